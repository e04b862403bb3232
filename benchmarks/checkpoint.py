"""Checkpoint size and save/restore time of the whole RCIG state: `python -m benchmarks.checkpoint`.

For each setting (default: the embedded `digits` run at 1 ipc, and CIFAR-10 shape at 10 ipc
with the paper's `depth_3` ConvNet, width 128, a pool of 30 models), the state has the
exact shapes of a real run (`Engine.abstract_state`: coreset + its optimiser state and
EMA, every pool model with its Adam state and counters, LRs, step, key), filled with
random numbers (zeros would compress away), and is saved with `rcig.checkpoint`:

- bytes in memory and on storage (Orbax/OCDBT, zstd);
- blocking part of an async save (what the training loop waits for), the whole async
  save (until committed), a synchronous save, and a restore;
- the step-time overhead of checkpointing every `--every` steps, between
  blocking/(every*step) and total/(every*step), where the step time is `--step-s` or the
  step benchmark's result for this setting on this device kind.

Imports only `rcig/`. Example:
    python -m benchmarks.checkpoint --settings digits,cifar10_ipc10 --repeats 3
    python -m benchmarks.checkpoint --uri gs://bucket/bench   # on a machine with gcsfs
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import common


def options(argv=None):
    p = common.parser("checkpoint", settings_default="digits,cifar10_ipc10")
    p.add_argument("--repeats", type=int, default=3, help="saves/restores timed per setting (median)")
    p.add_argument("--uri", default=None, help="where to write (local path or gs://); default: a temp folder")
    p.add_argument("--every", type=int, default=50, help="checkpoint interval for the overhead estimate")
    p.add_argument("--step-s", action="append", default=[], metavar="SETTING=SECONDS",
                   help="outer-step time to use for the overhead estimate")
    return p.parse_args(argv)


def materialize(abstract, seed: int = 0):
    """A concrete state of the abstract tree's shapes: random floats, zero ints, on its shardings."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def leaf(s):
        if np.issubdtype(s.dtype, np.floating):
            a = (0.05 * rng.standard_normal(s.shape, dtype=np.float32)).astype(s.dtype)
        else:
            a = np.zeros(s.shape, s.dtype)
        return jax.device_put(a, s.sharding)

    return jax.tree.map(leaf, abstract)


def tree_bytes(tree) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def pool_param_count(abstract) -> int | None:
    """Parameters of one base model of the pool (pool leaves are stacked on axis 0)."""
    import jax

    pool = abstract.get("pool") if isinstance(abstract, dict) else None
    if not isinstance(pool, dict) or "params" not in pool:
        return None
    leaves = jax.tree.leaves(pool["params"])
    return int(sum(x.size // x.shape[0] for x in leaves)) if leaves else None


def stored_bytes(uri: str) -> int:
    from rcig import storage

    fs, path = storage.filesystem(uri)
    return int(fs.du(path, total=True))


def known_step_s(name: str, device_kind: str, given: list[str]) -> tuple[float | None, str]:
    for item in given:
        k, _, v = item.partition("=")
        if k == name:
            return float(v), "--step-s"
    best = None
    for f in sorted(common.RESULTS.glob("*.json")):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if d.get("benchmark") != "step" or d.get("machine", {}).get("device_kind") != device_kind:
            continue
        for r in d.get("results", []):
            med = (r.get("step") or {}).get("median_s")
            if r.get("setting") == name and med and "tiny" not in (r.get("notes") or []):
                if best is None or med < best[0]:
                    best = (med, f.name)
    return best if best else (None, "")


def measure(s, opts, root: str) -> dict:
    import jax

    from rcig import storage
    from rcig.checkpoint import CheckpointStore
    from rcig.engine import Engine

    cfg, notes = common.build_config(s, opts)
    engine = Engine(cfg, s.shape, s.classes, devices=jax.local_devices()[:1])
    abstract = engine.abstract_state(s.ipc * s.classes)
    state = materialize(abstract)
    jax.block_until_ready(state)
    cfg_dict = cfg.to_dict()
    run = storage.join(root, s.name)

    blocking, total, sync, restore = [], [], [], []
    store = CheckpointStore(run, keep=2, async_save=True)
    for i in range(opts.repeats):
        t0 = time.perf_counter()
        store.save(i + 1, state, cfg_dict)
        t1 = time.perf_counter()
        store.wait()
        t2 = time.perf_counter()
        blocking.append(t1 - t0)
        total.append(t2 - t0)
    last = opts.repeats
    size = stored_bytes(storage.join(run, "checkpoints", str(last)))
    for _ in range(opts.repeats):
        t0 = time.perf_counter()
        restored, _ = store.restore(abstract, last)
        jax.block_until_ready(restored)
        restore.append(time.perf_counter() - t0)
        del restored
    store.close()
    sync_store = CheckpointStore(storage.join(root, s.name + "_sync"), keep=1, async_save=False)
    for i in range(opts.repeats):
        t0 = time.perf_counter()
        sync_store.save(i + 1, state, cfg_dict)
        sync.append(time.perf_counter() - t0)
    sync_store.close()

    med = statistics.median
    rec = {
        "setting": s.name, "preset": cfg.preset, "ipc": s.ipc, "shape": list(s.shape), "notes": notes,
        "model.width": cfg.model.width, "pool.model_count": cfg.pool.model_count,
        "params_per_model": pool_param_count(abstract), "leaves": len(jax.tree.leaves(abstract)),
        "state_bytes": tree_bytes(abstract), "stored_bytes": size,
        "save_blocking_s": med(blocking), "save_total_s": med(total), "save_sync_s": med(sync),
        "restore_s": med(restore),
        "times_s": {"blocking": blocking, "total": total, "sync": sync, "restore": restore},
        "uri": run,
    }
    step_s, source = (None, "") if opts.tiny else known_step_s(s.name, jax.local_devices()[0].device_kind, opts.step_s)
    if step_s:
        rec["step_s"], rec["step_s_source"] = step_s, source
        rec[f"overhead_every_{opts.every}"] = {
            "low": med(blocking) / (opts.every * step_s), "high": med(total) / (opts.every * step_s)}
    return rec


def main(argv=None) -> None:
    opts = options(argv)
    common.prepare(opts.devices)
    settings = common.selected(opts)
    info = common.machine_info()
    results = []
    with tempfile.TemporaryDirectory(prefix="rcig-ckpt-bench-") as tmp:
        root = opts.uri or tmp
        for s in settings:
            try:
                results.append(measure(s, opts, root))
            except Exception as e:  # record and go on: one bad setting must not lose the rest
                results.append({"setting": s.name, "error": f"{type(e).__name__}: {e}"})
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"setting": r["setting"], "state": r["error"]})
            continue
        over = r.get(f"overhead_every_{opts.every}")
        rows.append({
            "setting": r["setting"], "params": common.fmt(r["params_per_model"]),
            "state": common.mib(r["state_bytes"]), "stored": common.mib(r["stored_bytes"]),
            "blocking": common.fmt(r["save_blocking_s"]), "total": common.fmt(r["save_total_s"]),
            "sync": common.fmt(r["save_sync_s"]), "restore": common.fmt(r["restore_s"]),
            "overhead": f"{100 * over['low']:.2g}-{100 * over['high']:.2g}%" if over else "-",
        })
    print(f"device: {info['device_kind']} x{info['device_count']} ({info['backend']}); "
          f"storage: {opts.uri or 'local temp folder'}")
    print(common.table(rows, [
        ("setting", "setting"), ("params", "params/model"), ("state", "state MiB"),
        ("stored", "stored MiB"), ("blocking", "async save, blocking s"),
        ("total", "async save, total s"), ("sync", "sync save s"), ("restore", "restore s"),
        ("overhead", f"overhead every {opts.every} steps"),
    ]))
    out = common.write_json(opts.out, "checkpoint", {
        "benchmark": "checkpoint", "machine": info, "argv": list(argv) if argv else None,
        "storage": opts.uri or "local temp folder", "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
