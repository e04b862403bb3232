"""A whole distillation run, resumable: `run_distillation(cfg, out_uri)`.

Writes to `out_uri` (local path, file:// or gs://):
    config.json      the resolved config
    metrics.jsonl    one JSON object per outer step: {"step": s, "outer/loss": ..., ...}
    checkpoints/     Orbax checkpoints of the whole state (rcig.checkpoint)
    tuning.json      the LR search result (also inside the state) and the run identity
    split.json       the validation split held out of train (rcig.data.split)
    distilled.npz, distilled.png, eval.json   at the end
    eval.partial.json  finished evaluation runs while the evaluation is in progress

Init order (resume by rerunning the same command):
    1. this run folder's own latest committed checkpoint (the same run by
       `rcig.config.run_differences`; `steps` may change), else
    2. a fresh state: real images per class, the LR search (docs/algorithm.md §8.2) or, when this run's
       tuning.json is there, its result, then a checkpoint at step 0; a restart never
       re-tunes. A folder without checkpoints that holds another run's files is refused
       (`--restart` moves them aside).
A run whose final checkpoint is committed goes straight to the evaluation, which keeps
its finished runs. Stop requests: see `rcig.preemption.StopControl` (every phase is
either abortable or stops cooperatively within a deadline; exit `EXIT_PREEMPTED`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import jax
import numpy as np

from rcig import export, storage
from rcig.config import DistillConfig, run_differences, run_identity, validate
from rcig.preemption import EXIT_PREEMPTED, phase  # noqa: F401  (EXIT_PREEMPTED re-exported)

TUNING_JSON = "tuning.json"
SPLIT_JSON = "split.json"
EVAL_PARTIAL_JSON = "eval.partial.json"
# What `--restart` moves aside (or deletes with --force) besides the checkpoints.
RUN_FILES = ("config.json", "metrics.jsonl", TUNING_JSON, SPLIT_JSON, "distilled.npz", "distilled.png",
             "eval.json", EVAL_PARTIAL_JSON)



class NonFiniteError(FloatingPointError):
    """A metric became NaN/Inf; the message names the step and the metric."""


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (e.g. --restart over checkpoints without --force)."""


@dataclass
class RunResult:
    out_uri: str
    status: str  # "completed" | "preempted"
    step: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    eval: dict | None = None
    checkpoint_step: int | None = None
    wall_s: float = 0.0
    resumed_from: int | None = None
    tuning: dict | None = None


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and sys.stderr.isatty()
        self.plain = enabled and not self.enabled
        self.t_last, self.s_last = time.perf_counter(), None

    def update(self, s: int, m: dict[str, float]) -> None:
        now = time.perf_counter()
        rate = 0.0
        if self.s_last is not None and now > self.t_last:
            rate = (s - self.s_last) / (now - self.t_last)
        line = f"step {s}/{self.total}  loss {m.get('outer/loss', float('nan')):.4f}  acc {m.get('outer/acc', float('nan')):.3f}  {rate:.2f} steps/s"
        if self.enabled:
            done = int(30 * s / max(self.total, 1))
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {line}", end="", file=sys.stderr, flush=True)
        elif self.plain:
            print(line, file=sys.stderr, flush=True)
        self.t_last, self.s_last = now, s

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def _load_metrics(uri: str, upto: int) -> list[dict]:
    if not storage.exists(uri):
        return []
    rows = []
    for line in storage.read_text(uri).splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a kill mid-write
        if row.get("step", 0) <= upto:
            rows.append(row)
    return rows


def _write_metrics(uri: str, rows: list[dict]) -> None:
    storage.write_text(uri, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def run_distillation(
    cfg: DistillConfig,
    out_uri: str,
    *,
    restart: bool = False,
    force: bool = False,
    run_eval: bool = True,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    progress: bool = True,
    devices: list | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> RunResult:
    """Distill `cfg` into `out_uri`, resuming from its latest checkpoint if there is one.

    Phases (declared to an installed `rcig.preemption.StopControl`, which ends the
    process on a stop request in an abortable one): load, tune, init, compile (the
    first step) and eval are abortable; the step loop stops cooperatively at a
    checkpoint; file writes and the final checkpoint are short commits.

    Example:
        >>> cfg = make_config("digits", 1, overrides=["steps=20"])            # doctest: +SKIP
        >>> res = run_distillation(cfg, "runs/demo")                          # doctest: +SKIP
        >>> res.status, res.eval["mean"] > res.eval["baseline"]["mean"]      # doctest: +SKIP
    """
    from rcig.checkpoint import CheckpointStore, should_save
    from rcig.data import init_proto_indices, load_run_dataset, real_batch_indices, shifted_one_hot
    from rcig.engine import Engine

    validate(cfg)
    t_start = time.perf_counter()
    out = storage.normalize(out_uri)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    cfg_dict = cfg.to_dict()
    with phase("load", abortable=True):
        storage.makedirs(out)
        if restart:
            with phase("restart"):
                _clear_for_restart(out, force)
        store = CheckpointStore(out, keep=cfg.checkpoint.keep)
        latest = store.latest_step()
        if latest is not None:
            store.check_config(cfg_dict)
        else:
            check_run_folder(out, cfg)
        ds = load_run_dataset(cfg)  # train minus the validation split (never seen here)
        n_images = cfg.ipc * ds.num_classes
        engine = Engine(cfg, ds.image_shape, ds.num_classes, devices=devices)
    with phase("commit"):
        # First, so a folder stopped at any later point says which run it holds.
        storage.write_text(storage.join(out, "config.json"), cfg.to_json() + "\n")
        export.write_json(storage.join(out, SPLIT_JSON), ds.split)

    def batch_for(s: int):
        idx = real_batch_indices(cfg.seed, s, len(ds.x_train), cfg.outer.real_batch_size)
        return engine.put_batch(ds.x_train[idx], shifted_one_hot(ds.y_train[idx], ds.num_classes))

    tuning = None
    if latest is not None:
        with phase("restore", abortable=True):
            state, _ = store.restore(engine.abstract_state(n_images), latest)
        start = int(state["step"])
        if start >= cfg.steps:
            say(f"distillation already complete at step {start} (checkpoint); "
                + ("evaluating" if run_eval else "writing the distilled set"))
        else:
            say(f"resuming from checkpoint step {start}")
    else:
        key = jax.random.PRNGKey(cfg.seed)
        idx = init_proto_indices(ds.y_train, ds.num_classes, cfg.ipc, cfg.seed)
        if cfg.outer.init == "noise":
            x0 = 0.3 * np.random.default_rng([cfg.seed, 0, 2]).standard_normal((n_images, *ds.image_shape)).astype(np.float32)
        else:
            x0 = ds.x_train[idx]
        y0 = shifted_one_hot(ds.y_train[idx], ds.num_classes)
        inner_lr, hvp_lr = cfg.inner.lr, cfg.hinv.lr
        if not cfg.lr_tune.skip:
            tuning = load_tuning(out, cfg)
            if tuning is not None:
                say(f"LR search: reusing tuning.json (inner {tuning['inner']:.3g}, H-solve {tuning['hvp']:.3g})")
            else:
                coreset = {"x": np.asarray(x0, np.float32), "y": y0, "log_temp": np.float32(0.0)}
                with phase("tune", abortable=True):
                    tuning = engine.tune_learning_rates(coreset, batch_for(0), jax.random.fold_in(key, 1), inner_lr, hvp_lr)
                tuning["identity"] = run_identity(cfg)
                with phase("commit"):  # a rerun stopped before checkpoint 0 does not tune again
                    export.write_json(storage.join(out, TUNING_JSON), tuning)
                capped = f"; stopped at the probe cap for {', '.join(tuning['capped'])}" if tuning.get("capped") else ""
                say(f"LR search: inner {tuning['inner']:.3g}, H-solve {tuning['hvp']:.3g} ({tuning.get('probes')} probes, "
                    f"{tuning.get('seconds', 0.0):.1f} s{capped})")
            inner_lr, hvp_lr = tuning["inner"], tuning["hvp"]
        with phase("init", abortable=True):
            state = engine.init_state(x0, y0, key, inner_lr, hvp_lr)
        start = 0
        with phase("commit"):
            store.save(0, state, cfg_dict, force=True)

    metrics_uri = storage.join(out, "metrics.jsonl")
    with phase("commit"):
        rows = _load_metrics(metrics_uri, start)
        _write_metrics(metrics_uri, rows)
    local = not storage.is_remote(out)
    flushed = len(rows)

    def flush() -> None:
        nonlocal flushed
        if local:
            with open(metrics_uri, "a") as f:
                for r in rows[flushed:]:
                    f.write(json.dumps(r, sort_keys=True) + "\n")
        else:
            _write_metrics(metrics_uri, rows)
        flushed = len(rows)

    bar = _Progress(cfg.steps, progress)
    last_ckpt_step, last_ckpt_time = start, clock()
    status = "completed"
    pending = None  # (step, device metrics, wall time of dispatch)
    t_prev = time.perf_counter()
    s = start

    probe = None
    if cfg.eval.every_steps:
        from rcig.val_probe import ValProbe, probe_due

        probe = ValProbe(ds, cfg)
    val_latest: dict[str, float] = {}  # the newest intermediate metric (rcig.val_probe)

    def consume(p) -> dict[str, float]:
        nonlocal t_prev
        s_done, m_dev = p
        m = {k: float(v) for k, v in jax.device_get(m_dev).items()}
        now = time.perf_counter()
        m["time/step_s"] = now - t_prev
        t_prev = now
        bad = [k for k, v in m.items() if not math.isfinite(v)]
        if bad:
            flush()
            raise NonFiniteError(f"step {s_done}: non-finite {', '.join(sorted(bad))}; stopping (last checkpoint: step {store.latest_step()})")
        if val_latest.get("val/step") == s_done:
            m.update(val_latest)
        rows.append({"step": s_done, **m})
        if s_done % cfg.log_every == 0 or s_done == cfg.steps:
            if on_metrics:
                on_metrics(s_done, {**m, **val_latest})  # every report carries the metric
            bar.update(s_done, m)
        return m

    last_metrics: dict[str, float] = {}
    with phase("loop"):  # stops cooperatively, at a checkpoint (the deadline covers a slow step)
        next_batch = batch_for(start) if start < cfg.steps else None
        while s < cfg.steps:
            batch = next_batch
            if s == start:  # the first call compiles: nothing to lose if stopped there
                with phase("compile", abortable=True):
                    state, m_dev = engine.step(state, batch)
            else:
                state, m_dev = engine.step(state, batch)
            s += 1
            next_batch = batch_for(s) if s < cfg.steps else None  # host work overlaps the step
            if pending is not None:
                last_metrics = consume(pending)
            pending = (s, m_dev)
            if probe is not None and probe_due(s, cfg.eval.every_steps, cfg.log_every, bool(val_latest)):
                val_latest = {**probe(state["ema"]["average"]), "val/step": float(s)}
            stop = bool(stop_requested and stop_requested())
            if stop or should_save(s, clock(), last_ckpt_step, last_ckpt_time, cfg.checkpoint.every_steps, cfg.checkpoint.every_seconds):
                last_metrics = consume(pending)
                pending = None
                flush()
                store.save(s, state, cfg_dict, force=True)
                last_ckpt_step, last_ckpt_time = s, clock()
                if stop:
                    store.wait()  # the notice grace period is short: commit before returning
                if on_checkpoint:
                    on_checkpoint(s)  # save started; Orbax commits it before the next one starts
            if stop:
                status = "preempted"
                break
        if pending is not None:
            last_metrics = consume(pending)
        flush()
        bar.close()

        if status == "preempted":
            store.wait()
            store.close()
            return RunResult(out, status, s, last_metrics, None, store.latest_step(), time.perf_counter() - t_start,
                             resumed_from=start if latest is not None else None, tuning=tuning)

    with phase("finalize"):
        store.save(s, state, cfg_dict, final=True)  # marks the last step final (kept by retention)
        store.wait()
        if on_checkpoint:
            on_checkpoint(s)
        store.close()
        arrays = export.distilled_arrays(jax.device_get(state["ema"]["average"]), ds, cfg, s)
        export.write_distilled(out, arrays, ds.num_classes)
    eval_result = None
    if run_eval:
        from rcig.evaluate import evaluate_distilled

        # Everything the eval needs is committed (final checkpoint, distilled.npz): a stop
        # here ends the process; a rerun goes straight back to the eval, and finished
        # evaluation runs are kept (eval.partial.json).
        with phase("eval", abortable=True):
            eval_result = evaluate_distilled(
                arrays["x_proto"], arrays["y_proto"], ds, use_flip=cfg.outer.use_flip, cfg=cfg.eval,
                width=cfg.eval.width or cfg.model.width, ipc=cfg.ipc, seed=cfg.seed, depth=cfg.model.depth,
                partial_uri=storage.join(out, EVAL_PARTIAL_JSON),
            )
            eval_result["distill_steps"] = s
            export.write_json(storage.join(out, "eval.json"), eval_result)
            storage.remove(storage.join(out, EVAL_PARTIAL_JSON))
        # The final figures under the sweep's names: selection on validation, test beside it.
        if eval_result.get("val_mean") is not None:
            last_metrics["val/acc"] = eval_result["val_mean"]
        last_metrics["test/acc"] = eval_result["mean"]
    return RunResult(out, status, s, last_metrics, eval_result, s, time.perf_counter() - t_start,
                     resumed_from=start if latest is not None else None, tuning=tuning)


def load_tuning(out: str, cfg: DistillConfig) -> dict | None:
    """The LR search result saved in `out`, if it was found for this run (its identity,
    steps aside, equals `cfg`'s), else None: a run stopped after its LR search but before
    its first checkpoint does not search again."""
    uri = storage.join(out, TUNING_JSON)
    try:
        if not storage.exists(uri):
            return None
        doc = json.loads(storage.read_text(uri))
    except (ValueError, OSError, storage.StorageError):
        return None
    ident = doc.get("identity") if isinstance(doc, dict) else None
    if not isinstance(ident, dict) or run_differences(ident, cfg, resume=True):
        return None
    if not all(isinstance(doc.get(k), (int, float)) for k in ("inner", "hvp")):
        return None
    return doc


def _saved_run_config(out: str) -> tuple[dict | None, str]:
    """The config of the run a folder holds, from config.json or distilled.npz."""
    uri = storage.join(out, "config.json")
    if storage.exists(uri):
        try:
            return json.loads(storage.read_text(uri)), uri
        except ValueError as e:
            raise RunFolderError(f"{uri}: unreadable ({e}); use another --out, or --restart to move it aside") from None
    npz = storage.join(out, "distilled.npz")
    if storage.exists(npz):
        try:
            return json.loads(str(export.read_distilled(npz)["config_json"])), npz
        except (KeyError, ValueError, OSError) as e:
            raise RunFolderError(f"{npz}: unreadable ({e}); use another --out, or --restart to move it aside") from None
    return None, ""


def check_run_folder(out: str, cfg: DistillConfig) -> None:
    """Refuse a run folder (without checkpoints) that holds another run's files.

    A folder whose `config.json` (or `distilled.npz`) is another run
    (`rcig.config.run_differences`) is never written over: a `RunFolderError` names
    each differing field. Without results there, `steps` may differ (a rerun of a run
    stopped before its first checkpoint); with results, it may not."""
    saved, where = _saved_run_config(out)
    if saved is None:
        return
    has_results = any(storage.exists(storage.join(out, n)) for n in ("distilled.npz", "eval.json"))
    diffs = run_differences(saved, cfg, resume=not has_results)
    if diffs:
        raise RunFolderError(f"{out} holds another run ({where}): {'; '.join(diffs)}; "
                             f"use another --out, or --restart to move its files aside")


def _clear_for_restart(out: str, force: bool) -> None:
    """--restart: start over. The old run's checkpoints and files (`RUN_FILES`) are
    deleted only with --force; otherwise, in a local run folder, they are moved aside
    (into ``checkpoints.old-<time>``, or ``run.old-<time>`` when there were no
    checkpoints); a remote one is refused."""
    ck = storage.join(out, "checkpoints")
    has_ck = storage.exists(ck) and bool(storage.listdir(ck))
    files = [n for n in RUN_FILES if storage.exists(storage.join(out, n))]
    if not has_ck and not files:
        return
    if force:
        if has_ck:
            storage.remove(ck, recursive=True)
        for name in files:
            storage.remove(storage.join(out, name))
        return
    what = f"{ck}: holds checkpoints" if has_ck else f"{out}: holds another run's files ({', '.join(files)})"
    if storage.is_remote(out):
        raise RunFolderError(f"{what}; --restart deletes them only with --force (or use a new --out)")
    stamp = time.strftime('%Y%m%d-%H%M%S')
    if has_ck:
        aside = f"{ck}.old-{stamp}"
        os.replace(ck, aside)
    else:
        aside = storage.join(out, f"run.old-{stamp}")
        os.makedirs(aside, exist_ok=True)
    for name in files:
        os.replace(storage.join(out, name), os.path.join(aside, name))
