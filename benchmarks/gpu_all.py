"""One entry point for a GPU machine: step + limit for every anchored setting, in a time budget.

First the matmul/conv rates (`limit --micro-only`), then each setting in its own Python
process (`limit --no-micro --settings NAME`: LR tuning, compile, timed steps, cost
analysis; so a setting's peak memory is its own and an out-of-memory error costs one
setting, not the run). Settings run cheapest first (by the original's s/step); one that
would start with less than --min-left seconds of the budget is skipped, one that runs
past the budget is stopped; both are recorded. Writes benchmarks/results/gpu_all.json
(and one JSON per setting under benchmarks/results/gpu_all/).

Needs only JAX, flax, optax, numpy and this repository (no Ray, gcsfs, or network).

Example:
    PYTHONPATH=. python -m benchmarks.gpu_all                   # all 8, paper sizes, 450 s
    PYTHONPATH=. python -m benchmarks.gpu_all --tiny --settings digits_shape
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common, limit, step

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def _run(args: list[str], timeout: float) -> tuple[str, float]:
    """Run `python -m benchmarks.<args>`; returns (status, seconds); output goes to ours."""
    t0 = time.perf_counter()
    try:
        rc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(), timeout=max(timeout, 1)).returncode
        status = "ok" if rc == 0 else f"exit code {rc}"
    except subprocess.TimeoutExpired:
        status = f"stopped: ran past the budget (started with {timeout:.0f} s left)"
    return status, time.perf_counter() - t0


def passthrough(opts) -> list[str]:
    """The options every child gets."""
    args = ["--steps", str(opts.steps), "--warmup", str(opts.warmup), "--devices", str(opts.devices)]
    if opts.tiny:
        args.append("--tiny")
    for flag, v in (("--loop", opts.loop), ("--dtype", opts.dtype), ("--width", opts.width),
                    ("--real-batch", opts.real_batch), ("--tune-probes", opts.tune_probes)):
        if v is not None:
            args += [flag, str(v)]
    for kv in opts.set:
        args += ["--set", kv]
    return args


def main(argv: list[str] | None = None) -> int:
    p = common.parser("gpu_all", doc=__doc__)
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    p.add_argument("--min-left", type=float, default=None,
                   help="skip a setting with fewer seconds left (default 40; tiny 0)")
    p.add_argument("--phases-settings", default="cifar10_ipc10",
                   help="settings also timed phase by phase (comma-separated; '' for none)")
    opts = p.parse_args(argv)
    if opts.tune_probes is None and not opts.tiny:
        opts.tune_probes = 40  # bounded so all 8 settings fit; 'capped' in the JSON says if it bit
    t_start = time.perf_counter()
    settings = sorted(common.selected(opts), key=lambda s: s.anchor_s or 0.0)
    min_left = opts.min_left if opts.min_left is not None else (0.0 if opts.tiny else 40.0)
    phases = {x.strip() for x in opts.phases_settings.split(",") if x.strip()}
    out_dir = Path(opts.out).with_suffix("") if opts.out else common.RESULTS / "gpu_all"
    out_dir.mkdir(parents=True, exist_ok=True)

    def left() -> float:
        return opts.budget - (time.perf_counter() - t_start)

    micro_path = out_dir / "micro.json"
    status, secs = _run(["benchmarks.limit", "--micro-only", *(["--tiny"] if opts.tiny else []),
                         "--out", str(micro_path)], min(left(), 180))
    micro = json.loads(micro_path.read_text()) if status == "ok" else {"micro": [], "machine": None}
    runs = [{"what": "micro", "status": status, "seconds": secs}]
    recs = []
    for s in settings:
        if left() < max(min_left, 1.0):
            recs.append({"setting": s.name, "error": f"skipped: {left():.0f} s of the budget left"})
            runs.append({"what": s.name, "status": "skipped", "seconds": 0.0})
            continue
        path = out_dir / f"{s.name}.json"
        path.unlink(missing_ok=True)
        args = ["benchmarks.limit", "--no-micro", "--settings", s.name, "--out", str(path), *passthrough(opts)]
        if s.name in phases:
            args.append("--phases")
        print(f"[gpu_all] {s.name}: {left():.0f} s left", file=sys.stderr, flush=True)
        status, secs = _run(args, left())
        runs.append({"what": s.name, "status": status, "seconds": secs})
        if path.exists():
            recs.extend(json.loads(path.read_text())["results"])
        else:
            recs.append({"setting": s.name, "error": status})
    for rec in recs:
        if "error" not in rec:
            rate = limit.conv_rate(micro["micro"], rec["config"]["compute_dtype"])
            fl = common.best_flops(rec)
            rec["conv_rate_flops_per_s"] = rate
            rec["fraction_of_conv_rate"] = (fl / rec["step"]["median_s"] / rate) if (fl and rate) else None

    info = micro.get("machine") or common.machine_info()  # children first: they own the device
    print(f"\n{info['device_count']} x {info['device_kind']} ({info['backend']}), jax {info['versions']['jax']}, "
          f"{info['date']}; total {time.perf_counter() - t_start:.0f} s of a {opts.budget:.0f} s budget")
    print(common.table([{"op": r["op"], "shape": r["shape"], "tf": f"{r['flops_per_s'] / 1e12:.3g}"}
                        for r in micro["micro"]], [("op", "operation"), ("shape", "size"), ("tf", "TFLOP/s")]))
    print()
    print(common.table([step.row(r, info) for r in recs], step.COLUMNS))
    print()
    print(common.table([limit.limit_row(r) for r in recs], limit.LIMIT_COLUMNS))
    for r in recs:
        if r.get("phases"):
            print(f"\nphases of {r['setting']}: " + ", ".join(
                f"{k} {v['median_s'] * 1e3:.3g} ms" for k, v in r["phases"].items()))
    path = common.write_json(opts.out, "gpu_all", {
        "benchmark": "gpu_all", "machine": info, "argv": argv or sys.argv[1:], "budget_s": opts.budget,
        "total_s": time.perf_counter() - t_start, "runs": runs, "micro": micro["micro"], "results": recs})
    print(f"wrote {path}")
    return 1 if any("error" in r for r in recs) else 0


if __name__ == "__main__":
    sys.exit(main())
