"""Ray Tune sweeps on a real local Ray (2 CPUs): quickstart end to end, leaderboard,
fetch, Ray's own reader, a damaged tuner.pkl, a preemption notice, a raising trial,
and everything on gs:// (loopback GCS emulator) from a fresh process.

Trials run real distillation on digits with tiny overrides (seconds each).
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
from typer.testing import CliRunner

import cli
from orchestrator import manifest as mf
from orchestrator.results import best, fetch
from orchestrator.sweep import launch, resume

from conftest import loopback_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "sweeps" / "quickstart.yaml")
# Tiny real distillation: each trial takes seconds on one CPU once compiled. Tests vary
# only what is not compiled in (seed, steps, checkpoint interval), so every trial of the
# session reuses one program from JAX's disk cache (the trial's default cache dir).
TINY = ["outer.proto_lr=0.003", "outer.learn_labels=true", "model.width=8", "outer.real_batch_size=64", "pool.model_count=3", "lr_tune.skip=true",
        "eval.runs=2", "eval.steps=50", "eval.baseline=false", "checkpoint.every_steps=5",
        "checkpoint.every_seconds=0", "log_every=1", "steps=10"]
TEST_ENV = {"RCIG_LEASE_HEARTBEAT_S": "1", "RCIG_RECORD_MIN_INTERVAL_S": "0.3",
            "RCIG_TUNE_VERBOSE": "0"}


@pytest.fixture(scope="module")
def quick(ray_local, tmp_path_factory):
    """The quickstart, shrunk: 2 trials of real distillation, run once for the module."""
    root = tmp_path_factory.mktemp("sweeps")
    t0 = time.time()
    out = launch(QUICKSTART, storage_uri=str(root), sets=TINY + ["search.space.seed={grid: [0, 1]}"])
    out.wall_s = time.time() - t0
    return out


def test_quickstart_completes_best_and_fetch(quick, tmp_path):
    assert quick.counts == {mf.COMPLETED: 2}, quick
    recs = mf.read_records(quick.sweep_uri)
    assert all(r.attempts == 1 and r.preemptions == 0 and r.failures == 0 for r in recs)
    assert all(r.eval and len(r.eval["accs"]) == 2 for r in recs)
    assert all(r.accelerator_s > 0 for r in recs)
    rows = best(quick.sweep_uri, top=5)  # ranked on validation; test reported beside it
    assert [r["value"] for r in rows] == sorted((r.eval["val_mean"] for r in recs), reverse=True)
    assert sorted(r["eval_mean"] for r in rows) == sorted(r.eval["mean"] for r in recs)
    got = fetch(quick.sweep_uri, str(tmp_path / "best"))
    assert got["key"] == rows[0]["key"]
    for name in ("distilled.npz", "distilled.png", "eval.json", "config.json"):
        assert (tmp_path / "best" / name).is_file(), name
    assert json.loads((tmp_path / "best" / "eval.json").read_text())["mean"] == rows[0]["eval_mean"]
    arrays = np.load(tmp_path / "best" / "distilled.npz")
    assert arrays[arrays.files[0]].shape[0] >= 10
    assert got["checkpoint_step"] == 10 and (tmp_path / "best" / "checkpoint" / "10").is_dir()
    # The named trial, by prefix.
    other = rows[1]["key"]
    assert fetch(quick.sweep_uri, str(tmp_path / "o"), trial=other[:20])["key"] == other


def test_ray_experiment_analysis_reads_sweep_folder(quick):
    from ray.tune import ExperimentAnalysis

    ea = ExperimentAnalysis(quick.sweep_uri, default_metric="val/acc", default_mode="max")
    assert len(ea.trials) == 2 and {t.status for t in ea.trials} == {"TERMINATED"}
    top = best(quick.sweep_uri, top=1)[0]
    assert ea.best_config == top["params"]
    # Tune got the Orbax pointer, never a copy of the checkpoint.
    assert ea.best_result["rcig/checkpoint_step"] == 10
    assert ea.best_result["rcig/checkpoint_uri"].endswith(f"{top['key']}/checkpoints")
    assert not list(Path(quick.sweep_uri).glob("*/checkpoint_0*"))


def test_cli_status_best_fetch_hints(quick, tmp_path):
    r = CliRunner().invoke(cli.app, ["sweep", "status", quick.sweep_uri, "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    assert st["counts"] == {"COMPLETED": 2} and all(t["checkpoint_step"] == 10 for t in st["trials"])
    r = CliRunner().invoke(cli.app, ["sweep", "status", quick.sweep_uri])
    assert "COMPLETED" in r.output and f"rcig report {quick.sweep_uri}" in r.output
    r = CliRunner().invoke(cli.app, ["best", quick.sweep_uri, "--top", "1"])
    assert r.exit_code == 0 and "rcig fetch" in r.output and "rcig report" in r.output
    r = CliRunner().invoke(cli.app, ["best", quick.sweep_uri, "--metric", "outer/loss", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)[0]["metric"] == "outer/loss"
    r = CliRunner().invoke(cli.app, ["fetch", quick.sweep_uri, "--to", str(tmp_path / "f")])
    assert r.exit_code == 0 and "distilled.npz" in r.output and "next:" in r.output


def test_truncated_tuner_pkl_status_best_fetch_resume(quick, tmp_path):
    pkl = Path(quick.sweep_uri) / "tuner.pkl"
    pkl.write_bytes(pkl.read_bytes()[: pkl.stat().st_size // 3])
    for argv in (["sweep", "status", quick.sweep_uri], ["best", quick.sweep_uri],
                 ["fetch", quick.sweep_uri, "--to", str(tmp_path / "f")]):
        r = CliRunner().invoke(cli.app, argv)
        assert r.exit_code == 0, (argv, r.output)
    before = {r.key: r.attempts for r in mf.read_records(quick.sweep_uri)}
    out = resume(quick.sweep_uri)
    assert any("unreadable" in n for n in out.notes), out.notes
    assert out.counts == {mf.COMPLETED: 2}
    assert {r.key: r.attempts for r in mf.read_records(quick.sweep_uri)} == before  # not rerun


def test_relaunch_adopts_finished_trials(quick):
    before = {r.key: r.attempts for r in mf.read_records(quick.sweep_uri)}
    root = str(Path(quick.sweep_uri).parent)
    out = launch(QUICKSTART, storage_uri=root, sets=TINY + ["search.space.seed={grid: [0, 1]}"])
    assert any("adopted" in n for n in out.notes)
    assert {r.key: r.attempts for r in mf.read_records(quick.sweep_uri)} == before


@pytest.mark.parametrize("target", ["distill_process", "ray_worker"])
def test_sigterm_notice_checkpoints_current_step_and_resumes(ray_local, tmp_path, target):
    """SIGTERM to the process running the distillation (clean notice path), or to the
    trial's Ray worker (Ray exits it at once; its distillation child gets SIGTERM from
    the kernel and still commits the current step)."""
    # The periodic checkpoint (every 150) lies far beyond where the notice lands (a few
    # steps after step 3 even on a fast idle machine), so a resume at the notice step
    # cannot be mistaken for a resume at a periodic one.
    n_steps, every = 200, 150
    sets = TINY + [f"steps={n_steps}", f"checkpoint.every_steps={every}", "search.space={}", "name=notice"]
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(out=launch(QUICKSTART, storage_uri=str(tmp_path), sets=sets)))
    th.start()
    sweep = str(tmp_path / "notice")

    def running():
        recs = mf.read_records(sweep)
        r = recs[0] if recs else None
        return r if r and r.history and r.history[-1].get("pid") and (r.step or 0) >= 3 else None

    rec = wait_for(running, 240, "the trial to run a few steps")
    t_notice = time.time()
    os.kill(rec.history[-1]["pid" if target == "distill_process" else "worker_pid"], signal.SIGTERM)
    th.join(timeout=300)
    assert not th.is_alive() and box["out"].counts == {mf.COMPLETED: 1}
    rec = mf.read_records(sweep)[0]
    first, second = rec.history[0], rec.history[1]
    assert second["outcome"] == "completed" and rec.status == mf.COMPLETED, rec.history
    assert rec.preemptions == 1 and rec.failures == 0 and rec.attempts == 2
    resumed_at = second["start_step"]  # the notice checkpoint, off the every_steps grid
    assert 3 <= resumed_at < every, rec.history
    if target == "distill_process":  # the worker saw the clean exit and recorded it
        assert first["outcome"] == "preempted" and first["end_step"] == resumed_at
        print(f"SIGTERM -> checkpoint committed and attempt closed: {first['ended'] - t_notice:.2f} s")
    else:  # the worker died at once: the next attempt books the loss
        assert first["outcome"] == "lost"
    steps = [json.loads(line)["step"] for line in (Path(sweep) / "trials" / rec.key / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, n_steps + 1))  # no step lost or repeated across the notice


def test_raising_trial_retried_then_error_with_traceback(ray_local, tmp_path):
    from ray.tune import ExperimentAnalysis

    missing = tmp_path / "no_mnist_here"
    out = launch(QUICKSTART, storage_uri=str(tmp_path), sets=TINY + [
        "name=broken", "base.dataset=mnist", "base.preset=digits", f"data_dir={missing}",
        "search.space={}", "max_failures=1"])
    assert out.counts == {mf.ERROR: 1}
    rec = mf.read_records(out.sweep_uri)[0]
    assert rec.attempts == 2 and rec.failures == 2 and rec.preemptions == 0
    assert "Traceback" in rec.last_error() and str(missing) in rec.last_error()
    assert [t.status for t in ExperimentAnalysis(out.sweep_uri).trials] == ["ERROR"]
    r = CliRunner().invoke(cli.app, ["sweep", "status", out.sweep_uri])
    assert "ERROR" in r.output and "last traceback" in r.output and str(missing) in r.output
    r = CliRunner().invoke(cli.app, ["best", out.sweep_uri])
    assert r.exit_code == 2 and "1 ERROR" in r.output


@pytest.mark.gcs
def test_everything_on_gcs_from_a_fresh_process(ray_local, gcs, tmp_path):
    bucket = gcs.make_bucket("rcig-sweeps")
    out = launch(QUICKSTART, storage_uri=f"{bucket}/team", sets=TINY + ["search.space={}", "name=ongcs"])
    uri = f"{bucket}/team/ongcs"
    assert out.sweep_uri == uri and out.counts == {mf.COMPLETED: 1}
    env = {**os.environ, **loopback_env()}

    def rcig(*argv):
        p = subprocess.run([sys.executable, str(ROOT / "cli.py"), *argv], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr + p.stdout
        return p.stdout

    st = json.loads(rcig("sweep", "status", uri, "--json"))
    assert st["counts"] == {"COMPLETED": 1}
    assert json.loads(rcig("best", uri, "--json"))[0]["eval_mean"] is not None
    rcig("fetch", uri, "--to", str(tmp_path / "got"))
    for name in ("distilled.npz", "distilled.png", "eval.json", "config.json"):
        assert (tmp_path / "got" / name).is_file(), name
    assert any((tmp_path / "got" / "checkpoint").iterdir())
    # Resume from the URI alone: Ray's state on gs:// is restored; nothing is rerun.
    again = resume(uri)
    assert again.counts == {mf.COMPLETED: 1} and not again.notes, again
    assert mf.read_records(uri)[0].attempts == 1


@pytest.mark.parametrize("space", ["{model.width: {grid: [8]}}", "{model.width: {choice: [8]}}"],
                         ids=["grid-repeats", "choice-drawn-twice"])
def test_samples_of_one_point_get_their_own_folders_and_seeds(ray_local, tmp_path, space):
    """num_samples=2 over a grid-only space, or a choice that draws the same value twice:
    two trials, two folders, two seeds, neither taken for the other's lost attempt."""
    out = launch(QUICKSTART, storage_uri=str(tmp_path), sets=TINY + [
        f"search.space={space}", "num_samples=2", "eval.runs=1"])
    recs = mf.read_records(out.sweep_uri)
    assert len({r.key for r in recs}) == 2 and {r.status for r in recs} == {mf.COMPLETED}
    assert sorted(r.sample for r in recs) == [0, 1]
    assert sorted(r.config["seed"] for r in recs) == [0, 1]
    assert all(r.attempts == 1 and r.preemptions == 0 for r in recs)
