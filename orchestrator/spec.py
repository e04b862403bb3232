"""Sweep specs: a YAML file that says what to distill, what to search, what a trial needs.

Loading never starts Ray. `load_spec` checks the whole file and raises `SpecError` listing
EVERY problem, each with the file and the key path (``sweeps/x.yaml: search.space.model.widht:
unknown config key ...``).

A spec (all keys but ``name`` and ``base.dataset`` optional)::

    name: quickstart
    base: {dataset: digits, ipc: 1, preset: digits, data_dir: null,
           overrides: {steps: 60}}                 # dotted DistillConfig fields
    search:
      seed: 0                                      # seed of the random sampler
      algorithm: random                            # Ray's basic variant generator
      space:                                       # dotted DistillConfig fields
        outer.proto_lr: {loguniform: [0.001, 0.01]}
        model.width: {grid: [16, 32]}
    num_samples: 1                                 # repeats of the grid (random draws)
    max_concurrent: 2
    resources: {cpu: 1, gpu: 0, tpu: 0, accelerator_type: null}
    scheduler: none                                # or {type: asha, metric, mode, ...}
    metric: eval/mean                              # leaderboard metric
    mode: max
    storage: ./sweep_results                       # parent folder / URI of sweeps
    max_failures: 2                                # real errors per trial
    max_preemptions: 100                           # node losses per trial
    checkpoint: {every_steps: 50, every_seconds: 0, keep: 3}
    eval: {runs: 5, protocol: rcig, baseline: true}
    cost: {per_accelerator_hour: 1.35, currency: USD}

Example:
    >>> spec = load_spec("sweeps/quickstart.yaml", sets=["steps=10"])
    >>> spec.name, spec.base_overrides["steps"]
    ('quickstart', 10)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from orchestrator.spec_check import TOP_KEYS as SPEC_KEYS, validate_raw
from rcig.config import DistillConfig, make_config

# Spec blocks that are shorthands for config sections (`eval.runs` -> config `eval.runs`).
CONFIG_BLOCKS = ("checkpoint", "eval")


class SpecError(ValueError):
    """A sweep spec with problems; `problems` holds one "key: what is wrong" per problem."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(f"{source}: {p}" for p in self.problems))


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep spec. `raw` is the spec as launched (after --set)."""

    name: str
    dataset: str
    ipc: int
    preset: str | None
    data_dir: str | None
    base_overrides: dict[str, Any]
    space: dict[str, dict[str, Any]]  # dotted field -> {kind: values}
    search_seed: int | None
    algorithm: str
    num_samples: int
    max_concurrent: int
    resources: dict[str, Any]
    scheduler: dict[str, Any] | None
    metric: str
    mode: str
    storage: str | None
    max_failures: int
    max_preemptions: int
    cost: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False)
    source: str = "<spec>"

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
        """Ray resource bundle of one trial (`accelerator_type:X` as Ray spells it)."""
        r = self.resources
        out: dict[str, float] = {"CPU": float(r["cpu"])}
        if r["gpu"]:
            out["GPU"] = float(r["gpu"])
        if r["tpu"]:
            out["TPU"] = float(r["tpu"])
        if r.get("accelerator_type"):
            out[f"accelerator_type:{r['accelerator_type']}"] = 0.001
        return out

    def accelerators_per_trial(self) -> tuple[int, str]:
        """(count, unit) used for accelerator-seconds: TPU chips, else GPUs, else CPUs."""
        r = self.resources
        if r["tpu"]:
            return int(r["tpu"]), "tpu"
        if r["gpu"]:
            return int(r["gpu"]), "gpu"
        return int(r["cpu"]), "cpu"

    def grid_size(self) -> int:
        """Trials the search creates: product of grid lengths times num_samples."""
        n = 1
        for dist in self.space.values():
            if "grid" in dist:
                n *= len(dist["grid"])
        return n * self.num_samples


# ---- loading ------------------------------------------------------------------------
def load_spec(path: str | Path, sets: Sequence[str] = (), storage: str | None = None,
              name: str | None = None) -> SweepSpec:
    """Read, override (`--set k=v`) and validate a spec file; raise `SpecError` on any problem."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise SpecError(source, ["file not found"]) from None
    except OSError as e:
        raise SpecError(source, [f"cannot read: {e.strerror or e}"]) from None
    return parse_spec(text, source=source, sets=sets, storage=storage, name=name)


def parse_spec(text: str, source: str = "<spec>", sets: Sequence[str] = (),
               storage: str | None = None, name: str | None = None) -> SweepSpec:
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
    spec = _validate(raw, problems, source)
    if problems:
        raise SpecError(source, problems)
    assert spec is not None
    return spec


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


def _validate(raw: dict[str, Any], problems: list[str], source: str) -> SweepSpec | None:
    fields_ = validate_raw(raw, problems)
    if problems or fields_ is None:
        return None
    return SweepSpec(raw=raw, source=source, **fields_)


def spec_from_raw(raw: Mapping[str, Any], source: str = "<manifest>") -> SweepSpec:
    """Rebuild a spec from its stored raw dict (the manifest's "spec as launched")."""
    problems: list[str] = []
    spec = _validate(copy.deepcopy(dict(raw)), problems, source)
    if problems or spec is None:
        raise SpecError(source, problems)
    return spec
