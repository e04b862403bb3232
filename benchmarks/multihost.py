"""One RCIG step over 4 devices as 1 process vs 2 processes (multi-host, emulated on CPU):
`python -m benchmarks.multihost`.

Two layouts of the same 4-device `data` mesh, on this machine:

- ``1x4``: one process with 4 emulated CPU devices (what a one-host trial does);
- ``2x2``: two processes with 2 emulated CPU devices each, joined with
  `rcig.multihost.initialize` (gloo collectives over loopback), each building only its
  own rows of the real batch (`rcig.multihost.global_batch`), as the hosts of a
  multi-host trial do.

For each layout: compile + first step, the median outer-step time (`--steps` after
`--warmup`), the cost of the per-step stop agreement (`rcig.multihost.any_process`, one
tiny all-gather; 0 for one process), and the median time of a synchronous checkpoint
save (until committed) and of a restore of the whole state with `rcig.checkpoint`
(`--repeats`). The setting is the embedded digits run (8x8 digits shape, `digits`
preset: width 32, real batch 256, 10-model pool) on synthetic data; `--tiny` shrinks it.

Caveat: both processes of ``2x2`` share this machine's cores, so this measures the cost
of the multi-process machinery (gloo all-reduces over loopback, Orbax's cross-process
barriers), not what two real hosts would gain.

Example:
    python -m benchmarks.multihost --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

LAYOUTS = {"1x4": (1, 4), "2x2": (2, 2)}  # processes x devices per process


def options(argv=None):
    p = common.parser("multihost", settings_default="digits")
    p.add_argument("--repeats", type=int, default=3, help="checkpoint saves/restores timed (median)")
    p.add_argument("--layouts", default="1x4,2x2", help=f"comma-separated; known: {', '.join(LAYOUTS)}")
    p.add_argument("--worker", nargs=4, metavar=("LAYOUT", "PROCESS", "PORT", "DIR"), help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    for name in opts.layouts.split(","):
        if name not in LAYOUTS:
            raise SystemExit(f"--layouts: unknown layout {name}; known: {', '.join(LAYOUTS)}")
    return opts


def worker(opts) -> dict:
    """One process of a layout: set up, time steps and checkpoints; process 0 returns the record."""
    layout, pid, port, folder = opts.worker
    n_proc, n_dev = LAYOUTS[layout]
    pid = int(pid)
    from rcig import multihost as mh

    if n_proc > 1:
        mh.initialize(mh.Distributed(f"127.0.0.1:{port}", n_proc, pid))
    import jax
    import numpy as np

    from rcig.checkpoint import CheckpointStore
    from rcig.engine import Engine

    s = common.selected(opts)[0]
    cfg, notes = common.build_config(s, opts)
    engine = Engine(cfg, s.shape, s.classes, devices=jax.devices())
    x0, y0, batches = common.synthetic(s, cfg.outer.real_batch_size, n_batches=2)

    def batch(k: int) -> dict:  # each process reads only the rows its devices hold
        x, y = batches[k % len(batches)]
        return {"x": mh.global_batch(engine.batch_sharding, x.shape, lambda lo, hi: x[lo:hi]),
                "y": mh.global_batch(engine.batch_sharding, y.shape, lambda lo, hi: y[lo:hi])}

    n_img = cfg.ipc * s.classes
    t0 = time.perf_counter()
    state = engine.init_state(x0, y0, jax.random.PRNGKey(0), cfg.inner.lr, cfg.hinv.lr)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, m = engine.step(state, batch(0))
    jax.block_until_ready(m)
    first_s = time.perf_counter() - t0
    for k in range(opts.warmup):
        state, m = engine.step(state, batch(k + 1))
    jax.block_until_ready(m)
    times, agree = [], []
    for k in range(opts.steps):
        t0 = time.perf_counter()
        state, m = engine.step(state, batch(k))
        loss = float(m["outer/loss"])  # the loop reads its metrics every step
        t1 = time.perf_counter()
        mh.any_process(False)
        t2 = time.perf_counter()
        times.append(t1 - t0)
        agree.append(t2 - t1)
    store = CheckpointStore(folder, keep=2, async_save=False)
    saves, restores = [], []
    abstract = engine.abstract_state(n_img)
    for r in range(opts.repeats):
        mh.sync(f"bench-save-{r}")
        t0 = time.perf_counter()
        store.save(100 + r, state, cfg.to_dict(), force=True)
        saves.append(time.perf_counter() - t0)
        mh.sync(f"bench-restore-{r}")
        t0 = time.perf_counter()
        restored, _ = store.restore(abstract, 100 + r)
        jax.block_until_ready(restored)
        restores.append(time.perf_counter() - t0)
    same = bool(np.array_equal(np.asarray(restored["coreset"]["x"]), np.asarray(state["coreset"]["x"])))
    store.close()
    size = sum(f.stat().st_size for f in Path(folder, "checkpoints").rglob("*") if f.is_file())
    return {
        "layout": layout, "processes": n_proc, "devices_per_process": n_dev,
        "device_count": jax.device_count(), "notes": notes, "config": _config_digest(cfg),
        "init_s": init_s, "compile_and_first_step_s": first_s,
        "step": {"n": len(times), "median_s": statistics.median(times), "min_s": min(times),
                 "max_s": max(times), "times_s": times},
        "stop_agreement_median_s": statistics.median(agree) if n_proc > 1 else 0.0,
        "checkpoint": {"save_sync_median_s": statistics.median(saves), "restore_median_s": statistics.median(restores),
                       "saves_s": saves, "restores_s": restores, "restored_equal": same,
                       "bytes_on_disk": size, "steps_on_disk": min(opts.repeats, 2)},
        "last_loss": loss,
    }


def _config_digest(cfg) -> dict:
    return {"model.width": cfg.model.width, "outer.real_batch_size": cfg.outer.real_batch_size,
            "pool.model_count": cfg.pool.model_count, "inner.n_steps": cfg.inner.n_steps,
            "hinv.n_steps": cfg.hinv.n_steps, "loop": cfg.loop, "ipc": cfg.ipc}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(name: str, argv: list[str], timeout: float = 3000) -> dict:
    """Start the layout's processes (fresh interpreters: the device count is fixed at jax
    import) and return process 0's record."""
    n_proc, n_dev = LAYOUTS[name]
    port = _free_port()
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n_dev}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="rcig-mh-bench-") as folder:
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.multihost", *argv,
                                   "--worker", name, str(i), str(port), folder],
                                  cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(n_proc)]
        outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"layout {name}: a process exited {p.returncode}:\n{err[-3000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = options(argv)
    if opts.worker:
        rec = worker(opts)
        if opts.worker[1] == "0":
            print(json.dumps(rec), flush=True)
        return 0
    passed = [a for a in argv if a not in ("--out",)]
    if "--out" in argv:
        i = argv.index("--out")
        passed = argv[:i] + argv[i + 2:]
    load_before = os.getloadavg()
    records = {}
    for name in opts.layouts.split(","):
        t0 = time.time()
        records[name] = run_layout(name, passed)
        records[name]["wall_s"] = time.time() - t0
        r = records[name]
        print(f"{name}: step {r['step']['median_s'] * 1e3:.1f} ms (median of {r['step']['n']}), "
              f"compile+first {r['compile_and_first_step_s']:.1f} s, stop agreement "
              f"{r['stop_agreement_median_s'] * 1e3:.2f} ms, checkpoint save "
              f"{r['checkpoint']['save_sync_median_s']:.2f} s / restore {r['checkpoint']['restore_median_s']:.2f} s",
              flush=True)
    common.prepare(1)
    out = {"benchmark": "multihost", "machine": common.machine_info(), "loadavg_before": load_before,
           "loadavg_after": os.getloadavg(), "layouts": records,
           "caveat": "both processes of 2x2 share one machine's cores: emulated multi-host"}
    if "1x4" in records and "2x2" in records:
        a, b = records["1x4"], records["2x2"]
        out["ratio_2x2_over_1x4"] = {
            "step": b["step"]["median_s"] / a["step"]["median_s"],
            "save": b["checkpoint"]["save_sync_median_s"] / a["checkpoint"]["save_sync_median_s"],
            "restore": b["checkpoint"]["restore_median_s"] / a["checkpoint"]["restore_median_s"],
        }
        print(f"2x2 / 1x4: step x{out['ratio_2x2_over_1x4']['step']:.2f}, save "
              f"x{out['ratio_2x2_over_1x4']['save']:.2f}, restore x{out['ratio_2x2_over_1x4']['restore']:.2f}")
    path = Path(opts.out) if opts.out else common.RESULTS / "cpu_multihost.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
