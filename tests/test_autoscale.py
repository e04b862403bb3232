"""Sweeps on a real autoscaling Ray cluster on this machine (conftest.AutoscalingRay).

The head has no CPUs; two worker node types start at zero nodes: `cpu_worker` (1 CPU)
and `tpu_worker`, which advertises what a TPU v4-8 host does (`TPU: 4`,
`TPU-v4-8-head`, `accelerator_type:TPU-V4`). The autoscaler (v2, as `ray up` and KubeRay
run it in Ray 2.60) adds and removes real raylets on loopback. The cluster uses token
authentication, so every connection here also covers `--address` of a token cluster.

A TPU trial cannot run JAX on this machine (no libtpu): the accelerator type is covered by
the preflight (accepted, and the autoscaler starts that type from zero, which then scales
back down); full sweeps run on the CPU type.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator import manifest as mf
from orchestrator.sweep import SweepError, init_ray, launch
from orchestrator.preflight import preflight
from orchestrator.spec import load_spec

from conftest import AutoscalingRay, assert_same_distilled, raylet_node_ips, wait_for
from test_sweep import QUICKSTART, TEST_ENV, TINY

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
IDLE_S = 10
TPU_TYPE = {"CPU": 1, "TPU": 4, "TPU-v4-8-head": 1, "accelerator_type:TPU-V4": 1}


@pytest.fixture(scope="module")
def cluster():
    import ray

    os.environ.update(TEST_ENV)
    c = AutoscalingRay({"cpu_worker": {"resources": {"CPU": 1}, "max_workers": 2},
                        "tpu_worker": {"resources": dict(TPU_TYPE), "max_workers": 1}},
                       idle_timeout_s=IDLE_S, max_workers=3).start()
    try:
        init_ray(address=c.address)  # as `rcig sweep launch --address` connects
        yield c
    finally:
        ray.shutdown()
        c.stop()


def _types(c) -> list[str]:
    return sorted(n["type"] for n in c.workers())


@contextlib.contextmanager
def _sampling(sample, every_s: float = 0.2):
    """Calls `sample()` every `every_s` seconds in a thread while the block runs; its
    errors are ignored (nodes vanish between calls, the sweep folder appears during the run)."""
    done = threading.Event()

    def watch():
        while not done.is_set():
            try:
                sample()
            except Exception:  # noqa: BLE001 - see the docstring
                pass
            time.sleep(every_s)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        yield
    finally:
        done.set()
        th.join(timeout=5)


@pytest.mark.parametrize("sets, why", [
    (["resources.tpu=8", "resources.accelerator_type=TPU-V4"], "TPU': 8.0"),  # too many chips
    (["resources.tpu=4", "resources.accelerator_type=TPU-V5LITEPOD"], "accelerator_type:TPU-V5LITEPOD"),
    (["resources.cpu=4"], "{'CPU': 4.0}"),                                     # more CPUs than any type
])
def test_preflight_rejects_what_no_node_type_holds_before_any_trial(cluster, tmp_path, sets, why):
    t0 = time.time()
    with pytest.raises(SweepError) as e:
        launch(QUICKSTART, storage_uri=str(tmp_path), address=cluster.address, shared_storage=True,
               sets=TINY + ["search.space={}"] + sets)
    msg = str(e.value)
    assert "\n" not in msg and why in msg, msg
    assert "its autoscaler reports that no node type it can add holds it" in msg, msg
    assert "node types seen so far" in msg and "ray.head.default" in msg, msg
    assert not (tmp_path / "quickstart").exists()  # nothing written, no trial started
    assert time.time() - t0 < 30


def test_preflight_accepts_an_accelerator_type_after_scale_up_from_zero(cluster):
    wait_for(lambda: not cluster.workers(), 60 + IDLE_S, "no worker nodes")
    spec = load_spec(QUICKSTART, sets=["resources.tpu=4", "resources.accelerator_type=TPU-V4"])
    t0 = time.time()
    notes = preflight(spec, cluster.address)  # no live node holds it: the autoscaler decides
    assert any("tpu_worker" in n for n in notes), notes
    wait_for(lambda: "tpu_worker" in _types(cluster), 60, "a tpu_worker node")
    up = time.time() - t0
    tpu = next(n for n in cluster.workers() if n["type"] == "tpu_worker")
    assert tpu["resources"]["TPU"] == 4 and tpu["resources"]["accelerator_type:TPU-V4"] == 1
    assert set(raylet_node_ips((str(cluster.dir),)).values()) == {"127.0.0.1"}
    assert len(raylet_node_ips((str(cluster.dir),))) == 2  # head + the new node, both on loopback
    wait_for(lambda: not cluster.workers(), IDLE_S + 60, "the idle tpu_worker to be removed")
    print(f"tpu_worker from zero: up {up:.1f} s after preflight; removed {time.time() - t0 - up:.1f} s later")


def test_cpu_sweep_scales_from_zero_keeps_max_concurrent_and_scales_down(cluster, tmp_path):
    """3 trials of 1 CPU, max_concurrent=2, on 1-CPU nodes that start at zero: the
    autoscaler adds cpu_worker nodes and the trials run there, no more than 2 at once,
    never two on one node at once, and the nodes go after the sweep."""
    wait_for(lambda: not cluster.workers(), 60 + IDLE_S, "no worker nodes")
    sweep = tmp_path / "asweep"
    seen: dict[str, str] = {}      # node id -> node type, while the sweep runs
    busy: list[int] = []           # trials running at once, sampled
    first_step: dict = {}

    def sample():
        for n in cluster.workers():
            seen[n["id"]] = n["type"]
        recs = mf.read_records(str(sweep))
        busy.append(sum(1 for r in recs if r.history and r.history[-1].get("outcome") is None))
        if "t" not in first_step and any(r.step is not None for r in recs):
            first_step["t"] = time.time()

    with _sampling(sample):
        t0 = time.time()
        out = launch(QUICKSTART, storage_uri=str(tmp_path), name="asweep", address=cluster.address,
                     shared_storage=True, sets=TINY + ["max_concurrent=2", "search.space.seed={grid: [0, 1, 2]}"])
    wall = time.time() - t0
    assert out.counts == {mf.COMPLETED: 3}, out
    recs = mf.read_records(out.sweep_uri)
    nodes = {h["node_id"] for r in recs for h in r.history}
    assert nodes and all(seen.get(n) == "cpu_worker" for n in nodes), (nodes, seen)
    assert 1 <= max(busy) <= 2, "max_concurrent=2 was exceeded"
    spans = [(h["started"], h["ended"], h["node_id"]) for r in recs for h in r.history]
    # At any moment at most 2 trials (a sweep over start/end events), and never two at
    # once on one 1-CPU node (0.5 s of slack for the record's clock).
    running, peak = 0, 0
    for _, delta in sorted([(a, 1) for a, _, _ in spans] + [(b - 0.5, -1) for _, b, _ in spans]):
        running += delta
        peak = max(peak, running)
    assert peak <= 2, spans
    for a, b in itertools.combinations(spans, 2):
        assert a[2] != b[2] or a[1] - 0.5 <= b[0] or b[1] - 0.5 <= a[0], spans
    # Nodes came: two cpu_workers. (With both busy, Tune's pending placement group for the
    # third trial may make the autoscaler add a tpu_worker too: it has a CPU. Trials still
    # ran on cpu_workers only, asserted above.)
    assert sum(1 for t in seen.values() if t == "cpu_worker") >= 2, seen
    assert all(r.attempts == 1 and r.failures == 0 for r in recs)
    t_down = time.time()
    wait_for(lambda: not cluster.workers(), IDLE_S + 60, "the cluster to scale back to zero workers")
    print(f"cpu sweep (3 trials, max_concurrent=2) from zero workers: first trial step "
          f"{first_step['t'] - t0:.1f} s after launch, sweep {wall:.1f} s, back to zero workers "
          f"{time.time() - t_down:.1f} s after it ended")


def test_accelerator_host_sweep_scales_its_type_from_zero_and_back(cluster, tmp_path):
    """A sweep whose trials need the accelerator host's own resource (a TPU slice head's
    `TPU-v4-8-head`, through `resources.custom`) scales that node type up from zero, runs
    there, finishes, and the node goes after. JAX runs on the host's CPU: no TPU chips here."""
    wait_for(lambda: not cluster.workers(), 60 + IDLE_S, "no worker nodes")
    seen: dict[str, str] = {}
    with _sampling(lambda: seen.update({n["id"]: n["type"] for n in cluster.workers()})):
        out = launch(QUICKSTART, storage_uri=str(tmp_path), name="accsweep", address=cluster.address,
                     shared_storage=True, sets=TINY + ["search.space={}", "resources.custom={TPU-v4-8-head: 1}"])
    assert out.counts == {mf.COMPLETED: 1}, out
    rec = mf.read_records(out.sweep_uri)[0]
    assert rec.history and all(seen.get(h["node_id"]) == "tpu_worker" for h in rec.history), (rec.history, seen)
    wait_for(lambda: not cluster.workers(), IDLE_S + 60, "the tpu_worker to be removed")


def _cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _errors(r: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error")]


@pytest.mark.parametrize("case", ["wrong", "missing", "mode unset"])
def test_token_problems_are_one_line_saying_where_the_token_is_read(cluster, tmp_path, case):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["RAY_AUTH_MODE"] = "token"
    if case == "wrong":
        env["RAY_AUTH_TOKEN"] = "not-the-cluster-token"
    elif case == "missing":
        env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token there
    else:
        env.pop("RAY_AUTH_MODE")
    t0 = time.time()
    r = _cli(["sweep", "launch", QUICKSTART, "--address", cluster.address, "--storage", str(tmp_path),
              "--shared-storage", "--set", "steps=10"], env)
    assert r.returncode != 0
    err = _errors(r)
    assert len(err) == 1, r.stderr[-3000:]
    assert "RAY_AUTH_TOKEN" in err[0] and "~/.ray/auth_token" in err[0], err[0]
    assert {"wrong": "rejected the one from $RAY_AUTH_TOKEN", "missing": "none was found",
            "mode unset": "set RAY_AUTH_MODE=token"}[case] in err[0], err[0]
    assert time.time() - t0 < 60


def test_preflight_through_ray_client(cluster, tmp_path):
    """`--address ray://...`: the cluster is read on the cluster (a zero-CPU task)."""
    script = (
        "import sys\n"
        "from orchestrator.sweep import SweepError, init_ray, preflight\n"
        "from orchestrator.spec import load_spec\n"
        f"init_ray({cluster.client_address!r})\n"
        f"ok = preflight(load_spec({QUICKSTART!r}, sets=['resources.cpu=1']), 'client')\n"
        "print('ACCEPTED', ok)\n"
        "try:\n"
        f"    preflight(load_spec({QUICKSTART!r}, sets=['resources.tpu=8']), 'client')\n"
        "except SweepError as e:\n"
        "    print('REJECTED', e)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "token"},
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ACCEPTED" in r.stdout and "REJECTED" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "its autoscaler reports that no node type it can add holds it" in r.stdout


def test_node_terminated_by_the_provider_mid_trial_resumes_on_a_new_node(cluster, tmp_path):
    """The autoscaler itself ends the node under a running trial (its type's max_workers
    drops to 0: the provider terminates it, as a cloud would a preempted VM); when the type
    may run again, a new node comes up and the trial resumes there from its checkpoint,
    ending equal to an uninterrupted run."""
    wait_for(lambda: not cluster.workers(), 60 + IDLE_S, "no worker nodes")
    sets = TINY + ["steps=40", "checkpoint.every_steps=5", "search.space={}"]
    sweep = str(tmp_path / "lossy")
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(out=launch(
        QUICKSTART, storage_uri=str(tmp_path), name="lossy", address=cluster.address,
        shared_storage=True, sets=sets)))
    th.start()
    try:
        def checkpointed():
            recs = mf.read_records(sweep)
            r = recs[0] if recs else None
            return r if r and (r.checkpoint_step or 0) >= 5 and r.history and r.history[-1].get("node_id") else None

        rec = wait_for(checkpointed, 300, "the first checkpoint")
        victim = rec.history[-1]["node_id"]
        assert victim in {n["id"] for n in cluster.workers()}
        t_term = time.time()
        cluster.set_max_workers("cpu_worker", 0)
        wait_for(lambda: victim not in {n["id"] for n in cluster.workers()}, 60, "the provider to end the node")
        t_gone = time.time()
        cluster.set_max_workers("cpu_worker", 2)

        def resumed():
            recs = mf.read_records(sweep)
            r = recs[0] if recs else None
            if r and r.attempts >= 2 and r.step is not None and r.history[-1].get("start_step") is not None \
                    and r.step > r.history[-1]["start_step"]:
                return time.time()
            return None

        t_step = wait_for(resumed, 300, "the trial's next step on a new node")
    finally:
        cluster.set_max_workers("cpu_worker", 2)
        th.join(timeout=600)
    assert not th.is_alive() and box["out"].counts == {mf.COMPLETED: 1}, box
    rec = mf.read_records(sweep)[0]
    first, last = rec.history[0], rec.history[-1]
    # Usually 2 attempts; the autoscaler may also end a replacement node it had just started
    # while it re-read the config, which is one more node loss, never a failure.
    assert rec.attempts >= 2 and rec.failures == 0, rec.history
    assert last["outcome"] == "completed" and last["node_id"] != first["node_id"]
    assert last["start_step"] >= 5  # resumed from a checkpoint, not from scratch
    print(f"provider termination: node gone {t_gone - t_term:.1f} s after the autoscaler was told, "
          f"trial's next step {t_step - t_term:.1f} s after (new node from zero included)")

    ref = launch(QUICKSTART, storage_uri=str(tmp_path), name="steady", address=cluster.address,
                 shared_storage=True, sets=sets)
    assert ref.counts == {mf.COMPLETED: 1}
    assert_same_distilled(Path(sweep) / "trials" / rec.key / "distilled.npz",
                          tmp_path / "steady" / "trials" / rec.key / "distilled.npz")


@pytest.mark.gcs
def test_readme_sequence_through_ray_client_on_gs_storage(cluster, gcs_bucket, tmp_path):
    """README "Launch on a cluster", after `ray attach`: launch through Ray Client with the
    sweep in a bucket (loopback GCS emulator), then status, best, fetch and resume from the
    bucket, each a fresh `rcig` process."""
    import json

    env = {**os.environ, "RAY_AUTH_MODE": "token", "RCIG_TUNE_VERBOSE": "0"}
    root = f"{gcs_bucket}/sweeps"
    sets = [a for kv in TINY + ["search.space={}"] for a in ("--set", kv)]
    t0 = time.time()
    r = _cli(["sweep", "launch", QUICKSTART, "--address", cluster.client_address, "--storage", root, *sets],
             env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    uri = f"{root}/quickstart"
    assert f"-> {uri}" in r.stdout, r.stdout
    launched = time.time() - t0
    r = _cli(["sweep", "status", uri, "--json"], env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [t["status"] for t in json.loads(r.stdout)["trials"]] == ["COMPLETED"]
    r = _cli(["best", uri], env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli(["fetch", uri, "--to", str(tmp_path / "best")], env)
    assert r.returncode == 0 and (tmp_path / "best" / "distilled.npz").exists(), r.stderr[-2000:]
    r = _cli(["sweep", "resume", uri, "--address", cluster.client_address], env, timeout=300)
    assert r.returncode == 0 and "1 COMPLETED" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    print(f"launch through Ray Client onto gs:// (from zero workers): {launched:.1f} s")
