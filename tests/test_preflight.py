"""Checks before any trial starts: storage every node reaches when a sweep runs on a
cluster, and (with a real local Ray) a spec this machine cannot hold is refused instead
of staying PENDING. The same preflight against an autoscaling cluster: test_autoscale.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.preflight import covers, shortfall
from orchestrator.sweep import SweepError, launch, resume

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "sweeps" / "quickstart.yaml")


@pytest.fixture
def no_ray(monkeypatch):
    import orchestrator.sweep as sw

    def tripwire(*a, **k):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(sw, "init_ray", tripwire)


def test_address_with_local_storage_is_refused_naming_gs(tmp_path, no_ray):
    with pytest.raises(SweepError) as e:
        launch(QUICKSTART, storage_uri=str(tmp_path), address="127.0.0.1:6379", sets=["steps=10"])
    msg = str(e.value)
    assert "\n" not in msg and "--storage gs://" in msg and "--shared-storage" in msg, msg
    assert str(tmp_path) in msg
    assert not (tmp_path / "quickstart").exists()
    from orchestrator import manifest as mf
    from orchestrator.spec import load_spec

    spec = load_spec(QUICKSTART, sets=["steps=10"])
    mf.write_manifest(str(tmp_path / "q"), spec.name, spec.raw, spec.source, {})
    with pytest.raises(SweepError, match="gs://"):
        resume(str(tmp_path / "q"), address="127.0.0.1:6379")


def test_cli_address_with_local_storage_is_one_line(tmp_path, no_ray):
    from typer.testing import CliRunner

    import cli

    r = CliRunner().invoke(cli.app, ["sweep", "launch", QUICKSTART, "--storage", str(tmp_path),
                                     "--address", "127.0.0.1:6379", "--set", "steps=10"])
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "gs://" in lines[0], r.output


def test_shortfall_names_what_no_node_type_has():
    types = {"cpu": {"CPU": 16}, "tpu_v4_8": {"CPU": 96, "TPU": 4, "accelerator_type:TPU-V4": 1}}
    assert shortfall({"CPU": 1, "TPU": 8}, types) == "TPU 8 > at most 4 on any node type"
    assert shortfall({"CPU": 200}, types) == "CPU 200 > at most 96 on any node type"
    assert shortfall({"GPU": 1}, types) == "no node type has GPU"
    assert shortfall({"TPU": 4, "accelerator_type:TPU-V5LITEPOD": 0.001}, types) == (
        "no node type has accelerator type TPU-V5LITEPOD (known: TPU-V4)")
    assert shortfall({"CPU": 32, "TPU": 4}, {"a": {"CPU": 64}, "b": {"CPU": 8, "TPU": 4}}) == (
        "no single node type has all of them")
    assert covers(types["tpu_v4_8"], {"CPU": 8, "TPU": 4, "accelerator_type:TPU-V4": 0.001})


@pytest.mark.slow
@pytest.mark.ray
def test_local_launch_of_a_spec_this_machine_cannot_hold_is_an_error(tmp_path):
    """Without --address: a GPU spec on a machine without GPUs fails fast, not PENDING."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "cli", "sweep", "launch", QUICKSTART, "--storage",
                        str(tmp_path), "--set", "steps=10", "--set", "resources.gpu=1"],
                       cwd=ROOT, env={**os.environ, "RCIG_TUNE_VERBOSE": "0"},
                       capture_output=True, text=True, timeout=180)
    wall = time.time() - t0
    assert r.returncode != 0, r.stdout + r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert err and "resources: no node of the cluster at local" in err[0], r.stderr[-3000:]
    assert "{'CPU': 1.0, 'GPU': 1.0}" in err[0] and "no node type has GPU" in err[0], err[0]
    assert not (tmp_path / "quickstart").exists()
    print(f"local GPU spec refused after {wall:.1f} s (Ray start included)")
