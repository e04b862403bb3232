"""`rcig sweep doctor` and `status` on a sweep folder with every kind of trouble (no Ray)."""

from __future__ import annotations

import json
import time

from typer.testing import CliRunner

import cli
from orchestrator import manifest as mf
from rcig import lease, storage


def _sweep(tmp_path) -> str:
    uri = str(tmp_path / "sw")
    mf.write_manifest(uri, "sw", {"name": "sw", "metric": "eval/mean", "mode": "max"}, "test", {"at": 0})
    ok = mf.TrialRecord(key="ok", params={}, fingerprint="", config={"steps": 10}, status=mf.COMPLETED,
                        step=10, eval={"mean": 0.8, "std": 0.0})
    mf.write_record(uri, ok)
    stale = mf.TrialRecord(key="stale", params={}, fingerprint="", config={"steps": 10},
                           status=mf.RUNNING, step=4, checkpoint_step=4)
    mf.write_record(uri, stale)
    rec_path = storage.join(mf.trial_uri(uri, "stale"), mf.RECORD)
    doc = json.loads(storage.read_text(rec_path))
    doc["updated"] = time.time() - 3600  # its driver died an hour ago
    storage.write_text(rec_path, json.dumps(doc))
    old = {"owner": "x", "pid": 9, "host": "gone", "t": time.time() - 3600, "released": False, "attempt": 1}
    storage.write_text(lease.lease_uri(mf.trial_uri(uri, "stale")), json.dumps(old))
    storage.write_text(storage.join(mf.trial_uri(uri, "broken"), mf.RECORD), '{"key": "broken", "sta')
    storage.write_text(storage.join(uri, "lost_trial", "params.json"), "{}")  # Ray's, no rcig folder
    return uri


def test_doctor_lists_every_problem_with_its_path(tmp_path):
    uri = _sweep(tmp_path)
    held = lease.acquire(mf.trial_uri(uri, "ok"), wait_s=0, heartbeat=30, info={"attempt": 3})
    try:
        res = CliRunner().invoke(cli.app, ["sweep", "doctor", uri])
    finally:
        held.release()
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()

    def line(kind: str) -> str:
        found = [ln for ln in lines if f" {kind} " in ln]
        assert len(found) == 1, (kind, res.output)
        return found[0]

    assert "trials/broken/trial.json" in line("damaged-record")
    assert "trials/stale/lease.json" in line("lease-stale") and "pid 9 on gone" in line("lease-stale")
    assert line("lease-held").startswith("info") and "attempt 3" in line("lease-held")
    assert "trials/stale/trial.json" in line("running-stale")
    assert "trials/stale/checkpoints" in line("checkpoint-missing")
    assert "trials/lost_trial" in line("folder-missing")
    assert lines[-1].endswith("3 trial(s), 5 problem(s)")


def test_doctor_on_a_healthy_sweep_exits_0(tmp_path):
    uri = str(tmp_path / "sw")
    mf.write_manifest(uri, "sw", {"name": "sw"}, "test", {"at": 0})
    mf.write_record(uri, mf.TrialRecord(key="ok", params={}, fingerprint="", config={}, status=mf.COMPLETED))
    res = CliRunner().invoke(cli.app, ["sweep", "doctor", uri, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["findings"] == []


def test_status_reports_a_damaged_record_instead_of_dropping_it(tmp_path):
    uri = _sweep(tmp_path)
    res = CliRunner().invoke(cli.app, ["sweep", "status", uri])
    assert res.exit_code == 0, res.output
    assert "DAMAGED" in res.output and "trials/broken/trial.json" in res.output
    assert "1 DAMAGED" in res.output.splitlines()[0]
    assert "RUNNING*" in res.output  # the stale trial, by the library's rule
    res = CliRunner().invoke(cli.app, ["sweep", "status", uri, "--json"])
    st = json.loads(res.output)
    assert st["counts"]["DAMAGED"] == 1 and "broken" in st["damaged"][0]["path"]
    res = CliRunner().invoke(cli.app, ["best", uri, "--metric", "eval/mean"])
    assert res.exit_code == 0 and "ok" in res.output, res.output
