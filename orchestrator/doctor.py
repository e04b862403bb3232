"""`rcig sweep doctor`: what in a sweep's storage needs a person's attention.

Reads storage only (no Ray). Each finding is one line naming the path:

- a damaged trial record (not JSON, not a record): that trial cannot run until it is
  fixed or removed; status and best cannot rank it;
- a lease: held (an attempt is writing the folder now; who, since when), stale (its holder
  stopped renewing without releasing: the next attempt takes it over), or damaged;
- a trial RUNNING without an update for a while (its driver or node is probably gone);
- a record whose committed checkpoint is missing from its folder;
- a trial folder Ray's experiment state knows with no rcig trial folder (or no record).

Example:
    >>> report = diagnose("quickstart")                          # doctest: +SKIP
    >>> [f.kind for f in report.findings]                        # doctest: +SKIP
    ['lease-held']
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator import lifecycle as lc
from orchestrator import manifest as mf
from orchestrator.locate import resolve_sweep
from rcig import lease, storage

# Kinds that need a fix (the others only inform: a held lease is a running attempt).
PROBLEMS = ("damaged-record", "lease-stale", "lease-damaged", "running-stale",
            "checkpoint-missing", "folder-missing")


@dataclass(frozen=True)
class Finding:
    kind: str
    path: str
    detail: str

    @property
    def problem(self) -> bool:
        return self.kind in PROBLEMS


@dataclass
class Diagnosis:
    sweep_uri: str
    trials: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.problem]

    def to_dict(self) -> dict[str, Any]:
        return {"sweep_uri": self.sweep_uri, "trials": self.trials,
                "findings": [{**asdict(f), "problem": f.problem} for f in self.findings]}


def _lease_finding(folder: str, now: float) -> Finding | None:
    uri = lease.lease_uri(folder)
    cur = storage.read_versioned(uri)
    if cur is None:
        return None
    doc = lease.parse(cur.text)
    if doc is None:
        return Finding("lease-damaged", uri, "not a lease; the next attempt takes it over")
    if doc.get("released"):
        return None
    stale_s = lease.stale_after_s()
    if now - float(doc.get("t", 0)) > stale_s:
        return Finding("lease-stale", uri, f"held by {lease.describe(doc, now)}: its holder is gone; "
                                           f"the trial's next attempt takes it over")
    return Finding("lease-held", uri, f"held by {lease.describe(doc, now)}")


def _ray_trial_dirs(sweep_uri: str) -> list[str]:
    """Names of Ray's per-trial folders in the sweep (they hold params.json)."""
    out = []
    for name in storage.listdir(sweep_uri):
        if name == mf.TRIALS or "." in name:
            continue
        if storage.exists(storage.join(sweep_uri, name, "params.json")):
            out.append(name)
    return out


def diagnose(name_or_uri: str, running_stale_s: float = 180.0) -> Diagnosis:
    """Everything in the sweep's storage that needs attention (see the module docstring)."""
    from orchestrator.results import committed_steps

    uri = resolve_sweep(name_or_uri)
    mf.read_manifest(uri)
    out = Diagnosis(uri)
    now = time.time()
    damaged: list[mf.DamagedRecord] = []
    records = {r.key: r for r in mf.read_records(uri, damaged)}
    out.trials = len(records) + len(damaged)
    out.findings += [Finding("damaged-record", e.uri, str(e).split(": ", 1)[-1]) for e in damaged]
    for key in storage.listdir(storage.join(uri, mf.TRIALS)):
        found = _lease_finding(mf.trial_uri(uri, key), now)
        if found:
            out.findings.append(found)
    for key, rec in records.items():
        folder = mf.trial_uri(uri, key)
        if lc.is_stale_running(rec, now, running_stale_s):
            out.findings.append(Finding("running-stale", mf.record_uri(uri, key),
                                        f"RUNNING but not updated for {now - rec.updated:.0f} s; if the "
                                        f"sweep's driver is gone, `rcig sweep resume` continues it"))
        if rec.checkpoint_step is not None and rec.checkpoint_step not in committed_steps(folder):
            out.findings.append(Finding("checkpoint-missing", storage.join(folder, "checkpoints"),
                                        f"the record names committed step {rec.checkpoint_step}, "
                                        f"which is not there; the next attempt starts from the "
                                        f"newest step that is"))
    known = set(records) | {e.uri.split("/")[-2] for e in damaged}
    for name in _ray_trial_dirs(uri):
        if name not in known:
            out.findings.append(Finding("folder-missing", mf.trial_uri(uri, name),
                                        "Ray ran this trial but its rcig folder (record, "
                                        "checkpoints) is missing"))
    return out
