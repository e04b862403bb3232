"""Laptop presets, the preset `rcig distill` picks per backend, and the cost estimate."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rcig import cost
from rcig.config import LAPTOP_PRESETS, PRESETS, default_preset, make_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.width=4", "outer.real_batch_size=16", "pool.model_count=1", "inner.n_steps=2", "hinv.n_steps=2",
        "eval.runs=1", "eval.steps=2"]


@pytest.mark.parametrize("dataset", sorted(LAPTOP_PRESETS))
def test_every_dataset_has_a_laptop_preset_chosen_on_cpu_only(dataset):
    name = LAPTOP_PRESETS[dataset]
    assert name in PRESETS
    chosen, note = cost.choose_preset(dataset, 1, None, backend="cpu")
    if name == default_preset(dataset, 1):  # digits: its default is already laptop-sized
        assert (chosen, note) == (None, None)
    else:
        assert chosen == name and name in note and f"--preset {default_preset(dataset, 1)}" in note
        assert len(note.splitlines()) == 1
    assert cost.choose_preset(dataset, 1, None, backend="gpu") == (None, None)
    assert cost.choose_preset(dataset, 1, "depth_3", backend="cpu") == ("depth_3", None)


@pytest.mark.parametrize("name", sorted(set(LAPTOP_PRESETS.values())))
def test_laptop_presets_are_small(name):
    p = PRESETS[name]
    paper = PRESETS["depth_3"]
    assert p.model.width <= 32 < paper.model.width and p.steps <= 300 < paper.steps
    assert p.pool.model_count <= 10 and p.outer.real_batch_size <= 256


@pytest.mark.parametrize("dataset", ["mnist", "cifar100", "tiny_imagenet"])
def test_estimate_on_abstract_shapes(dataset):
    """FLOPs from XLA's cost analysis of the step at the dataset's shape, without its files."""
    cfg = make_config(dataset, 1, preset=LAPTOP_PRESETS[dataset], overrides=TINY)
    est = cost.estimate(cfg, compile_below_flops=0, rate=1e10)
    shape, classes = cost.SHAPES[dataset]
    assert est["image_shape"] == list(shape) and est["num_classes"] == classes
    assert est["flops_per_step"] > 0 and est["memory_per_device_bytes"] > 0 and est["wall_s"] > 0
    assert "arguments only" in est["memory_kind"]
    assert est["wall_s"] == pytest.approx(est["tune_s"] + est["compile_s"] + cfg.steps * est["step_s"] + est["eval_s"])


@pytest.mark.slow  # compiles a step for its memory analysis
def test_estimate_grows_with_width_and_compiles_small_steps_for_memory():
    small = cost.estimate(make_config("digits", 1, overrides=TINY), rate=1e10)
    wide = cost.estimate(make_config("digits", 1, overrides=TINY + ["model.width=16"]), compile_below_flops=0, rate=1e10)
    assert wide["flops_per_step"] > 2 * small["flops_per_step"]
    assert small["memory_kind"].startswith("XLA memory analysis")


def test_slow_cpu_run_prints_estimate_and_faster_options(monkeypatch):
    cfg = make_config("cifar10", 1, preset="depth_3")
    fake = {"preset": "depth_3", "dataset": "cifar10", "image_shape": [32, 32, 3], "num_classes": 10, "ipc": 1,
            "steps": 10000, "loop": "unroll", "flops_per_step": 2.8e12, "memory_per_device_bytes": 2**30,
            "memory_kind": "x", "devices": 1, "device_kind": "cpu", "platform": "cpu", "matmul_flops_per_s": 5e10,
            "efficiency": 0.3, "wall_s": 3.0e6, "tune_s": 1.0, "compile_s": 1.0, "step_s": 300.0, "eval_s": 1.0}
    monkeypatch.setattr(cost, "estimate", lambda cfg, **kw: fake)
    lines = cost.preflight(cfg, dry_run=False, backend="cpu")
    assert any("estimated wall time" in line for line in lines)
    assert "exceeds 30 min" in lines[-1] and "--preset laptop_cifar10" in lines[-1]
    assert cost.preflight(cfg, dry_run=False, backend="gpu") == []  # no estimate before accelerator runs
    assert cost.preflight(make_config("digits", 1), dry_run=False, backend="cpu") == []  # laptop-sized: no cost


@pytest.mark.slow  # lowers two step forms and compiles one
def test_cli_dry_run_prints_the_cost_and_runs_nothing(tmp_path):
    from cli import app

    out = tmp_path / "run"
    args = ["distill", "--dataset", "mnist", "--dry-run", "--out", str(out)]
    for s in TINY:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    text = res.output
    assert "laptop preset laptop_mnist" in text
    assert re.search(r"preset laptop_mnist: mnist 28x28x1", text)
    assert re.search(r"step: [0-9.e+]+ GFLOP \(XLA cost analysis\), memory per device", text)
    assert "estimated wall time" in text
    assert not out.exists()


def test_every_sweep_spec_names_its_preset():
    specs = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert specs
    for p in specs:
        text = p.read_text()
        spec = yaml.safe_load(text)
        assert spec["base"].get("preset") in PRESETS, p.name
        assert re.search(r"^# Preset: +\S+", text, re.M), f"{p.name}: no '# Preset:' line"
        named = re.search(r"^# Preset: +(\S+)", text, re.M).group(1)
        assert named == spec["base"]["preset"], p.name


@pytest.mark.slow  # lowers two step forms and compiles one
def test_sweep_launch_dry_run_costs_a_trial_and_launches_nothing(tmp_path):
    from cli import app

    args = ["sweep", "launch", str(ROOT / "sweeps" / "quickstart.yaml"), "--dry-run", "--storage", str(tmp_path)]
    for s in TINY:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "preset digits: digits 8x8x1" in res.output and "GFLOP" in res.output
    assert re.search(r"sweep: 4 trials \(1 cpu", res.output)
    assert list(tmp_path.iterdir()) == []  # no sweep folder, no manifest
