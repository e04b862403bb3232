"""Ray Tune's `MLflowLoggerCallback`, one MLflow run per rcig trial (`--mlflow URI`).

Imported only when a sweep tracks to MLflow (importing Ray's MLflow integration imports
MLflow, which takes seconds). What it records is described in `orchestrator.tracking`.

Example:
    >>> cb = MLflowCallback("file:///tmp/mlruns", sweep_uri, spec)   # doctest: +SKIP
    >>> RunConfig(callbacks=[cb])                                     # doctest: +SKIP
"""

from __future__ import annotations

import time

from ray.air.integrations.mlflow import MLflowLoggerCallback

from orchestrator import manifest as mf
from orchestrator.spec import SweepSpec
from orchestrator.tracking import (STATUS_TAG, SWEEP_TAG, TRIAL_KEY_TAG, _allow_file_store, _key,
                                   _params, _warn, scalars)
from rcig import storage


class MLflowCallback(MLflowLoggerCallback):
    """Ray Tune's MLflow logger, one run per rcig trial (see `orchestrator.tracking`)."""

    RCIG_TRACKING = True  # replaced by `tracking.replace_in_restored` on resume

    def __init__(self, tracking_uri: str, sweep_uri: str, spec: SweepSpec):
        super().__init__(tracking_uri=tracking_uri, experiment_name=spec.name,
                         tags={SWEEP_TAG: storage.normalize(sweep_uri)})
        self.sweep_uri = storage.normalize(sweep_uri)
        self.spec = spec
        self._runs: dict[str, str] = {}
        self._seen: dict[str, str] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_runs"] = {}
        return state

    def setup(self, *args, **kwargs):
        _allow_file_store(self.tracking_uri)
        super().setup(*args, **kwargs)
        self._runs = {}

    def _client(self):
        return self.mlflow_util._get_client()

    def _run_id(self, trial, result: dict | None = None) -> str:
        key = _key(self.spec, trial, result, self._seen)
        if key in self._runs:
            return self._runs[key]
        client = self._client()
        found = [] if "'" in key else client.search_runs(
            [self.mlflow_util.experiment_id], filter_string=f"tags.`{TRIAL_KEY_TAG}` = '{key}'",
            max_results=1)
        if found:  # a resumed sweep: the trial's run goes on
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            tags = {**(self.tags or {}), TRIAL_KEY_TAG: key, "trial_name": key}
            run_id = self.mlflow_util.start_run(run_name=key, tags=tags).info.run_id
            from mlflow.entities import Param

            params = [Param(k, str(v)) for k, v in sorted(_params(trial).items())]
            if params:
                client.log_batch(run_id, params=params)
        self._runs[key] = run_id
        return run_id

    def log_trial_start(self, trial) -> None:
        try:
            self._run_id(trial)
        except Exception as e:  # noqa: BLE001 - tracking must never stop the sweep
            _warn(f"MLflow: trial {trial.trial_id} not logged", e)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        try:
            from mlflow.entities import Metric

            step, values = scalars(result)
            if not values:
                return
            now = int(time.time() * 1000)
            self._client().log_batch(self._run_id(trial, result), metrics=[
                Metric(k, v, now, step) for k, v in sorted(values.items())])
        except Exception as e:  # noqa: BLE001
            _warn(f"MLflow: a result of trial {trial.trial_id} not logged", e)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        try:
            key = _key(self.spec, trial, seen=self._seen)
            run_id = self._run_id(trial)
            client = self._client()
            try:
                rec = mf.read_record(self.sweep_uri, key)
            except (mf.DamagedRecord, OSError):
                rec = None
            status = rec.status if rec else (mf.ERROR if failed else mf.COMPLETED)
            client.set_tag(run_id, STATUS_TAG, status)
            client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
            self._runs.pop(key, None)
        except Exception as e:  # noqa: BLE001
            _warn(f"MLflow: end of trial {trial.trial_id} not logged", e)

