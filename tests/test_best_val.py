"""`rcig best` ranks on validation and shows test and the baseline beside it; `rcig fetch`
takes the best on validation; a trial a scheduler stopped is ranked on the intermediate
validation estimate it reached. A sweep folder is written with the manifest's writers
(no Ray: best and fetch read storage only)."""

from __future__ import annotations

import io
import json

import numpy as np
from typer.testing import CliRunner

import cli
from orchestrator import manifest as mf
from orchestrator.results import best, fetch
from rcig import storage
from rcig.config import make_config, identity_hash

SPEC = {"name": "bv", "base": {"dataset": "digits", "ipc": 1}, "metric": "val/acc", "mode": "max",
        "search": {"space": {"outer.proto_lr": {"grid": [0.001, 0.003, 0.01]}}}}


def _trial(sweep: str, lr: float, val: float | None, test: float | None, status: str = mf.COMPLETED,
           probe: float | None = None) -> str:
    params = {"outer.proto_lr": lr}
    cfg = make_config("digits", 1, overrides=[f"outer.proto_lr={lr}", "steps=10"])
    key = mf.trial_key(params, cfg)
    ev = None
    if test is not None:
        ev = {"mean": test, "std": 0.01, "accs": [test], "val": {"mean": val, "std": 0.02, "accs": [val]},
              "val_mean": val, "baseline": {"mean": 0.55, "std": 0.03, "accs": [0.55], "val_mean": 0.58}}
    metrics = {"val/acc": probe, "val/step": 5.0} if probe is not None else {}
    rec = mf.TrialRecord(key=key, params=params, fingerprint=identity_hash(cfg), config=cfg.to_dict(),
                         status=status, step=10 if ev else 5, eval=ev, metrics=metrics)
    tdir = mf.trial_uri(sweep, key)
    buf = io.BytesIO()
    np.savez_compressed(buf, x_proto=np.zeros((10, 8, 8, 1), np.float32))
    storage.write_bytes(storage.join(tdir, "distilled.npz"), buf.getvalue())
    if ev:
        storage.write_text(storage.join(tdir, "eval.json"), json.dumps(ev))
    mf.write_record(sweep, rec)
    return key


def _sweep(root: str, spec: dict = SPEC) -> tuple[str, dict[str, str]]:
    sweep = storage.join(root, "bv")
    mf.write_manifest(sweep, "bv", spec, "tests/test_best_val.py", {"at": 0})
    keys = {
        # best on validation, not on test
        "val_best": _trial(sweep, 0.001, val=0.90, test=0.80),
        # best on test: a choice on test would take it
        "test_best": _trial(sweep, 0.003, val=0.85, test=0.88),
        # stopped early by a scheduler: only its intermediate estimate
        "stopped": _trial(sweep, 0.01, val=None, test=None, status=mf.STOPPED, probe=0.40),
    }
    return sweep, keys


def test_best_ranks_on_validation_and_shows_test_and_baseline(tmp_path):
    sweep, keys = _sweep(str(tmp_path))
    rows = best(sweep)
    assert [r["key"] for r in rows] == [keys["val_best"], keys["test_best"], keys["stopped"]]
    assert [r["metric"] for r in rows] == ["val/acc"] * 3
    assert [r["value"] for r in rows] == [0.90, 0.85, 0.40]
    assert [r["val_source"] for r in rows] == ["eval", "eval", "probe"]
    assert [r["eval_mean"] for r in rows] == [0.80, 0.88, None]
    assert rows[0]["baseline_val_mean"] == 0.58 and rows[0]["baseline_mean"] == 0.55
    # A test metric is still available by name, never by default.
    assert best(sweep, metric="test/acc")[0]["key"] == keys["test_best"]


def test_a_sweep_whose_spec_names_test_still_selects_on_validation(tmp_path):
    sweep, keys = _sweep(str(tmp_path), {**SPEC, "metric": "eval/mean"})
    assert best(sweep)[0]["key"] == keys["val_best"] and best(sweep)[0]["metric"] == "val/acc"


def test_fetch_takes_the_best_on_validation(tmp_path):
    sweep, keys = _sweep(str(tmp_path))
    got = fetch(sweep, str(tmp_path / "best"))
    assert got["key"] == keys["val_best"] and got["val_mean"] == 0.90 and got["eval_mean"] == 0.80
    res = CliRunner().invoke(cli.app, ["fetch", sweep, "--to", str(tmp_path / "b2")])
    assert res.exit_code == 0, res.output
    assert "val 0.9000 test 0.8000" in res.output


def test_best_table_columns(tmp_path):
    sweep, keys = _sweep(str(tmp_path))
    res = CliRunner().invoke(cli.app, ["best", sweep])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert all(h in lines[0] for h in ("val/acc", "val", "test±std", "random val/test±std"))
    row = {name: next(ln for ln in lines if k[:46] in ln).split() for name, k in keys.items()}
    assert row["val_best"][3:6] == ["0.9000", "0.8000±0.010", "0.5800/0.5500±0.030"]
    assert row["stopped"][3:6] == ["0.4000(p)", "-", "-"]
    assert any(ln.startswith("(p):") for ln in lines)


def test_a_stopped_trial_whose_record_missed_its_last_report_ranks_on_its_metrics_file(tmp_path):
    """A scheduler can end a trial between two writes of its record: what it reached is
    read from its own metrics.jsonl (the probe rows carry val/acc)."""
    sweep, keys = _sweep(str(tmp_path))
    key = _trial(sweep, 0.03, val=None, test=None, status=mf.STOPPED)  # no metrics recorded
    rows = [{"step": s, "outer/loss": 1.0 / s} for s in range(1, 8)]
    rows[4]["val/acc"] = 0.61  # the probe at step 5
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "outer/lo'  # torn last line
    storage.write_text(storage.join(mf.trial_uri(sweep, key), "metrics.jsonl"), text)
    got = {r["key"]: r for r in best(sweep, top=10)}
    assert got[key]["value"] == 0.61 and got[key]["val_source"] == "probe"
    assert got[key]["val_step"] == 5.0
    assert [r["key"] for r in best(sweep, top=10)][2] == key  # below 0.90 and 0.85, above 0.40
