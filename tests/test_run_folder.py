"""The run folder's files (`rcig.run_folder`): the metrics log locally (one file, appended)
and on gs:// (parts written once each, on the loopback GCS emulator), both read back by
the one reader; JSON files and the distilled set round-trip."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rcig import run_folder as rf
from rcig import storage


def _rows(steps):
    return [{"step": s, "outer/loss": 1.0 / s} for s in steps]


def _run_attempt(run: str, start: int, steps, flush_every: int = 2) -> None:
    """An attempt that resumes at `start` and logs `steps`, flushing every `flush_every` rows."""
    log = rf.open_metrics(run, start)
    for i, row in enumerate(_rows(steps), 1):
        log.add(row)
        if i % flush_every == 0:
            log.flush()
    log.flush()


def _history(run: str):
    return [r["step"] for r in rf.read_metrics(run)]


def test_local_metrics_one_file_resume_drops_rows_past_the_checkpoint(tmp_path):
    run = str(tmp_path)
    _run_attempt(run, 0, range(1, 8))           # killed after step 7, last checkpoint at 4
    assert _history(run) == list(range(1, 8))
    _run_attempt(run, 4, range(5, 11))
    assert _history(run) == list(range(1, 11))
    assert os.listdir(tmp_path) == [rf.METRICS_JSONL]  # one file, nothing else
    lines = (tmp_path / rf.METRICS_JSONL).read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 11))
    with open(tmp_path / rf.METRICS_JSONL, "a") as f:
        f.write('{"step": 11, "outer/lo')          # a torn last line from a kill mid-write
    assert _history(run) == list(range(1, 11)) and rf.read_metrics(run, upto=3) == _rows([1, 2, 3])


def test_null_metrics_log_writes_nothing(tmp_path):
    log = rf.open_metrics(str(tmp_path), 0, write=False)
    log.add({"step": 1})
    log.flush()
    assert os.listdir(tmp_path) == [] and rf.read_metrics(str(tmp_path)) == []


def test_remote_metrics_are_parts_and_read_like_one_file(gcs_bucket, tmp_path):
    run = f"{gcs_bucket}/run"
    _run_attempt(run, 0, range(1, 6))           # 3 flushes: 3 parts, no whole-file rewrite
    parts = storage.listdir(rf.uri_of(run, rf.METRICS_PARTS))
    assert parts == ["000000.jsonl", "000001.jsonl", "000002.jsonl"]
    assert not storage.exists(rf.uri_of(run, rf.METRICS_JSONL))
    assert _history(run) == [1, 2, 3, 4, 5]
    _run_attempt(run, 5, [6, 7])                 # a resume at the last step: parts appended
    assert _history(run) == list(range(1, 8))
    _run_attempt(run, 4, [5, 6])                 # a resume behind rows: one base part replaces them
    assert _history(run) == list(range(1, 7))
    assert storage.listdir(rf.uri_of(run, rf.METRICS_PARTS)) == ["000004.base.jsonl", "000005.jsonl"]
    assert rf.download_metrics(run, str(tmp_path / "m.jsonl"))
    assert [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == list(range(1, 7))


def test_remote_single_file_from_before_parts_is_read_and_continued(gcs_bucket):
    run = f"{gcs_bucket}/old"
    storage.write_text(rf.uri_of(run, rf.METRICS_JSONL), "".join(json.dumps(r) + "\n" for r in _rows(range(1, 5))))
    assert _history(run) == [1, 2, 3, 4]
    _run_attempt(run, 4, [5])
    assert _history(run) == [1, 2, 3, 4, 5]
    _run_attempt(run, 2, [3])                    # behind: the single file is folded into a base
    assert _history(run) == [1, 2, 3] and not storage.exists(rf.uri_of(run, rf.METRICS_JSONL))


def test_json_and_distilled_round_trip(tmp_path):
    run = str(tmp_path)
    assert rf.read_eval(run) is None and rf.read_config(run) is None
    storage.write_text(rf.uri_of(run, rf.EVAL_PARTIAL_JSON), "{}")
    rf.write_eval(run, {"mean": np.float32(0.5)})
    assert rf.read_eval(run) == {"mean": 0.5} and not (tmp_path / rf.EVAL_PARTIAL_JSON).exists()
    (tmp_path / rf.EVAL_JSON).write_text("{half")
    with pytest.raises(ValueError):
        rf.read_eval(run)
    arrays = {"x_pixels": np.zeros((2, 4, 4, 1), np.float32), "y_proto": np.eye(2, dtype=np.float32),
              "dataset": np.asarray("digits")}
    rf.write_distilled(run, arrays, num_classes=2)
    back = rf.read_distilled(run)
    assert set(back) == set(arrays) and np.array_equal(back["y_proto"], arrays["y_proto"])
    assert (tmp_path / rf.DISTILLED_PNG).read_bytes()[:4] == b"\x89PNG"
