"""The files of a run folder (local path, file:// or gs://): their names, their one writer
and their one reader each.

    config.json        the resolved config (`write_config`, `read_config`)
    metrics.jsonl      one JSON object per outer step, {"step": s, "outer/loss": ..., ...}
                       (`open_metrics`, `read_metrics`)
    metrics.jsonl.d/   remote folders only: the same rows as numbered parts (see below)
    tuning.json        the LR search result and the run identity
    split.json         the validation split held out of train
    distilled.npz      the distilled set (`write_distilled`, `read_distilled`), with
    distilled.png      a grid of its images
    eval.json          the final evaluation (`write_eval`, `read_eval`)
    eval.partial.json  finished evaluation runs while the evaluation is in progress
    checkpoints/       Orbax checkpoints (`rcig.checkpoint`, not here)

Metrics in storage. A local `metrics.jsonl` is one file: opened for a run from step
`start`, it keeps the rows up to `start` (a resumed run replays the steps after its
checkpoint) and every flush appends the new rows. An object store cannot append, so a
remote run folder keeps the rows as parts written once each: `metrics.jsonl.d/000007.jsonl`
holds the rows of one flush, in order of the number. A part named `000009.base.jsonl` holds
the whole history up to its point (written when a resumed run drops rows past its
checkpoint): reading starts at the newest base and ignores what precedes it. Without a
base, reading starts with a `metrics.jsonl` file if there is one (run folders written
before parts existed, or a folder copied from a local run), then the parts. `read_metrics`
reads all three forms; `download_metrics` makes a single local file of any of them.

The writer of a multi-process run lives in one process; the others get `NullMetricsLog`
(`open_metrics(..., write=False)`), which takes rows and writes nothing.

Example:
    >>> import tempfile
    >>> run = tempfile.mkdtemp()
    >>> log = open_metrics(run, start=0)
    >>> log.add({"step": 1, "outer/loss": 0.5}); log.flush()
    >>> [r["step"] for r in read_metrics(run)]
    [1]
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np

from rcig import storage

CONFIG_JSON = "config.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_PARTS = "metrics.jsonl.d"
TUNING_JSON = "tuning.json"
SPLIT_JSON = "split.json"
DISTILLED_NPZ = "distilled.npz"
DISTILLED_PNG = "distilled.png"
EVAL_JSON = "eval.json"
EVAL_PARTIAL_JSON = "eval.partial.json"
# A run's own files besides its checkpoints (what `rcig distill --restart` moves aside).
RUN_FILES = (CONFIG_JSON, METRICS_JSONL, METRICS_PARTS, TUNING_JSON, SPLIT_JSON, DISTILLED_NPZ,
             DISTILLED_PNG, EVAL_JSON, EVAL_PARTIAL_JSON)

_PART = re.compile(r"^(\d+)(\.base)?\.jsonl$")


def uri_of(run: str, *names: str) -> str:
    """The URI of file `names` (joined) of run folder `run`."""
    return storage.join(run, *names)


# ---- JSON files ---------------------------------------------------------------------------
def write_json(uri: str, obj: Any) -> None:
    """A JSON file as every run file is written: indented, keys sorted, one final newline."""
    storage.write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def read_json(uri: str) -> Any:
    """The parsed JSON file at `uri`, or None if there is none. Unreadable: the ValueError
    (bad JSON) or OSError (storage) as raised."""
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_text(uri))


def write_config(run: str, cfg) -> None:
    """config.json: `DistillConfig.to_json()` (written first, so a folder says which run it holds)."""
    storage.write_text(uri_of(run, CONFIG_JSON), cfg.to_json() + "\n")


def read_config(run: str) -> dict | None:
    """config.json as a dict, None if absent; ValueError if it is not JSON."""
    return read_json(uri_of(run, CONFIG_JSON))


def write_eval(run: str, result: dict) -> None:
    """eval.json (the dict of `rcig.evaluate.evaluate_distilled`); drops eval.partial.json."""
    write_json(uri_of(run, EVAL_JSON), result)
    storage.remove(uri_of(run, EVAL_PARTIAL_JSON))


def read_eval(run: str) -> dict | None:
    """eval.json as a dict; None if absent or not an object; ValueError if it is not JSON."""
    doc = read_json(uri_of(run, EVAL_JSON))
    return doc if isinstance(doc, dict) else None


# ---- the distilled set --------------------------------------------------------------------
def write_distilled(run: str, arrays: dict[str, np.ndarray], num_classes: int) -> None:
    """distilled.npz (`rcig.export.distilled_arrays`) and distilled.png (one row per class)."""
    from rcig.export import image_grid_png

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    storage.write_bytes(uri_of(run, DISTILLED_NPZ), buf.getvalue())
    storage.write_bytes(uri_of(run, DISTILLED_PNG), image_grid_png(arrays["x_pixels"], rows=num_classes))


def read_distilled(uri: str) -> dict[str, np.ndarray]:
    """Every array of a distilled.npz (`uri` is the file, or a run folder holding it).

    Raises FileNotFoundError / `storage.StorageError` if it cannot be read, and ValueError,
    OSError or `zipfile.BadZipFile` if it is not a readable .npz (no pickled objects)."""
    if not uri.endswith(".npz"):
        uri = uri_of(uri, DISTILLED_NPZ)
    with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ---- metrics ------------------------------------------------------------------------------
def _parse_rows(text: str) -> list[dict]:
    """Objects with an integer "step", one a line; torn (a kill mid-write) or other lines skipped."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _dump_rows(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def _parts(run: str) -> list[tuple[int, bool, str]]:
    """(number, is_base, name) of the metric parts, in order."""
    out = []
    for name in storage.listdir(uri_of(run, METRICS_PARTS)):
        m = _PART.match(name)
        if m:
            out.append((int(m.group(1)), bool(m.group(2)), name))
    return sorted(out)


def _read_all_metrics(run: str) -> tuple[list[dict], list[tuple[int, bool, str]]]:
    parts = _parts(run)
    bases = [i for i, (_, is_base, _) in enumerate(parts) if is_base]
    rows: list[dict] = []
    if bases:
        parts_read = parts[bases[-1]:]
    else:
        parts_read = parts
        single = uri_of(run, METRICS_JSONL)
        if storage.exists(single):
            rows = _parse_rows(storage.read_text(single))
    for _, _, name in parts_read:
        rows.extend(_parse_rows(storage.read_text(uri_of(run, METRICS_PARTS, name))))
    return rows, parts


def read_metrics(run: str, upto: int | None = None) -> list[dict]:
    """The metric rows of run folder `run` in step order (those with step <= `upto` if
    given); [] if it has none. Reads a local file, remote parts or an older single remote file.

    Example:
        >>> read_metrics("/nonexistent/run")
        []
    """
    rows, _ = _read_all_metrics(run)
    return rows if upto is None else [r for r in rows if r["step"] <= upto]


def download_metrics(run: str, local_path: str) -> bool:
    """Write the metrics of `run` (any form) as one local metrics.jsonl; False if it has none."""
    if not _parts(run):
        src = uri_of(run, METRICS_JSONL)
        if not storage.exists(src):
            return False
        storage.download(src, local_path)
        return True
    storage.write_text(local_path, _dump_rows(read_metrics(run)))
    return True


class NullMetricsLog:
    """The metrics log of a process that does not write them: takes rows, writes nothing."""

    def add(self, row: dict) -> None:
        pass

    def flush(self) -> None:
        pass


class MetricsLog(NullMetricsLog):
    """The metrics of a run from step `start` on: `add` a row per step, `flush` writes the
    rows added since the last flush (an append locally, a new part remotely)."""

    def __init__(self, run: str, start: int):
        self.run = storage.normalize(run)
        self.remote = storage.is_remote(self.run)
        self.pending: list[dict] = []
        if not self.remote:
            uri = uri_of(self.run, METRICS_JSONL)
            kept = _parse_rows(storage.read_text(uri)) if storage.exists(uri) else []
            storage.write_text(uri, _dump_rows([r for r in kept if r["step"] <= start]))
            return
        rows, parts = _read_all_metrics(self.run)
        kept = [r for r in rows if r["step"] <= start]
        self.next = parts[-1][0] + 1 if parts else 0
        if len(kept) < len(rows):  # rows past the checkpoint: one base part replaces them all
            storage.write_text(uri_of(self.run, METRICS_PARTS, f"{self.next:06d}.base.jsonl"), _dump_rows(kept))
            self.next += 1
            for _, _, name in parts:  # unread from now on; removed to keep listings short
                storage.remove(uri_of(self.run, METRICS_PARTS, name))
            storage.remove(uri_of(self.run, METRICS_JSONL))

    def add(self, row: dict) -> None:
        self.pending.append(row)

    def flush(self) -> None:
        if not self.pending:
            return
        text = _dump_rows(self.pending)
        if self.remote:
            storage.write_text(uri_of(self.run, METRICS_PARTS, f"{self.next:06d}.jsonl"), text)
            self.next += 1
        else:
            with open(uri_of(self.run, METRICS_JSONL), "a") as f:
                f.write(text)
        self.pending = []


def open_metrics(run: str, start: int, write: bool = True) -> NullMetricsLog:
    """The metrics log of a run (resumed) from step `start`: rows past `start` are dropped
    now; `write=False` (a process that does not own the files) gives a `NullMetricsLog`."""
    return MetricsLog(run, start) if write else NullMetricsLog()
