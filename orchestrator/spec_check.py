"""What a spec's trials will be, checked before launch: every trial's config, its devices,
its data, and what the scheduler needs of it.

`orchestrator.spec` checks the file's shape (types, keys, ranges). This module builds the
configs the trials would run, from the raw spec dict, and reports everything that would
make a trial fail the same way on every attempt (and so burn its `max_failures`):

- every override (`base.overrides`, the `checkpoint:` / `eval:` blocks) and every value a
  search-space entry can give (each grid/choice value, each range's ends; a float range
  on an integer field) type-checks against `DistillConfig`;
- every combination of those values makes a valid config (all of them up to
  `MAX_COMBINATIONS`, else each entry's values against the others' first);
- the real batch splits over the trial's devices (`resources.cpu` CPU devices, or its
  GPUs, or TPU chips: `orchestrator.devices.trial_devices`), as the engine requires;
- ipc is at most the images per class of the training split (the init draws that many);
- optional batch sizes are >= 1;
- the scheduler can act on trials of that many steps (`orchestrator.search.SCHEDULERS`);
- with `check_data`: a dataset that reads files has `data_dir`, and a local one exists.

Example:
    >>> trial_problems({"name": "x", "base": {"dataset": "digits"}, "resources": {"cpu": 3}})
    ['resources.cpu: the real batch of 256 (outer.real_batch_size, preset digits) does not split over the 3 cpu devices of a trial; use a batch that is a multiple of 3, or another device count']
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Iterable, Mapping

from orchestrator import search as search_registry
from orchestrator.devices import trial_devices
from rcig import storage
from rcig.config import ConfigError, DistillConfig, apply_overrides, make_config, validate

MAX_COMBINATIONS = 512

# Classes, fewest training images in a class, whether the dataset reads files (data_dir).
# `digits` is scikit-learn's bundled set in this project's split (tests check the figure).
DATASET_FACTS: dict[str, tuple[int | None, int | None, bool]] = {
    "digits": (10, 139, False),
    "mnist": (10, 5421, True),
    "fashion_mnist": (10, 6000, True),
    "cifar10": (10, 5000, True),
    "cifar100": (100, 500, True),
    "tiny_imagenet": (200, 500, True),
    "npz": (None, None, True),
}
# Config fields that may be None (off) but, when set, must be >= 1.
OPTIONAL_POSITIVE = (
    "model.depth", "inner.train_batch_size", "hinv.batch_size", "outer.direct_support_batch",
    "outer.direct_real_batch", "outer.implicit_batch_size", "outer.max_forward_batch_size",
    "pool.train_batch_size", "eval.steps", "eval.width", "eval.batch_size", "eval.test_batch_size",
)


def _config_msg(path: str, err: ConfigError, key: str) -> str:
    msg = str(err)
    if msg.startswith(f"{key}: "):
        msg = msg[len(key) + 2:]
    return f"{path}: {msg}"


def _get(cfg: DistillConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _quiet(cls: type, name: str, block: Mapping[str, Any], default: Any) -> tuple[Any, bool]:
    """(value, good) of one field of a raw block, checked like `from_mapping` does, silently."""
    from orchestrator.spec import _BAD, field_value

    if name not in block:
        return default, True
    value = field_value(cls, name, block[name], name, [])
    return (default, False) if value is _BAD else (value, True)


def _mapping(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def trial_problems(raw: Mapping[str, Any], *, check_data: bool = False) -> list[str]:
    """"key.path: problem" lines for the trials a raw spec would launch (see module doc)."""
    from orchestrator.spec import _BAD, CONFIG_BLOCKS, BaseSpec, Resources, _parse_scheduler, from_mapping

    problems: list[str] = []
    base = _mapping(raw.get("base"))
    dataset, ok_ds = _quiet(BaseSpec, "dataset", base, None)
    ipc, ok_ipc = _quiet(BaseSpec, "ipc", base, 1)
    preset, ok_preset = _quiet(BaseSpec, "preset", base, None)
    data_dir, ok_dir = _quiet(BaseSpec, "data_dir", base, None)
    exact = dataset is not None and ok_ds and ok_ipc and ok_preset and ok_dir

    # Overrides in the order trials apply them, each with the key path the user wrote.
    overrides: list[tuple[str, Any, str]] = [
        (str(k), v, f"base.overrides.{k}") for k, v in _mapping(base.get("overrides")).items()]
    for block in CONFIG_BLOCKS:
        overrides += [(f"{block}.{k}", v, f"{block}.{k}") for k, v in _mapping(raw.get(block)).items()]
    # Checked against a stand-in base when dataset/ipc/preset are bad, so one run reports all.
    cfg = make_config(dataset if exact else "digits", ipc if exact else 1, preset if exact else None,
                      data_dir=data_dir if exact else None)
    where: dict[str, str] = {}
    for key, value, path in overrides:
        try:
            trial = apply_overrides(cfg, {key: value})
            validate(trial)
            cfg, where[key] = trial, path
        except ConfigError as e:
            problems.append(_config_msg(path, e, key))
            exact = False
    try:
        validate(cfg)
    except ConfigError as e:
        problems.append(f"base: {e}")
        exact = False

    # Every value each search entry can give, against the base config.
    probes: dict[str, list[tuple[Any, str]]] = {}
    space = _mapping(_mapping(raw.get("search")).get("space"))
    for key, dist in space.items():
        key = str(key)
        if search_registry.dist_problem(dist):  # reported by the spec's shape check
            exact = False
            continue
        (kind, values), = dist.items()
        d = search_registry.DISTRIBUTIONS[kind]
        path = f"search.space.{key}"
        vals = [(v, f"{path}.{kind}[{i}]" if d.discrete else path) for i, v in enumerate(d.probes(values))]
        try:  # a key that names no config field is one problem, not one per value
            apply_overrides(cfg, {key: vals[0][0]})
        except ConfigError as e:
            if any(w in str(e) for w in ("unknown config key", "is a section", "not a section")):
                problems.append(_config_msg(path, e, key))
                exact = False
                continue
        for v, vpath in vals:
            try:
                validate(apply_overrides(cfg, {key: v}))
            except ConfigError as e:
                msg = _config_msg(vpath, e, key)
                if not d.discrete and "expected an integer" in msg:
                    msg += f" ({kind} samples floats; use randint or grid for this field)"
                problems.append(msg)
                exact = False
                if not d.discrete:
                    break
        probes[key] = vals

    res = from_mapping(Resources, raw.get("resources"), "resources", [])
    sched_raw = raw.get("scheduler")
    sched = _parse_scheduler(sched_raw, "scheduler", [])
    if not exact or res is None:
        return problems

    # Every trial the spec can launch (or a sample of them), as the trial would build it.
    steps: list[int] = []
    for params in _combinations(probes):
        values = {k: v for k, (v, _) in params.items()}
        for k, (_, vpath) in params.items():
            where[k] = vpath
        try:
            tcfg = apply_overrides(cfg, values)
            validate(tcfg)
        except ConfigError as e:
            key = str(e).split(":", 1)[0]
            problems.append(_config_msg(where.get(key, "search.space"), e, key))
            continue
        steps.append(tcfg.steps)
        problems.extend(_config_problems(tcfg, res, where))
    if check_data:
        problems.extend(_data_problems(cfg, where))
    if (sched is not None and sched is not _BAD and getattr(sched, "metric", None) == "val/acc"
            and cfg.eval.every_steps == 0):
        problems.append("scheduler.metric: val/acc during the run needs eval.every_steps > 0 "
                        "(the intermediate validation estimate); without it the scheduler "
                        "never sees the metric and stops nothing")
    if sched is not None and sched is not _BAD and steps:
        entry = search_registry.SCHEDULERS.get(getattr(sched, "type", ""))
        if entry is not None and entry.trial_problems is not None:
            problems.extend(f"{k}: {m}" for k, m in entry.trial_problems(sched, steps))
    if sched is not None and sched is not _BAD:  # what the scheduler needs of the rest of the spec
        entry = search_registry.SCHEDULERS.get(getattr(sched, "type", ""))
        if entry is not None and entry.spec_problems is not None:
            problems.extend(f"{k}: {m}" for k, m in entry.spec_problems(sched, raw, cfg))
    return list(dict.fromkeys(problems))  # one line per distinct problem, in order


def _combinations(probes: Mapping[str, list[tuple[Any, str]]]) -> Iterable[dict[str, tuple[Any, str]]]:
    keys = list(probes)
    if not keys:
        yield {}
        return
    total = 1
    for k in keys:
        total *= len(probes[k])
    if total <= MAX_COMBINATIONS:
        for combo in itertools.product(*(probes[k] for k in keys)):
            yield dict(zip(keys, combo))
        return
    first = {k: probes[k][0] for k in keys}
    for k in keys:
        for v in probes[k]:
            yield {**first, k: v}


def _config_problems(cfg: DistillConfig, res: Any, where: Mapping[str, str]) -> list[str]:
    """What one trial's resolved config would fail on, before the first step."""
    out = []
    n, unit = trial_devices(res)
    batch = cfg.outer.real_batch_size
    if batch % n:
        key = "outer.real_batch_size"
        path = where.get(key, f"resources.{unit}")
        origin = "" if key in where else f" ({key}, preset {cfg.preset})"
        out.append(f"{path}: the real batch of {batch}{origin} does not split over the {n} {unit} "
                   f"devices of a trial; use a batch that is a multiple of {n}, or another device count")
    classes, per_class, _ = DATASET_FACTS.get(cfg.dataset, (None, None, True))
    if per_class is not None and cfg.ipc > per_class:
        out.append(f"{where.get('ipc', 'base.ipc')}: {cfg.ipc} images per class, but {cfg.dataset}'s "
                   f"training split has only {per_class} images in its smallest class")
    for key in OPTIONAL_POSITIVE:
        v = _get(cfg, key)
        if v is not None and v < 1:
            out.append(f"{where.get(key, key)}: must be >= 1 (or null), got {v}")
    return out


def _data_problems(cfg: DistillConfig, where: Mapping[str, str]) -> list[str]:
    """A dataset that reads files has `data_dir`; a local `data_dir` exists here."""
    path = where.get("data_dir", "base.data_dir")
    _, _, needs_files = DATASET_FACTS.get(cfg.dataset, (None, None, True))
    if needs_files and not cfg.data_dir:
        return [f"{path}: dataset {cfg.dataset!r} reads its files from data_dir (a folder or gs:// "
                f"URI); none given (e.g. --set base.data_dir=gs://BUCKET/data/{cfg.dataset})"]
    if needs_files and cfg.data_dir and not storage.is_remote(cfg.data_dir):
        if not os.path.exists(storage.normalize(cfg.data_dir)):
            return [f"{path}: {cfg.data_dir} does not exist on this machine"]
    return []
