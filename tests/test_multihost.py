"""Trials over several hosts, emulated on this machine: JAX processes with gloo collectives
on loopback, 2 emulated CPU devices each, forming one 4-device mesh.

- Without Ray: two processes join with `rcig.multihost.initialize`, each builds only its
  own rows of a batch sharded over the 4 devices, they agree on a stop flag, and write one
  Orbax checkpoint together, which this (one-process, 4-device) test restores.
- On a real Ray cluster of 2 nodes on loopback (`ray.cluster_utils.Cluster`, 2 CPUs
  each), a sweep of 2-host trials: each trial is a STRICT_SPREAD placement group of two
  bundles, one worker process per node. A 2-host trial matches a 1-process 4-device run
  (outer-loss trajectory, distilled set, evaluation); a SIGKILL of one host's worker and
  a SIGTERM to one host each stop the whole trial, which resumes on a new placement from
  its committed step and ends as the uninterrupted run; a spec asking for more hosts
  than the cluster has is refused before any trial starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, assert_same_distilled, loopback_env, suite_pids, wait_for

CHILD = r"""
import json, os, sys
pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
from rcig import multihost as mh
mh.initialize(mh.Distributed(f"127.0.0.1:{port}", 2, pid))
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from rcig.checkpoint import CheckpointStore
mesh = jax.make_mesh((jax.device_count(),), ("data",), devices=jax.devices())
data = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
asked = []
def rows(lo, hi):
    asked.append([lo, hi])
    return data[lo:hi]
x = mh.global_batch(NamedSharding(mesh, P("data")), (16, 3), rows)
w = jax.device_put(np.full((3,), 2.0, np.float32), NamedSharding(mesh, P()))
step = jax.jit(lambda w, x: w * x.sum(0), out_shardings=NamedSharding(mesh, P()))
state = {"w": step(w, x), "n": jax.device_put(np.int32(7), NamedSharding(mesh, P()))}
stop = mh.any_process(pid == 1)   # only process 1 was asked to stop: both stop
store = CheckpointStore(out, keep=2)
store.save(3, state, {"ipc": 1}, force=True)
store.close()
print(json.dumps({"pid": pid, "devices": jax.device_count(), "local": jax.local_device_count(),
                  "asked": asked, "stop": stop, "w": np.asarray(state["w"]).tolist(),
                  "primary": mh.is_primary()}), flush=True)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_form_one_mesh_feed_their_rows_and_share_a_checkpoint(tmp_path):
    """No Ray: 2 processes x 2 CPU devices = a 4-device mesh; a checkpoint they write
    together restores in one process with 4 devices (another layout, same device count)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from rcig.checkpoint import CheckpointStore

    port = _free_port()
    env = {**os.environ, **loopback_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(i), str(port), str(tmp_path)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    want = (2.0 * np.arange(48, dtype=np.float32).reshape(16, 3).sum(0)).tolist()
    for i, o in enumerate(outs):
        assert (o["pid"], o["devices"], o["local"], o["primary"]) == (i, 4, 2, i == 0)
        assert o["asked"] == [[8 * i, 8 * i + 4], [8 * i + 4, 8 * i + 8]]  # its own rows only
        assert o["stop"] is True and o["w"] == want
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]

    mesh = jax.make_mesh((4,), ("data",))  # this process: 4 local devices
    rep = NamedSharding(mesh, P())
    target = {"w": jax.ShapeDtypeStruct((3,), np.float32, sharding=rep),
              "n": jax.ShapeDtypeStruct((), np.int32, sharding=rep)}
    state, config = CheckpointStore(str(tmp_path)).restore(target)
    assert np.asarray(state["w"]).tolist() == want and int(state["n"]) == 7 and config == {"ipc": 1}


# ---- on a Ray cluster of 2 nodes ----------------------------------------------------------

# Tiny, so that the two hosts' programs compile in about a minute on 2 shared cores; the
# later trials reuse them from JAX's disk cache.
TINY_MH = ["outer.proto_lr=0.003", "outer.learn_labels=true", "model.width=8", "outer.real_batch_size=64",
           "pool.model_count=2", "lr_tune.skip=true", "inner.n_steps=3", "hinv.n_steps=3",
           "pool.max_online_steps=3", "pool.n_max_steps=3", "loop=scan",
           "eval.runs=1", "eval.steps=100", "eval.baseline=false", "eval.every_steps=0",
           "checkpoint.every_steps=4", "checkpoint.every_seconds=0", "log_every=1", "steps=16",
           "search.space={}", "resources.cpu=2", "resources.hosts=2", "max_failures=2"]
QUICKSTART = str(ROOT / "sweeps" / "quickstart.yaml")


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from test_sweep import TEST_ENV

    os.environ.update(TEST_ENV)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    for _ in range(2):
        c.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    from orchestrator.sweep import init_ray

    init_ray(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


def _launch(address: str, tmp_path, name: str, sets=()):
    from orchestrator.sweep import launch

    return launch(QUICKSTART, storage_uri=str(tmp_path), name=name, address=address,
                  shared_storage=True, sets=TINY_MH + list(sets))


@pytest.fixture(scope="module")
def steady(cluster, tmp_path_factory):
    """One uninterrupted 2-host trial (the reference of every test here)."""
    root = tmp_path_factory.mktemp("mh")
    t0 = time.time()
    out = _launch(cluster.address, root, "steady")
    from orchestrator import manifest as mf

    rec = mf.read_records(out.sweep_uri)[0]
    return {"out": out, "rec": rec, "dir": Path(out.sweep_uri) / "trials" / rec.key,
            "wall_s": time.time() - t0}


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["outer/loss"]) for r in rows]


def _same_set(a: Path, b: Path, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert_same_distilled(a, b, rtol=rtol, atol=atol)


@pytest.mark.slow
@pytest.mark.ray
def test_two_host_trial_equals_one_process_on_four_devices(steady, tmp_path):
    from orchestrator import manifest as mf
    from rcig.config import DistillConfig
    from rcig.distill import run_distillation

    out, rec = steady["out"], steady["rec"]
    assert out.counts == {mf.COMPLETED: 1}, out
    assert rec.attempts == 1 and rec.accelerators == 4  # 2 hosts x 2 CPU devices
    nodes = {h.get("node_id") for h in rec.history}
    assert len(nodes) == 1 and None not in nodes
    # The same config in one process with 4 devices (this test process).
    import jax

    assert jax.device_count() == 4
    ref = run_distillation(DistillConfig.from_dict(rec.config), str(tmp_path / "one"), progress=False)
    got, want = _losses(steady["dir"]), _losses(tmp_path / "one")
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 17))
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-4)
    _same_set(steady["dir"] / "distilled.npz", tmp_path / "one" / "distilled.npz")
    ev = json.loads((steady["dir"] / "eval.json").read_text())
    np.testing.assert_allclose(ev["accs"], ref.eval["accs"], atol=0.02)
    print(f"2-host trial: {steady['wall_s']:.1f} s wall")


# The two fault tests below run 2-host trials again after `steady`, whose programs they
# take from JAX's disk cache.


def _host_worker_pid(sweep_dir: Path) -> int | None:
    """The worker process of host 1 (process 1) of the trial writing under `sweep_dir`."""
    for pid in suite_pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "orchestrator.trial_worker" in argv and any("rcig-host-" in a for a in argv):
            job = next(a for a in argv if "rcig-host-" in a)
            try:
                doc = json.loads(Path(job).read_text())
            except (OSError, ValueError):
                continue
            if str(sweep_dir) in doc.get("out_uri", "") and doc.get("distributed", {}).get("process_id") == 1:
                return pid
    return None


def _interrupt(address: str, tmp_path, name: str, sig: int):
    """Launch a 2-host trial; once it has committed a checkpoint, send `sig` to host 1's
    worker; return (outcome, record, trial folder, step it was signalled at)."""
    from orchestrator import manifest as mf

    box: dict = {}
    th = threading.Thread(target=lambda: box.update(out=_launch(address, tmp_path, name)))
    th.start()
    sweep = tmp_path / name

    def ready():
        recs = mf.read_records(str(sweep)) if sweep.exists() else []
        r = recs[0] if recs else None
        if r and (r.checkpoint_step or 0) >= 4 and (r.step or 0) < 12:
            pid = _host_worker_pid(sweep)
            return (pid, r) if pid else None
        return None

    pid, seen = wait_for(ready, 900, "a checkpoint of the 2-host trial")
    os.kill(pid, sig)
    th.join(timeout=400)
    assert not th.is_alive()
    rec = mf.read_records(str(sweep))[0]
    return box["out"], rec, sweep / "trials" / rec.key, seen.step or 0


def _interrupted_then_completed(address: str, tmp_path, name: str, sig: int):
    """`_interrupt` of a trial that must then complete; return (record, trial folder, step
    it was signalled at, its first attempt, its last attempt)."""
    from orchestrator import manifest as mf

    out, rec, run, signalled_at = _interrupt(address, tmp_path, name, sig)
    assert out.counts == {mf.COMPLETED: 1}, out
    return rec, run, signalled_at, rec.history[0], rec.history[-1]


@pytest.mark.slow
@pytest.mark.ray
def test_sigkill_of_one_host_stops_the_trial_which_resumes_elsewhere(cluster, steady, tmp_path):
    rec, run, _, first, last = _interrupted_then_completed(cluster.address, tmp_path, "killed", signal.SIGKILL)
    assert rec.attempts == 2 and rec.failures == 1 and first["outcome"] == "failed", rec.history
    assert "host 1's worker was killed by signal 9" in rec.errors[0]["traceback"], rec.errors
    assert last["outcome"] == "completed" and last["start_step"] >= 4  # resumed, not restarted
    _same_set(run / "distilled.npz", steady["dir"] / "distilled.npz", rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_to_one_host_checkpoints_that_step_and_resumes(cluster, steady, tmp_path):
    rec, run, signalled_at, first, last = _interrupted_then_completed(cluster.address, tmp_path, "noticed",
                                                                      signal.SIGTERM)
    assert rec.attempts == 2 and rec.preemptions == 1 and rec.failures == 0, rec.history
    assert first["outcome"] == "preempted"
    # Both hosts stopped at the step they were on and committed it (not the last periodic
    # checkpoint, every 4 steps); the next attempt started there.
    assert last["start_step"] >= max(signalled_at, 4), (signalled_at, rec.history)
    _same_set(run / "distilled.npz", steady["dir"] / "distilled.npz", rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.ray
def test_more_hosts_than_nodes_is_refused_before_any_trial(cluster, tmp_path):
    from orchestrator.sweep import SweepError, launch

    with pytest.raises(SweepError) as e:
        launch(QUICKSTART, storage_uri=str(tmp_path), name="toomany", address=cluster.address,
               shared_storage=True, sets=TINY_MH + ["resources.hosts=4"])
    msg = str(e.value)
    assert "\n" not in msg and "resources.hosts: a trial spans 4 hosts" in msg and "only 2 node(s)" in msg, msg
    assert not (tmp_path / "toomany").exists()
