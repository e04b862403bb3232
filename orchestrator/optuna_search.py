"""Tune's OptunaSearch as the sweeps use it (imports Ray and optuna; loaded only to build).

`RcigOptunaSearch` is TPE on the spec's metric, given at construction rather than through
`tune.TuneConfig` (which leaves metric and mode unset when a scheduler holds them). A
result without the metric (a report before a trial's first intermediate metric, or the
terminal-budget notice of `orchestrator.trial`) is not passed to Optuna, whose
`on_trial_result` would raise KeyError on it; a trial that ends without the metric is
recorded in the study as failed, not as a value.

**After a driver kill** (`rcig sweep resume`) the searcher comes back from Tune's own
searcher checkpoint, which Tune writes with the experiment state (`searcher-state-*.pkl`
in the sweep folder, the pickled searcher: the Optuna study with every trial it was told
of, its open trials, and the sampler with its random state). This was chosen over
replaying finished trials' results into a fresh searcher because Tune's restore also
brings back the trials that were running, under their own trial ids (their folders, so
they resume from their checkpoints) and tied to their open Optuna trials, which are told
their results when they finish; a replayed searcher would see those as new proposals.
What the checkpoint cannot hold is a proposal made after Tune's last save of it (at most
~10 s before the kill): `orchestrator.sweep.resume` finds such a trial's record (its trial
id is unknown to the restored experiment), closes it as STOPPED and lets the searcher
propose another in its place, so the sweep still ends with `num_samples` trials and no
finished trial runs again. Without readable Ray state the sweep is rebuilt from its
records instead (`orchestrator.sweep`): the recorded trials are replayed as a fixed list
and no new proposal is made.
"""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch


class RcigOptunaSearch(OptunaSearch):
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is not None and self.metric not in result:
            result, error = None, True
        super().on_trial_complete(trial_id, result, error)
