"""Tune's OptunaSearch as the sweeps use it (imports Ray and optuna; loaded only to build).

`RcigOptunaSearch` is TPE on the spec's metric, given at construction rather than through
`tune.TuneConfig` (which leaves metric and mode unset when a scheduler holds them). A
result without the metric (a report before a trial's first intermediate metric, or the
terminal-budget notice of `orchestrator.trial`) is not passed to Optuna, whose
`on_trial_result` would raise KeyError on it; a trial that ends without the metric is
recorded in the study as failed, not as a value.
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
