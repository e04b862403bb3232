"""Search algorithms at the same trial budget on digits: grid, random, Optuna, ASHA, PBT.

Each algorithm runs one sweep (`rcig sweep launch sweeps/digits_<algo>.yaml`, a fresh
process with its own local Ray) of `--trials` trials over the coreset and temperature
learning rates, every trial `--steps` outer steps, `--concurrent` at a time, with the
spec's intermediate validation estimate every `--every` steps (ASHA's rungs and PBT's
decisions use it). The space is the same for every algorithm: log-uniform ranges for
random, Optuna, ASHA and PBT's initial draws; for grid, `--trials` points of a
log-spaced grid over the same ranges. Recorded per algorithm: the best trial by
validation accuracy (the final evaluation's, or, for a trial ASHA stopped, the last
estimate it reached), that trial's test accuracy, the sweep's wall time (launch to end,
Ray's start included) and its trial states; for PBT also the exploits.

A learning rate is a constant of the compiled step, so every trial with a new value
compiles once (JAX's disk cache is shared by all sweeps; a PBT exploit that perturbs a
rate compiles again). On a loaded CPU the compile dominates each trial's wall time.

    python -m benchmarks.search_compare [--trials 8] [--steps 100] [--concurrent 2]
        [--algos grid,random,optuna,asha,pbt] [--out benchmarks/results/cpu_search_compare.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ALGOS = ("grid", "random", "optuna", "asha", "pbt")
PROTO = (0.0003, 0.1)
TEMP = (0.003, 0.3)


def _load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _grid(trials: int) -> str:
    """`trials` grid points over the same ranges: coreset rates x 2 temperature rates."""
    n_proto = max(1, trials // 2)
    n_temp = max(1, trials // n_proto)

    def logspace(lo: float, hi: float, n: int) -> list[float]:
        if n == 1:
            return [math.sqrt(lo * hi)]
        return [float(f"{lo * (hi / lo) ** ((i + 0.5) / n):.3g}") for i in range(n)]

    return (f"search.space={{outer.proto_lr: {{grid: {logspace(*PROTO, n_proto)}}}, "
            f"outer.temp_lr: {{grid: {logspace(*TEMP, n_temp)}}}}}")


def sets_for(algo: str, a: argparse.Namespace) -> list[str]:
    ranges = (f"search.space={{outer.proto_lr: {{loguniform: {list(PROTO)}}}, "
              f"outer.temp_lr: {{loguniform: {list(TEMP)}}}}}")
    out = [f"steps={a.steps}", f"max_concurrent={a.concurrent}", f"eval.every_steps={a.every}",
           f"checkpoint.every_steps={a.every}", "checkpoint.every_seconds=0", f"eval.runs={a.eval_runs}",
           f"name=cmp_{algo}", "search.seed=0"]
    if algo == "grid":
        return out + [_grid(a.trials), "num_samples=1"]
    out += [ranges, f"num_samples={a.trials}"]
    if algo == "asha":
        out += [f"scheduler.grace_period={a.every}"]
    if algo == "pbt":
        out += [f"scheduler.perturbation_interval={a.every}", "checkpoint.keep=3"]
    return out


def run_one(algo: str, a: argparse.Namespace, root: Path) -> dict:
    from orchestrator import manifest as mf
    from orchestrator.results import best

    cmd = [sys.executable, str(ROOT / "cli.py"), "sweep", "launch", str(ROOT / "sweeps" / f"digits_{algo}.yaml")]
    for s in sets_for(algo, a):
        cmd += ["--set", s]
    env = {**os.environ, "RCIG_SWEEP_ROOT": str(root), "RCIG_TUNE_VERBOSE": "0",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="sc", dir="/tmp")}
    load0 = _load()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    sweep = root / f"cmp_{algo}"
    rec = {"algo": algo, "sets": sets_for(algo, a), "wall_s": round(wall, 1), "rc": proc.returncode,
           "load_before": load0, "load_after": _load()}
    if proc.returncode != 0:
        rec["error"] = (proc.stdout + proc.stderr)[-2000:]
        return rec
    recs = mf.read_records(str(sweep))
    rec["counts"] = mf.count_states(recs)
    rec["trials"] = len(recs)
    rec["outer_steps_run"] = sum(r.step or 0 for r in recs)
    rows = best(str(sweep), top=len(recs))
    top = rows[0]
    rec["best"] = {"key": top["key"], "params": top["params"], "status": top["status"],
                   "val_acc": top["val_mean"], "val_source": top["val_source"],
                   "test_acc": top["eval_mean"], "baseline_test_acc": top["baseline_mean"]}
    rec["val_acc_all"] = sorted((r["val_mean"] for r in rows if r["val_mean"] is not None), reverse=True)
    if algo == "pbt":
        from orchestrator.pbt import lineage

        rec["exploits"] = sum(len(lineage(mf.trial_uri(str(sweep), r.key))["exploits"]) for r in recs)
        rec["preemptions"] = sum(r.preemptions for r in recs)
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=25, help="intermediate estimate / rung / PBT interval")
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--eval-runs", type=int, default=3)
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--storage", default=None, help="sweep root (default: a temp dir, removed)")
    ap.add_argument("--out", default=str(RESULTS / "cpu_search_compare.json"))
    a = ap.parse_args(argv)
    root = Path(a.storage) if a.storage else Path(tempfile.mkdtemp(prefix="search_compare_"))
    out = {"benchmark": "search_compare", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "budget": {"trials": a.trials, "steps": a.steps, "every": a.every, "concurrent": a.concurrent,
                      "eval_runs": a.eval_runs}, "algos": {}}
    try:
        for algo in a.algos.split(","):
            r = run_one(algo, a, root)
            out["algos"][algo] = r
            b = r.get("best") or {}
            print(f"{algo:7s} wall {r['wall_s']:7.1f} s  best val {b.get('val_acc')}  its test "
                  f"{b.get('test_acc')}  states {r.get('counts')}  load {r['load_before']}", flush=True)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(out, indent=1, default=str) + "\n")  # after each
    finally:
        if not a.storage:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=1, default=str))
    return 0 if all(r.get("rc") == 0 for r in out["algos"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
