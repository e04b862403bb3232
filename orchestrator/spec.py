"""Sweep specs: a YAML file that says what to distill, what to search, what a trial needs.

A spec is a tree of frozen dataclasses (`SweepSpec` and its blocks), filled from the
YAML by the same coercion `rcig.config` uses for `DistillConfig` (`rcig.config.coerce`,
`ConfigError` naming the key). Loading never starts Ray. `load_spec` checks the whole
file, then everything about the trials that can be known before launch
(`orchestrator.spec_check`), and raises one `SpecError` listing EVERY problem, each with
the file and the key path (``sweeps/x.yaml: search.space.model.widht: unknown config
key ...``).

A spec (all keys but ``name`` and ``base.dataset`` optional)::

    name: quickstart
    base: {dataset: digits, ipc: 1, preset: digits, data_dir: null,
           overrides: {steps: 60}}                 # dotted DistillConfig fields
    search:
      seed: 0                                      # seed of the random sampler
      algorithm: random                            # random | grid | optuna (orchestrator.search)
      space:                                       # dotted DistillConfig fields
        outer.proto_lr: {loguniform: [0.001, 0.01]}
        model.width: {grid: [16, 32]}
    num_samples: 1                                 # repeats of the grid (random draws); repeat k
                                                   # has its own folder and seed (seed + k)
    max_concurrent: 2
    resources: {cpu: 1, gpu: 0, tpu: 0, accelerator_type: null, custom: {}, hosts: 1}
                                                   # per host; tpu: v4-16 (a slice type) sets hosts
    scheduler: none                                # or {type: asha, metric, mode, ...}
    metric: val/acc                                # selection metric (validation accuracy)
    mode: max
    storage: ./sweep_results                       # parent folder / URI of sweeps
    max_failures: 2                                # real errors per trial
    max_preemptions: 100                           # node losses per trial
    checkpoint: {every_steps: 50, every_seconds: 0, keep: 3}
    eval: {runs: 5, protocol: rcig, baseline: true}
    cost: {per_accelerator_hour: 1.35, currency: USD}

Example:
    >>> spec = load_spec("sweeps/quickstart.yaml", sets=["steps=10"])
    >>> spec.name, spec.base_overrides["steps"], spec.resources.cpu
    ('quickstart', 10, 1)
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import yaml

from orchestrator import search as search_registry
from orchestrator.devices import ray_bundle, trial_bundles, trial_devices, trial_hosts, tpu_slice
from rcig.config import DATASET_PRESETS, PRESETS, ConfigError, DistillConfig, coerce, make_config

# Spec blocks that are shorthands for config sections (`eval.runs` -> config `eval.runs`).
CONFIG_BLOCKS = ("checkpoint", "eval")
TPU_CHIP_OPTIONS = (0, 1, 2, 4, 8)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class SpecError(ValueError):
    """A sweep spec with problems; `problems` holds one "key: what is wrong" per problem."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(f"{source}: {p}" for p in self.problems))


# ---- filling frozen dataclasses from YAML, collecting every problem -----------------
_BAD = object()  # a field value that did not parse (its problem is already recorded)


def spec_field(default: Any = MISSING, *, default_factory: Any = MISSING,
               check: Callable[[Any], str | None] | None = None, hint: str | None = None,
               parse: Callable[[Any, str, list[str]], Any] | None = None, internal: bool = False) -> Any:
    """A dataclass field with what `from_mapping` needs: `check(value)` returns a problem
    (or None); `hint` is added to a "missing" or wrong-type message; `parse(value, key,
    problems)` replaces type coercion for free-form blocks (returns `_BAD` on a problem);
    `internal` fields are not read from the file."""
    md = {"check": check, "hint": hint, "parse": parse, "internal": internal}
    return field(default=default, default_factory=default_factory, metadata=md)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _unknown(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key{hint}; known: {', '.join(known)}"


def _dataclass_of(tp: Any) -> tuple[type | None, bool]:
    """(dataclass, optional) if `tp` is a dataclass or `X | None` of one."""
    if dataclasses.is_dataclass(tp):
        return tp, False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            return args[0], True
    return None, False


def field_value(cls: type, name: str, value: Any, key: str, problems: list[str]) -> Any:
    """One field of `cls` from its raw value: parsed, coerced and checked; `_BAD` (with
    the problem appended) if it is wrong."""
    f = next(f for f in fields(cls) if f.name == name)
    tp = typing.get_type_hints(cls)[name]
    md = f.metadata
    if md.get("parse") is not None:
        value = md["parse"](value, key, problems)
    else:
        sub, optional = _dataclass_of(tp)
        if sub is not None and not (optional and value is None):
            value = from_mapping(sub, value, key, problems)
            return _BAD if value is None else value
        try:
            value = coerce(tp, value, key)
        except ConfigError as e:
            problems.append(f"{e}" + (f" ({md['hint']})" if md.get("hint") else ""))
            return _BAD
    if value is not _BAD and value is not None and md.get("check") is not None:
        bad = md["check"](value)
        if bad:
            problems.append(f"{key}: {bad}")
            return _BAD
    return value


def from_mapping(cls: type, raw: Any, path: str, problems: list[str],
                 internal: Mapping[str, Any] | None = None) -> Any:
    """Build frozen dataclass `cls` from a YAML mapping with `rcig.config.coerce`, appending
    one "key.path: problem" per problem (unknown keys with a close match, missing
    required fields, wrong types, failed checks, then the block's own `problems()`);
    return None if there was any.

    Example:
        >>> problems = []
        >>> from_mapping(Resources, {"cpu": 0, "gpus": 1}, "resources", problems), problems
        (None, ["resources.gpus: unknown key (did you mean 'gpu'?); known: cpu, gpu, tpu, accelerator_type, custom, hosts", 'resources.cpu: must be >= 1, got 0'])
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(f"{path}: must be a mapping, got {type(raw).__name__} {raw!r}")
        return None
    before = len(problems)
    readable = [f for f in fields(cls) if f.init and not f.metadata.get("internal")]
    names = [f.name for f in readable]
    for k in raw:
        if k not in names:
            problems.append(f"{_join(path, k)}: {_unknown(str(k), names)}")
    kwargs: dict[str, Any] = dict(internal or {})  # fields not read from the file
    for f in readable:
        key = _join(path, f.name)
        if f.name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                hint = f.metadata.get("hint")
                problems.append(f"{key}: missing" + (f"; {hint}" if hint else ""))
            continue
        value = field_value(cls, f.name, raw[f.name], key, problems)
        if value is not _BAD:
            kwargs[f.name] = value
    if len(problems) > before:
        return None
    obj = cls(**kwargs)
    for sub, msg in (obj.problems() if hasattr(obj, "problems") else []):
        problems.append(f"{_join(path, sub) if sub else path}: {msg}")
    return obj if len(problems) == before else None


def _at_least(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be >= {lo}, got {v!r}"


def _one_of(known: Sequence[Any], what: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in known else f"unknown {what} {v!r}; known: {', '.join(map(str, known))}"


def _mapping_of_str_keys(what: str) -> Callable[[Any, str, list[str]], Any]:
    def parse(value: Any, key: str, problems: list[str]) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            problems.append(f"{key}: must be a mapping of {what}, got {value!r}")
            return _BAD
        return {str(k): v for k, v in value.items()}

    return parse


def _parse_space(value: Any, key: str, problems: list[str]) -> Any:
    space = _mapping_of_str_keys("dotted config fields")(value, key, problems)
    if space is _BAD:
        return _BAD
    out, good = {}, True
    for k, dist in space.items():
        bad = search_registry.dist_problem(dist)
        if bad:
            kind = next(iter(dist)) if isinstance(dist, Mapping) and len(dist) == 1 else None
            where = f"{key}.{k}.{kind}" if kind in search_registry.DISTRIBUTIONS else f"{key}.{k}"
            problems.append(f"{where}: {bad.split(': ', 1)[1] if where.endswith(f'.{kind}') else bad}")
            good = False
        else:
            (kind, values), = dist.items()
            out[k] = {kind: list(values)}
    return out if good else _BAD


def _parse_scheduler(value: Any, key: str, problems: list[str]) -> Any:
    known = ", ".join(search_registry.SCHEDULERS)
    if value is None or (isinstance(value, str) and value.lower() in search_registry.SCHEDULERS
                         and search_registry.SCHEDULERS[value.lower()].options is None):
        return None
    if not isinstance(value, Mapping):
        problems.append(f"{key}: must be none or a mapping like {{type: asha, metric: outer/loss, "
                        f"mode: min}}, got {value!r}")
        return _BAD
    kind = value.get("type")
    entry = search_registry.SCHEDULERS.get(str(kind).lower()) if kind is not None else None
    if entry is None:
        problems.append(f"{key}.type: unknown scheduler {kind!r}; known: {known}")
        return _BAD
    if entry.options is None:
        extra = [k for k in value if k != "type"]
        if extra:
            problems.append(f"{key}.{extra[0]}: scheduler {entry.name} takes no options")
            return _BAD
        return None
    opts = from_mapping(entry.options, {**value, "type": entry.name}, key, problems)
    return _BAD if opts is None else opts


# ---- the spec's blocks ----------------------------------------------------------------
class _Block:
    """Read access by key for code that treats a block as a mapping (`res["cpu"]`)."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BaseSpec(_Block):
    """`base:` what every trial distills before its search parameters."""

    dataset: str = spec_field(hint=f"one of {', '.join(DATASET_PRESETS)}",
                              check=_one_of(tuple(DATASET_PRESETS), "dataset"))
    ipc: int = spec_field(1, check=_at_least(1))
    preset: str | None = spec_field(None, check=_one_of(sorted(PRESETS), "preset"))
    data_dir: str | None = spec_field(None, hint="a path or gs:// URI")
    overrides: dict[str, Any] = spec_field(default_factory=dict,
                                           parse=_mapping_of_str_keys("dotted config fields"))


@dataclass(frozen=True)
class SearchSpec(_Block):
    """`search:` the sampler and the space (dotted config field -> {kind: values})."""

    seed: int | None = None
    algorithm: str = spec_field("random", check=_one_of(tuple(search_registry.SEARCHERS), "algorithm"))
    space: dict[str, dict[str, list]] = spec_field(default_factory=dict, parse=_parse_space)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for key, msg in search_registry.SEARCHERS[self.algorithm].problems(self.space):
            out.append((key[len("search."):] if key.startswith("search.") else key, msg))
        return out


def _tpu_check(v: Any) -> str | None:
    if isinstance(v, str):
        try:
            tpu_slice(v)
        except ValueError as e:
            return str(e)
        return None
    if v in TPU_CHIP_OPTIONS:
        return None
    return f"chips per host must be one of {list(TPU_CHIP_OPTIONS)} (or a slice type such as v4-16), got {v!r}"


@dataclass(frozen=True)
class Resources(_Block):
    """`resources:` what one trial holds; `orchestrator.devices.ray_bundle` is its Ray bundle."""

    cpu: int = spec_field(1, check=_at_least(1))
    gpu: int = spec_field(0, check=_at_least(0))
    # Chips per host (0, 1, 2, 4, 8), or a TPU slice type (`v4-16`, `v5e-16`), which
    # implies the hosts, the chips per host and the accelerator type.
    tpu: int | str = spec_field(0, check=_tpu_check)
    accelerator_type: str | None = spec_field(
        None, check=lambda v: None if v else "must be a string such as A100 or TPU-V4")
    # Custom Ray resources a trial's node must offer (e.g. a TPU slice head's
    # `TPU-v4-8-head: 1`, or a label a node pool advertises): name -> amount.
    custom: dict[str, Any] = spec_field(default_factory=dict,
                                        parse=_mapping_of_str_keys("Ray resource names to amounts"))
    # Hosts a trial spans, one process each (every count above is per host); a TPU slice
    # type sets it.
    hosts: int = spec_field(1, check=_at_least(1))

    def problems(self) -> list[tuple[str, str]]:
        out = self._block_problems()
        if isinstance(self.tpu, str):
            sl = tpu_slice(self.tpu)
            if self.hosts not in (1, sl.hosts):
                out.append(("hosts", f"tpu {self.tpu} is a slice of {sl.hosts} host(s); "
                                     f"leave hosts out or set it to {sl.hosts}, got {self.hosts}"))
            if self.accelerator_type and self.accelerator_type != sl.accelerator_type:
                out.append(("accelerator_type", f"tpu {self.tpu} is {sl.accelerator_type}; "
                                                f"leave accelerator_type out, got {self.accelerator_type}"))
        return out

    def _block_problems(self) -> list[tuple[str, str]]:
        out = []
        for name, amount in self.custom.items():
            if name.upper() in ("CPU", "GPU", "TPU", "MEMORY") or name.startswith("accelerator_type:"):
                out.append((f"custom.{name}", "set it with resources.cpu/gpu/tpu/accelerator_type"))
            elif isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
                out.append((f"custom.{name}", f"must be a number > 0, got {amount!r}"))
        if self.gpu and self.tpu:
            out.append(("", "ask for gpu or tpu, not both"))
        if self.accelerator_type and not (self.gpu or self.tpu):
            out.append(("accelerator_type", "needs resources.gpu or resources.tpu > 0"))
        return out


@dataclass(frozen=True)
class Cost(_Block):
    """`cost:` price of one accelerator (TPU chip, GPU, else CPU) per hour."""

    per_accelerator_hour: float = spec_field(check=_at_least(0), hint="a number >= 0, e.g. 1.35")
    currency: str = "USD"


def _name_check(v: str) -> str | None:
    return None if _NAME_RE.match(v) else f"{v!r} is not a valid name (letters, digits, . _ -; at most 80)"


@dataclass(frozen=True)
class SweepSpec(_Block):
    """A validated sweep spec. `raw` is the spec as launched (after --set)."""

    name: str = spec_field(check=_name_check, hint="give the sweep a name (letters, digits, . _ -)")
    base: BaseSpec = spec_field(hint="e.g. base: {dataset: digits, ipc: 1}")
    search: SearchSpec = spec_field(default_factory=SearchSpec)
    num_samples: int = spec_field(1, check=_at_least(1))
    max_concurrent: int | None = spec_field(None, check=_at_least(1))
    resources: Resources = spec_field(default_factory=Resources)
    scheduler: Any = spec_field(None, parse=_parse_scheduler)  # None or a SCHEDULERS options object
    metric: str = spec_field("val/acc", check=lambda v: None if v else "must be a metric name such as val/acc")
    mode: Literal["min", "max"] = "max"
    storage: str | None = spec_field(None, hint="a path or URI, e.g. ./sweep_results or gs://bucket/sweeps",
                                     check=lambda v: None if v.strip() else "must be a path or URI, got ''")
    max_failures: int = spec_field(2, check=_at_least(0))
    max_preemptions: int = spec_field(100, check=_at_least(0))
    checkpoint: dict[str, Any] = spec_field(default_factory=dict, parse=_mapping_of_str_keys("checkpoint fields"))
    eval: dict[str, Any] = spec_field(default_factory=dict, parse=_mapping_of_str_keys("eval fields"))
    cost: Cost | None = None
    raw: dict[str, Any] = spec_field(default_factory=dict, internal=True)
    source: str = spec_field("<spec>", internal=True)

    # ---- flat views ------------------------------------------------------------------
    dataset = property(lambda self: self.base.dataset)
    ipc = property(lambda self: self.base.ipc)
    preset = property(lambda self: self.base.preset)
    data_dir = property(lambda self: self.base.data_dir)
    space = property(lambda self: self.search.space)
    search_seed = property(lambda self: self.search.seed)
    algorithm = property(lambda self: self.search.algorithm)

    @property
    def base_overrides(self) -> dict[str, Any]:
        """Config overrides of every trial: `base.overrides`, then the `checkpoint:` and
        `eval:` blocks as `checkpoint.*` / `eval.*`."""
        out = dict(self.base.overrides)
        for block in CONFIG_BLOCKS:
            out.update({f"{block}.{k}": v for k, v in getattr(self, block).items()})
        return out

    def base_config(self) -> DistillConfig:
        """The config every trial starts from (before its search parameters)."""
        return make_config(self.dataset, self.ipc, self.preset, overrides=self.base_overrides,
                           data_dir=self.data_dir)

    def trial_config(self, params: Mapping[str, Any]) -> DistillConfig:
        """Resolved config of one trial: base, then its sampled parameters.

        Example:
            >>> spec.trial_config({"model.width": 16}).model.width  # doctest: +SKIP
            16
        """
        return make_config(self.dataset, self.ipc, self.preset,
                           overrides={**self.base_overrides, **dict(params)},
                           data_dir=self.data_dir)

    def ray_resources(self) -> dict[str, float]:
        """Ray resource bundle of a trial's first host (`orchestrator.devices.ray_bundle`)."""
        return ray_bundle(self.resources)

    def ray_bundles(self) -> list[dict[str, float]]:
        """One Ray bundle per host of a trial (`orchestrator.devices.trial_bundles`)."""
        return trial_bundles(self.resources)

    def hosts_per_trial(self) -> int:
        """Hosts a trial spans (`resources.hosts`, or its TPU slice's)."""
        return trial_hosts(self.resources)

    def accelerators_per_trial(self) -> tuple[int, str]:
        """(count, unit) of a trial's devices, billed as accelerator-seconds: TPU chips,
        else GPUs, else CPUs (`orchestrator.devices.trial_devices`)."""
        return trial_devices(self.resources)

    def searcher_proposes(self) -> bool:
        """Whether the search algorithm proposes each trial (optuna) rather than repeating
        the space `num_samples` times (random, grid)."""
        return search_registry.SEARCHERS[self.algorithm].proposes

    def grid_size(self) -> int:
        """Trials the search creates: product of grid lengths times num_samples."""
        n = 1
        for dist in self.space.values():
            if "grid" in dist:
                n *= len(dist["grid"])
        return n * self.num_samples


SPEC_KEYS = tuple(f.name for f in fields(SweepSpec) if not f.metadata.get("internal"))


# ---- loading ------------------------------------------------------------------------
def load_spec(path: str | Path, sets: Sequence[str] = (), storage: str | None = None,
              name: str | None = None, *, check_data: bool = False) -> SweepSpec:
    """Read, override (`--set k=v`) and validate a spec file; raise `SpecError` on any problem.

    `check_data=True` (what `rcig sweep launch` uses) also checks the data the trials will
    read: a dataset that reads files has `base.data_dir`, and a local one exists on this
    machine. Without it a template spec (the shipped paper settings, launched with
    `--set base.data_dir=...`) loads as it is.
    """
    source = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise SpecError(source, ["file not found"]) from None
    except OSError as e:
        raise SpecError(source, [f"cannot read: {e.strerror or e}"]) from None
    return parse_spec(text, source=source, sets=sets, storage=storage, name=name, check_data=check_data)


def parse_spec(text: str, source: str = "<spec>", sets: Sequence[str] = (),
               storage: str | None = None, name: str | None = None, *,
               check_data: bool = False) -> SweepSpec:
    """Validate spec text; see `load_spec`."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        raise SpecError(source, [f"{where}: not valid YAML ({getattr(e, 'problem', e)})"]) from None
    if raw is None:
        raise SpecError(source, ["the file is empty; a spec needs at least `name` and `base.dataset`"])
    if not isinstance(raw, dict):
        raise SpecError(source, [f"top level must be a mapping of keys, got {type(raw).__name__}"])
    raw = copy.deepcopy(raw)
    problems: list[str] = []
    apply_sets(raw, sets, problems)
    if storage is not None:
        raw["storage"] = storage
    if name is not None:
        raw["name"] = name
    return _validated(raw, problems, source, check_data)


def apply_sets(raw: dict[str, Any], sets: Sequence[str], problems: list[str]) -> None:
    """Apply `--set key=value` items to the raw spec dict (values parsed as YAML).

    A first key naming a spec field (`max_concurrent=1`, `resources.cpu=2`) sets the spec;
    anything else is a config override (`steps=10`, `model.width=8`) that also pins the
    field if the search space had it.
    """
    for item in sets:
        if "=" not in item:
            problems.append(f"--set {item}: expected key=value (e.g. --set steps=10)")
            continue
        key, text = (s.strip() for s in item.split("=", 1))
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        head = key.split(".", 1)[0]
        if head in SPEC_KEYS and head not in CONFIG_BLOCKS:
            _set_spec_path(raw, key, value, problems)
        elif head in CONFIG_BLOCKS and "." in key and isinstance(raw.get(head), dict):
            raw[head][key.split(".", 1)[1]] = value  # the spec's own block must not win
        else:
            base = raw.setdefault("base", {})
            if not isinstance(base, dict):
                problems.append(f"--set {key}: `base` is not a mapping")
                continue
            ovr = base.setdefault("overrides", {})
            if isinstance(ovr, dict):
                ovr[key] = value
            space = (raw.get("search") or {}).get("space") if isinstance(raw.get("search"), dict) else None
            if isinstance(space, dict):
                space.pop(key, None)


def _set_spec_path(raw: dict[str, Any], key: str, value: Any, problems: list[str]) -> None:
    parts = key.split(".")
    # Keys below these hold dotted config names, so the rest of the path is one key.
    for prefix in (("search", "space"), ("base", "overrides")):
        if tuple(parts[:2]) == prefix and len(parts) > 2:
            parts = [*prefix, ".".join(parts[2:])]
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            problems.append(f"--set {key}: `{p}` is not a mapping")
            return
        node = nxt
    node[parts[-1]] = value


def _validated(raw: dict[str, Any], problems: list[str], source: str, check_data: bool) -> SweepSpec:
    from orchestrator.spec_check import trial_problems

    spec = from_mapping(SweepSpec, raw, "", problems, {"raw": raw, "source": source})
    problems.extend(p for p in trial_problems(raw, check_data=check_data) if p not in problems)
    if problems or spec is None:
        raise SpecError(source, problems)
    return spec


def spec_from_raw(raw: Mapping[str, Any], source: str = "<manifest>", *,
                  check_data: bool = False) -> SweepSpec:
    """Rebuild a spec from its stored raw dict (the manifest's "spec as launched")."""
    return _validated(copy.deepcopy(dict(raw)), [], source, check_data)
