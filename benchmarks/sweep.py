"""Sweep overhead: a quickstart trial run directly (`rcig distill`) vs inside the sweep.

Both sides run the same resolved config in a fresh process with the same JAX compilation
cache; each side runs `--repeats` times (the first run of each side warms the cache and
is reported but not used for the ratio). The direct figure is the wall time of the
`rcig distill` process; the sweep figure is the trial attempt's wall time recorded in
the sweep's own manifest (child process start to end, distillation + eval + writes).
Ray's start-up and Tune's scheduling are reported separately (`sweep_total_s`).

Needs Ray (unlike the other benchmarks); run it on a machine with the full install:

    python -m benchmarks.sweep [--steps 100] [--repeats 2] [--out benchmarks/results/sweep.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rcig() -> list[str]:
    exe = shutil.which("rcig")
    return [exe] if exe else [sys.executable, "-m", "cli"]


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep.json"))
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="rcig-sweep-bench-"))
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(work / "jax-cache"), RAY_USAGE_STATS_ENABLED="0")
    sets = [f"steps={args.steps}", "search.space={}", "checkpoint.every_seconds=0"]
    rows = {"direct_s": [], "sweep_attempt_s": [], "sweep_total_s": []}
    for r in range(args.repeats):
        name = f"bench{r}"
        t_total = _timed(_rcig() + ["sweep", "launch", str(ROOT / "sweeps" / "quickstart.yaml"), "--storage", str(work),
                                    "--name", name] + sum((["--set", s] for s in sets), []), env)
        trials = list((work / name / "trials").glob("*/trial.json"))
        rec = json.loads(trials[0].read_text())
        att = rec["history"][-1]
        rows["sweep_attempt_s"].append(att["ended"] - att["started"])
        rows["sweep_total_s"].append(t_total)
        cfg = json.loads((trials[0].parent / "config.json").read_text())
        cfg_path = work / f"cfg{r}.json"
        cfg_path.write_text(json.dumps(cfg))
        # the same resolved config, run directly in a fresh process
        direct = [sys.executable, "-c",
                  "import json,sys; from rcig.config import DistillConfig; from rcig.distill import run_distillation; "
                  "run_distillation(DistillConfig.from_dict(json.load(open(sys.argv[1]))), sys.argv[2], progress=False)",
                  str(cfg_path), str(work / f"direct{r}")]
        rows["direct_s"].append(_timed(direct, env))
    use = slice(1, None) if args.repeats > 1 else slice(None)
    d = statistics.median(rows["direct_s"][use])
    s = statistics.median(rows["sweep_attempt_s"][use])
    out = {"steps": args.steps, "repeats": args.repeats, **rows, "direct_median_s": d,
           "sweep_attempt_median_s": s, "overhead_pct": 100 * (s - d) / d,
           "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"{'run':>4} {'direct s':>9} {'sweep attempt s':>16} {'sweep total s':>14}")
    for i in range(args.repeats):
        print(f"{i:>4} {rows['direct_s'][i]:>9.1f} {rows['sweep_attempt_s'][i]:>16.1f} {rows['sweep_total_s'][i]:>14.1f}")
    print(f"overhead of the trial inside the sweep: {out['overhead_pct']:+.1f}% (median of warm runs)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
