"""Typed, frozen configuration of one distillation run, the paper's presets, overrides.

One `DistillConfig` describes a run completely. The six `configs_final` settings of the
original code are named presets (`PRESETS`), fixed where the released files were broken
(docs/algorithm.md §11.1/E7: `pool_model_count` is 30 and `pool_train_batch_size` is
None for `cifar100_50` and `depth_4_big`). A seventh preset, `digits`, is this project's
embedded default: a small network sized so a run finishes in minutes on 2 CPU cores.

Overrides use dotted names: ``apply_overrides(cfg, {"inner.n_steps": 10})`` or
``apply_overrides(cfg, ["inner.n_steps=10"])``. An unknown key or a value of the wrong
type raises `ConfigError` naming the key.

Example:
    >>> cfg = make_config(dataset="digits", ipc=1, overrides=["steps=50"])
    >>> cfg.steps, cfg.model.width
    (50, 32)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Mapping, Sequence


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    """ConvNet of docs/algorithm.md §2 (FRePo's doubling-width variant)."""

    width: int = 128
    depth: int | None = None  # None: from the image side (8->2, 28/32->3, 64->4, 128->5)
    softplus_temp: float = 60.0  # 0 means ReLU; evaluation always uses ReLU
    normalization: Literal["identity"] = "identity"


@dataclass(frozen=True)
class InnerConfig:
    """Inner KRR problem and its Adam optimisation (§4)."""

    n_steps: int = 20
    lr: float = 1e-5  # start of the LR search, or the fixed value with lr_tune.skip
    train_batch_size: int | None = None  # §5.6 `inner_train_batch_size`


@dataclass(frozen=True)
class HinvConfig:
    """Hessian-inverse-vector product solve (§5.3)."""

    n_steps: int = 20
    lr: float = 5e-5
    batch_size: int | None = None  # §5.6 `hinv_batch_size`


@dataclass(frozen=True)
class OuterConfig:
    """Outer (meta) step, coreset optimiser and EMA (§5, §6)."""

    real_batch_size: int = 1024
    l2_rate: float = 5e-4  # lambda = l2_rate * N (N un-flipped images)
    proto_lr: float = 3e-3  # AdaBelief on x_proto and y_proto
    temp_lr: float = 3e-2  # AdaBelief on log_temp
    ema_decay: float = 0.99
    use_flip: bool = True
    learn_labels: bool = True
    label_margin: bool = True
    normal_repeats: int = 1
    direct_support_batch: int | None = None  # §5.6 direct_batch_sizes[0]
    direct_real_batch: int | None = None  # §5.6 direct_batch_sizes[1]
    implicit_batch_size: int | None = None
    do_precompute: bool = False
    max_forward_batch_size: int | None = None
    # E15: K + λI is symmetric positive definite; Cholesky is the same math as the
    # original's LU (tests/test_reference.py passes with both at the README's tolerances),
    # cheaper, and on XLA:CPU (jax 0.10) an LU solve repeated in a Python-unrolled loop
    # returned NaN (BENCHMARKS.md, "Findings"; loops are now scans by default, see
    # DistillConfig.loop). "lu" stays available.
    solve: Literal["lu", "cholesky"] = "cholesky"
    init: Literal["real", "noise"] = "real"  # §1.3


@dataclass(frozen=True)
class PoolConfig:
    """Model pool trained online on the distilled set (§7)."""

    model_count: int = 30
    max_online_steps: int = 100
    n_max_steps: int = 16  # exclusive upper bound: s ~ U{1..15}
    lr: float = 5e-5
    train_batch_size: int | None = None  # E7/E8: None (full batch) for every preset


@dataclass(frozen=True)
class LRTuneConfig:
    """Learning-rate search before training and online adaptation (§8)."""

    skip: bool = False
    growth: float = 1.2
    backoff: float = 0.7
    max_probes: int = 60  # probe budget per search (inner, then H-solve); hitting a cap is logged
    # rcig.lr_search: "bracket" gallops then bisects on the grid lr0*growth**i (a few
    # probes), "linear" walks it one candidate at a time (the original); same answer
    # whenever the labels along the grid are monotonic-then-not.
    method: Literal["bracket", "linear"] = "bracket"
    max_index: int = 100  # largest grid index tried (1.2**100 ~ 8e7 times the start)
    batch: int = 0  # candidate LRs per vmapped probe call; 0 = auto (1 on CPU, 8 on GPU/TPU)
    adapt_every: int = 50
    fail_fraction: float = 0.29
    monotonic_fraction: float = 0.7
    decrease: float = 0.9
    increase: float = 1.05


@dataclass(frozen=True)
class FaithfulConfig:
    """Switches that reproduce quirks of the original code (§13).

    dense_kernel_tangent (E1): "frozen" keeps the final Dense-kernel tangent at 0 in the
      inner loop (recommended; matches reference `varB/`); "ascent" replicates the
      original's raw-gradient ascent step on it (matches reference `out/`). The H-solve
      and the implicit gradient always use the full tangent tree, as the original does.
    inner_opt_state (E2): inherit the pool model's Adam step count for the inner Adam and
      let the base parameters drift by their leftover Adam momentum during the inner loop.
    """

    dense_kernel_tangent: Literal["frozen", "ascent"] = "frozen"
    inner_opt_state: bool = False


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol (§10)."""

    runs: int = 5
    lr: float = 1e-4
    protocol: Literal["rcig", "noaug"] = "rcig"
    aug: str = "flip_color_crop_rotate_translate_cutout"
    steps: int | None = None  # None: the spec's T (1000 if N == 10 else 2000)
    baseline: bool = True
    width: int | None = None  # None: same as model.width
    batch_size: int = 256
    test_batch_size: int = 1000
    # Intermediate validation metric (`rcig.val_probe`): every `every_steps` outer steps
    # (0: never), `probe_runs` networks trained `probe_steps` steps at `probe_lr` (a short
    # run needs a larger step than the full one) on the EMA distilled set, otherwise with
    # this protocol, scored on the validation split, reported as `val/acc`.
    every_steps: int = 0
    probe_steps: int = 100
    probe_lr: float = 1e-2
    probe_runs: int = 1


@dataclass(frozen=True)
class ValConfig:
    """The validation split carved from train (`rcig.data.split`): stratified, seeded by
    the dataset, never seen by distillation; all selection uses it, the test split is
    scored once at the end. `fraction` 0 turns it off."""

    fraction: float = 0.1
    max_images: int = 5000


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoint policy; intervals in steps and/or seconds (0 disables that trigger)."""

    every_steps: int = 50
    every_seconds: float = 0.0
    keep: int = 3


@dataclass(frozen=True)
class DistillConfig:
    """Everything one distillation run depends on."""

    dataset: str = "digits"
    ipc: int = 1
    seed: int = 0
    steps: int = 300
    preset: str = "digits"
    data_dir: str | None = None
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    # Inner/H-solve loop form. "auto" = Python-unrolled on CPU (~2x faster steps on
    # XLA:CPU) behind a run-time guard, lax.scan elsewhere. The guard (rcig.engine.Engine)
    # checks the first step's first inner loss against the same loss computed without a
    # loop and recompiles with scans on a mismatch: some XLA:CPU compiles (jax 0.10.2) of
    # the network's tangent map applied to literal zeros gave garbage (BENCHMARKS.md,
    # "Findings"). LR probes always use scans (few calls: compile time dominates).
    loop: Literal["auto", "unroll", "scan"] = "auto"
    log_every: int = 10
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    hinv: HinvConfig = field(default_factory=HinvConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    lr_tune: LRTuneConfig = field(default_factory=LRTuneConfig)
    faithful: FaithfulConfig = field(default_factory=FaithfulConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    val: ValConfig = field(default_factory=ValConfig)

    # ---- serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DistillConfig":
        return _from_dict(cls, d, prefix="")


# ---- the paper's presets (docs/algorithm.md §11.1), and the embedded default -------
_FULL_AUG = "flip_color_crop_rotate_translate_cutout"


def _precomputed(forward_batch: int, **outer: Any) -> OuterConfig:
    """Outer step with the stop-gradient features/offsets of all support and real rows
    precomputed, `forward_batch` rows a forward (§5.6 `do_precompute`,
    `max_forward_batch_size`)."""
    return OuterConfig(do_precompute=True, max_forward_batch_size=forward_batch, **outer)


def _big_batch(n: int, **outer: Any) -> dict[str, Any]:
    """The memory-bounded presets' batching: the inner loop, the H-solve, the direct
    support batch, the implicit gradient and the precomputed forward all `n` rows at a
    time; `outer` adds the preset's other outer settings."""
    return dict(
        inner=InnerConfig(train_batch_size=n),
        hinv=HinvConfig(batch_size=n),
        outer=_precomputed(n, direct_support_batch=n, implicit_batch_size=n, **outer),
    )


PRESETS: dict[str, DistillConfig] = {
    "depth_3": DistillConfig(preset="depth_3", steps=10000),
    "depth_3_no_flip": DistillConfig(
        preset="depth_3_no_flip",
        steps=10000,
        outer=OuterConfig(use_flip=False),
        eval=EvalConfig(aug="crop_rotate_translate_cutout"),
    ),
    "cifar100_50": DistillConfig(
        preset="cifar100_50", steps=10000, **_big_batch(2000, use_flip=False, normal_repeats=2)
    ),
    "depth_4_200": DistillConfig(
        preset="depth_4_200",
        steps=5000,
        model=ModelConfig(softplus_temp=0.0),
        outer=_precomputed(400, direct_real_batch=400),
    ),
    "depth_4_big": DistillConfig(
        preset="depth_4_big",
        steps=10000,
        model=ModelConfig(softplus_temp=0.0),
        **_big_batch(500, use_flip=False, direct_real_batch=256),
    ),
    "depth_5": DistillConfig(
        preset="depth_5",
        steps=10000,
        model=ModelConfig(softplus_temp=0.0),
        outer=_precomputed(256, l2_rate=0.05, direct_real_batch=256),
    ),
    # Embedded default for 8x8 digits on a laptop: depth 2 (8 -> 12 with the 1-channel
    # padding rule -> 6 -> 3), width 32, real batch 256, a 10-model pool, no flips
    # (digits are not mirror-symmetric), digit-safe augmentations for evaluation.
    "digits": DistillConfig(
        preset="digits",
        steps=300,  # with unrolled loops on CPU: ~2 minutes with LR search and eval (BENCHMARKS.md)
        model=ModelConfig(width=32),
        outer=OuterConfig(real_batch_size=256, use_flip=False),
        pool=PoolConfig(model_count=10),
        # Evaluation without augmentation: at 8x8 px the geometric ops (±15° rotation,
        # 0.8-1.25 zoom, a 2x2 cutout) destroy much of a digit; they lift the random
        # baseline and lower the distilled set (BENCHMARKS.md has both protocols).
        eval=EvalConfig(protocol="noaug", aug="crop_rotate_translate_cutout", batch_size=256),
        checkpoint=CheckpointConfig(every_steps=50),
    ),
}

# ---- laptop presets: each dataset's shape, 1 ipc in minutes on 2 CPU cores ----------
# The paper's presets (width 128, 10000 steps) need minutes per step on a CPU. These keep
# the algorithm whole (inner loop, H-solve, implicit gradient, pool, learned labels) and
# shrink what costs: width 8 (4 for 100/200 classes), real batch 256 (64 for 64 px), a
# 10-model pool, 300 outer steps (fewer for 100/200 classes), evaluation at the same width
# without augmentation (as `digits`), 1000 steps. `rcig distill` picks them when no accelerator is present
# (`laptop_preset`); `--preset <paper preset>` restores the paper's. Measured on this
# project's data only (the bundled digits, resized/channel-replicated to each shape, which
# is not the real dataset): BENCHMARKS.md, "Laptop presets".
def _laptop(name: str, *, width: int, steps: int, flip: bool, real_batch: int = 256,
            n_loop: int = 20, softplus_temp: float = 60.0) -> DistillConfig:
    return DistillConfig(
        preset=name,
        steps=steps,
        model=ModelConfig(width=width, softplus_temp=softplus_temp),
        inner=InnerConfig(n_steps=n_loop),
        hinv=HinvConfig(n_steps=n_loop),
        outer=OuterConfig(real_batch_size=real_batch, use_flip=flip),
        pool=PoolConfig(model_count=10),
        eval=EvalConfig(protocol="noaug", aug=_FULL_AUG if flip else "crop_rotate_translate_cutout", batch_size=256,
                        steps=1000),
        checkpoint=CheckpointConfig(every_steps=50),
    )


PRESETS.update({
    "laptop_mnist": _laptop("laptop_mnist", width=8, steps=300, flip=False),  # MNIST, Fashion-MNIST
    "laptop_cifar10": _laptop("laptop_cifar10", width=8, steps=300, flip=True),
    # 100/200 classes: the support set is 10-20x larger, so narrower, no flips (half the
    # rows), shorter inner loop and H-solve, fewer steps (dry-run estimates: BENCHMARKS.md)
    "laptop_cifar100": _laptop("laptop_cifar100", width=4, steps=150, flip=False, n_loop=10),
    "laptop_tiny": replace(_laptop("laptop_tiny", width=4, steps=40, flip=False, real_batch=64, n_loop=5,
                                   softplus_temp=0.0), eval=EvalConfig(protocol="noaug", runs=3, steps=500,
                                                                       aug="crop_rotate_translate_cutout")),
})

LAPTOP_PRESETS: dict[str, str] = {
    "digits": "digits",
    "mnist": "laptop_mnist",
    "fashion_mnist": "laptop_mnist",
    "cifar10": "laptop_cifar10",
    "cifar100": "laptop_cifar100",
    "tiny_imagenet": "laptop_tiny",
}


def laptop_preset(dataset: str, ipc: int, backend: str) -> str | None:
    """The preset `rcig distill` uses without --preset: the dataset's laptop preset when the
    backend is a CPU (None for datasets without one, and on GPU/TPU: the paper's applies)."""
    if backend != "cpu":
        return None
    return LAPTOP_PRESETS.get(dataset)


# Which preset each dataset uses by default (readme mapping, §11.2).
DATASET_PRESETS: dict[str, str] = {
    "digits": "digits",
    "mnist": "depth_3_no_flip",
    "fashion_mnist": "depth_3_no_flip",
    "cifar10": "depth_3",
    "cifar100": "depth_3",
    "tiny_imagenet": "depth_4_200",
    "npz": "depth_3",
}


def default_preset(dataset: str, ipc: int) -> str:
    if dataset == "cifar100" and ipc >= 50:
        return "cifar100_50"
    if dataset == "tiny_imagenet" and ipc >= 10:
        return "depth_4_big"
    return DATASET_PRESETS.get(dataset, "depth_3")


def make_config(
    dataset: str = "digits",
    ipc: int = 1,
    preset: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    **top: Any,
) -> DistillConfig:
    """Build a config from a preset (default: the dataset's), top-level fields, overrides."""
    name = preset or default_preset(dataset, ipc)
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    cfg = replace(PRESETS[name], dataset=dataset, ipc=ipc)
    if top:
        cfg = apply_overrides(cfg, top)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


# ---- overrides ---------------------------------------------------------------------
def parse_override_strings(items: Sequence[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> {"a.b": "1", "c": "x"} (values converted later, by type)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{item!r}: an override must look like key=value (e.g. inner.n_steps=10)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def apply_overrides(cfg: DistillConfig, overrides: Mapping[str, Any] | Sequence[str]) -> DistillConfig:
    if not isinstance(overrides, Mapping):
        overrides = parse_override_strings(list(overrides))
    for key, value in overrides.items():
        cfg = _set_path(cfg, key.split("."), value, full_key=key)
    return cfg


def _set_path(obj: Any, path: list[str], value: Any, full_key: str) -> Any:
    names = {f.name: f for f in fields(obj)}
    head = path[0]
    if head not in names:
        raise ConfigError(
            f"{full_key}: unknown config key {head!r} in {type(obj).__name__}; "
            f"known: {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(type(obj))
    if len(path) == 1:
        if dataclasses.is_dataclass(hints[head]) and not isinstance(value, Mapping):
            raise ConfigError(f"{full_key}: is a section; set one of its fields, e.g. {full_key}.<field>=...")
        if isinstance(value, Mapping) and dataclasses.is_dataclass(hints[head]):
            sub = getattr(obj, head)
            for k, v in value.items():
                sub = _set_path(sub, [k], v, full_key=f"{full_key}.{k}")
            return replace(obj, **{head: sub})
        return replace(obj, **{head: coerce(hints[head], value, full_key)})
    sub = getattr(obj, head)
    if not dataclasses.is_dataclass(sub):
        raise ConfigError(f"{full_key}: {head!r} is a value, not a section")
    return replace(obj, **{head: _set_path(sub, path[1:], value, full_key)})


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Convert `value` (a Python value or a string from the command line) to type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if tp is int or tp is float:
        return _coerce_number(tp, value, key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return _from_dict(tp, value, prefix=key + ".")
        raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _coerce_number(tp: type, value: Any, key: str) -> Any:
    """An int or a float from a number or a numeric string; a bool is neither, and an int
    takes a float only when it is integral."""
    if not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, float) and (tp is float or value.is_integer())):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
    raise ConfigError(f"{key}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")


def _from_dict(cls: Any, d: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            raise ConfigError(f"{prefix}{k}: unknown config key in {cls.__name__}")
        kwargs[k] = coerce(hints[k], v, prefix + k)
    return cls(**kwargs)


def validate(cfg: DistillConfig) -> None:
    """Cross-field checks; raises ConfigError naming the key."""
    checks = [
        (cfg.ipc >= 1, "ipc", "must be >= 1"),
        (cfg.steps >= 0, "steps", "must be >= 0"),
        (cfg.inner.n_steps >= 1, "inner.n_steps", "must be >= 1"),
        (cfg.hinv.n_steps >= 1, "hinv.n_steps", "must be >= 1"),
        (cfg.outer.real_batch_size >= 1, "outer.real_batch_size", "must be >= 1"),
        (cfg.pool.model_count >= 1, "pool.model_count", "must be >= 1"),
        (cfg.pool.n_max_steps >= 2, "pool.n_max_steps", "must be >= 2 (exclusive bound)"),
        (cfg.outer.normal_repeats >= 1, "outer.normal_repeats", "must be >= 1"),
        (cfg.model.width >= 1, "model.width", "must be >= 1"),
        (cfg.eval.runs >= 1, "eval.runs", "must be >= 1"),
        (cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1"),
        (cfg.log_every >= 1, "log_every", "must be >= 1"),
        (0.0 <= cfg.val.fraction < 1.0, "val.fraction", "must be in [0, 1)"),
        (cfg.val.max_images >= 0, "val.max_images", "must be >= 0"),
        (cfg.eval.every_steps >= 0, "eval.every_steps", "must be >= 0 (0: no intermediate metric)"),
        (cfg.eval.probe_steps >= 1, "eval.probe_steps", "must be >= 1"),
        (cfg.eval.probe_runs >= 1, "eval.probe_runs", "must be >= 1"),
        (cfg.eval.probe_lr > 0, "eval.probe_lr", "must be > 0"),
        (cfg.eval.every_steps == 0 or (cfg.val.fraction > 0 and cfg.val.max_images > 0), "eval.every_steps",
         "needs a validation split (val.fraction > 0 and val.max_images > 0)"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg}")
    if cfg.preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {cfg.preset!r}")


# ---- run identity: what makes two configs "the same run" -------------------------------
# Fields that never change the distilled set: where the data is read from, the checkpoint
# policy, the evaluation protocol, logging, the loop form (lax.scan or unrolled: the same
# math), and the preset's name (its values are in the resolved fields).
NOT_IDENTITY: tuple[str, ...] = ("data_dir", "checkpoint", "eval", "log_every", "loop", "preset")
# Identity fields a resumed run may change: a rerun may extend (or shorten) `steps`.
RESUME_MAY_CHANGE: tuple[str, ...] = ("steps",)
# Identity fields listed even at their defaults (so a key's contents read plainly).
ALWAYS_LISTED: tuple[str, ...] = ("dataset", "ipc", "seed", "steps")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


_DEFAULTS: dict[str, Any] | None = None


def run_identity(cfg: "DistillConfig | Mapping[str, Any]") -> dict[str, Any]:
    """The fields that change the distilled set, as a flat, sorted ``{"dotted.key": value}``.

    A field at its class default is left out (except `ALWAYS_LISTED`), so a release that adds a field (with a
    default that keeps today's behaviour) does not change any run's identity. Accepts a
    `DistillConfig` or its dict (e.g. a `config.json` or a checkpoint's config, possibly
    written by another release: unknown keys are kept, missing ones count as defaults).

    Example:
        >>> ident = run_identity(make_config("digits", 1, overrides=["steps=50"]))
        >>> ident["steps"], ident["model.width"], "eval.runs" in ident
        (50, 32, False)
    """
    global _DEFAULTS
    if _DEFAULTS is None:
        _DEFAULTS = _flat(json.loads(json.dumps(DistillConfig().to_dict())))
    d = cfg.to_dict() if isinstance(cfg, DistillConfig) else cfg
    flat = _flat(json.loads(json.dumps(d)))  # JSON round trip: tuples -> lists, like a file
    missing = object()
    return {k: flat[k] for k in sorted(flat)
            if not _under(k, NOT_IDENTITY)
            and (k in ALWAYS_LISTED or flat[k] != _DEFAULTS.get(k, missing))}


def identity_hash(cfg: "DistillConfig | Mapping[str, Any]") -> str:
    """sha256 (hex) of `run_identity(cfg)` as canonical JSON: equal hashes, same run.

    Example:
        >>> a = make_config("digits", 1)
        >>> identity_hash(a) == identity_hash(apply_overrides(a, ["eval.runs=10"]))
        True
        >>> identity_hash(a) == identity_hash(apply_overrides(a, ["model.width=64"]))
        False
    """
    blob = json.dumps(run_identity(cfg), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_differences(a: "DistillConfig | Mapping[str, Any]", b: "DistillConfig | Mapping[str, Any]",
                    *, resume: bool = False) -> list[str]:
    """How `b` differs from `a` as runs: one ``"dotted.key (saved X, now Y)"`` per identity
    field (a field absent on one side is at its default). Empty: the same run. With
    `resume`, fields a resumed run may change (`RESUME_MAY_CHANGE`) are not compared.

    This is the one definition of "the same run": trial keys (`identity_hash`), resuming a
    run folder and checking a checkpoint's config all use it.

    Example:
        >>> a = make_config("digits", 1)
        >>> run_differences(a, apply_overrides(a, ["ipc=2", "eval.runs=3"]))
        ['ipc (saved 1, now 2)']
        >>> run_differences(a, apply_overrides(a, ["steps=5"]), resume=True)
        []
    """
    ia, ib = run_identity(a), run_identity(b)
    assert _DEFAULTS is not None
    missing = object()

    def show(key: str, ident: dict) -> str:
        v = ident.get(key, _DEFAULTS.get(key, missing))
        return "<absent>" if v is missing else json.dumps(v)

    out = []
    for key in sorted(set(ia) | set(ib)):
        if ia.get(key, missing) == ib.get(key, missing) or (resume and _under(key, RESUME_MAY_CHANGE)):
            continue
        out.append(f"{key} (saved {show(key, ia)}, now {show(key, ib)})")
    return out
