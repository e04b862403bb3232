"""The run-folder lease is a lock: one writer, decided by a conditional write.

Races run two real processes against one folder many times, on local disk and on the
loopback GCS emulator (which, like GCS, honours `ifGenerationMatch`; see conftest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from rcig import lease, storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RACER = os.path.join(REPO, "tests", "lease_racer.py")


def test_second_contender_is_refused_then_takes_a_released_lease(tmp_path):
    folder = str(tmp_path / "run")
    a = lease.acquire(folder, wait_s=0, heartbeat=30)
    with pytest.raises(lease.LeaseHeld, match=r"in use by attempt None \(pid \d+"):
        lease.acquire(folder, wait_s=0.3, heartbeat=30, poll_s=0.05)
    a.release()
    b = lease.acquire(folder, wait_s=0, heartbeat=30)
    assert b.owner != a.owner
    b.release()


def test_stale_lease_is_taken_over_after_the_stale_period(tmp_path):
    folder = str(tmp_path / "run")
    a = lease.acquire(folder, wait_s=0, heartbeat=0.2)
    a._done.set()  # the holder stops renewing (frozen or dead) without releasing
    a._thread.join()
    t = time.monotonic()
    b = lease.acquire(folder, wait_s=5, heartbeat=0.2, poll_s=0.05)
    assert 0.5 <= time.monotonic() - t < 3  # waited ~3 heartbeats, not the whole wait
    assert json.loads(storage.read_text(lease.lease_uri(folder)))["owner"] == b.owner
    b.release()


def test_renewal_fails_once_taken_over_and_the_holder_is_told(tmp_path):
    folder = str(tmp_path / "run")
    told = []
    a = lease.acquire(folder, wait_s=0, heartbeat=0.1, on_lost=told.append)
    cur = storage.read_versioned(lease.lease_uri(folder))
    storage.write_if(lease.lease_uri(folder), json.dumps({"owner": "other", "t": time.time()}), cur.version)
    assert a.lost.wait(3)
    assert told and "taken over" in told[0]
    a.release()  # must not overwrite the new holder's lease
    assert json.loads(storage.read_text(lease.lease_uri(folder)))["owner"] == "other"


def test_a_lease_renewed_by_its_holder_is_never_taken(tmp_path):
    folder = str(tmp_path / "run")
    a = lease.acquire(folder, wait_s=0, heartbeat=0.1)
    with pytest.raises(lease.LeaseHeld):
        lease.acquire(folder, wait_s=1.0, heartbeat=0.1, poll_s=0.05)  # > 3 heartbeats
    assert not a.lost.is_set()
    a.release()


def _race(base: str, rounds: int, mode: str, env: dict[str, str]) -> list[list[str]]:
    if mode == "stale":
        for k in range(rounds):
            old = {"owner": "dead", "pid": 1, "host": "gone", "t": time.time() - 3600, "released": False}
            storage.write_text(lease.lease_uri(storage.join(base, f"r{k}")), json.dumps(old))
    gap = 0.6
    t0 = time.time() + 4.0  # both interpreters are up before the first round
    procs = [subprocess.Popen([sys.executable, RACER, base, str(rounds), str(t0), str(gap), mode],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.split("\n"))
    winners = []
    for k in range(rounds):
        won = [i for i, out in enumerate(outs) if f"{k} won" in out]
        lost = [i for i, out in enumerate(outs) if f"{k} lost" in out]
        assert len(won) == 1 and len(lost) == 1, (k, outs)
        writers = [n for n in storage.listdir(storage.join(base, f"r{k}")) if n.startswith("w-")]
        assert len(writers) == 1, (k, writers)
        winners.append(won[0])
    return winners


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.parametrize("mode", ["fresh", "stale"])
def test_two_processes_race_for_a_local_folder(tmp_path, mode):
    _race(str(tmp_path / "sweep"), 25, mode, _env())


@pytest.mark.gcs
@pytest.mark.parametrize("mode", ["fresh", "stale"])
def test_two_processes_race_for_a_gcs_folder(gcs_bucket, mode):
    _race(f"{gcs_bucket}/sweep", 10, mode, _env())


@pytest.mark.gcs
def test_gcs_conditional_write_refuses_a_stale_version(gcs_bucket):
    uri = f"{gcs_bucket}/obj.json"
    assert storage.read_versioned(uri) is None
    v1 = storage.write_if(uri, "a", None)
    assert not storage.create_exclusive(uri, "b")
    v2 = storage.write_if(uri, "c", v1)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if(uri, "d", v1)
    assert storage.read_versioned(uri) == storage.Versioned("c", v2)


def test_trial_worker_refuses_a_folder_held_by_a_live_attempt(tmp_path):
    """A second attempt on a trial folder whose lease is renewed writes nothing: it waits
    its bounded time, then exits 76 naming the holder."""
    from orchestrator.trial_worker import EXIT_LEASE_HELD

    folder = tmp_path / "trial"
    held = lease.acquire(str(folder), wait_s=0, heartbeat=0.2, info={"attempt": 1})
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"config": {}, "out_uri": str(folder), "attempt": 2,
                               "parent_pid": os.getpid()}))
    r, w = os.pipe()
    env = dict(_env(), RCIG_LEASE_HEARTBEAT_S="0.2")
    p = subprocess.Popen([sys.executable, "-m", "orchestrator.trial_worker", str(job), str(w)],
                         cwd=REPO, env=env, pass_fds=(w,))
    os.close(w)
    with os.fdopen(r) as events:
        lines = events.read().splitlines()
    assert p.wait(timeout=60) == EXIT_LEASE_HELD
    err = json.loads(lines[-1])
    assert err["event"] == "error" and "in use by attempt 1" in err["traceback"]
    assert sorted(os.listdir(folder)) == ["lease.json"]  # nothing else written
    assert not held.lost.is_set()
    held.release()


@pytest.mark.slow
def test_rcig_distill_refuses_a_run_folder_another_live_run_writes(tmp_path):
    """Two `rcig distill --out DIR` at once: the second waits out the stale period, sees a
    live holder and refuses in one line; the first finishes untouched."""
    rcig = os.path.join(os.path.dirname(sys.executable), "rcig")
    out = str(tmp_path / "run")
    env = dict(_env(), RCIG_LEASE_HEARTBEAT_S="0.5")
    cmd = [rcig, "distill", "--out", out, "--quiet", "--no-eval", "--set", "steps=30",
           "--set", "model.width=8", "--set", "pool.model_count=2", "--set", "lr_tune.skip=true",
           "--set", "outer.real_batch_size=64"]
    first = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not os.path.exists(lease.lease_uri(out)) and time.time() < deadline:
        time.sleep(0.1)
    second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode != 0
    assert "in use by" in second.stderr and "Traceback" not in second.stderr, second.stderr
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    doc = json.loads(storage.read_text(lease.lease_uri(out)))
    assert doc["released"] and doc["pid"] == first.pid
