"""Sweep overhead (a quickstart trial direct vs inside the sweep) and node-kill recovery.

Overhead: both sides run the same resolved config in a fresh process with the same JAX compilation
cache; each side runs `--repeats` times (the first run of each side warms the cache and
is reported but not used for the ratio). The direct figure is the wall time of the
`rcig distill` process; the sweep figure is the trial attempt's wall time recorded in
the sweep's own manifest (child process start to end, distillation + eval + writes).
Ray's start-up and Tune's scheduling are reported separately (`sweep_total_s`).

Node kill: a real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a
head without CPUs and two 1-CPU worker nodes) runs one quickstart trial with a checkpoint
every `--ckpt-every` steps. Some steps after its first periodic checkpoint, the node that
runs it disappears the way a reclaimed spot VM does: the trial's worker process is frozen
(SIGSTOP, so it can neither checkpoint nor release its lease), then it and its Ray worker
are killed (SIGKILL) and its Ray node is removed without grace. Measured from the kill: when Ray/Tune
start the next attempt on the other node (after the dead attempt's lease goes stale:
3 heartbeats of `RCIG_LEASE_HEARTBEAT_S`, default 5 s), when that attempt finishes its
first outer step (restore + compile-cache load + the step), and when it is back at the
step the killed attempt had recorded. Default knobs throughout, except that the trial
record is written at every step (`RCIG_RECORD_MIN_INTERVAL_S=0`; default: at most every
2 s), so the record's timestamps date each step; the trial then finishes and must
complete with exactly one preemption and no failure.

Needs Ray (unlike the other benchmarks); run it on a machine with the full install:

    python -m benchmarks.sweep [--only overhead|node-kill] [--steps 100] [--repeats 2]
                               [--kill-repeats 1] [--out benchmarks/results/sweep.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The benchmarks' Ray clusters stay on loopback: Ray's address lookup answers 127.0.0.1
# (read when Ray is first imported, and inherited by every Ray process started from here).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RCIG_RAY_NODE_IP", "127.0.0.1")


def _rcig() -> list[str]:
    exe = shutil.which("rcig")
    return [exe] if exe else [sys.executable, "-m", "cli"]


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def overhead(args) -> dict:
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
    shutil.rmtree(work, ignore_errors=True)
    return out


def _wait(pred, timeout: float, what: str, every: float = 0.1):
    from orchestrator.polling import poll_until

    v = poll_until(pred, timeout, every)
    if not v:
        raise SystemExit(f"node-kill benchmark: timed out after {timeout:.0f} s waiting for {what}")
    return v


def node_kill(args) -> dict:
    """Kill the node under a running trial; time the recovery (see the module docstring)."""
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator import manifest as mf
    from orchestrator.sweep import init_ray, launch
    from rcig.lease import LEASE, heartbeat_s as lease_heartbeat_s

    # The trial record is written at every reported step (default: at most every 2 s), so
    # its timestamps say when each step landed.
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RCIG_RECORD_MIN_INTERVAL_S="0", RCIG_TUNE_VERBOSE="0")
    work = Path(tempfile.mkdtemp(prefix="rcig-kill-bench-"))
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(work / "jax-cache"))
    # Every node on loopback (the driver finds it there too: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    # makes Ray's own address lookup answer 127.0.0.1, set before Ray is imported, at the top).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    for _ in range(2):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    init_ray(address=cluster.address)
    sets = [f"steps={args.kill_steps}", f"checkpoint.every_steps={args.ckpt_every}", "checkpoint.every_seconds=0",
            "search.space={}", "log_every=1", "eval.runs=1"]
    runs = []
    try:
        for r in range(args.kill_repeats):
            name = f"kill{r}"
            sweep = str(work / name)
            box: dict = {}
            th = threading.Thread(target=lambda: box.update(out=launch(
                str(ROOT / "sweeps" / "quickstart.yaml"), storage_uri=str(work), name=name,
                address=cluster.address, shared_storage=True, sets=sets)), daemon=True)
            th.start()

            def ready():
                recs = mf.read_records(sweep)
                rec = recs[0] if recs else None
                if rec and rec.attempts == 1 and rec.checkpoint_step and rec.step is not None \
                        and rec.step >= rec.checkpoint_step + args.kill_after:
                    return rec
                return None

            rec = _wait(ready, 600, f"step {args.ckpt_every + args.kill_after} of the first attempt")
            att = rec.history[-1]
            victim = next(n for n in cluster.list_all_nodes() if n.node_id == att["node_id"])
            t_kill = time.time()
            os.kill(att["pid"], signal.SIGSTOP)  # the VM is gone: no checkpoint, no lease release
            lease = json.loads((Path(sweep) / "trials" / rec.key / LEASE).read_text())
            time.sleep(1.0)  # the (live) Ray worker records what the frozen process had reported
            rec = mf.read_records(sweep)[0]
            step_at_kill, ckpt_at_kill = rec.step, rec.checkpoint_step
            for pid in (att["worker_pid"], att["pid"]):  # the whole VM goes at once: nobody
                os.kill(pid, signal.SIGKILL)             # is left to record a failure
            cluster.remove_node(victim, allow_graceful=False)

            def second(cond):
                def f():
                    recs = mf.read_records(sweep)
                    x = recs[0] if recs else None
                    if x and x.attempts >= 2 and x.history[1]["updated"] > x.history[1]["started"] and cond(x):
                        return x
                    return None
                return f

            # Times come from the record itself: an attempt's `updated` is stamped when the
            # Ray worker writes a new step, so polling adds no error.
            first = _wait(second(lambda x: x.step is not None), 600, "the next attempt's first step")
            caught = _wait(second(lambda x: x.step is not None and x.step >= step_at_kill), 600,
                           "the next attempt to reach the killed attempt's step")
            th.join(timeout=900)
            final = mf.read_records(sweep)[0]
            ok = (not th.is_alive() and "out" in box and box["out"].counts == {mf.COMPLETED: 1}
                  and final.preemptions == 1 and final.failures == 0)
            run = {
                "step_at_kill": step_at_kill, "checkpoint_step_at_kill": ckpt_at_kill,
                "resumed_from": final.history[1].get("start_step"),
                "steps_redone": step_at_kill - (final.history[1].get("start_step") or 0),
                "kill_to_lease_stale_s": float(lease["t"]) + 3 * lease_heartbeat_s() - t_kill,
                "kill_to_next_attempt_s": first.history[1]["started"] - t_kill,
                "kill_to_first_step_s": first.history[1]["updated"] - t_kill,
                "first_step_of_next_attempt": first.step,
                "kill_to_caught_up_s": caught.history[1]["updated"] - t_kill,
                "outcomes": [h.get("outcome") for h in final.history],
                "completed_with_one_preemption": ok,
            }
            runs.append(run)
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")  # the replacement VM: the next repeat has a spare node again
            cluster.wait_for_nodes()
            print(f"kill {r}: killed at step {step_at_kill} (checkpoint {ckpt_at_kill}); next attempt "
                  f"+{run['kill_to_next_attempt_s']:.1f} s, first step +{run['kill_to_first_step_s']:.1f} s, "
                  f"back at step {step_at_kill} +{run['kill_to_caught_up_s']:.1f} s; completed: {ok}", flush=True)
            if not ok:
                raise SystemExit(f"node-kill benchmark: the trial did not complete cleanly: {final.history}")
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    keys = ["kill_to_lease_stale_s", "kill_to_next_attempt_s", "kill_to_first_step_s", "kill_to_caught_up_s"]
    return {"steps": args.kill_steps, "ckpt_every": args.ckpt_every, "kill_after": args.kill_after,
            "lease_heartbeat_s": lease_heartbeat_s(), "runs": runs,
            "median": {k: statistics.median(x[k] for x in runs) for k in keys}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["overhead", "node-kill"], default=None, help="run one part (default: both)")
    ap.add_argument("--steps", type=int, default=100, help="overhead: outer steps per run")
    ap.add_argument("--repeats", type=int, default=2, help="overhead: runs per side (the first warms the cache)")
    ap.add_argument("--kill-steps", type=int, default=60, help="node kill: outer steps of the trial")
    ap.add_argument("--ckpt-every", type=int, default=20, help="node kill: checkpoint interval (steps)")
    ap.add_argument("--kill-after", type=int, default=5, help="node kill: steps past the first checkpoint")
    ap.add_argument("--kill-repeats", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep.json"))
    args = ap.parse_args(argv)
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": os.uname().nodename, "cpu_count": os.cpu_count()}
    if args.only in (None, "overhead"):
        out["overhead"] = overhead(args)
    if args.only in (None, "node-kill"):
        out["node_kill"] = node_kill(args)
    out["load_avg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
