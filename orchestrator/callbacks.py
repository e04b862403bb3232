"""Driver-side Tune callback that makes Tune follow the trial's two budgets.

Tune has one retry counter (`FailureConfig.max_failures`) for every kind of trial death.
The sweep sets it to `max_failures + max_preemptions` (plus slack) and lets each trial
decide from its own record (`orchestrator.trial`): when a trial has used up either
budget it reports `rcig/terminal` and then raises; on that report this callback lowers
the trial's retry limit so Tune marks it ERROR instead of retrying. Each new start (for
instance after `rcig sweep resume`) gets the full limit back.

It also marks trials that a scheduler (ASHA) stopped early as STOPPED in the manifest,
so a resubmitted sweep adopts them instead of rerunning them.

Example:
    >>> RunConfig(callbacks=[BudgetCallback(sweep_uri, spec)])  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time

from ray.tune import Callback

from orchestrator import lifecycle as lc
from orchestrator import manifest as mf
from orchestrator.spec import SweepSpec
from orchestrator.trial import TERMINAL, key_of


def ray_max_failures(spec: SweepSpec) -> int:
    """Tune's retry limit: both budgets together, plus slack for lost restores."""
    return spec.max_failures + spec.max_preemptions + 2


class BudgetCallback(Callback):
    def __init__(self, sweep_uri: str, spec: SweepSpec):
        self.sweep_uri = sweep_uri
        self.spec = spec

    def on_trial_start(self, iteration, trials, trial, **info):
        trial.max_failures = ray_max_failures(self.spec)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(TERMINAL):
            # should_recover() is `num_failures <= max_failures`; the coming error adds one.
            trial.max_failures = trial.run_metadata.num_failures

    def on_trial_complete(self, iteration, trials, trial, **info):
        try:
            key = key_of(self.spec, trial.config, trial.trial_id)
            mf.RecordStore(self.sweep_uri, key).update(
                lambda rec: lc.stopped_by_scheduler(rec, time.time()) if rec else None)
        except (mf.DamagedRecord, OSError) as e:  # bookkeeping must never stop the sweep
            print(f"rcig: could not mark trial {trial.trial_id} stopped: {e}", file=sys.stderr)
