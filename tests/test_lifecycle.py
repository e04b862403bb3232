"""The trial lifecycle, without Ray: every transition of `orchestrator.lifecycle`, the
record's compare-and-swap under concurrent writers, damaged records, and trial identity."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from orchestrator import lifecycle as lc
from orchestrator import manifest as mf
from rcig.config import make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = lc.Budgets(max_failures=1, max_preemptions=2)


def fresh() -> mf.TrialRecord:
    return mf.TrialRecord(key="k", params={"a": 1}, fingerprint="f", config={})


def run(rec=None, now=1.0) -> mf.TrialRecord:
    d = lc.start(rec or fresh(), B, now)
    assert d.action == lc.RUN
    return d.record


def test_start_opens_an_attempt_and_never_changes_its_input():
    rec = fresh()
    d = lc.start(rec, B, 5.0, host="h")
    assert (d.action, d.record.status, d.record.attempts) == (lc.RUN, mf.RUNNING, 1)
    assert d.record.history[-1] == {"n": 1, "started": 5.0, "updated": 5.0, "start_step": None,
                                    "outcome": None, "host": "h"}
    assert rec == fresh()


@pytest.mark.parametrize("status", mf.FINAL_STATES)
def test_finished_trials_are_adopted_not_rerun(status):
    rec = fresh()
    rec.status = status
    d = lc.start(rec, B, 1.0)
    assert d.action == lc.ADOPT and d.record.attempts == 0


def test_an_attempt_left_open_was_lost_and_counts_one_preemption():
    rec = run(now=1.0)
    rec = lc.progress(rec, 3.0, step=7, checkpoint_step=5)
    d = lc.start(rec, B, 10.0)
    assert d.action == lc.RUN
    first = d.record.history[0]
    assert (first["outcome"], first["ended"], first["end_step"]) == ("lost", 3.0, 7)
    assert d.record.preemptions == 1 and d.record.history[1]["start_step"] == 5


def test_completed_records_results_and_reports():
    rec = run()
    d = lc.finish(rec, lc.Ending("completed", step=9, checkpoint_step=9, metrics={"m": 1.0},
                                 eval={"mean": 0.9}, wall_s=3.0, resumed_from=4), B, 2.0)
    r = d.record
    assert (d.action, r.status, r.step, r.checkpoint_step, r.eval, r.wall_s) == (
        lc.REPORT, mf.COMPLETED, 9, 9, {"mean": 0.9}, 3.0)
    assert r.history[-1]["outcome"] == "completed" and r.history[-1]["start_step"] == 4
    assert r.metrics == {"m": 1.0}


@pytest.mark.parametrize("kind", ["preempted", "lost"])
def test_preemptions_retry_until_their_budget_then_give_up(kind):
    rec = fresh()
    actions = []
    for i in range(B.max_preemptions + 1):
        rec = run(rec, now=float(i))
        d = lc.finish(rec, lc.Ending(kind, checkpoint_step=i), B, i + 0.5)
        rec = d.record
        actions.append(d.action)
    assert actions == [lc.RETRY] * B.max_preemptions + [lc.GIVE_UP]
    assert rec.status == mf.ERROR and rec.failures == 0 and rec.checkpoint_step == B.max_preemptions


def test_failures_retry_until_their_budget_then_give_up_with_the_traceback():
    rec = fresh()
    actions = []
    for i in range(B.max_failures + 1):
        rec = run(rec)
        d = lc.finish(rec, lc.Ending("failed", error=f"tb{i}"), B, 2.0)
        rec = d.record
        actions.append(d.action)
    assert actions == [lc.RETRY] * B.max_failures + [lc.GIVE_UP]
    assert rec.status == mf.ERROR and rec.last_error() == f"tb{B.max_failures}"
    assert lc.start(rec, B, 3.0).action == lc.GIVE_UP  # a rerun by Tune does not run


def test_a_failure_without_traceback_says_so():
    d = lc.finish(run(), lc.Ending("failed"), B, 2.0)
    assert "without a traceback" in d.record.last_error()


def test_budgets_are_independent():
    rec = fresh()
    for i in range(B.max_preemptions):  # preemptions up to (not past) their budget
        rec = lc.finish(run(rec), lc.Ending("preempted"), B, 1.0).record
    d = lc.finish(run(rec), lc.Ending("failed", error="x"), B, 1.0)
    assert d.action == lc.RETRY  # one failure is within max_failures=1


def test_resume_grants_fresh_budgets_to_errored_trials_only():
    rec = fresh()
    for _ in range(B.max_failures + 1):
        rec = lc.finish(run(rec), lc.Ending("failed", error="x"), B, 1.0).record
    assert rec.status == mf.ERROR
    again = lc.grant_budgets(rec)
    assert again.status == mf.FAILED and again.failures_used == 0 and again.failures == rec.failures
    assert lc.start(again, B, 2.0).action == lc.RUN
    done = fresh()
    done.status = mf.COMPLETED
    assert lc.grant_budgets(done) == done


def test_scheduler_stop_is_final_and_keeps_finished_trials():
    rec = lc.stopped_by_scheduler(run(), 2.0)
    assert rec.status == mf.STOPPED and rec.history[-1]["outcome"] == "stopped"
    assert lc.start(rec, B, 3.0).action == lc.ADOPT
    done = fresh()
    done.status = mf.COMPLETED
    assert lc.stopped_by_scheduler(done, 2.0).status == mf.COMPLETED


def test_accelerator_time_is_accounted_per_device():
    rec = fresh()
    rec.accelerators = 4
    rec = lc.start(rec, B, 10.0).record
    rec = lc.progress(rec, 12.0, step=1)
    rec = lc.finish(rec, lc.Ending("preempted"), B, 13.0).record
    assert rec.accelerator_s == pytest.approx(4 * 3.0)


def test_every_status_and_ending_has_a_transition():
    for status, kind in itertools.product(
            (mf.PENDING, mf.RUNNING, mf.PREEMPTED, mf.FAILED, mf.ERROR, mf.COMPLETED, mf.STOPPED),
            lc.ENDINGS):
        rec = fresh()
        rec.status = status
        d = lc.start(rec, B, 1.0)
        if status in mf.FINAL_STATES:
            assert d.action == lc.ADOPT
            continue
        assert d.action in (lc.RUN, lc.GIVE_UP)
        if d.action == lc.RUN:
            out = lc.finish(d.record, lc.Ending(kind), B, 2.0)
            assert out.action in (lc.REPORT, lc.RETRY, lc.GIVE_UP)
            assert out.record.history[-1]["outcome"] == kind
    with pytest.raises(ValueError, match="unknown attempt ending"):
        lc.Ending("exploded")


def test_stale_running():
    rec = run()
    rec.updated = 100.0
    assert lc.is_stale_running(rec, 100.0 + 181) and not lc.is_stale_running(rec, 150.0)


# ---- records in storage ------------------------------------------------------------------
def test_a_damaged_record_is_an_error_naming_its_path_not_a_blank_record(tmp_path):
    sweep = str(tmp_path / "sweep")
    path = tmp_path / "sweep" / "trials" / "k" / "trial.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"key": "k", "status": "COMPL')
    with pytest.raises(mf.DamagedRecord, match=str(path)):
        mf.read_record(sweep, "k")
    with pytest.raises(mf.DamagedRecord):
        mf.RecordStore(sweep, "k").update(lambda r: r or fresh())
    assert path.read_text() == '{"key": "k", "status": "COMPL'  # not overwritten
    damaged: list = []
    assert mf.read_records(sweep, damaged) == [] and str(path) in str(damaged[0])


COUNTER = r"""
import sys
from orchestrator import manifest as mf
sweep, n = sys.argv[1], int(sys.argv[2])
def bump(rec):
    rec.accelerator_s += 1.0
    return rec
for _ in range(n):
    mf.RecordStore(sweep, "k").update(bump)
"""


@pytest.mark.parametrize("where", ["local", pytest.param("gcs", marks=pytest.mark.gcs)])
def test_concurrent_updates_are_never_lost(tmp_path, where, request):
    sweep = str(tmp_path / "sweep") if where == "local" else f"{request.getfixturevalue('gcs_bucket')}/sweep"
    mf.RecordStore(sweep, "k").update(lambda r: fresh())
    n, procs = 15, 3
    env = dict(os.environ, PYTHONPATH=REPO)
    ps = [subprocess.Popen([sys.executable, "-c", COUNTER, sweep, str(n)], env=env, cwd=REPO,
                           stderr=subprocess.PIPE, text=True) for _ in range(procs)]
    for p in ps:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    assert mf.read_record(sweep, "k").accelerator_s == n * procs


# ---- identity ------------------------------------------------------------------------------
def test_trial_key_ignores_what_does_not_change_the_distilled_set():
    cfg = make_config("digits", 1)
    key = mf.trial_key({"model.width": 32}, cfg)
    for harmless in (["eval.runs=10"], ["checkpoint.every_steps=7"], ["log_every=3"],
                     ["data_dir=/elsewhere"]):
        other = make_config("digits", 1, overrides=harmless)
        assert mf.trial_key({"model.width": 32}, other) == key, harmless
    assert mf.trial_key({"model.width": 32}, make_config("digits", 1, overrides=["model.width=16"])) != key


def test_trial_key_survives_a_release_that_adds_a_field_with_its_default():
    cfg = make_config("digits", 1)
    saved = json.loads(cfg.to_json())
    saved["outer"].pop(next(iter(saved["outer"])))  # as written by a release without that field
    from rcig.config import identity_hash

    assert identity_hash(saved) == identity_hash(cfg)


def test_samples_of_one_point_have_their_own_keys():
    cfg = make_config("digits", 1)
    keys = {mf.trial_key({"model.width": 32}, cfg, s) for s in range(3)}
    assert len(keys) == 3 and all("s" in k for k in keys)
