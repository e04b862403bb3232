"""Seeing a sweep from outside: TensorBoard event files per trial, optional MLflow runs.

Both are driver-side Tune callbacks fed by the metrics each trial reports to Tune (the
trial's own run folder is never read or written here):

- `TensorBoardCallback` writes one TensorBoard run per trial under
  `<sweep>/tensorboard/<trial key>/` (for a gs:// sweep: staged in a local temporary
  folder and copied there at most every `RCIG_TB_UPLOAD_S` seconds, 30 by default, and
  when the trial ends). The x axis is the trial's outer step (not Tune's report count),
  so a trial that resumed from a checkpoint continues its curves. Scalars carry the names
  the trial reports: `val/acc` (the intermediate validation estimate every
  `eval.every_steps`; at a finished trial's last step, its final evaluation's validation
  accuracy, the number `rcig best` ranks by), `test/acc`, `eval/mean`, `outer/loss`, ...;
  when a trial ends, its searched parameters and `val/acc`/`test/acc` go to TensorBoard's
  HParams tab. It stands in for Tune's own TBX logger (a subclass of it, so Tune does not
  add a second copy of every scalar, on the report-count axis, in Ray's trial folders).
  View: ``tensorboard --logdir <sweep>/tensorboard``.
- `MLflowCallback` (only with `rcig sweep launch --mlflow URI`) is Ray Tune's
  `MLflowLoggerCallback` with one MLflow run per trial in the experiment named after the
  sweep: run name and tag `rcig.trial_key` = the trial key, params = the searched
  parameters, metrics on the outer-step axis, tag `rcig.status` = the trial's final state
  (COMPLETED, STOPPED by a scheduler, ERROR). A resumed sweep continues each trial's run.
  Nothing is sent anywhere unless a URI is given. Tracking problems are printed and never
  stop the sweep.

Example:
    >>> scalars({"step": 10, "val/acc": 0.5, "rcig/checkpoint_step": 10, "training_iteration": 2})
    (10, {'val/acc': 0.5})
    >>> tensorboard_uri("/sweeps/q", "lr=0.1_ab12")
    '/sweeps/q/tensorboard/lr=0.1_ab12'
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from ray.tune.logger import TBXLoggerCallback

from orchestrator import manifest as mf
from orchestrator.spec import SweepSpec
from orchestrator.sweep import SweepError
from rcig import storage

TB_DIR = "tensorboard"
TRIAL_KEY_TAG = "rcig.trial_key"
STATUS_TAG = "rcig.status"
SWEEP_TAG = "rcig.sweep"
OFF = ("off", "none", "")
HPARAM_METRICS = ("val/acc", "test/acc")
# Tune's own bookkeeping in every result; not metrics of the run.
_TUNE_KEYS = frozenset({
    "step", "training_iteration", "timestamp", "time_this_iter_s", "time_total_s",
    "time_since_restore", "iterations_since_restore", "timesteps_total", "timesteps_since_restore",
    "episodes_total", "pid", "date", "hostname", "node_ip", "done", "trial_id", "experiment_tag",
    "config", "checkpoint_dir_name", "should_checkpoint", "warmup_time"})


class TrackingError(SweepError):
    """`--mlflow` cannot be used as given; one line saying why."""


def tensorboard_uri(sweep_uri: str, key: str | None = None) -> str:
    """`<sweep>/tensorboard[/<key>]`: the logdir of a sweep (or of one trial)."""
    return storage.join(sweep_uri, TB_DIR, *([key] if key else []))


def scalars(result: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """(outer step, the finite numeric metrics) of a Tune result; Tune's and rcig's
    bookkeeping (`rcig/...`: checkpoint pointer, accelerator seconds) left out."""
    step = result.get("step")
    if not isinstance(step, (int, float)) or isinstance(step, bool):
        step = result.get("training_iteration") or 0
    out = {}
    for k, v in result.items():
        if k in _TUNE_KEYS or k.startswith("rcig/") or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return int(step), out


def _key(spec: SweepSpec, trial, result: Mapping[str, Any] | None = None,
         seen: dict[str, str] | None = None) -> str:
    """The trial's folder key: as its results name it (`rcig/trial_key`; remembered in
    `seen` by Tune trial id), else from its config."""
    named = (result or {}).get("rcig/trial_key")
    if isinstance(named, str) and named:
        if seen is not None:
            seen[trial.trial_id] = named
        return named
    if seen and trial.trial_id in seen:
        return seen[trial.trial_id]
    from orchestrator.trial import key_of

    return key_of(spec, trial.config, trial.trial_id)


def _params(trial) -> dict[str, Any]:
    from orchestrator.trial import trial_params

    return trial_params(trial.config)


def _warn(what: str, e: BaseException) -> None:
    msg = " ".join(str(e).split())[:300] or type(e).__name__
    print(f"rcig: {what}: {type(e).__name__}: {msg}", file=sys.stderr)


# ---- TensorBoard ---------------------------------------------------------------------------
class TensorBoardCallback(TBXLoggerCallback):
    """One TensorBoard run per trial in `<sweep>/tensorboard/<key>/` (see module docstring)."""

    RCIG_TRACKING = True

    def __init__(self, sweep_uri: str, spec: SweepSpec, upload_s: float | None = None):
        super().__init__()  # checks tensorboardX is importable
        self.sweep_uri = storage.normalize(sweep_uri)
        self.spec = spec
        self.upload_s = float(os.environ.get("RCIG_TB_UPLOAD_S", "30")) if upload_s is None else upload_s
        self._writers: dict[str, Any] = {}
        self._last: dict[str, dict[str, float]] = {}
        self._uploaded: dict[str, float] = {}
        self._staging: str | None = None
        self._seen: dict[str, str] = {}

    def __getstate__(self):  # pickled into Tune's tuner.pkl: no open writers, no temp dirs
        state = self.__dict__.copy()
        state.update(_writers={}, _last={}, _uploaded={}, _staging=None,
                     _trial_writer={}, _trial_result={})
        return state

    def _logdir(self, key: str) -> str:
        if not storage.is_remote(self.sweep_uri):
            return tensorboard_uri(self.sweep_uri, key)
        if self._staging is None:
            self._staging = tempfile.mkdtemp(prefix="rcig-tensorboard-")
        return os.path.join(self._staging, key)

    def _writer(self, key: str):
        if key not in self._writers:  # one writer per trial and driver, across its restarts
            os.makedirs(self._logdir(key), exist_ok=True)
            # a unique file per writer: tensorboardX names files by the second and host only
            suffix = f".{os.getpid()}.{time.monotonic_ns()}"
            self._writers[key] = self._summary_writer_cls(self._logdir(key), flush_secs=30,
                                                          filename_suffix=suffix)
            self._last.setdefault(key, {})
        return self._writers[key]

    def _upload(self, key: str, force: bool = False) -> None:
        if not storage.is_remote(self.sweep_uri):
            return
        now = time.time()
        if not force and now - self._uploaded.get(key, 0.0) < self.upload_s:
            return
        self._uploaded[key] = now
        local = self._logdir(key)
        for name in sorted(os.listdir(local)) if os.path.isdir(local) else []:
            with open(os.path.join(local, name), "rb") as f:
                storage.write_bytes(tensorboard_uri(self.sweep_uri, key) + "/" + name, f.read())

    def log_trial_start(self, trial) -> None:
        try:
            self._writer(_key(self.spec, trial, seen=self._seen))
        except Exception as e:  # noqa: BLE001 - tracking must never stop the sweep
            _warn(f"TensorBoard: trial {trial.trial_id} not logged", e)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        try:
            key = _key(self.spec, trial, result, self._seen)
            w = self._writer(key)
            step, values = scalars(result)
            for tag, v in sorted(values.items()):
                w.add_scalar(tag, v, global_step=step)
            self._last[key].update(values)
            w.flush()
            self._upload(key)
        except Exception as e:  # noqa: BLE001
            _warn(f"TensorBoard: a result of trial {trial.trial_id} not logged", e)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        try:
            key = _key(self.spec, trial, seen=self._seen)
            if key not in self._writers:
                return
            w = self._writers.pop(key)
            last = self._last.pop(key, {})
            metrics = {m: last[m] for m in HPARAM_METRICS if m in last}
            params = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                      for k, v in _params(trial).items()}
            if metrics and params:
                from tensorboardX.summary import hparams

                for summary in hparams(hparam_dict=params, metric_dict=metrics):
                    w.file_writer.add_summary(summary)
            w.close()
            self._upload(key, force=True)
        except Exception as e:  # noqa: BLE001
            _warn(f"TensorBoard: end of trial {trial.trial_id} not logged", e)

    def on_experiment_end(self, trials, **info) -> None:
        for key in list(self._writers):
            try:
                self._writers.pop(key).close()
                self._upload(key, force=True)
            except Exception as e:  # noqa: BLE001
                _warn(f"TensorBoard: trial {key} not uploaded", e)


# ---- MLflow ---------------------------------------------------------------------------------
def _allow_file_store(uri: str) -> None:
    """MLflow 3 refuses its file store unless asked; a `file://` URI asks for exactly that."""
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def check_mlflow(uri: str) -> str:
    """Before Ray starts: MLflow importable and the tracking store answering. Returns the
    URI to use (a plain path becomes an absolute `file://` URI, so a resume from another
    folder logs to the same store). Raises `TrackingError` (one line) otherwise.

    Example:
        >>> check_mlflow("relative/mlruns")          # doctest: +SKIP
        'file:///work/relative/mlruns'
    """
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError("--mlflow needs MLflow: pip install 'rcig-sweep[tracking]' "
                            "(mlflow-skinny)") from None
    if "://" not in uri and not uri.startswith("file:"):
        uri = "file://" + os.path.abspath(os.path.expanduser(uri))
    _allow_file_store(uri)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure is the user's URI or server
        raise TrackingError(f"--mlflow {uri}: the tracking store does not answer "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    return uri


def recordable(uri: str | None) -> str | None:
    """The URI as the manifest may keep it: without a password (resume then needs
    MLflow's own credentials, e.g. MLFLOW_TRACKING_PASSWORD).

    Example:
        >>> recordable("https://me:secret@mlflow.example/x")
        'https://me@mlflow.example/x'
    """
    if not uri:
        return None
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def resume_uri(doc: Mapping[str, Any], given: str | None) -> str | None:
    """MLflow URI for `rcig sweep resume`: `--mlflow URI` if given (`--mlflow off`: none),
    else the one the sweep's latest launch or resume tracked to.

    Example:
        >>> doc = {"launches": [{"kind": "launch", "mlflow": "file:///m"}, {"kind": "resume"}]}
        >>> resume_uri(doc, None), resume_uri(doc, "off"), resume_uri({}, None)
        ('file:///m', None, None)
    """
    if given is not None:
        return None if given.strip().lower() in OFF else given
    for launch in reversed(doc.get("launches") or []):
        if "mlflow" in launch:
            return launch["mlflow"] or None
    return None


# ---- wiring into a sweep --------------------------------------------------------------------
def callbacks(sweep_uri: str, spec: SweepSpec, mlflow_uri: str | None = None) -> list:
    """The sweep's tracking callbacks: TensorBoard always, MLflow when a URI is given."""
    out: list = [TensorBoardCallback(sweep_uri, spec)]
    if mlflow_uri:
        from orchestrator.mlflow_tracking import MLflowCallback

        out.append(MLflowCallback(mlflow_uri, sweep_uri, spec))
    return out


def replace_in_restored(tuner, new: Sequence) -> bool:
    """Put fresh tracking callbacks into a tuner from `Tuner.restore`, which brings back the
    ones pickled at launch (with the URIs of then). Ray has no public setter for a restored
    tuner's run config; it is reached through `tuner._local_tuner.get_run_config()`.
    Returns False (the pickled callbacks stay) where that is not available."""
    local = getattr(tuner, "_local_tuner", None)
    if local is None or not hasattr(local, "get_run_config"):
        return False
    rc = local.get_run_config()
    kept = [c for c in (rc.callbacks or [])
            if not (isinstance(c, TensorBoardCallback) or getattr(c, "RCIG_TRACKING", False))]
    rc.callbacks = kept + list(new)
    return True
