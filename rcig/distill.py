"""A whole distillation run, resumable: `run_distillation(cfg, out_uri)`.

Writes to `out_uri` (local path, file:// or gs://), through `rcig.run_folder` (the files
and their formats) and `rcig.checkpoint` (checkpoints/, the whole state):
    config.json, split.json, tuning.json   first (tuning.json: the LR search result and
                                           the run identity; the result is also in the state)
    metrics.jsonl    one JSON object per outer step: {"step": s, "outer/loss": ..., ...}
    distilled.npz, distilled.png, eval.json   at the end
    eval.partial.json  finished evaluation runs while the evaluation is in progress

The run is three parts: `_open_run` and `_init_or_restore` (the folder, the dataset, the
engine, the state), `_StepLoop` (the outer steps, metrics, checkpoints, stop requests) and
`_write_results` (the final checkpoint, the distilled set, the evaluation).

Init order (resume by rerunning the same command):
    1. this run folder's own latest committed checkpoint (the same run by
       `rcig.config.run_differences`; `steps` may change), else
    2. a fresh state: real images per class, the LR search (docs/algorithm.md §8.2) or, when this run's
       tuning.json is there, its result, then a checkpoint at step 0; a restart never
       re-tunes. A folder without checkpoints that holds another run's files is refused
       (`--restart` moves them aside).
A run whose final checkpoint is committed goes straight to the evaluation, which keeps
its finished runs.

Several processes (`rcig.multihost`, one per host, joined before this is called, with
`devices=jax.devices()`): every process runs the same steps over the one mesh, feeding
only its own rows of each real batch; they agree after every step whether to save or stop
(`multihost.agree`), so all stop at one step; every process writes its part of each
checkpoint; process 0 alone writes the run files (config, split, tuning, metrics), runs
the validation probe and, after the final checkpoint, writes the distilled set and
evaluates it. Stop requests: see `rcig.preemption.StopControl` (every phase is
either abortable or stops cooperatively within a deadline; exit `EXIT_PREEMPTED`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np

from rcig import export, multihost, run_folder, storage
from rcig.config import DistillConfig, run_differences, run_identity, validate
from rcig.preemption import EXIT_PREEMPTED, phase  # noqa: F401  (EXIT_PREEMPTED re-exported)
from rcig.run_folder import EVAL_PARTIAL_JSON, RUN_FILES, SPLIT_JSON, TUNING_JSON  # noqa: F401  (re-exported)


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


def _real_batch(run: _Run, s: int):
    """The real batch of outer step `s` (a function of the seed and the step), on the devices."""
    from rcig.data import real_batch_indices, shifted_one_hot

    cfg, ds = run.cfg, run.ds
    idx = real_batch_indices(cfg.seed, s, len(ds.x_train), cfg.outer.real_batch_size)
    if multihost.process_count() == 1:
        return run.engine.put_batch(ds.x_train[idx], shifted_one_hot(ds.y_train[idx], ds.num_classes))
    # Several processes: each reads and sends only the rows its own devices hold.
    sharding, n = run.engine.batch_sharding, len(idx)
    return {"x": multihost.global_batch(sharding, (n, *ds.image_shape), lambda lo, hi: ds.x_train[idx[lo:hi]]),
            "y": multihost.global_batch(sharding, (n, ds.num_classes),
                                        lambda lo, hi: shifted_one_hot(ds.y_train[idx[lo:hi]], ds.num_classes))}


@dataclass
class _Run:
    """An opened run folder: what init-or-restore fills in and the loop and the writer use."""

    out: str
    cfg: DistillConfig
    cfg_dict: dict
    ds: Any                       # rcig.data's run dataset (train minus the validation split)
    engine: Any                   # rcig.engine.Engine
    store: Any                    # rcig.checkpoint.CheckpointStore
    latest: int | None            # the folder's latest committed checkpoint step
    state: Any = None             # the whole distillation state (a pytree)
    start: int = 0                # the step the loop starts from
    tuning: dict | None = None    # this run's LR search result (None when restored or skipped)


def _open_run(cfg: DistillConfig, out: str, restart: bool, force: bool, devices: list | None) -> _Run:
    """The run folder (cleared first with `restart`), its checkpoints, the dataset and the
    engine; refuses another run's folder; commits config.json and split.json."""
    from rcig.checkpoint import CheckpointStore
    from rcig.data import load_run_dataset
    from rcig.engine import Engine

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
        engine = Engine(cfg, ds.image_shape, ds.num_classes, devices=devices)
    with phase("commit"):
        # First, so a folder stopped at any later point says which run it holds.
        if multihost.is_primary():
            run_folder.write_config(out, cfg)
            run_folder.write_json(run_folder.uri_of(out, SPLIT_JSON), ds.split)
    return _Run(out, cfg, cfg_dict, ds, engine, store, latest)


def _init_or_restore(run: _Run, run_eval: bool, say: Callable[[str], None]) -> None:
    """Set `run.state`, `run.start` (and `run.tuning`): the folder's latest checkpoint, else a
    fresh state (real images or noise, the LR search or this run's tuning.json) saved as
    checkpoint 0."""
    cfg, ds, engine = run.cfg, run.ds, run.engine
    n_images = cfg.ipc * ds.num_classes
    if run.latest is not None:
        with phase("restore", abortable=True):
            run.state, _ = run.store.restore(engine.abstract_state(n_images), run.latest)
        run.start = int(run.state["step"])
        if run.start >= cfg.steps:
            say(f"distillation already complete at step {run.start} (checkpoint); "
                + ("evaluating" if run_eval else "writing the distilled set"))
        else:
            say(f"resuming from checkpoint step {run.start}")
        return
    from rcig.data import init_proto_indices, shifted_one_hot

    key = jax.random.PRNGKey(cfg.seed)
    idx = init_proto_indices(ds.y_train, ds.num_classes, cfg.ipc, cfg.seed)
    if cfg.outer.init == "noise":
        x0 = 0.3 * np.random.default_rng([cfg.seed, 0, 2]).standard_normal((n_images, *ds.image_shape)).astype(np.float32)
    else:
        x0 = ds.x_train[idx]
    y0 = shifted_one_hot(ds.y_train[idx], ds.num_classes)
    inner_lr, hvp_lr = cfg.inner.lr, cfg.hinv.lr
    if not cfg.lr_tune.skip:
        tuning = load_tuning(run.out, cfg)
        if tuning is not None:
            say(f"LR search: reusing tuning.json (inner {tuning['inner']:.3g}, H-solve {tuning['hvp']:.3g})")
        else:
            coreset = {"x": np.asarray(x0, np.float32), "y": y0, "log_temp": np.float32(0.0)}
            with phase("tune", abortable=True):
                tuning = engine.tune_learning_rates(coreset, _real_batch(run, 0), jax.random.fold_in(key, 1), inner_lr, hvp_lr)
            tuning["identity"] = run_identity(cfg)
            with phase("commit"):  # a rerun stopped before checkpoint 0 does not tune again
                if multihost.is_primary():
                    run_folder.write_json(run_folder.uri_of(run.out, TUNING_JSON), tuning)
            capped = f"; stopped at the probe cap for {', '.join(tuning['capped'])}" if tuning.get("capped") else ""
            say(f"LR search: inner {tuning['inner']:.3g}, H-solve {tuning['hvp']:.3g} ({tuning.get('probes')} probes, "
                f"{tuning.get('seconds', 0.0):.1f} s{capped})")
        inner_lr, hvp_lr = tuning["inner"], tuning["hvp"]
        run.tuning = tuning
    with phase("init", abortable=True):
        run.state = engine.init_state(x0, y0, key, inner_lr, hvp_lr)
    run.start = 0
    with phase("commit"):
        run.store.save(0, run.state, run.cfg_dict, force=True)


class _StepLoop:
    """The outer steps from `run.start` to `cfg.steps`, updating `run.state`: each step's
    metrics are checked finite, logged and reported; the validation probe runs when due;
    checkpoints are saved on schedule and when a stop is requested, which ends the loop.

    A step's metrics are read back one step late, so the host's work overlaps the next
    step on the devices."""

    def __init__(self, run: _Run, metrics: run_folder.NullMetricsLog, bar: _Progress,
                 on_metrics: Callable[[int, dict[str, float]], None] | None,
                 on_checkpoint: Callable[[int], None] | None,
                 stop_requested: Callable[[], bool] | None, clock: Callable[[], float]):
        self.run, self.metrics, self.bar = run, metrics, bar
        self.on_metrics, self.on_checkpoint, self.stop_requested, self.clock = on_metrics, on_checkpoint, stop_requested, clock
        self.last_ckpt_step, self.last_ckpt_time = run.start, clock()
        self.t_prev = time.perf_counter()
        self.probe = None
        if run.cfg.eval.every_steps and multihost.is_primary():  # its metric goes to process 0's log
            from rcig.val_probe import ValProbe

            self.probe = ValProbe(run.ds, run.cfg)
        self.val_latest: dict[str, float] = {}  # the newest intermediate metric (rcig.val_probe)

    def _consume(self, s_done: int, m_dev) -> dict[str, float]:
        """Step `s_done`'s metrics on the host: checked, logged, reported."""
        cfg = self.run.cfg
        m = {k: float(v) for k, v in jax.device_get(m_dev).items()}
        now = time.perf_counter()
        m["time/step_s"] = now - self.t_prev
        self.t_prev = now
        bad = [k for k, v in m.items() if not math.isfinite(v)]
        if bad:
            self.metrics.flush()
            raise NonFiniteError(f"step {s_done}: non-finite {', '.join(sorted(bad))}; stopping "
                                 f"(last checkpoint: step {self.run.store.latest_step()})")
        if self.val_latest.get("val/step") == s_done:
            m.update(self.val_latest)
        self.metrics.add({"step": s_done, **m})
        if s_done % cfg.log_every == 0 or s_done == cfg.steps:
            if self.on_metrics:
                self.on_metrics(s_done, {**m, **self.val_latest})  # every report carries the metric
            self.bar.update(s_done, m)
        return m

    def run_steps(self) -> tuple[str, int, dict[str, float]]:
        """("completed" or "preempted", the step reached, its metrics)."""
        from rcig.checkpoint import should_save
        from rcig.val_probe import probe_due

        run, cfg = self.run, self.run.cfg
        s = run.start
        status = "completed"
        pending = None  # (step, device metrics)
        last_metrics: dict[str, float] = {}
        last_ckpt_step, last_ckpt_time = self.last_ckpt_step, self.last_ckpt_time
        next_batch = _real_batch(run, run.start) if run.start < cfg.steps else None
        while s < cfg.steps:
            batch = next_batch
            if s == run.start:  # the first call compiles: nothing to lose if stopped there
                with phase("compile", abortable=True):
                    run.state, m_dev = run.engine.step(run.state, batch)
            else:
                run.state, m_dev = run.engine.step(run.state, batch)
            s += 1
            next_batch = _real_batch(run, s) if s < cfg.steps else None  # host work overlaps the step
            if pending is not None:
                last_metrics = self._consume(*pending)
            pending = (s, m_dev)
            if self.probe is not None and probe_due(s, cfg.eval.every_steps, cfg.log_every, bool(self.val_latest)):
                self.val_latest = {**self.probe(run.state["ema"]["average"]), "val/step": float(s)}
            stop = bool(self.stop_requested and self.stop_requested())
            due = should_save(s, self.clock(), last_ckpt_step, last_ckpt_time, cfg.checkpoint.every_steps,
                              cfg.checkpoint.every_seconds)
            # Several processes: a stop asked of any one, or a save due on any one's clock,
            # holds for all, at this same step (one tiny collective per step).
            stop, due = multihost.agree(stop, due)
            if stop or due:
                last_metrics = self._consume(*pending)
                pending = None
                self.metrics.flush()
                run.store.save(s, run.state, run.cfg_dict, force=True)
                last_ckpt_step, last_ckpt_time = s, self.clock()
                if stop:
                    run.store.wait()  # the notice grace period is short: commit before returning
                if self.on_checkpoint:
                    self.on_checkpoint(s)  # save started; Orbax commits it before the next one starts
            if stop:
                status = "preempted"
                break
        if pending is not None:
            last_metrics = self._consume(*pending)
        self.metrics.flush()
        self.bar.close()
        return status, s, last_metrics


def _write_results(run: _Run, s: int, run_eval: bool, on_checkpoint: Callable[[int], None] | None,
                   last_metrics: dict[str, float]) -> dict | None:
    """The final checkpoint, distilled.npz/.png and (with `run_eval`) the evaluation,
    eval.json; the final figures are added to `last_metrics`. Returns the evaluation."""
    cfg = run.cfg
    with phase("finalize"):
        run.store.save(s, run.state, run.cfg_dict, final=True)  # marks the last step final (kept by retention)
        run.store.wait()
        if on_checkpoint:
            on_checkpoint(s)
        run.store.close()
        if not multihost.is_primary():  # the distilled set, its evaluation: process 0 alone
            return None
        arrays = export.distilled_arrays(jax.device_get(run.state["ema"]["average"]), run.ds, cfg, s)
        run_folder.write_distilled(run.out, arrays, run.ds.num_classes)
    if not run_eval:
        return None
    from rcig.evaluate import evaluate_distilled

    # Everything the eval needs is committed (final checkpoint, distilled.npz): a stop
    # here ends the process; a rerun goes straight back to the eval, and finished
    # evaluation runs are kept (eval.partial.json).
    with phase("eval", abortable=True):
        eval_result = evaluate_distilled(
            arrays["x_proto"], arrays["y_proto"], run.ds, use_flip=cfg.outer.use_flip, cfg=cfg.eval,
            width=cfg.eval.width or cfg.model.width, ipc=cfg.ipc, seed=cfg.seed, depth=cfg.model.depth,
            partial_uri=run_folder.uri_of(run.out, EVAL_PARTIAL_JSON),
        )
        eval_result["distill_steps"] = s
        run_folder.write_eval(run.out, eval_result)  # and drops eval.partial.json
    # The final figures under the sweep's names: selection on validation, test beside it.
    if eval_result.get("val_mean") is not None:
        last_metrics["val/acc"] = eval_result["val_mean"]
    last_metrics["test/acc"] = eval_result["mean"]
    return eval_result


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
    validate(cfg)
    t_start = time.perf_counter()
    out = storage.normalize(out_uri)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    run = _open_run(cfg, out, restart, force, devices)
    _init_or_restore(run, run_eval, say)
    with phase("commit"):
        metrics = run_folder.open_metrics(out, run.start, write=multihost.is_primary())
    resumed_from = run.start if run.latest is not None else None
    with phase("loop"):  # stops cooperatively, at a checkpoint (the deadline covers a slow step)
        loop = _StepLoop(run, metrics, _Progress(cfg.steps, progress), on_metrics, on_checkpoint, stop_requested, clock)
        status, s, last_metrics = loop.run_steps()
        if status == "preempted":
            run.store.wait()
            run.store.close()
            return RunResult(out, status, s, last_metrics, None, run.store.latest_step(), time.perf_counter() - t_start,
                             resumed_from=resumed_from, tuning=run.tuning)
    eval_result = _write_results(run, s, run_eval, on_checkpoint, last_metrics)
    return RunResult(out, status, s, last_metrics, eval_result, s, time.perf_counter() - t_start,
                     resumed_from=resumed_from, tuning=run.tuning)


def load_tuning(out: str, cfg: DistillConfig) -> dict | None:
    """The LR search result saved in `out`, if it was found for this run (its identity,
    steps aside, equals `cfg`'s), else None: a run stopped after its LR search but before
    its first checkpoint does not search again."""
    try:
        doc = run_folder.read_json(run_folder.uri_of(out, TUNING_JSON))
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
    uri = run_folder.uri_of(out, run_folder.CONFIG_JSON)
    try:
        saved = run_folder.read_config(out)
    except ValueError as e:
        raise RunFolderError(f"{uri}: unreadable ({e}); use another --out, or --restart to move it aside") from None
    if saved is not None:
        return saved, uri
    npz = run_folder.uri_of(out, run_folder.DISTILLED_NPZ)
    if storage.exists(npz):
        try:
            return json.loads(str(run_folder.read_distilled(npz)["config_json"])), npz
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
    has_results = any(storage.exists(run_folder.uri_of(out, n)) for n in (run_folder.DISTILLED_NPZ, run_folder.EVAL_JSON))
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
            storage.remove(storage.join(out, name), recursive=True)
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
