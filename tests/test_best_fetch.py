"""`rcig best` shows the random-real baseline; `rcig fetch` takes only a committed checkpoint.

A small sweep folder is written with the manifest's own writers and a real Orbax
checkpoint (`rcig.checkpoint.CheckpointStore`), locally and on the loopback GCS emulator.
No Ray is needed: best and fetch read storage only.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from orchestrator import manifest as mf
from orchestrator.results import best, committed_steps, fetch
from rcig import storage
from rcig.checkpoint import CheckpointStore
from rcig.config import make_config, identity_hash

SPEC = {"name": "bf", "base": {"dataset": "digits", "ipc": 1}, "metric": "eval/mean", "mode": "max",
        "search": {"space": {"outer.proto_lr": {"grid": [0.001, 0.003]}}}}
# (proto_lr, eval mean, random-real baseline mean or None when the eval ran without it)
TRIALS = [(0.001, 0.81, 0.61), (0.003, 0.86, 0.57)]


def _trial(sweep: str, lr: float, mean: float, base_mean: float | None) -> str:
    params = {"outer.proto_lr": lr}
    cfg = make_config("digits", 1, overrides=[f"outer.proto_lr={lr}", "steps=10"])
    key = mf.trial_key(params, cfg)
    ev = {"mean": mean, "std": 0.01, "accs": [mean], "protocol": "noaug", "runs": 1}
    if base_mean is not None:
        ev["baseline"] = {"mean": base_mean, "std": 0.02, "accs": [base_mean]}
    rec = mf.TrialRecord(key=key, params=params, fingerprint=identity_hash(cfg), config=cfg.to_dict(),
                         status=mf.COMPLETED, step=10, eval=ev)
    tdir = mf.trial_uri(sweep, key)
    buf = io.BytesIO()
    np.savez_compressed(buf, x_proto=np.zeros((10, 8, 8, 1), np.float32))
    storage.write_bytes(storage.join(tdir, "distilled.npz"), buf.getvalue())
    storage.write_text(storage.join(tdir, "eval.json"), json.dumps(ev))
    mf.write_record(sweep, rec)
    return key


def _sweep(root: str, trials=TRIALS) -> tuple[str, list[str]]:
    sweep = storage.join(root, "bf")
    mf.write_manifest(sweep, "bf", SPEC, "tests/test_best_fetch.py", {"at": 0})
    return sweep, [_trial(sweep, *t) for t in trials]


# ---- best: the random-real baseline beside the metric -----------------------------------
def test_best_rows_and_json_carry_the_baseline(tmp_path):
    sweep, keys = _sweep(str(tmp_path), TRIALS + [(0.01, 0.70, None)])
    rows = best(sweep)
    assert [r["key"] for r in rows] == [keys[1], keys[0], keys[2]]
    assert [r["baseline_mean"] for r in rows] == [0.57, 0.61, None]
    assert rows[0]["baseline_std"] == 0.02
    res = CliRunner().invoke(cli.app, ["best", sweep, "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert [(r["eval_mean"], r["baseline_mean"]) for r in got] == [(0.86, 0.57), (0.81, 0.61), (0.70, None)]


def test_best_table_has_a_random_column(tmp_path):
    sweep, keys = _sweep(str(tmp_path), TRIALS + [(0.01, 0.70, None)])
    res = CliRunner().invoke(cli.app, ["best", sweep])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "random val/test±std" in lines[0]
    by_key = {k: next(ln for ln in lines if k[:46] in ln) for k in keys}
    assert "0.5700±0.020" in by_key[keys[1]] and "0.6100±0.020" in by_key[keys[0]]
    assert "0.8600±0.010" in by_key[keys[1]]
    assert by_key[keys[2]].split()[5] == "-"  # no baseline: a dash, columns stay aligned


# ---- fetch: the newest committed step, never a half-written one -------------------------
def _commit_step(trial_uri: str, step: int) -> None:
    with CheckpointStore(trial_uri, keep=3, async_save=False) as store:
        store.save(step, {"w": jnp.full((3,), float(step))}, {"steps": 10})


def test_fetch_takes_the_committed_step_local(tmp_path):
    sweep, keys = _sweep(str(tmp_path))
    tdir = mf.trial_uri(sweep, keys[1])
    _commit_step(tdir, 5)
    ck = os.path.join(tdir, "checkpoints")
    # A step folder with the files but no commit marker (a save or copy cut short), and
    # an interrupted local save's temp folder: neither is a checkpoint.
    shutil.copytree(os.path.join(ck, "5"), os.path.join(ck, "6"))
    os.remove(os.path.join(ck, "6", "commit_success.txt"))
    shutil.copytree(os.path.join(ck, "5"), os.path.join(ck, "7.orbax-checkpoint-tmp-1712345678"))
    assert committed_steps(tdir) == [5]
    got = fetch(sweep, str(tmp_path / "got"))
    assert got["key"] == keys[1] and got["checkpoint_step"] == 5
    assert "checkpoint/5" in got["files"]
    assert sorted(os.listdir(tmp_path / "got" / "checkpoint")) == ["5"]
    assert (tmp_path / "got" / "checkpoint" / "5" / "commit_success.txt").is_file()


def test_fetch_without_any_committed_step_copies_no_checkpoint(tmp_path):
    sweep, keys = _sweep(str(tmp_path))
    ck = os.path.join(mf.trial_uri(sweep, keys[1]), "checkpoints", "3", "state")
    os.makedirs(ck)
    open(os.path.join(ck, "manifest.ocdbt"), "wb").write(b"partial")
    got = fetch(sweep, str(tmp_path / "got"))
    assert got["checkpoint_step"] is None and not any(f.startswith("checkpoint") for f in got["files"])


@pytest.mark.gcs
def test_fetch_takes_the_committed_step_gcs(gcs_bucket, tmp_path):
    sweep, keys = _sweep(f"{gcs_bucket}/sweeps")
    tdir = mf.trial_uri(sweep, keys[1])
    _commit_step(tdir, 5)
    # On GCS a step in progress is written in place (no temp suffix); only the final
    # commit_success.txt marks it done.
    fs, root = storage.filesystem(storage.join(tdir, "checkpoints"))
    fs.copy(f"{root}/5", f"{root}/6", recursive=True)
    fs.rm(f"{root}/6/commit_success.txt")
    fs.invalidate_cache()
    assert fs.exists(f"{root}/6/state")
    assert committed_steps(tdir) == [5]
    res = CliRunner().invoke(cli.app, ["fetch", sweep, "--to", str(tmp_path / "got")])
    assert res.exit_code == 0, res.output
    assert "checkpoint/5" in res.output and "checkpoint/6" not in res.output
    assert sorted(os.listdir(tmp_path / "got" / "checkpoint")) == ["5"]
