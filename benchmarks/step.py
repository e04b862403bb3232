"""Outer-step speed, compile time, LR-tuning time and memory for the anchored settings.

For each setting (synthetic data of its shape, the preset of docs/performance.md):
LR tuning (bounded by --tune-probes), AOT compile of the step, the first step, --warmup
untimed steps, then --steps timed steps (each synced; median reported) and the same
number dispatched back to back (pipelined mean). The original's s/step and compile are
printed beside ours, with the ratio only where the device is of the anchor's kind.

Example:
    PYTHONPATH=. python -m benchmarks.step                        # all 8, paper sizes
    PYTHONPATH=. python -m benchmarks.step --tiny --settings digits_shape,tiny_ipc1
    PYTHONPATH=. python -m benchmarks.step --settings cifar10_ipc10 --width 16 --real-batch 256
"""

from __future__ import annotations

import sys
import traceback

from benchmarks import common


def row(rec: dict, info: dict) -> dict:
    """One table row (strings) from a measured setting."""
    if "error" in rec:
        return {"setting": rec["setting"], "notes": "ERROR: " + rec["error"][:60]}
    st, tun = rec["step"], rec.get("tuning")
    dev_mem = rec.get("device_peak_bytes")
    if dev_mem is None:
        dev_mem = rec.get("memory_analysis", {}).get("total_bytes")
    return {
        "setting": rec["setting"],
        "rows": str(rec["support_rows"]),
        "notes": ", ".join(rec["notes"]) or "paper size",
        "dev": str(rec["devices"]),
        "loop": rec["config"]["loop_form"],
        "s_step": common.fmt(st["median_s"]),
        "steps_s": common.fmt(st["steps_per_s"]),
        "pipe": common.fmt(st["pipelined_s"]),
        "compile": common.fmt(rec["compile_s"]),
        "first": common.fmt(rec["first_step_s"]),
        "tune": "skipped" if tun is None else f"{tun['seconds']:.3g} ({tun['probes']}{'+' if tun['capped'] else ''})",
        "rss": common.mib(rec["host_peak_rss_bytes"]),
        "devmem": common.mib(dev_mem),
        "orig_s": common.fmt(rec["anchor"]["s_per_step"]),
        "orig_c": common.fmt(rec["anchor"]["compile_s"]),
        "ratio": common.ratio_text(st["median_s"], rec["anchor"]["s_per_step"], info),
    }


COLUMNS = [
    ("setting", "setting"), ("rows", "support rows"), ("notes", "size"), ("dev", "devices"),
    ("loop", "loop"), ("s_step", "s/step (median)"), ("steps_s", "steps/s"), ("pipe", "s/step pipelined"),
    ("compile", "compile s"), ("first", "first step s"), ("tune", "LR tuning s (probes)"),
    ("rss", "host peak RSS MiB"), ("devmem", "device MiB"), ("orig_s", "original s/step (H200)"),
    ("orig_c", "original compile s"), ("ratio", "speed-up vs original"),
]


def run_settings(opts, info: dict) -> list[dict]:
    recs = []
    for s in common.selected(opts):
        print(f"[step] {s.name} ...", file=sys.stderr, flush=True)
        try:
            recs.append(common.measure_setting(s, opts))
        except Exception as e:  # keep going; the JSON and the exit code say what failed
            traceback.print_exc()
            recs.append({"setting": s.name, "error": f"{type(e).__name__}: {e}"})
    return recs


def main(argv: list[str] | None = None) -> int:
    opts = common.parser("step", doc=__doc__).parse_args(argv)
    if opts.steps < 1:
        raise SystemExit("--steps: must be >= 1")
    common.prepare(opts.devices)
    common.selected(opts)  # validate names before the slow part
    info = common.machine_info()
    recs = run_settings(opts, info)
    print(f"\n{info['device_count']} x {info['device_kind']} ({info['backend']}), jax {info['versions']['jax']}, "
          f"{info['date']}")
    print(common.table([row(r, info) for r in recs], COLUMNS))
    path = common.write_json(opts.out, "step", {"benchmark": "step", "machine": info, "argv": argv or sys.argv[1:],
                                                "results": recs})
    print(f"wrote {path}")
    return 1 if any("error" in r or not r.get("finite", False) for r in recs) else 0


if __name__ == "__main__":
    sys.exit(main())
