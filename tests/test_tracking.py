"""Seeing the search: TensorBoard event files per trial (read back with TensorBoard's own
event reader) and MLflow runs through Ray Tune's MLflow callback (a local MLflow file
store), after one tiny real ASHA sweep on a local Ray in which one trial finishes and one
is stopped early; the same runs continued by `rcig sweep resume`; and the one-line refusal
of an MLflow URI that cannot be used. Nothing leaves the machine: the MLflow store is a
folder.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from orchestrator import manifest as mf
from orchestrator import tracking
from orchestrator.spec import load_spec
from orchestrator.sweep import launch

ROOT = Path(__file__).resolve().parents[1]
ASHA = str(ROOT / "sweeps" / "digits_asha.yaml")
# The tiny trials of tests/test_search_e2e.py (one compiled program, shared through JAX's
# disk cache); the intermediate metric every 5 of 10 steps. One trial at a time: the one
# whose probe learns (lr 0.03) runs first and sets ASHA's cutoff at the rung of step 5;
# the one whose probe cannot learn (lr 1e-6: chance) falls below it there and is stopped.
TINY = ["model.width=8", "outer.real_batch_size=64", "pool.model_count=2", "lr_tune.skip=true",
        "eval.runs=1", "eval.steps=30", "eval.baseline=false", "eval.every_steps=5",
        "eval.probe_steps=30", "checkpoint.every_steps=5", "checkpoint.every_seconds=0",
        "log_every=5", "steps=10", "max_concurrent=1", "name=tracked", "num_samples=1",
        "scheduler.grace_period=5", "search.space={eval.probe_lr: {grid: [0.03, 0.000001]}}"]
STRONG, WEAK = 0.03, 0.000001
TEST_ENV = {"RCIG_LEASE_HEARTBEAT_S": "1", "RCIG_RECORD_MIN_INTERVAL_S": "0.3",
            "RCIG_TUNE_VERBOSE": "0"}


@pytest.fixture(scope="module")
def tracked(ray_local, tmp_path_factory):
    """One ASHA sweep of 2 trials with `--mlflow file://...`, run once for the module."""
    root = tmp_path_factory.mktemp("tracked")
    store = f"file://{root / 'mlruns'}"
    out = launch(ASHA, storage_uri=str(root / "sweeps"), sets=TINY, mlflow=store)
    recs = {r.params["eval.probe_lr"]: r for r in mf.read_records(out.sweep_uri)}
    return SimpleNamespace(out=out, store=store, recs=list(recs.values()), strong=recs[STRONG],
                           weak=recs[WEAK])


def _scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard itself reads the run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
@pytest.mark.ray
def test_tensorboard_event_files_per_trial(tracked):
    out, strong, weak = tracked.out, tracked.strong, tracked.weak
    assert (strong.status, weak.status) == (mf.COMPLETED, mf.STOPPED), out
    # the finished trial: the intermediate validation estimate on the outer-step axis
    # (steps 5 and 10), then, at its last step, the final evaluation's validation accuracy
    sc = _scalars(tracking.tensorboard_uri(out.sweep_uri, strong.key))
    val = sc["val/acc"]
    assert [s for s, _ in val][:2] == [5, 10] and len(val) == 3, val
    assert val[-1] == (10, pytest.approx(strong.eval["val_mean"], abs=1e-6))
    assert all(0.0 <= v <= 1.0 for _, v in val)
    # its final metrics: test accuracy and the evaluation's mean, at the last step
    assert sc["test/acc"] == [(10, pytest.approx(strong.eval["mean"], abs=1e-6))]
    assert sc["eval/mean"][-1][1] == pytest.approx(strong.eval["mean"], abs=1e-6)
    assert "outer/loss" in sc and not [t for t in sc if t.startswith(("rcig/", "ray/"))]
    # the trial ASHA stopped at the rung of step 5: what it reached, and no final metrics
    sc = _scalars(tracking.tensorboard_uri(out.sweep_uri, weak.key))
    assert sc["val/acc"] == [(5, pytest.approx(weak.metrics["val/acc"], abs=1e-6))]
    assert sc["val/acc"][0][1] < val[0][1]  # below the finished trial's at that rung
    assert "test/acc" not in sc and "eval/mean" not in sc
    # the searched parameter and the metrics in TensorBoard's HParams data, for both
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for rec in tracked.recs:
        acc = EventAccumulator(tracking.tensorboard_uri(out.sweep_uri, rec.key))
        acc.Reload()
        hp = acc.PluginTagToContent("hparams")
        assert hp and any(b"eval.probe_lr" in v for v in hp.values())
    # one logdir for the sweep, one run per trial; Tune's default TBX logger (report-count
    # axis, in Ray's trial folders) is replaced, not doubled
    assert sorted(os.listdir(tracking.tensorboard_uri(out.sweep_uri))) == sorted(r.key for r in tracked.recs)
    events = glob.glob(os.path.join(out.sweep_uri, "**", "events.out.tfevents*"), recursive=True)
    assert events and all(os.sep + tracking.TB_DIR + os.sep in e for e in events), events


def _runs(store: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("tracked")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert len(by_name) == len(runs), "one run per trial"
    return client, by_name


@pytest.mark.slow
@pytest.mark.ray
def test_mlflow_runs_hold_searched_params_and_metrics(tracked):
    out, strong, weak = tracked.out, tracked.strong, tracked.weak
    client, runs = _runs(tracked.store)
    assert sorted(runs) == sorted(r.key for r in tracked.recs)  # one run per trial
    for rec in tracked.recs:
        run = runs[rec.key]
        assert run.info.status == "FINISHED"
        assert run.data.params == {"eval.probe_lr": str(rec.params["eval.probe_lr"])}
        assert run.data.tags[tracking.TRIAL_KEY_TAG] == rec.key
        assert run.data.tags[tracking.SWEEP_TAG] == out.sweep_uri
        assert not [k for k in run.data.metrics if k.startswith("rcig/")]
    run = runs[strong.key]
    assert run.data.tags[tracking.STATUS_TAG] == mf.COMPLETED
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "val/acc")}) == [5, 10]
    assert run.data.metrics["test/acc"] == pytest.approx(strong.eval["mean"], abs=1e-6)
    run = runs[weak.key]  # stopped by ASHA: STOPPED, with the estimate it reached
    assert run.data.tags[tracking.STATUS_TAG] == mf.STOPPED
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [5]
    assert "test/acc" not in run.data.metrics
    # the manifest remembers where the sweep logged, for `rcig sweep resume`
    doc = mf.read_manifest(out.sweep_uri)
    assert doc["launches"][-1]["mlflow"] == tracked.store
    assert tracking.resume_uri(doc, None) == tracked.store and tracking.resume_uri(doc, "off") is None


@pytest.mark.slow
@pytest.mark.ray
def test_report_search_panel_of_the_sweep(tracked):
    """`rcig report` of the real ASHA sweep: the stopped trial on its reached estimate,
    its curve ending at the rung; the finished one's curve ending at its final evaluation."""
    from orchestrator.report import build_report, search_data

    strong, weak = tracked.strong, tracked.weak
    rep = build_report(tracked.out.sweep_uri)
    data = search_data(rep)
    points = {p["key"]: (p["state"], p["value"]) for p in data["points"]}
    assert points == {strong.key: (mf.COMPLETED, pytest.approx(strong.eval["val_mean"])),
                      weak.key: (mf.STOPPED, pytest.approx(weak.metrics["val/acc"]))}
    curves = {c["key"]: c for c in data["curves"]}
    assert (curves[weak.key]["steps"], curves[weak.key]["final"]) == ([5], None)
    assert curves[strong.key]["steps"] == [5, 10]
    assert curves[strong.key]["final"] == pytest.approx(strong.eval["val_mean"])
    assert sorted(rep.search) == ["curves", "params"]
    assert 'data-completed="1" data-stopped="1"' in rep.html


@pytest.mark.slow
@pytest.mark.ray
def test_resume_logs_to_the_same_runs(tracked):
    """`rcig sweep resume` without `--mlflow` logs where the launch did, into each trial's
    own run (no second run per trial). Ray's state is moved aside, so the sweep is rebuilt
    from the manifest and both trials, finished or stopped, report again (adopted)."""
    from orchestrator.sweep import resume

    out, strong = tracked.out, tracked.strong
    # Through Ray's state: Tune.restore brings back the callbacks pickled at launch (the
    # MLflow one with the launch's URI); resume swaps in fresh ones (here: another URI).
    from ray import tune

    from orchestrator.mlflow_tracking import MLflowCallback
    from orchestrator.spec import spec_from_raw
    from orchestrator.trial import TrialContext, make_trainable

    spec = spec_from_raw(mf.read_manifest(out.sweep_uri)["spec"])
    tuner = tune.Tuner.restore(out.sweep_uri, trainable=make_trainable(TrialContext(out.sweep_uri, spec)))
    pickled = tuner._local_tuner.get_run_config().callbacks
    assert [c.tracking_uri for c in pickled if isinstance(c, MLflowCallback)] == [tracked.store]
    assert tracking.replace_in_restored(tuner, tracking.callbacks(out.sweep_uri, spec, "file:///elsewhere"))
    now = tuner._local_tuner.get_run_config().callbacks
    assert [type(c).__name__ for c in now] == ["BudgetCallback", "TensorBoardCallback", "MLflowCallback"]
    assert now[2].tracking_uri == "file:///elsewhere"
    # Without Ray's state: the sweep is rebuilt from the manifest.
    os.rename(os.path.join(out.sweep_uri, "tuner.pkl"), os.path.join(out.sweep_uri, "tuner.pkl.aside"))
    again = resume(out.sweep_uri)
    assert again.counts == {mf.COMPLETED: 1, mf.STOPPED: 1}, again
    assert any("resuming from the rcig manifest" in n for n in again.notes), again.notes
    client, runs = _runs(tracked.store)
    assert sorted(runs) == sorted(r.key for r in tracked.recs)
    for rec in tracked.recs:
        run = runs[rec.key]
        assert run.info.status == "FINISHED" and run.data.tags[tracking.STATUS_TAG] == rec.status
    assert len(client.get_metric_history(runs[strong.key].info.run_id, "test/acc")) == 2  # launch + resume
    assert mf.read_manifest(out.sweep_uri)["launches"][-1]["mlflow"] == tracked.store
    # TensorBoard: the resumed driver adds an event file to each trial's run folder
    for rec in tracked.recs:
        logdir = tracking.tensorboard_uri(out.sweep_uri, rec.key)
        assert len(glob.glob(os.path.join(logdir, "events.out.tfevents*"))) == 2
    assert _scalars(tracking.tensorboard_uri(out.sweep_uri, strong.key))["test/acc"][-1][0] == 10


def test_no_mlflow_unless_asked(tmp_path):
    spec = load_spec(ASHA, sets=TINY)
    cbs = tracking.callbacks(str(tmp_path), spec)
    assert [type(c).__name__ for c in cbs] == ["TensorBoardCallback"]


def test_unusable_mlflow_uri_is_one_line_and_launches_nothing(tmp_path):
    from cli import app

    res = CliRunner().invoke(app, ["sweep", "launch", ASHA, "--storage", str(tmp_path),
                                   "--mlflow", "nosuchscheme://x", *sum((["--set", s] for s in TINY), [])])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--mlflow nosuchscheme://x" in lines[0], res.output
    assert "Traceback" not in res.output and not (tmp_path / "tracked").exists()


@pytest.mark.gcs
def test_tensorboard_files_reach_a_gcs_sweep(gcs_bucket, tmp_path):
    """A gs:// sweep: event files are staged locally and copied to the bucket when a
    trial ends (the callback driven with Tune's trial interface: config, trial_id)."""
    from orchestrator.trial import key_of
    from rcig import storage

    spec = load_spec(ASHA, sets=TINY)
    sweep = storage.join(gcs_bucket, "sweeps", "tracked")
    cb = tracking.TensorBoardCallback(sweep, spec, upload_s=3600)
    trial = SimpleNamespace(config={"eval.probe_lr": 0.03}, trial_id="t0")
    key = key_of(spec, trial.config, trial.trial_id)
    cb.log_trial_start(trial)
    cb.log_trial_result(1, trial, {"step": 5, "val/acc": 0.5, "training_iteration": 1})
    cb.log_trial_result(2, trial, {"step": 10, "val/acc": 0.75, "test/acc": 0.7, "training_iteration": 2})
    cb.log_trial_end(trial)
    remote = tracking.tensorboard_uri(sweep, key)
    names = storage.listdir(remote)
    assert names and all(n.startswith("events.out.tfevents") for n in names)
    local = tmp_path / key
    local.mkdir()
    for n in names:
        (local / n).write_bytes(storage.read_bytes(remote + "/" + n))
    sc = _scalars(str(local))
    assert sc["val/acc"] == [(5, 0.5), (10, 0.75)] and sc["test/acc"] == [(10, pytest.approx(0.7))]
