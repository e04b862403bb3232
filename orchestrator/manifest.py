"""The sweep's own manifest in storage: enough for status/best/fetch without Ray.

Layout of a sweep folder (any URI: local path, file://, gs://)::

    <sweep>/rcig_sweep.json          name, spec as launched, launches (ours)
    <sweep>/spec.yaml                the same spec, readable
    <sweep>/trials/<key>/trial.json  one record per trial (ours; written by the trial)
    <sweep>/trials/<key>/...         what rcig.distill writes: config.json, metrics.jsonl,
                                     checkpoints/ (Orbax), distilled.npz/.png, eval.json
    <sweep>/tuner.pkl, experiment_state-*.json, <key>/result.json ...   (Ray's, standard)

A trial's key is its parameters (and sample index, when a sweep draws several samples) plus
a short hash of its run identity, so a rerun, a resubmitted sweep or an upgraded release
finds the same folder. Records change only by compare-and-swap (`RecordStore`).

Example:
    >>> from rcig.config import make_config
    >>> trial_key({"model.width": 16}, make_config("digits", 1))[:9]
    'width=16_'
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Mapping

from rcig import storage
from rcig.config import DistillConfig, identity_hash

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


class DamagedRecord(ValueError):
    """A trial record that is not valid JSON or not a record; the message names its path.
    Never read as "no record": that would restart the trial with blank budgets."""

    def __init__(self, uri: str, why: str):
        self.uri = uri
        super().__init__(f"{uri}: damaged trial record ({why}); fix or remove it "
                         f"(`rcig sweep doctor` lists damaged records)")


# ---- identity ------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def trial_key(params: Mapping[str, Any], cfg: DistillConfig, sample: int | None = None) -> str:
    """Folder name of a trial: short `name=value` pairs, the sample index when the sweep
    draws several samples, and a hash of the run's identity (`rcig.config.identity_hash`:
    only the fields that change the distilled set, defaults left out) and the sample."""
    ident = identity_hash(cfg) + ("" if sample is None else f"|sample={sample}")
    digest = hashlib.sha256(ident.encode()).hexdigest()[:8]
    lasts = [k.rsplit(".", 1)[-1] for k in params]
    parts = []
    for k in sorted(params):
        short = k.rsplit(".", 1)[-1]
        parts.append(f"{short if lasts.count(short) == 1 else k}={_fmt(params[k])}")
    if sample is not None:
        parts.append(f"s{sample}")
    slug = re.sub(r"[^A-Za-z0-9._=,+-]", "-", ",".join(parts))[:60].rstrip(",")
    return f"{slug}_{digest}" if slug else digest


# ---- records ---------------------------------------------------------------------------
@dataclass
class TrialRecord:
    """Our record of one trial, kept in `<sweep>/trials/<key>/trial.json`."""

    key: str
    params: dict[str, Any]
    fingerprint: str  # rcig.config.identity_hash of the config
    config: dict[str, Any]
    sample: int | str | None = None  # which sample of a repeated point (None: the only one)
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


def trial_uri(sweep_uri: str, key: str) -> str:
    return storage.join(sweep_uri, TRIALS, key)


def record_uri(sweep_uri: str, key: str) -> str:
    return storage.join(trial_uri(sweep_uri, key), RECORD)


def _parse_record(uri: str, text: str) -> TrialRecord:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise DamagedRecord(uri, f"not JSON: {e}") from None
    if not isinstance(doc, dict) or "key" not in doc:
        raise DamagedRecord(uri, "not a trial record")
    try:
        return TrialRecord.from_dict(doc)
    except TypeError as e:
        raise DamagedRecord(uri, str(e)) from None


def read_record(sweep_uri: str, key: str) -> TrialRecord | None:
    """The trial's record; None if it has none; `DamagedRecord` if it is unreadable."""
    uri = record_uri(sweep_uri, key)
    cur = storage.read_versioned(uri)
    return None if cur is None else _parse_record(uri, cur.text)


class RecordStore:
    """One trial's record, changed only by compare-and-swap (`update`).

    The trial's actor, the driver's callback and `rcig sweep resume` all change records;
    each change is a function of the current record, applied to a freshly read copy and
    written only if nobody wrote in between (else it is recomputed), so no update is lost.
    """

    def __init__(self, sweep_uri: str, key: str, attempts: int = 20):
        self.sweep_uri, self.key, self.uri = sweep_uri, key, record_uri(sweep_uri, key)
        self.attempts = attempts

    def update(self, change: Callable[[TrialRecord | None], Any]) -> Any:
        """Apply `change(record or None)`; it returns the new record, or an object with a
        `.record` (a lifecycle Decision), which is returned. Raises `DamagedRecord`."""
        for _ in range(self.attempts):
            cur = storage.read_versioned(self.uri)
            rec = None if cur is None else _parse_record(self.uri, cur.text)
            out = change(rec)
            new = getattr(out, "record", out)
            if new is None:
                return out
            new.updated = time.time()
            try:
                storage.write_if(self.uri, new.to_json(), None if cur is None else cur.version)
                return out
            except storage.PreconditionFailed:
                time.sleep(random.uniform(0.01, 0.2))
        raise storage.StorageError(f"{self.uri}: still changing after {self.attempts} tries; "
                                   f"giving up this update")


def count_states(records: list[TrialRecord], damaged: list[DamagedRecord] | None = None) -> dict[str, int]:
    """Trials per state (damaged records as DAMAGED)."""
    out: dict[str, int] = {}
    for rec in records:
        out[rec.status] = out.get(rec.status, 0) + 1
    if damaged:
        out["DAMAGED"] = len(damaged)
    return out


def format_counts(counts: dict[str, int], empty: str = "no trials yet") -> str:
    """`count_states` as one line of text.

    Example:
        >>> format_counts({"RUNNING": 1, "COMPLETED": 2})
        '2 COMPLETED, 1 RUNNING'
    """
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or empty


def write_record(sweep_uri: str, rec: TrialRecord) -> None:
    """Replace a record unconditionally (tests and repairs; trials use RecordStore)."""
    rec.updated = time.time()
    storage.write_text(record_uri(sweep_uri, rec.key), rec.to_json())


def read_records(sweep_uri: str, damaged: list[DamagedRecord] | None = None) -> list[TrialRecord]:
    """All trial records of a sweep, sorted by key. A damaged record is never dropped
    silently: it goes to `damaged` if given, else `DamagedRecord` is raised."""
    out = []
    for key in storage.listdir(storage.join(sweep_uri, TRIALS)):
        try:
            rec = read_record(sweep_uri, key)
        except DamagedRecord as e:
            if damaged is None:
                raise
            damaged.append(e)
            continue
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
