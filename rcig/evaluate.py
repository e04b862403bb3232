"""Evaluation of a distilled set (docs/algorithm.md §10): train fresh ConvNets on it.

Protocol (`EvalConfig`, defaults = the original's):

- **Network**: the §2 ConvNet with **ReLU** (`softplus_temp=0`), width from the config
  (default: the distillation model's width), depth from the image side.
- **Data**: the images as given (model space: preprocessed/whitened) and their (learned)
  labels as regression targets; with `use_flip`, horizontally flipped copies with the same
  labels are appended (2N rows).
- **Loss**: MSE, Σ ½(f(x) − y)² / (batch · C). No weight decay.
- **Optimiser**: Adam; lr warms up linearly 0 → `lr` over W steps, then cosine decays to
  0.01·`lr` at step T, then stays there. W = 500 as in the original, except that for
  budgets T < 1000 (tests, smoke runs) W = T // 2 so the peak is still reached.
- **Steps** T: `cfg.steps`, or the spec's 1000 if the un-flipped N is exactly 10, else 2000.
- **Batch**: the whole set if the un-flipped N ≤ `batch_size` (256), else `batch_size` rows
  drawn without replacement from the (flipped) rows, afresh at every step.
- **Protocols**: ``"rcig"`` trains T steps, each image augmented at each step with ONE op
  drawn from `cfg.aug` (`rcig.augment`). ``"noaug"`` trains T steps without augmentation.
  *Decision on E9*: the original's no-augmentation run lasted 2.5·T steps with the
  schedule still ending at T (1.5·T extra steps at the floor lr, an artefact of its
  500-step chunking); here both protocols run the same T-step schedule so they are
  comparable. (`train_and_test` has a `total_steps` argument should the quirk be wanted.)
- **Keys** (E6/E9 not replicated): run r gets ``split(fold_in(key(seed), 0), runs)[r]``;
  its init key and the key of step i (``fold_in(run_key, i)``) are all distinct, so no
  batch/augmentation key is ever reused. The distilled set and the baseline share the
  same run keys (paired comparison).
- **Runs**: `cfg.runs` (5) networks. On GPU/TPU all runs are vectorised with `jax.vmap`
  inside one jitted `lax.scan` over the steps. On CPU two XLA:CPU weaknesses reverse that:
  a convolution inside a while loop runs ~30x slower than the same step jitted alone
  (jax-ml/jax#12868), and vmapping a convolution over per-run weights becomes a grouped
  convolution that is slower than the runs one after another (measured: 5 digits runs
  vmapped 54 s vs sequential 6.4 s warm, identical accuracies; benchmarks/eval_vmap.py).
  So CPU defaults to one run at a time through a host loop over the jitted step
  (`default_runs_per_group`, `default_loop`; both overridable in `train_and_test`).
  Accuracy = argmax agreement on the full test split, in batches of `test_batch_size`;
  mean and population std. With a validation split (`Dataset.x_val`, `rcig.data.split`)
  the same trained networks are also scored on it: `val` beside the test figures.
- **Baseline**: `ipc` random real training images per class
  (`init_proto_indices(y_train, C, ipc, seed)`, i.e. with the distillation seed this is the
  very subset the distilled set started from) with shifted one-hot labels, same protocol.

Example:
    >>> from rcig.config import EvalConfig
    >>> from rcig.data import load_dataset, shifted_one_hot
    >>> ds = load_dataset("digits")
    >>> r = evaluate_set(ds.x_train[:10], shifted_one_hot(ds.y_train[:10], 10), ds,
    ...                  use_flip=False, cfg=EvalConfig(runs=2, steps=50), width=8)
    >>> len(r["accs"]), r["steps"]
    (2, 50)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rcig.augment import augment_batch, parse_ops
from rcig.config import EvalConfig
from rcig.model import make_convnet

PROTOCOLS = ("rcig", "noaug")
WARMUP_STEPS = 500


class EvalError(ValueError):
    """Bad evaluation input (source, file, key, shape); the message names what and where."""


# ---- protocol pieces -------------------------------------------------------------------
def spec_steps(n_unflipped: int) -> int:
    """The spec's step budget T: 1000 if the un-flipped set has exactly 10 images, else 2000."""
    return 1000 if n_unflipped == 10 else 2000


def lr_schedule(lr, steps):
    """Warm-up 0 → lr over W = 500 steps (T//2 if T < 1000), cosine to 0.01·lr at T, then
    constant. `lr` and `steps` may be traced, so one compiled trainer serves every budget.

    Example:
        >>> s = lr_schedule(1e-4, 2000)
        >>> round(float(s(500)), 9), round(float(s(5000)), 9)
        (0.0001, 1e-06)
    """
    lr = jnp.asarray(lr, jnp.float32)
    t_end = jnp.asarray(steps, jnp.float32)
    warm = jnp.where(t_end >= 2 * WARMUP_STEPS, float(WARMUP_STEPS), jnp.maximum(1.0, jnp.floor(t_end / 2)))
    decay = jnp.maximum(t_end - warm, 1.0)

    def schedule(i):
        i = jnp.asarray(i, jnp.float32)
        frac = jnp.clip((i - warm) / decay, 0.0, 1.0)
        cosine = 0.01 * lr + 0.99 * lr * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(i < warm, lr * i / warm, cosine)

    return schedule


def with_flips(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[X; X flipped along width] and [Y; Y] (§6.3 / §10.1)."""
    return np.concatenate([x, x[:, :, ::-1]]), np.concatenate([y, y])


def run_keys(seed: int, runs: int) -> jax.Array:
    """One independent PRNG key per run (same for the distilled set and the baseline)."""
    return jax.random.split(jax.random.fold_in(jax.random.key(seed), 0), runs)


# ---- the jitted, run-vectorised trainer -----------------------------------------------
def default_loop() -> str:
    """"python" on CPU, "scan" elsewhere.

    XLA:CPU runs convolutions inside a while-loop body (lax.scan/fori_loop) ~30x slower
    than the same step jitted on its own (jax-ml/jax#12868; measured here: 1.7 s vs 0.05 s
    per step), so on CPU each (vmapped) step is one jitted call from a host loop.
    """
    return "python" if jax.default_backend() == "cpu" else "scan"


def default_runs_per_group() -> int | None:
    """All runs in one vmap on accelerators; one at a time on CPU, where vmapping the
    convolution over per-run weights becomes a grouped convolution that XLA:CPU runs
    slower than the runs one after another (see BENCHMARKS.md / the module docstring)."""
    return 1 if jax.default_backend() == "cpu" else None


def _loss(net, params, xb, yb):
    logits, _ = net.apply({"params": params}, xb)
    return 0.5 * jnp.mean(jnp.square(logits - yb))  # Σ½(f−y)² / (batch·C)


# Adam moments only; the step is scaled by the (traced) schedule by hand, so changing the
# learning rate or the budget does not recompile.
_ADAM = optax.scale_by_adam()


@functools.partial(jax.jit, static_argnames=("net",))
def _init_runs(keys, x, *, net):
    tx = _ADAM

    def init(key):
        k_init, k_train = jax.random.split(key)
        params = net.init(k_init, x[:1])["params"]
        return params, tx.init(params), k_train

    return jax.vmap(init)(keys)


@functools.partial(
    jax.jit, static_argnames=("net", "batch", "ops", "n_steps"), donate_argnums=(0, 1),
)
def _run_steps(params, opt_state, k_train, x, y, start, lr, schedule_steps, *, net, batch, ops,
               n_steps):
    """Steps start .. start+n_steps-1 for every run (vmap); a lax.scan when n_steps > 1."""
    schedule = lr_schedule(lr, schedule_steps)
    n = x.shape[0]

    def step(p, s, k, i):
        k_batch, k_aug = jax.random.split(jax.random.fold_in(k, i))  # fresh keys every step
        if batch < n:
            idx = jax.random.choice(k_batch, n, (batch,), replace=False)
            xb, yb = x[idx], y[idx]
        else:
            xb, yb = x, y
        if ops:
            xb = augment_batch(k_aug, xb, ops)
        loss, grads = jax.value_and_grad(functools.partial(_loss, net))(p, xb, yb)
        updates, s = _ADAM.update(grads, s, p)
        step_lr = schedule(i)
        p = jax.tree.map(lambda w, u: w - step_lr * u, p, updates)
        return p, s, loss

    vstep = jax.vmap(step, in_axes=(0, 0, 0, None))
    if n_steps == 1:
        return vstep(params, opt_state, k_train, start)

    def body(carry, i):
        p, s, _ = carry
        return vstep(p, s, k_train, i), None

    loss0 = jnp.zeros((k_train.shape[0],), jnp.float32)
    carry, _ = jax.lax.scan(body, (params, opt_state, loss0), start + jnp.arange(n_steps))
    return carry


@functools.partial(jax.jit, static_argnames=("net",))
def _count_correct(params, xb, yb, *, net):
    logits = jax.vmap(lambda p: net.apply({"params": p}, xb)[0])(params)
    return jnp.sum(jnp.argmax(logits, -1) == yb[None], axis=-1)


def train_and_test(
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    keys: jax.Array,
    **kw: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Train one fresh ReLU ConvNet per key on (x, y) (already flipped); test accuracies.

    `train_and_score` with the one scored set (x_test, y_test); same keyword arguments.
    Returns (accuracies (R,), final training losses (R,)).

    Example:
        >>> accs, losses = train_and_test(x, y, xt, yt, run_keys(0, 5), width=32, depth=None,
        ...     steps=100, lr=1e-3, batch=None, ops=())  # doctest: +SKIP
    """
    accs, losses = train_and_score(x, y, {"test": (x_test, y_test)}, keys, **kw)
    return accs["test"], losses


def _padded(x_eval: np.ndarray, y_eval: np.ndarray, tb: int) -> tuple[np.ndarray, np.ndarray]:
    """A scored set padded to a multiple of `tb` (label -1 never matches): one shape."""
    pad = -x_eval.shape[0] % tb
    xt = np.concatenate([np.asarray(x_eval, np.float32), np.zeros((pad, *x_eval.shape[1:]), np.float32)])
    yt = np.concatenate([np.asarray(y_eval, np.int32), np.full((pad,), -1, np.int32)])
    return xt, yt


def train_and_score(
    x: np.ndarray,
    y: np.ndarray,
    scored: dict[str, tuple[np.ndarray, np.ndarray]],
    keys: jax.Array,
    *,
    width: int,
    depth: int | None,
    steps: int,
    lr: float,
    batch: int | None,
    ops: tuple[str, ...],
    test_batch: int = 1000,
    total_steps: int | None = None,
    runs_per_group: int | None | str = "auto",
    loop: str = "auto",
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Train one fresh ReLU ConvNet per key on (x, y) (already flipped) and score each
    network on every set of `scored` (name -> (images, integer labels)).

    `batch` None = full batch. `total_steps` (default `steps`) may exceed the schedule
    length `steps`; extra steps run at the floor lr. Runs go `runs_per_group` at a time
    through the vmapped, jitted step (None = all at once, 1 = sequential, "auto" =
    `default_runs_per_group()`); `loop` is "scan" (one jitted lax.scan over all steps),
    "python" (a host loop over the jitted step) or "auto" (`default_loop()`).
    Returns ({name: accuracies (R,)}, final training losses (R,)).

    Example:
        >>> accs, _ = train_and_score(x, y, {"val": (xv, yv), "test": (xt, yt)}, run_keys(0, 5),
        ...     width=32, depth=None, steps=100, lr=1e-3, batch=None, ops=())  # doctest: +SKIP
    """
    num_classes = y.shape[1]
    net = make_convnet(tuple(x.shape[1:]), num_classes, width=width, depth=depth, softplus_temp=0.0)
    total = int(total_steps if total_steps is not None else steps)
    n = x.shape[0]
    b = n if (batch is None or batch >= n) else int(batch)
    if runs_per_group == "auto":
        runs_per_group = default_runs_per_group()
    loop = default_loop() if loop == "auto" else loop
    if loop not in ("scan", "python"):
        raise EvalError(f"loop: expected 'scan' or 'python', got {loop!r}")
    group = len(keys) if not runs_per_group else int(runs_per_group)
    lr_j, steps_j = jnp.float32(lr), jnp.int32(steps)
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    # Scored sets in batches, the last one padded so one shape compiles once per set.
    sets = {}
    for name, (x_eval, y_eval) in scored.items():
        tb = int(min(test_batch, x_eval.shape[0]))
        sets[name] = (*_padded(x_eval, y_eval, tb), tb, x_eval.shape[0])
    counts: dict[str, list] = {name: [] for name in sets}
    losses = []
    for g0 in range(0, len(keys), group):
        params, opt_state, k_train = _init_runs(keys[g0 : g0 + group], xj, net=net)
        loss = None
        if loop == "scan":
            params, opt_state, loss = _run_steps(params, opt_state, k_train, xj, yj, jnp.int32(0),
                                                 lr_j, steps_j, net=net, batch=b, ops=tuple(ops),
                                                 n_steps=total)
        else:
            for i in range(total):
                params, opt_state, loss = _run_steps(params, opt_state, k_train, xj, yj, jnp.int32(i),
                                                     lr_j, steps_j, net=net, batch=b, ops=tuple(ops),
                                                     n_steps=1)
        for name, (xt, yt, tb, _) in sets.items():
            c = sum(
                np.asarray(_count_correct(params, jnp.asarray(xt[i : i + tb]), jnp.asarray(yt[i : i + tb]), net=net))
                for i in range(0, len(xt), tb)
            )
            counts[name].append(np.asarray(c))
        losses.append(np.asarray(loss) if loss is not None else np.full(len(keys[g0 : g0 + group]), np.nan))
    accs = {name: np.concatenate(counts[name]) / sets[name][3] for name in sets}
    return accs, np.concatenate(losses)


# ---- public API ----------------------------------------------------------------------------
def _dataset(dataset: Any, data_dir: str | None = None):
    if isinstance(dataset, str):
        from rcig.data import load_dataset

        return load_dataset(dataset, data_dir=data_dir)
    return dataset


def _check_set(x: np.ndarray, y: np.ndarray, ds: Any, what: str) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(ds.image_shape):
        raise EvalError(f"{what}: images have shape {x.shape}, expected (N, {', '.join(map(str, ds.image_shape))})")
    if y.ndim != 2 or y.shape != (x.shape[0], ds.num_classes):
        raise EvalError(f"{what}: labels have shape {y.shape}, expected ({x.shape[0]}, {ds.num_classes})")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise EvalError(f"{what}: images or labels contain NaN/inf")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """The keywords `evaluate_set` and `evaluate_distilled` share: the §10 protocol `cfg`;
    with `use_flip`, flipped copies appended; the networks' `width` and `depth` (None: from
    the image side); `seed` of the run keys; `runs_per_group`, the runs trained at once
    ("auto": `default_runs_per_group()`; None or 0: all)."""

    use_flip: bool
    cfg: EvalConfig
    width: int
    seed: int = 0
    depth: int | None = None
    runs_per_group: int | None | str = "auto"


def evaluate_set(
    x_NHWC: np.ndarray,
    y_NC: np.ndarray,
    dataset: Any,
    *,
    done: dict[int, dict[str, float]] | None = None,
    on_run: Callable[[int, dict[str, float]], None] | None = None,
    **options: Any,
) -> dict:
    """Evaluate one labelled set with the §10 protocol; `dataset` is a Dataset or its name,
    `options` the `EvalOptions` (use_flip, cfg and width required).

    Returns {"accs": [...], "mean", "std" (population), "protocol", "steps", "runs",
    "val"}: test accuracy, and "val" the same networks' {"accs", "mean", "std"} on the
    dataset's validation split (None without one).
    `done` ({run index: {"test": acc, "val": acc}}) holds runs already finished (they are
    not trained again); `on_run(r, {"test": acc, "val": acc})` is called as each finishes.

    Example:
        >>> r = evaluate_set(x, y, "digits", use_flip=False, cfg=EvalConfig(steps=100), width=32)  # doctest: +SKIP
        >>> 0.0 <= r["mean"] <= 1.0  # doctest: +SKIP
        True
    """
    o = EvalOptions(**options)
    cfg = o.cfg
    if cfg.protocol not in PROTOCOLS:
        raise EvalError(f"eval.protocol: expected one of {list(PROTOCOLS)}, got {cfg.protocol!r}")
    if cfg.runs < 1:
        raise EvalError(f"eval.runs: must be >= 1, got {cfg.runs}")
    ds = _dataset(dataset)
    x = np.asarray(x_NHWC, np.float32)
    y = np.asarray(y_NC, np.float32)
    _check_set(x, y, ds, "evaluated set")
    n = x.shape[0]
    steps = int(cfg.steps) if cfg.steps else spec_steps(n)
    batch = None if n <= cfg.batch_size else cfg.batch_size
    if o.use_flip:
        x, y = with_flips(x, y)
    ops = parse_ops(cfg.aug) if cfg.protocol == "rcig" else ()
    keys = run_keys(o.seed, cfg.runs)
    scored = {"test": (ds.x_test, ds.y_test)}
    if getattr(ds, "x_val", None) is not None:
        scored["val"] = (ds.x_val, ds.y_val)
    accs: list[dict[str, float] | None] = [None] * cfg.runs
    for r, a in (done or {}).items():
        if 0 <= int(r) < cfg.runs and isinstance(a, dict) and set(scored) <= set(a):
            accs[int(r)] = {k: float(a[k]) for k in scored}
    todo = [r for r in range(cfg.runs) if accs[r] is None]
    group = default_runs_per_group() if o.runs_per_group == "auto" else o.runs_per_group
    group = len(todo) if not group else int(group)
    # Runs are independent (each has its own key), so finished ones can be skipped; the
    # groups are the ones `train_and_test` would form, so nothing changes when none are.
    for g0 in range(0, len(todo), max(group, 1)):
        chunk = todo[g0 : g0 + group]
        got, _ = train_and_score(
            x, y, scored, keys[np.asarray(chunk)],
            width=o.width, depth=o.depth, steps=steps, lr=cfg.lr, batch=batch, ops=ops,
            test_batch=cfg.test_batch_size, runs_per_group=None,
        )
        for i, r in enumerate(chunk):
            accs[r] = {k: float(got[k][i]) for k in scored}
            if on_run is not None:
                on_run(r, dict(accs[r]))

    def summary(which: str) -> dict:
        a = [float(run[which]) for run in accs]
        return {"accs": a, "mean": float(np.mean(a)), "std": float(np.std(a))}

    return {
        **summary("test"),
        "val": summary("val") if "val" in scored else None,
        "protocol": cfg.protocol,
        "steps": steps,
        "runs": cfg.runs,
    }


def baseline_set(dataset: Any, ipc: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`ipc` random real training images per class and their shifted one-hot labels."""
    from rcig.data import init_proto_indices, shifted_one_hot

    ds = _dataset(dataset)
    idx = init_proto_indices(ds.y_train, ds.num_classes, ipc, seed)
    return np.asarray(ds.x_train[idx], np.float32), shifted_one_hot(ds.y_train[idx], ds.num_classes)


def evaluate_distilled(
    x_NHWC: np.ndarray, y_NC: np.ndarray, dataset: Any, *, ipc: int, partial_uri: str | None = None, **options: Any
) -> dict:
    """Distilled set vs the random-real-subset baseline (if `cfg.baseline`): the eval.json dict.
    Both sets are evaluated with `options`, the `EvalOptions` (use_flip, cfg and width required).

    Keys: mean, std, accs (test), val ({mean, std, accs} on the validation split, or None),
    val_mean, baseline ({mean, std, accs, val, val_mean} or None), split (the validation
    split's record), protocol, dataset, ipc, steps, runs, use_flip, width, wall_s.

    `partial_uri` (a JSON file): each finished run's accuracy is recorded there, and an
    evaluation of the same sets with the same protocol that was stopped resumes from it.

    Example:
        >>> r = evaluate_distilled(x, y, "digits", use_flip=False, cfg=EvalConfig(), width=32, ipc=1)  # doctest: +SKIP
        >>> f"distilled {r['mean']:.2f} vs random {r['baseline']['mean']:.2f}"  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    ds = _dataset(dataset)
    o = EvalOptions(**options)
    cfg = o.cfg
    common = dict(vars(o))
    partial = _Partial(partial_uri, x_NHWC, y_NC, common | {"ipc": int(ipc), "dataset": getattr(ds, "name", None),
                                                              "split": getattr(ds, "split", None)})
    res = evaluate_set(x_NHWC, y_NC, ds, **common, done=partial.done("distilled"),
                       on_run=partial.recorder("distilled"))
    base = None
    if cfg.baseline:
        xb, yb = baseline_set(ds, ipc, o.seed)
        b = evaluate_set(xb, yb, ds, **common, done=partial.done("baseline"),
                         on_run=partial.recorder("baseline"))
        base = {"mean": b["mean"], "std": b["std"], "accs": b["accs"], "steps": b["steps"],
                "val": b["val"], "val_mean": (b["val"] or {}).get("mean")}
    return {
        "mean": res["mean"],
        "std": res["std"],
        "accs": res["accs"],
        "val": res["val"],
        "val_mean": (res["val"] or {}).get("mean"),
        "split": getattr(ds, "split", None),
        "baseline": base,
        "protocol": cfg.protocol,
        "dataset": getattr(ds, "name", dataset if isinstance(dataset, str) else None),
        "ipc": int(ipc),
        "steps": res["steps"],
        "runs": cfg.runs,
        "use_flip": bool(o.use_flip),
        "width": int(o.width),
        "wall_s": round(time.perf_counter() - t0, 3),
    }


class _Partial:
    """Finished evaluation runs kept in a JSON file, valid only for the same sets and protocol.

    Layout: {"key", "distilled": {run: test acc}, "baseline": {...}, "val": {"distilled":
    {run: val acc}, "baseline": {...}}} (validation only with a validation split)."""

    def __init__(self, uri: str | None, x: np.ndarray, y: np.ndarray, setup: dict):
        self.uri = uri
        h = hashlib.sha256()
        for a in (x, y):
            a = np.ascontiguousarray(np.asarray(a, np.float32))
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        cfg = setup.pop("cfg")
        setup = {**setup, "eval": dataclasses.asdict(cfg), "set_sha256": h.hexdigest()}
        self.key = json.loads(json.dumps(setup, sort_keys=True, default=str))
        self.doc = {"key": self.key, "distilled": {}, "baseline": {}, "val": {"distilled": {}, "baseline": {}}}
        if uri is None:
            return
        from rcig import storage

        try:
            if storage.exists(uri):
                old = json.loads(storage.read_text(uri))
                if isinstance(old, dict) and old.get("key") == self.key:
                    for which in ("distilled", "baseline"):
                        self.doc[which] = {str(int(r)): float(a) for r, a in (old.get(which) or {}).items()}
                        self.doc["val"][which] = {str(int(r)): float(a) for r, a in
                                                  ((old.get("val") or {}).get(which) or {}).items()}
        except (ValueError, TypeError, OSError, AttributeError, storage.StorageError):
            pass  # unreadable: evaluate from scratch

    def done(self, which: str) -> dict[int, dict[str, float]]:
        val = self.doc["val"][which]
        return {int(r): {"test": a, **({"val": val[r]} if r in val else {})}
                for r, a in self.doc[which].items()}

    def recorder(self, which: str) -> Callable[[int, dict[str, float]], None] | None:
        if self.uri is None:
            return None

        def record(r: int, accs: dict[str, float]) -> None:
            from rcig import storage

            self.doc[which][str(r)] = accs["test"]
            if "val" in accs:
                self.doc["val"][which][str(r)] = accs["val"]
            storage.write_text(self.uri, json.dumps(self.doc, sort_keys=True) + "\n")

        return record


def evaluate_source(
    source: str,
    *,
    runs: int | None = None,
    protocol: str | None = None,
    baseline: bool = True,
    data_dir: str | None = None,
    steps: int | None = None,
) -> dict:
    """Evaluate a saved distilled set: a `distilled.npz` (path or URI), a run folder from
    `rcig distill`, or its `checkpoints` folder (local or gs://). Returns the eval.json dict
    plus "source".

    Example:
        >>> r = evaluate_source("runs/digits-ipc1/distilled.npz", runs=5)  # doctest: +SKIP
    """
    from dataclasses import replace

    from rcig.distilled_io import load_distilled

    d = load_distilled(source)
    cfg = d.config
    ev = cfg.eval
    if runs is not None:
        ev = replace(ev, runs=int(runs))
    if protocol is not None:
        ev = replace(ev, protocol=protocol)
    if steps is not None:
        ev = replace(ev, steps=int(steps))
    ev = replace(ev, baseline=bool(baseline))
    from rcig.data import load_run_dataset

    ds = load_run_dataset(replace(cfg, dataset=d.dataset, data_dir=data_dir or cfg.data_dir))
    try:
        res = evaluate_distilled(
            d.x_proto, d.y_proto, ds, use_flip=d.use_flip, cfg=ev,
            width=ev.width or cfg.model.width, ipc=d.ipc, seed=cfg.seed, depth=cfg.model.depth,
        )
    except EvalError as e:
        raise EvalError(f"{d.path}: {e}") from None
    res["source"] = d.path
    return res
