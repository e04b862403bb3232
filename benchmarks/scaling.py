"""The outer step on 1, 2, 4 devices: speed-up and efficiency of the data-parallel step.

The real batch is sharded over the devices; everything else is replicated. On a CPU-only
machine the devices are emulated (XLA_FLAGS=--xla_force_host_platform_device_count, set
here before jax is imported): they share the same cores, so the efficiency measured there
says nothing about real devices. Device counts that are not available are reported as
skipped.

Example:
    PYTHONPATH=. python -m benchmarks.scaling --settings digits --device-counts 1,2,4
    PYTHONPATH=. python -m benchmarks.scaling --tiny --settings digits_shape --device-counts 1,2
"""

from __future__ import annotations

import sys
import traceback

from benchmarks import common, step


def main(argv: list[str] | None = None) -> int:
    p = common.parser("scaling", settings_default="digits", doc=__doc__)
    p.add_argument("--device-counts", default="1,2,4", help="comma-separated device counts")
    opts = p.parse_args(argv)
    try:
        counts = sorted({int(c) for c in opts.device_counts.split(",") if c.strip()})
    except ValueError:
        raise SystemExit(f"--device-counts: expected integers like 1,2,4, got {opts.device_counts!r}")
    if not counts or counts[0] < 1:
        raise SystemExit("--device-counts: counts must be >= 1")
    common.prepare(max(counts))
    settings = common.selected(opts)
    import jax

    info = common.machine_info()
    available = len(jax.local_devices())
    recs = []
    for s in settings:
        base = None
        for n in counts:
            print(f"[scaling] {s.name} on {n} device(s) ...", file=sys.stderr, flush=True)
            if n > available:
                recs.append({"setting": s.name, "devices": n, "skipped": f"only {available} device(s)"})
                continue
            try:
                rec = common.measure_setting(s, opts, devices=jax.local_devices()[:n])
            except Exception as e:
                traceback.print_exc()
                recs.append({"setting": s.name, "devices": n, "error": f"{type(e).__name__}: {e}"})
                continue
            med = rec["step"]["median_s"]
            if n == counts[0]:
                base = (n, med)
            if base:
                rec["speedup"] = base[1] / med * 1.0
                rec["efficiency"] = rec["speedup"] / (n / base[0])
            recs.append(rec)
    emulated = info["backend"] == "cpu"
    print(f"\n{info['device_count']} x {info['device_kind']} ({info['backend']}"
          f"{', emulated devices sharing ' + str(info['cpu_count']) + ' cores' if emulated else ''}), "
          f"jax {info['versions']['jax']}, {info['date']}")
    print(common.table([scaling_row(r, info) for r in recs], COLUMNS))
    path = common.write_json(opts.out, "scaling", {"benchmark": "scaling", "machine": info, "emulated": emulated,
                                                   "argv": argv or sys.argv[1:], "results": recs})
    print(f"wrote {path}")
    return 1 if any("error" in r for r in recs) else 0


COLUMNS = [("setting", "setting"), ("notes", "size"), ("dev", "devices"), ("s_step", "s/step (median)"),
           ("steps_s", "steps/s"), ("compile", "compile s"), ("rss", "host peak RSS MiB"),
           ("devmem", "device MiB"), ("speedup", "speed-up"), ("eff", "efficiency")]


def scaling_row(rec: dict, info: dict) -> dict:
    if "skipped" in rec or "error" in rec:
        return {"setting": rec["setting"], "dev": str(rec["devices"]),
                "notes": rec.get("skipped") or "ERROR: " + rec["error"][:60]}
    r = step.row(rec, info)
    r["speedup"] = common.fmt(rec.get("speedup"))
    r["eff"] = "-" if rec.get("efficiency") is None else f"{100 * rec['efficiency']:.0f}%"
    return r


if __name__ == "__main__":
    sys.exit(main())
