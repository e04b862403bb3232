"""Validation of a raw sweep spec dict: collect every problem, each with its key path.

Used by `orchestrator.spec`; returns plain normalised values so it has no dependency on
the `SweepSpec` class. Never imports Ray.

Example:
    >>> problems = []
    >>> _ = validate_raw({"name": "x", "base": {"dataset": "digits", "ipc": 0}}, problems)
    >>> problems
    ['base.ipc: must be an integer >= 1, got 0']
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from typing import Any, Mapping

from rcig.config import (
    DATASET_PRESETS, PRESETS, ConfigError, DistillConfig, apply_overrides, make_config, validate,
)

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
ALGORITHMS = ("random", "optuna")
TPU_CHIP_OPTIONS = (0, 1, 2, 4, 8)
TOP_KEYS = (
    "name", "base", "search", "num_samples", "max_concurrent", "resources", "scheduler",
    "metric", "mode", "storage", "max_failures", "max_preemptions", "checkpoint", "eval",
    "cost",
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


def _unknown(key: str, known: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key{hint}; known: {', '.join(known)}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _config_msg(path: str, err: ConfigError, key: str) -> str:
    msg = str(err)
    if msg.startswith(f"{key}: "):
        msg = msg[len(key) + 2:]
    return f"{path}: {msg}"


def _mapping(raw: Mapping[str, Any], key: str, problems: list[str]) -> dict[str, Any]:
    v = raw.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        problems.append(f"{key}: must be a mapping, got {type(v).__name__} {v!r}")
        return {}
    return v


def _int_at(d: Mapping[str, Any], key: str, path: str, default: Any, lo: int,
            problems: list[str]) -> Any:
    v = d.get(key, default)
    if v is default and default is None:
        return None
    if not _is_int(v) or v < lo:
        problems.append(f"{path}: must be an integer >= {lo}, got {v!r}")
        return default
    return v


def validate_raw(raw: Mapping[str, Any], problems: list[str]) -> dict[str, Any] | None:
    """Check a raw spec; append "path: problem" lines; return normalised fields."""
    for k in raw:
        if k not in TOP_KEYS:
            problems.append(f"{k}: {_unknown(str(k), TOP_KEYS)}")
    out: dict[str, Any] = {}

    name = raw.get("name")
    if name is None:
        problems.append("name: missing; give the sweep a name (letters, digits, . _ -)")
    elif not isinstance(name, str) or not _NAME_RE.match(name):
        problems.append(f"name: {name!r} is not a valid name (letters, digits, . _ -; at most 80)")
    out["name"] = name

    base_cfg = _check_base(raw, problems, out)
    _check_search(raw, problems, out, base_cfg)

    out["num_samples"] = _int_at(raw, "num_samples", "num_samples", 1, 1, problems)
    out["max_concurrent"] = _int_at(raw, "max_concurrent", "max_concurrent", None, 1, problems)
    out["max_failures"] = _int_at(raw, "max_failures", "max_failures", 2, 0, problems)
    out["max_preemptions"] = _int_at(raw, "max_preemptions", "max_preemptions", 100, 0, problems)
    _check_resources(raw, problems, out)
    _check_metric_scheduler(raw, problems, out)

    storage = raw.get("storage")
    if storage is not None and (not isinstance(storage, str) or not storage.strip()):
        problems.append(f"storage: must be a path or URI (e.g. ./sweep_results, gs://bucket/sweeps), got {storage!r}")
        storage = None
    out["storage"] = storage

    cost = _mapping(raw, "cost", problems) if "cost" in raw else None
    if cost:
        for k in cost:
            if k not in ("per_accelerator_hour", "currency"):
                problems.append(f"cost.{k}: {_unknown(k, ('per_accelerator_hour', 'currency'))}")
        price = cost.get("per_accelerator_hour")
        if not _is_num(price) or price < 0:
            problems.append(f"cost.per_accelerator_hour: must be a number >= 0, got {price!r}")
        cur = cost.get("currency", "USD")
        if not isinstance(cur, str):
            problems.append(f"cost.currency: must be a string like USD, got {cur!r}")
        cost = {"per_accelerator_hour": price, "currency": cur if isinstance(cur, str) else "USD"}
    out["cost"] = cost or None
    return out


def _check_base(raw: Mapping[str, Any], problems: list[str], out: dict[str, Any]) -> DistillConfig:
    if "base" not in raw:
        problems.append("base: missing; e.g. base: {dataset: digits, ipc: 1}")
    base = _mapping(raw, "base", problems)
    known = ("dataset", "ipc", "preset", "data_dir", "overrides")
    for k in base:
        if k not in known:
            problems.append(f"base.{k}: {_unknown(k, known)}")
    dataset = base.get("dataset")
    datasets = tuple(DATASET_PRESETS)
    if "base" in raw and dataset is None:
        problems.append(f"base.dataset: missing; one of {', '.join(datasets)}")
    elif dataset is not None and (not isinstance(dataset, str) or dataset not in datasets):
        problems.append(f"base.dataset: unknown dataset {dataset!r}; known: {', '.join(datasets)}")
    ipc = base.get("ipc", 1)
    if not _is_int(ipc) or ipc < 1:
        problems.append(f"base.ipc: must be an integer >= 1, got {ipc!r}")
    preset = base.get("preset")
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        problems.append(f"base.preset: unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    data_dir = base.get("data_dir")
    if data_dir is not None and not isinstance(data_dir, str):
        problems.append(f"base.data_dir: must be a path or URI, got {data_dir!r}")
    overrides = base.get("overrides") or {}
    if not isinstance(overrides, dict):
        problems.append(f"base.overrides: must be a mapping of dotted config fields, got {overrides!r}")
        overrides = {}
    overrides = {str(k): v for k, v in overrides.items()}
    paths = {k: f"base.overrides.{k}" for k in overrides}
    # Spec blocks `checkpoint:` and `eval:` are shorthands for config sections.
    for block in ("checkpoint", "eval"):
        sub = _mapping(raw, block, problems)
        for k, v in sub.items():
            overrides[f"{block}.{k}"] = v
            paths[f"{block}.{k}"] = f"{block}.{k}"
    out.update(dataset=dataset, ipc=ipc, preset=preset, data_dir=data_dir, base_overrides=overrides)
    # Check overrides and the search space even when dataset/ipc/preset are bad, against
    # a stand-in base, so one run of the validator reports every problem.
    cfg = make_config(dataset if isinstance(dataset, str) and dataset in datasets else "digits",
                      ipc if _is_int(ipc) and ipc >= 1 else 1,
                      preset if isinstance(preset, str) and preset in PRESETS else None)
    for k, v in overrides.items():
        try:
            trial = apply_overrides(cfg, {k: v})
            validate(trial)
            cfg = trial
        except ConfigError as e:
            problems.append(_config_msg(paths[k], e, k))
    try:
        validate(cfg)
    except ConfigError as e:
        problems.append(f"base: {e}")
    return cfg


def _check_search(raw: Mapping[str, Any], problems: list[str], out: dict[str, Any],
                  base_cfg: DistillConfig | None) -> None:
    search = _mapping(raw, "search", problems)
    known = ("seed", "algorithm", "space")
    for k in search:
        if k not in known:
            problems.append(f"search.{k}: {_unknown(k, known)}")
    seed = search.get("seed")
    if seed is not None and not _is_int(seed):
        problems.append(f"search.seed: must be an integer, got {seed!r}")
        seed = None
    algorithm = search.get("algorithm", "random")
    if algorithm not in ALGORITHMS:
        problems.append(f"search.algorithm: unknown algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    elif algorithm == "optuna" and importlib.util.find_spec("optuna") is None:
        problems.append("search.algorithm: optuna is not installed (pip install optuna), or use `random`")
    space = search.get("space") or {}
    if not isinstance(space, dict):
        problems.append(f"search.space: must be a mapping of dotted config fields, got {space!r}")
        space = {}
    norm: dict[str, dict[str, Any]] = {}
    for key, dist in space.items():
        key = str(key)
        path = f"search.space.{key}"
        d = _check_dist(path, key, dist, base_cfg, problems)
        if d is not None:
            norm[key] = d
            if algorithm == "optuna" and "grid" in d:
                problems.append(f"{path}: grid is not supported with algorithm optuna; use choice")
    out.update(space=norm, search_seed=seed, algorithm=algorithm)


def _check_dist(path: str, key: str, dist: Any, cfg: DistillConfig | None,
                problems: list[str]) -> dict[str, Any] | None:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in SEARCH_KINDS:
        problems.append(
            f"{path}: expected one of {{grid: [..]}}, {{choice: [..]}}, {{uniform: [lo, hi]}}, "
            f"{{loguniform: [lo, hi]}}, {{randint: [lo, hi]}}; got {dist!r}")
        return None
    kind, values = next(iter(dist.items()))
    if not isinstance(values, list) or not values:
        problems.append(f"{path}.{kind}: must be a non-empty list, got {values!r}")
        return None

    def check_value(v: Any, where: str) -> bool:
        if cfg is None:
            return True
        try:
            validate(apply_overrides(cfg, {key: v}))
        except ConfigError as e:
            problems.append(_config_msg(where, e, key))
            return False
        return True

    if kind in ("grid", "choice"):
        good = all([check_value(v, f"{path}.{kind}[{i}]") for i, v in enumerate(values)])
        return {kind: values} if good else None
    if len(values) != 2 or not all(_is_num(v) for v in values):
        problems.append(f"{path}.{kind}: must be [lo, hi] (two numbers), got {values!r}")
        return None
    lo, hi = values
    if not lo < hi:
        problems.append(f"{path}.{kind}: lo must be < hi, got [{lo}, {hi}]")
        return None
    if kind == "loguniform" and lo <= 0:
        problems.append(f"{path}.loguniform: lo must be > 0, got {lo}")
        return None
    if kind == "randint":
        if not (_is_int(lo) and _is_int(hi)):
            problems.append(f"{path}.randint: bounds must be integers, got {values!r}")
            return None
        ok = check_value(lo, path) and check_value(hi - 1, path)
    else:
        probe = (float(lo) + float(hi)) / 2 + 1e-9
        ok = check_value(probe, path)
        if not ok:
            problems[-1] += f" ({kind} samples floats; use randint or grid for this field)"
    return {kind: [lo, hi]} if ok else None


def _check_resources(raw: Mapping[str, Any], problems: list[str], out: dict[str, Any]) -> None:
    res = _mapping(raw, "resources", problems)
    known = ("cpu", "gpu", "tpu", "accelerator_type")
    for k in res:
        if k not in known:
            problems.append(f"resources.{k}: {_unknown(k, known)}")
    cpu = _int_at(res, "cpu", "resources.cpu", 1, 1, problems)
    gpu = _int_at(res, "gpu", "resources.gpu", 0, 0, problems)
    tpu = res.get("tpu", 0)
    if tpu not in TPU_CHIP_OPTIONS or not _is_int(tpu):
        problems.append(f"resources.tpu: chips per trial must be one of {list(TPU_CHIP_OPTIONS)}, got {tpu!r}")
        tpu = 0
    acc = res.get("accelerator_type")
    if acc is not None and (not isinstance(acc, str) or not acc):
        problems.append(f"resources.accelerator_type: must be a string such as A100 or TPU-V4, got {acc!r}")
        acc = None
    if gpu and tpu:
        problems.append("resources: ask for gpu or tpu, not both")
    if acc and not (gpu or tpu):
        problems.append("resources.accelerator_type: needs resources.gpu or resources.tpu > 0")
    out["resources"] = {"cpu": cpu, "gpu": gpu, "tpu": tpu, "accelerator_type": acc}


def _check_metric_scheduler(raw: Mapping[str, Any], problems: list[str], out: dict[str, Any]) -> None:
    metric = raw.get("metric", "eval/mean")
    if not isinstance(metric, str) or not metric:
        problems.append(f"metric: must be a metric name such as eval/mean, got {metric!r}")
        metric = "eval/mean"
    mode = raw.get("mode", "max")
    if mode not in ("min", "max"):
        problems.append(f"mode: must be min or max, got {mode!r}")
        mode = "max"
    out.update(metric=metric, mode=mode)
    sched = raw.get("scheduler")
    if sched is None or (isinstance(sched, str) and sched.lower() in ("none", "fifo")):
        out["scheduler"] = None
        return
    if not isinstance(sched, dict):
        problems.append(f"scheduler: must be none or a mapping like {{type: asha, metric: outer/loss, mode: min}}, got {sched!r}")
        out["scheduler"] = None
        return
    known = ("type", "metric", "mode", "grace_period", "reduction_factor", "max_t")
    for k in sched:
        if k not in known:
            problems.append(f"scheduler.{k}: {_unknown(k, known)}")
    if sched.get("type") != "asha":
        problems.append(f"scheduler.type: must be asha (or set scheduler: none), got {sched.get('type')!r}")
    s_metric = sched.get("metric")
    if not isinstance(s_metric, str) or not s_metric:
        problems.append("scheduler.metric: missing; an intermediate metric such as outer/loss")
    s_mode = sched.get("mode", "min")
    if s_mode not in ("min", "max"):
        problems.append(f"scheduler.mode: must be min or max, got {s_mode!r}")
    grace = _int_at(sched, "grace_period", "scheduler.grace_period", 10, 1, problems)
    rf = sched.get("reduction_factor", 2)
    if not _is_num(rf) or rf <= 1:
        problems.append(f"scheduler.reduction_factor: must be a number > 1, got {rf!r}")
    max_t = _int_at(sched, "max_t", "scheduler.max_t", None, 1, problems)
    out["scheduler"] = {"type": "asha", "metric": s_metric, "mode": s_mode,
                        "grace_period": grace, "reduction_factor": rf, "max_t": max_t}
