"""The sweep's own manifest in storage: enough for status/best/fetch without Ray.

Layout of a sweep folder (any URI: local path, file://, gs://)::

    <sweep>/rcig_sweep.json          name, spec as launched, launches (ours)
    <sweep>/spec.yaml                the same spec, readable
    <sweep>/trials/<key>/trial.json  one record per trial (ours; written by the trial)
    <sweep>/trials/<key>/...         what rcig.distill writes: config.json, metrics.jsonl,
                                     checkpoints/ (Orbax), distilled.npz/.png, eval.json
    <sweep>/tuner.pkl, experiment_state-*.json, <key>/result.json ...   (Ray's, standard)

A trial's key is its parameters plus a short hash of its resolved config and seed, so a
rerun or a resubmitted sweep finds the same folder.

Example:
    >>> from rcig.config import make_config
    >>> trial_key({"model.width": 16}, make_config("digits", 1))[:9]
    'width=16_'
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from rcig import storage
from rcig.config import DistillConfig

MANIFEST = "rcig_sweep.json"
TRIALS = "trials"
RECORD = "trial.json"
FORMAT = 1
# Trial states in our manifest (Ray's own states are separate).
PENDING, RUNNING, PREEMPTED, FAILED, ERROR, COMPLETED, STOPPED = (
    "PENDING", "RUNNING", "PREEMPTED", "FAILED", "ERROR", "COMPLETED", "STOPPED")
FINAL_STATES = (COMPLETED, STOPPED)


class ManifestError(ValueError):
    """No (readable) sweep manifest at a URI; the message names the URI."""


# ---- identity ------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def trial_key(params: Mapping[str, Any], cfg: DistillConfig) -> str:
    """Folder name of a trial: short `name=value` pairs + hash of (resolved config, seed)."""
    digest = hashlib.sha256(f"{cfg.fingerprint()}|seed={cfg.seed}".encode()).hexdigest()[:8]
    lasts = [k.rsplit(".", 1)[-1] for k in params]
    parts = []
    for k in sorted(params):
        short = k.rsplit(".", 1)[-1]
        parts.append(f"{short if lasts.count(short) == 1 else k}={_fmt(params[k])}")
    slug = re.sub(r"[^A-Za-z0-9._=,+-]", "-", ",".join(parts))[:60].rstrip(",")
    return f"{slug}_{digest}" if slug else digest


# ---- records ---------------------------------------------------------------------------
@dataclass
class TrialRecord:
    """Our record of one trial, kept in `<sweep>/trials/<key>/trial.json`."""

    key: str
    params: dict[str, Any]
    fingerprint: str
    config: dict[str, Any]
    status: str = PENDING
    attempts: int = 0
    preemptions: int = 0
    failures: int = 0
    budget_base_preemptions: int = 0  # counts at the last `resume` (it grants new budgets)
    budget_base_failures: int = 0
    step: int | None = None
    checkpoint_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    accelerators: int = 1
    accelerator_unit: str = "cpu"
    accelerator_s: float = 0.0
    wall_s: float | None = None
    updated: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrialRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True, default=str)

    @property
    def failures_used(self) -> int:
        return self.failures - self.budget_base_failures

    @property
    def preemptions_used(self) -> int:
        return self.preemptions - self.budget_base_preemptions

    def last_error(self) -> str | None:
        return self.errors[-1]["traceback"] if self.errors else None

    def open_attempt(self, **info: Any) -> dict[str, Any]:
        self.attempts += 1
        now = time.time()
        att = {"n": self.attempts, "host": socket.gethostname(), "started": now,
               "updated": now, "start_step": self.checkpoint_step, "outcome": None, **info}
        self.history.append(att)
        self.status = RUNNING
        return att

    def tick(self, now: float | None = None) -> None:
        """Account accelerator time of the open attempt up to `now`."""
        now = time.time() if now is None else now
        if self.history and self.history[-1].get("outcome") is None:
            att = self.history[-1]
            self.accelerator_s += max(0.0, now - att["updated"]) * self.accelerators
            att["updated"] = now

    def close_attempt(self, outcome: str, **info: Any) -> None:
        self.tick()
        if self.history and self.history[-1].get("outcome") is None:
            self.history[-1].update(outcome=outcome, ended=time.time(), end_step=self.step, **info)


def trial_uri(sweep_uri: str, key: str) -> str:
    return storage.join(sweep_uri, TRIALS, key)


def read_record(sweep_uri: str, key: str) -> TrialRecord | None:
    uri = storage.join(trial_uri(sweep_uri, key), RECORD)
    try:
        return TrialRecord.from_dict(json.loads(storage.read_text(uri)))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # half-written local file is impossible; be lenient
        return None


def write_record(sweep_uri: str, rec: TrialRecord) -> None:
    rec.updated = time.time()
    storage.write_text(storage.join(trial_uri(sweep_uri, rec.key), RECORD), rec.to_json())


def read_records(sweep_uri: str) -> list[TrialRecord]:
    """All trial records of a sweep, sorted by key (missing/unreadable ones skipped)."""
    out = []
    for key in storage.listdir(storage.join(sweep_uri, TRIALS)):
        rec = read_record(sweep_uri, key)
        if rec is not None:
            out.append(rec)
    return out


# ---- the sweep manifest -------------------------------------------------------------------
def write_manifest(sweep_uri: str, name: str, raw_spec: Mapping[str, Any], source: str,
                   launch: Mapping[str, Any]) -> dict[str, Any]:
    """Create or extend `<sweep>/rcig_sweep.json` with this launch; also writes spec.yaml."""
    import yaml

    old = read_manifest(sweep_uri, missing_ok=True) or {}
    doc = {
        "format": FORMAT,
        "name": name,
        "uri": storage.normalize(sweep_uri),
        "created": old.get("created", time.time()),
        "spec": dict(raw_spec),
        "source": source,
        "launches": [*old.get("launches", []), dict(launch)],
    }
    storage.write_text(storage.join(sweep_uri, MANIFEST), json.dumps(doc, indent=1, default=str))
    storage.write_text(storage.join(sweep_uri, "spec.yaml"),
                       f"# spec as launched from {source}\n" + yaml.safe_dump(dict(raw_spec), sort_keys=False))
    return doc


def read_manifest(sweep_uri: str, missing_ok: bool = False) -> dict[str, Any] | None:
    uri = storage.join(sweep_uri, MANIFEST)
    try:
        doc = json.loads(storage.read_text(uri))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ManifestError(f"{sweep_uri}: no rcig sweep here ({MANIFEST} not found)") from None
    except ValueError as e:
        raise ManifestError(f"{uri}: unreadable manifest ({e})") from None
    if not isinstance(doc, dict) or "spec" not in doc:
        raise ManifestError(f"{uri}: not an rcig sweep manifest")
    return doc
