"""The benchmark scripts run end to end in tiny-step mode and write complete JSON.

Each script runs as `python -m benchmarks.NAME` in a subprocess (loopback-only env, 4
emulated CPU devices), the way it runs on a GPU machine. Nothing here asserts a speed:
only that every figure exists, is positive, and is consistent with the others.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from benchmarks.common import ANCHORED, SETTINGS
from conftest import ROOT, loopback_env
from doc_tables import first_table

TINY = ["--tiny", "--settings", "digits_shape", "--steps", "2", "--warmup", "0", "--loop", "scan"]


def run_bench(name: str, args: list[str], out, timeout: float = 400) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, **loopback_env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"benchmarks.{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


def check_machine(m: dict) -> None:
    assert m["backend"] == "cpu" and m["device_count"] == 4
    assert m["versions"]["jax"] and m["versions"]["flax"] and m["versions"]["optax"]
    assert m["device_kind"] and m["date"]


def check_setting(rec: dict, devices: int = 1) -> None:
    assert "error" not in rec, rec.get("error")
    assert rec["setting"] == "digits_shape" and rec["devices"] == devices and rec["finite"]
    assert rec["notes"][0] == "tiny" and rec["config"]["model.width"] == 4
    st = rec["step"]
    assert st["n"] == 2 and len(st["times_s"]) == 2
    assert 0 < st["min_s"] <= st["median_s"] <= st["max_s"]
    assert st["steps_per_s"] == pytest.approx(1 / st["median_s"])
    assert st["pipelined_s"] > 0 and rec["compile_s"] > 0 and rec["first_step_s"] > 0
    assert rec["cost"]["flops"] > 0 and rec["cost"]["bytes"] > 0
    assert rec["memory_analysis"]["total_bytes"] > 0 and rec["host_peak_rss_bytes"] > 0
    anchor = SETTINGS["digits_shape"]
    assert rec["anchor"] == {"s_per_step": anchor.anchor_s, "compile_s": anchor.anchor_compile_s, "device": "H200"}
    assert rec["support_rows"] == 2 * anchor.classes * anchor.ipc  # flips on: two rows per image


def test_anchors_are_the_documented_figures():
    """The anchors benchmarks carry are the original's figures in docs/performance.md §1.2."""
    documented = {}
    for cells in first_table("docs/performance.md", "### 1.2 Seconds per outer step")[1:]:
        documented[re.fullmatch(r"`(\w+)`", cells[1]).group(1)] = (int(cells[2]), float(cells[3]), float(cells[4]))
    assert set(documented) == set(ANCHORED)
    for name, (rows, s_per_step, compile_s) in documented.items():
        st = SETTINGS[name]
        assert (st.anchor_s, st.anchor_compile_s) == (s_per_step, compile_s), name
        assert rows == 2 * st.classes * st.ipc, name  # flips on in both presets


def test_bad_setting_is_one_clear_line(tmp_path):
    env = {**os.environ, **loopback_env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step", "--settings", "cifar11",
                           "--out", str(tmp_path / "x.json")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "--settings: unknown setting(s) cifar11" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_step_tiny(tmp_path):
    proc, d = run_bench("step", [*TINY, "--tune-probes", "2"], tmp_path / "step.json")
    check_machine(d["machine"])
    (rec,) = d["results"]
    check_setting(rec)
    tun = rec["tuning"]
    # two searches (inner, H-solve), each capped at 2 probes
    assert 1 <= tun["probes"] <= 4 and tun["max_probes"] == 2
    assert tun["seconds"] > 0 and tun["inner"] > 0 and tun["hvp"] > 0
    assert "| digits_shape | 20 | tiny | 1 | scan |" in proc.stdout
    assert "n/a (device differs)" in proc.stdout  # the anchor is an H200, this is a CPU


@pytest.mark.slow
def test_limit_tiny_with_phases(tmp_path):
    proc, d = run_bench("limit", [*TINY, "--tune-probes", "0", "--phases"], tmp_path / "limit.json")
    ops = {r["op"]: r for r in d["micro"]}
    assert set(ops) == {"matmul f32 default", "matmul f32 highest", "matmul bf16", "conv3x3 f32 default",
                        "conv3x3 bf16"}
    assert all(r["flops_per_s"] > 0 and r["seconds"] > 0 for r in ops.values())
    (rec,) = d["results"]
    check_setting(rec)
    assert "tuning" not in rec
    # scan bodies are counted once by XLA; the unrolled lowering counts all iterations
    assert rec["cost_unrolled"]["flops"] > rec["cost"]["flops"] > 0
    rate = ops["conv3x3 f32 default"]["flops_per_s"]
    assert rec["conv_rate_flops_per_s"] == rate
    assert rec["fraction_of_conv_rate"] == pytest.approx(rec["cost_unrolled"]["flops"] / rec["step"]["median_s"] / rate)
    assert set(rec["phases"]) == {"inner loop", "direct grad + g_t", "H-solve", "implicit grad", "pool (1 steps)"}
    assert all(v["median_s"] > 0 and v["flops"] > 0 for v in rec["phases"].values())
    assert "fraction of conv rate" in proc.stdout


@pytest.mark.slow
def test_scaling_tiny(tmp_path):
    proc, d = run_bench("scaling", [*TINY, "--tune-probes", "0", "--device-counts", "1,2,8"],
                        tmp_path / "scaling.json")
    assert d["emulated"] is True
    one, two, eight = d["results"]
    check_setting(one, 1)
    check_setting(two, 2)
    assert one["speedup"] == 1.0 and one["efficiency"] == 1.0
    assert two["speedup"] == pytest.approx(one["step"]["median_s"] / two["step"]["median_s"])
    assert two["efficiency"] == pytest.approx(two["speedup"] / 2)
    assert eight == {"setting": "digits_shape", "devices": 8, "skipped": "only 4 device(s)"}


@pytest.mark.slow
def test_gpu_all_tiny(tmp_path):
    proc, d = run_bench("gpu_all", [*TINY, "--tune-probes", "1", "--phases-settings", "", "--budget", "1200"],
                        tmp_path / "all.json", timeout=1300)
    assert [r["status"] for r in d["runs"]] == ["ok", "ok"]
    assert d["total_s"] > 0 and d["micro"]
    (rec,) = d["results"]
    check_setting(rec)
    assert 1 <= rec["tuning"]["probes"] <= 2 and rec["fraction_of_conv_rate"] > 0
    assert (tmp_path / "all" / "digits_shape.json").exists() and (tmp_path / "all" / "micro.json").exists()
    assert "speed-up vs original" in proc.stdout and "achieved TFLOP/s" in proc.stdout


@pytest.mark.slow
def test_dtype_quality_tiny(tmp_path):
    """bf16 vs f32 accuracy script, on the 28x28 (MNIST-shaped) digits it builds itself."""
    proc, d = run_bench("dtype_quality", ["--tiny", "--data", "mnist_shape", "--steps", "2",
                                          "--set", "eval.runs=1"], tmp_path / "dq.json")
    assert [(r["data"], r["dtype"]) for r in d["runs"]] == [("mnist_shape", "float32"), ("mnist_shape", "bfloat16")]
    for r in d["runs"]:
        assert r["config"]["compute_dtype"] == r["dtype"] and r["config"]["model"]["depth"] == 3
        assert r["config"]["dataset"] == "npz" and r["config"]["steps"] == 2
        assert 0 <= r["acc_mean"] <= 1 and len(r["accs"]) == 1 and r["baseline_mean"] is not None
        assert r["median_step_s"] > 0 and r["wall_s"] > 0 and r["tuning"]["probes"] >= 1
    # both dtypes start from the same support set and are evaluated against the same random images
    assert d["runs"][0]["baseline_mean"] == d["runs"][1]["baseline_mean"]
    assert "| mnist_shape | bfloat16 |" in proc.stdout and d["mnist_shape_source"].startswith("bundled digits")
