"""A trial's lifecycle as a pure state machine: `(record, event) -> (next record, action)`.

No Ray, no storage, no clock of its own: every function takes a `TrialRecord` and returns a
new one (the input is never changed) with what the caller must do. `orchestrator.trial`
applies them through the record's compare-and-swap (`manifest.RecordStore.update`), so a
transition computed from a stale record is recomputed from the fresh one.

States (`manifest`): PENDING -> RUNNING -> COMPLETED | PREEMPTED | FAILED | ERROR | STOPPED.

::

    start(rec)                 final (COMPLETED/STOPPED)   -> ADOPT   (report, never rerun)
                               an attempt still open       -> it was lost with its node or
                                                              driver: one preemption
                               a budget used up            -> ERROR, GIVE_UP
                               else                        -> RUNNING, RUN (attempt n+1)
    finish(rec, Ending)        completed                   -> COMPLETED, REPORT
                               preempted (notice honoured) -> PREEMPTED, RETRY, or ERROR,
                               lost (lease taken over)        GIVE_UP past max_preemptions
                               failed                      -> FAILED, RETRY, or ERROR,
                                                              GIVE_UP past max_failures
    stopped_by_scheduler(rec)  not final                   -> STOPPED (adopted later)
    grant_budgets(rec)         ERROR                       -> FAILED with fresh budgets
                                                              (`rcig sweep resume`)

Two budgets: `max_failures` counts exceptions in the trial, `max_preemptions` counts node
losses and notices; `resume` grants both anew (the counts at that moment become the base).

Example:
    >>> rec = TrialRecord(key="k", params={}, fingerprint="", config={})
    >>> d = start(rec, Budgets(1, 5), now=10.0)
    >>> d.action, d.record.status, d.record.attempts, rec.attempts
    ('run', 'RUNNING', 1, 0)
    >>> d = finish(d.record, Ending("failed", error="boom"), Budgets(1, 5), now=11.0)
    >>> d.action, d.record.failures
    ('retry', 1)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from orchestrator.manifest import (COMPLETED, ERROR, FAILED, FINAL_STATES, PREEMPTED, RUNNING,
                                   STOPPED, TrialRecord)

# Actions for the caller.
ADOPT = "adopt"      # finished before: report its final metrics, do not run
RUN = "run"          # run the attempt just opened
REPORT = "report"    # finished now: report final metrics
RETRY = "retry"      # raise, so Tune reschedules; the next attempt resumes from the checkpoint
GIVE_UP = "give_up"  # terminal ERROR: tell Tune not to retry, then raise

ENDINGS = ("completed", "preempted", "failed", "lost")


@dataclass(frozen=True)
class Budgets:
    max_failures: int
    max_preemptions: int


@dataclass(frozen=True)
class Ending:
    """How an attempt ended, as its worker told (or as its parent saw it)."""

    kind: str  # one of ENDINGS
    step: int | None = None
    checkpoint_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    wall_s: float | None = None
    resumed_from: int | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ENDINGS:
            raise ValueError(f"unknown attempt ending {self.kind!r}; expected one of {ENDINGS}")


@dataclass(frozen=True)
class Decision:
    record: TrialRecord
    action: str
    reason: str = ""


def _copy(rec: TrialRecord) -> TrialRecord:
    return copy.deepcopy(rec)


def _open(rec: TrialRecord) -> dict[str, Any] | None:
    return rec.history[-1] if rec.history and rec.history[-1].get("outcome") is None else None


def _tick(rec: TrialRecord, now: float) -> None:
    att = _open(rec)
    if att is not None:
        rec.accelerator_s += max(0.0, now - att["updated"]) * rec.accelerators
        att["updated"] = now


def _close(rec: TrialRecord, outcome: str, now: float, **info: Any) -> None:
    _tick(rec, now)
    att = _open(rec)
    if att is not None:
        att.update(outcome=outcome, ended=now, end_step=rec.step, **info)


def exhausted(rec: TrialRecord, budgets: Budgets) -> str:
    """Which budget is used up ('' if none)."""
    if rec.failures_used > budgets.max_failures:
        return f"failed {rec.failures_used} times (max_failures={budgets.max_failures})"
    if rec.preemptions_used > budgets.max_preemptions:
        return f"preempted {rec.preemptions_used} times (max_preemptions={budgets.max_preemptions})"
    return ""


def start(rec: TrialRecord, budgets: Budgets, now: float, **attempt_info: Any) -> Decision:
    """A new attempt of the trial is about to run (see the module docstring)."""
    rec = _copy(rec)
    if rec.status in FINAL_STATES:
        return Decision(rec, ADOPT, f"already {rec.status}")
    if _open(rec) is not None:  # its process never said how it ended: lost with its node
        last = rec.history[-1]
        last.update(outcome="lost", ended=last.get("updated"), end_step=rec.step)
        rec.preemptions += 1
    why = exhausted(rec, budgets)
    if why:
        rec.status = ERROR
        return Decision(rec, GIVE_UP, why)
    rec.attempts += 1
    rec.history.append({"n": rec.attempts, "started": now, "updated": now,
                        "start_step": rec.checkpoint_step, "outcome": None, **attempt_info})
    rec.status = RUNNING
    return Decision(rec, RUN)


def progress(rec: TrialRecord, now: float, *, step: int | None = None,
             metrics: dict[str, float] | None = None, checkpoint_step: int | None = None,
             **attempt_info: Any) -> TrialRecord:
    """The running attempt reported a step, metrics or a committed checkpoint."""
    rec = _copy(rec)
    if step is not None:
        rec.step = step
    if metrics is not None:
        rec.metrics = dict(metrics)
    if checkpoint_step is not None:
        rec.checkpoint_step = checkpoint_step
    att = _open(rec)
    if att is not None:
        att.update(attempt_info)
    _tick(rec, now)
    return rec


def finish(rec: TrialRecord, ending: Ending, budgets: Budgets, now: float) -> Decision:
    """The attempt ended (see the module docstring)."""
    rec = _copy(rec)
    if ending.step is not None:
        rec.step = ending.step
    if ending.checkpoint_step is not None:
        rec.checkpoint_step = ending.checkpoint_step
    if ending.resumed_from is not None and _open(rec) is not None:
        rec.history[-1]["start_step"] = ending.resumed_from
    if ending.kind == "completed":
        rec.metrics.update(ending.metrics)
        rec.eval = ending.eval
        rec.wall_s = ending.wall_s
        _close(rec, "completed", now)
        rec.status = COMPLETED
        return Decision(rec, REPORT)
    if ending.kind in ("preempted", "lost"):
        _close(rec, ending.kind, now)
        rec.preemptions += 1
        cause = "preemption notice" if ending.kind == "preempted" else "lease lost"
        return _retry_or_give_up(rec, PREEMPTED, budgets,
                                 f"{cause}; checkpoint committed at step {rec.checkpoint_step}")
    tb = ending.error or "the trial worker ended without a traceback (killed? out of memory?)"
    rec.errors.append({"attempt": rec.attempts, "at": now, "traceback": tb[-8000:]})
    _close(rec, "failed", now)
    rec.failures += 1
    return _retry_or_give_up(rec, FAILED, budgets,
                             f"failed (attempt {rec.attempts}); retrying from its last checkpoint")


def _retry_or_give_up(rec: TrialRecord, status: str, budgets: Budgets, reason: str) -> Decision:
    why = exhausted(rec, budgets)
    if why:
        rec.status = ERROR
        return Decision(rec, GIVE_UP, why)
    rec.status = status
    return Decision(rec, RETRY, reason)


def stopped_by_scheduler(rec: TrialRecord, now: float) -> TrialRecord:
    """A scheduler (ASHA) ended the trial early: STOPPED, adopted by later launches."""
    rec = _copy(rec)
    if rec.status not in FINAL_STATES:
        _close(rec, "stopped", now)
        rec.status = STOPPED
    return rec


def grant_budgets(rec: TrialRecord) -> TrialRecord:
    """`rcig sweep resume`: an ERROR trial gets both budgets anew and may run again."""
    rec = _copy(rec)
    if rec.status == ERROR:
        rec.budget_base_failures, rec.budget_base_preemptions = rec.failures, rec.preemptions
        rec.status = FAILED
    return rec


def is_stale_running(rec: TrialRecord, now: float, after_s: float = 180.0) -> bool:
    """RUNNING but not updated for `after_s`: its attempt is probably gone (status shows it
    as RUNNING*; the next start of the trial counts it as lost)."""
    return rec.status == RUNNING and now - (rec.updated or 0.0) > after_s
