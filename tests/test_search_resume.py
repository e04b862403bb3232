"""Every search algorithm resumes after its driver is killed, without proposing again a
trial it already ran: `rcig sweep launch` (a subprocess, with the local Ray it started)
is killed mid-sweep, `rcig sweep resume` finishes the sweep, no trial that had finished
runs again, and the sweep ends with the trials it was asked for.

Tiny trials (width 8, 20 steps, no LR search, a 30-step evaluation), one at a time (two
for PBT, whose population runs together, synchronously: see tests/test_pbt.py), searched over fields that do not change the
compiled step (the run seed, the probe's learning rate) or over two listed values of
one that does, so every trial's programs come from JAX's disk cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator import manifest as mf
from orchestrator.pbt import lineage

from conftest import loopback_env, wait_for
from test_search_e2e import TEST_ENV, TINY, _searcher_study

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
COMMON = TINY + ["steps=20", "max_concurrent=1"]
CASES = {
    "grid": ("digits_grid.yaml", ["search.space={seed: {grid: [0, 1]}}", "num_samples=1"], 2),
    "random": ("digits_random.yaml", ["search.space={seed: {randint: [0, 1000]}}", "num_samples=2"], 2),
    "optuna": ("digits_optuna.yaml", ["search.space={seed: {randint: [0, 1000]}, "
                                      "eval.probe_lr: {loguniform: [0.001, 0.1]}}", "num_samples=2"], 2),
    # Rungs at 10 and 20: a stopped trial has run 10 steps (a checkpoint at 5) first.
    "asha": ("digits_asha.yaml", ["search.space={seed: {randint: [0, 1000]}}", "num_samples=2",
                                  "scheduler.grace_period=10"], 2),
    "pbt": ("digits_pbt.yaml", ["search.space={outer.proto_lr: {choice: [0.003, 0.004]}, "
                                "eval.probe_lr: {grid: [0.03, 0.000001]}}", "num_samples=1",
                                "max_concurrent=2", "scheduler.perturbation_interval=5",
                                "scheduler.quantile_fraction=0.5", "scheduler.resample_probability=0",
                                "scheduler.mutations=[outer.proto_lr]", "scheduler.synch=true"], 2),
}


def _snapshot(sweep: str) -> dict[str, tuple]:
    """What shows a finished trial ran again: its attempts, history and metrics file."""
    out = {}
    for r in mf.read_records(sweep):
        if r.status in mf.FINAL_STATES:
            metrics = Path(mf.trial_uri(sweep, r.key)) / "metrics.jsonl"
            out[r.key] = (r.status, r.attempts, len(r.history), metrics.read_bytes())
    return out


@pytest.mark.parametrize("algo", list(CASES))
def test_driver_killed_mid_sweep_resumes_without_rerunning(algo, tmp_path):
    spec, sets, n = CASES[algo]
    ray_tmp = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, **loopback_env(), **TEST_ENV, "RCIG_SWEEP_ROOT": str(tmp_path),
           "RAY_TMPDIR": ray_tmp}
    argv = [sys.executable, str(ROOT / "cli.py"), "sweep", "launch", str(ROOT / "sweeps" / spec)]
    for s in COMMON + sets + [f"name={algo}"]:
        argv += ["--set", s]
    log = open(tmp_path / "launch.log", "w")
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    sweep = str(tmp_path / algo)

    def mid_sweep():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended before it was killed:\n{(tmp_path / 'launch.log').read_text()[-3000:]}")
        recs = mf.read_records(sweep) if os.path.exists(sweep) else []
        final = [r for r in recs if r.status in mf.FINAL_STATES]
        # ASHA may stop the second trial at its first rung, 5 steps after its first
        # checkpoint: too short a window to poll for, so any trial under way will do there.
        least = 0 if algo == "asha" else 5
        going = [r for r in recs if r.status not in mf.FINAL_STATES and (r.checkpoint_step or 0) >= least]
        if algo == "pbt":  # the population runs together: kill once an exploit is done
            exploited = any(lineage(mf.trial_uri(sweep, r.key))["exploits"] for r in recs)
            return recs if exploited and going else None
        return recs if final and going else None

    try:
        wait_for(mid_sweep, 600, f"{algo}: a finished trial and one under way", every=0.3)
        before = _snapshot(sweep)
        lineages = {r.key: lineage(mf.trial_uri(sweep, r.key))["exploits"] for r in mf.read_records(sweep)}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        except ProcessLookupError:
            pass
        proc.wait()
    time.sleep(1)

    try:
        p = subprocess.run([sys.executable, str(ROOT / "cli.py"), "sweep", "resume", algo], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    recs = {r.key: r for r in mf.read_records(sweep)}
    from ray.tune import ExperimentAnalysis

    tune_keys = {os.path.basename(t.path) for t in ExperimentAnalysis(sweep).trials}
    assert len(tune_keys) == n, tune_keys  # the trials asked for, no more
    # Every record is one of them, or (a searcher's proposal made after Ray's last save of
    # its state) a trial the resume marked STOPPED and never ran again.
    extra = set(recs) - tune_keys
    assert all(recs[k].status == mf.STOPPED and recs[k].attempts == 1 for k in extra), extra
    assert all(r.status in mf.FINAL_STATES for r in recs.values()), {k: r.status for k, r in recs.items()}
    for key, (status, attempts, history, metrics) in before.items():  # finished: not rerun
        r = recs[key]
        assert (r.status, r.attempts, len(r.history)) == (status, attempts, history), key
        assert (Path(mf.trial_uri(sweep, key)) / "metrics.jsonl").read_bytes() == metrics, key
    if algo != "pbt":
        assert before, "nothing had finished before the kill"
    if algo != "pbt":  # new proposals: the params of a finished trial never again
        params = [json.dumps(r.params, sort_keys=True) for r in recs.values()]
        assert len(params) == len(set(params)), params
    if algo == "optuna":  # the study came back with the trials it had been told of
        study = _searcher_study(sweep)
        done = [t for t in study.trials if t.state.name == "COMPLETE"]
        assert len(done) == n
        told = {json.dumps(t.params, sort_keys=True) for t in done}
        assert {json.dumps(recs[k].params, sort_keys=True) for k in before} <= told
    if algo == "pbt":  # an exploit is applied once: a restarted trial resumes its own state
        for key, old in lineages.items():
            now = lineage(mf.trial_uri(sweep, key))["exploits"]
            ids = [e["pointer"] for e in now]
            assert len(ids) == len(set(ids)) and ids[:len(old)] == [e["pointer"] for e in old]
