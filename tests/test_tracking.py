"""Seeing the search: TensorBoard event files per trial (read back with TensorBoard's own
event reader) and MLflow runs through Ray Tune's MLflow callback (a local MLflow file
store), after one tiny real sweep on a local Ray; and the one-line refusal of an MLflow
URI that cannot be used. Nothing leaves the machine: the MLflow store is a folder.
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from orchestrator import manifest as mf
from orchestrator import tracking
from orchestrator.spec import load_spec
from orchestrator.sweep import launch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "sweeps" / "quickstart.yaml")
# The tiny trials of tests/test_search_e2e.py (one compiled program, shared through JAX's
# disk cache); the intermediate metric every 5 of 10 steps.
TINY = ["model.width=8", "outer.real_batch_size=64", "pool.model_count=2", "lr_tune.skip=true",
        "eval.runs=1", "eval.steps=30", "eval.baseline=false", "eval.every_steps=5",
        "eval.probe_steps=30", "checkpoint.every_steps=5", "checkpoint.every_seconds=0",
        "log_every=5", "steps=10", "max_concurrent=2", "name=tracked",
        "search.space={eval.probe_lr: {grid: [0.03, 0.003]}}"]
TEST_ENV = {"RCIG_LEASE_HEARTBEAT_S": "1", "RCIG_RECORD_MIN_INTERVAL_S": "0.3",
            "RCIG_TUNE_VERBOSE": "0"}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from orchestrator.sweep import init_ray

    os.environ.update(TEST_ENV)
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # our own Ray
    init_ray(num_cpus=2)  # as `rcig sweep launch` starts it
    yield
    ray.shutdown()
    if before is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = before


@pytest.fixture(scope="module")
def tracked(ray_local, tmp_path_factory):
    """One sweep of 2 trials with `--mlflow file://...`, run once for the module."""
    root = tmp_path_factory.mktemp("tracked")
    store = f"file://{root / 'mlruns'}"
    out = launch(QUICKSTART, storage_uri=str(root / "sweeps"), sets=TINY, mlflow=store)
    return SimpleNamespace(out=out, store=store, recs=mf.read_records(out.sweep_uri))


def _scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard itself reads the run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
@pytest.mark.ray
def test_tensorboard_event_files_per_trial(tracked):
    out, recs = tracked.out, tracked.recs
    assert out.counts == {mf.COMPLETED: 2}, out
    for rec in recs:
        logdir = tracking.tensorboard_uri(out.sweep_uri, rec.key)
        sc = _scalars(logdir)
        # the intermediate validation estimate on the outer-step axis (every 5 of 10 steps),
        # then, at the last step, the final evaluation's validation accuracy
        val = sc["val/acc"]
        assert [s for s, _ in val][:2] == [5, 10], val
        assert val[-1] == (10, pytest.approx(rec.eval["val_mean"], abs=1e-6))
        assert all(0.0 <= v <= 1.0 for _, v in val)
        # final metrics: test accuracy and the evaluation's mean, at the trial's last step
        assert sc["test/acc"] == [(10, pytest.approx(rec.eval["mean"], abs=1e-6))]
        assert sc["eval/mean"][-1][1] == pytest.approx(rec.eval["mean"], abs=1e-6)
        assert "outer/loss" in sc and not [t for t in sc if t.startswith(("rcig/", "ray/"))]
        # the searched parameter and the metrics in TensorBoard's HParams data
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(logdir)
        acc.Reload()
        hp = acc.PluginTagToContent("hparams")
        assert hp and any(b"eval.probe_lr" in v for v in hp.values())
    # one logdir for the sweep, one run per trial; Tune's default TBX logger (report-count
    # axis, in Ray's trial folders) is replaced, not doubled
    assert sorted(os.listdir(tracking.tensorboard_uri(out.sweep_uri))) == sorted(r.key for r in recs)
    events = glob.glob(os.path.join(out.sweep_uri, "**", "events.out.tfevents*"), recursive=True)
    assert events and all(os.sep + tracking.TB_DIR + os.sep in e for e in events), events


@pytest.mark.slow
@pytest.mark.ray
def test_mlflow_runs_hold_searched_params_and_metrics(tracked):
    from mlflow.tracking import MlflowClient

    out, recs = tracked.out, tracked.recs
    client = MlflowClient(tracking_uri=tracked.store)
    exp = client.get_experiment_by_name("tracked")
    assert exp is not None
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == sorted(r.key for r in recs)  # one run per trial
    for rec in recs:
        run = runs[rec.key]
        assert run.info.status == "FINISHED"
        assert run.data.params == {"eval.probe_lr": str(rec.params["eval.probe_lr"])}
        assert run.data.tags[tracking.TRIAL_KEY_TAG] == rec.key
        assert run.data.tags[tracking.STATUS_TAG] == mf.COMPLETED
        assert run.data.tags[tracking.SWEEP_TAG] == out.sweep_uri
        hist = client.get_metric_history(run.info.run_id, "val/acc")
        assert sorted({m.step for m in hist}) == [5, 10]
        assert run.data.metrics["test/acc"] == pytest.approx(rec.eval["mean"], abs=1e-6)
        assert not [k for k in run.data.metrics if k.startswith("rcig/")]
    # the manifest remembers where the sweep logged, for `rcig sweep resume`
    doc = mf.read_manifest(out.sweep_uri)
    assert doc["launches"][-1]["mlflow"] == tracked.store
    assert tracking.resume_uri(doc, None) == tracked.store and tracking.resume_uri(doc, "off") is None


@pytest.mark.slow
@pytest.mark.ray
def test_resume_logs_to_the_same_runs(tracked):
    """`rcig sweep resume` without `--mlflow` logs where the launch did, into each trial's
    own run (no second run per trial). Ray's state is moved aside, so the sweep is rebuilt
    from the manifest and both finished trials report their results again (adopted)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep import resume

    out = tracked.out
    os.rename(os.path.join(out.sweep_uri, "tuner.pkl"), os.path.join(out.sweep_uri, "tuner.pkl.aside"))
    again = resume(out.sweep_uri)
    assert again.counts == {mf.COMPLETED: 2}, again
    assert any("resuming from the rcig manifest" in n for n in again.notes), again.notes
    client = MlflowClient(tracking_uri=tracked.store)
    exp = client.get_experiment_by_name("tracked")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(r.key for r in tracked.recs)
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags[tracking.STATUS_TAG] == mf.COMPLETED
        assert len(client.get_metric_history(run.info.run_id, "test/acc")) == 2  # launch + resume
    assert mf.read_manifest(out.sweep_uri)["launches"][-1]["mlflow"] == tracked.store
    # TensorBoard: the resumed driver adds an event file to each trial's run folder
    for rec in tracked.recs:
        logdir = tracking.tensorboard_uri(out.sweep_uri, rec.key)
        assert len(glob.glob(os.path.join(logdir, "events.out.tfevents*"))) == 2
        assert _scalars(logdir)["test/acc"][-1][0] == 10


def test_no_mlflow_unless_asked(tmp_path):
    spec = load_spec(QUICKSTART, sets=TINY)
    cbs = tracking.callbacks(str(tmp_path), spec)
    assert [type(c).__name__ for c in cbs] == ["TensorBoardCallback"]


def test_unusable_mlflow_uri_is_one_line_and_launches_nothing(tmp_path):
    from cli import app

    res = CliRunner().invoke(app, ["sweep", "launch", QUICKSTART, "--storage", str(tmp_path),
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

    spec = load_spec(QUICKSTART, sets=TINY)
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
