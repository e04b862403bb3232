"""What a sweep searches and how Tune runs it: one registry per choice the spec makes.

- `DISTRIBUTIONS`: the kinds a `search.space` entry may be (`grid`, `choice`, `uniform`,
  `loguniform`, `randint`): the shape of their values, the values a check must try
  (every listed value, or a range's ends), and the Tune domain they become.
- `SEARCHERS`: `search.algorithm` (`random`, `grid`, `optuna`): what it accepts, and the
  Tune search algorithm it builds.
- `SCHEDULERS`: `scheduler` (`none`/`fifo`, `asha`, `pbt`): its options (a frozen
  dataclass the spec loader fills and checks), what it needs of the trials and of the
  rest of the spec, and the Tune scheduler.

`build_search(spec)` is all `orchestrator.sweep.build_tuner` needs. Validation never
imports Ray; construction does.

Example:
    >>> sorted(SEARCHERS), sorted(SCHEDULERS)
    (['grid', 'optuna', 'random'], ['asha', 'fifo', 'none', 'pbt'])
    >>> DISTRIBUTIONS["randint"].probes([2, 5])
    [2, 3, 4]
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.spec import SweepSpec


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _failed(*checks: tuple[str, bool, str]) -> list[tuple[str, str]]:
    """(key, message) of each check (key, whether it holds, message) that does not hold."""
    return [(key, msg) for key, holds, msg in checks if not holds]


# ---- distributions of a search-space entry ------------------------------------------
@dataclass(frozen=True)
class Distribution:
    """One kind of `search.space` entry, `{kind: values}`."""

    kind: str
    shape_problem: Callable[[Any], str | None]  # None if `values` has the right shape
    probes: Callable[[list], list]  # values a trial can get that a check must try
    tune: Callable[[list], Any]  # the Tune domain (imports Ray)
    discrete: bool  # every value is listed (a check can try them all)


def _listed(values: Any) -> str | None:
    if not isinstance(values, list) or not values:
        return f"must be a non-empty list, got {values!r}"
    return None


def _range(kind: str) -> Callable[[Any], str | None]:
    def problem(values: Any) -> str | None:
        if not isinstance(values, list) or len(values) != 2 or not all(_is_num(v) for v in values):
            return f"must be [lo, hi] (two numbers), got {values!r}"
        lo, hi = values
        if not lo < hi:
            return f"lo must be < hi, got [{lo}, {hi}]"
        if kind == "loguniform" and lo <= 0:
            return f"lo must be > 0, got {lo}"
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            return f"bounds must be integers (hi exclusive), got {values!r}"
        return None

    return problem


def _tune(name: str, spread: bool = True) -> Callable[[list], Any]:
    def make(values: list) -> Any:
        from ray import tune

        fn = getattr(tune, name)
        return fn(*values) if spread else fn(list(values))

    return make


DISTRIBUTIONS: dict[str, Distribution] = {
    d.kind: d for d in (
        Distribution("grid", _listed, list, _tune("grid_search", spread=False), True),
        Distribution("choice", _listed, list, _tune("choice", spread=False), True),
        # A float range: its ends, and a value between them (it must be a float field).
        Distribution("uniform", _range("uniform"), lambda v: [v[0], v[1], (v[0] + v[1]) / 2 + 1e-9],
                     _tune("uniform"), False),
        Distribution("loguniform", _range("loguniform"), lambda v: [v[0], v[1], (v[0] + v[1]) / 2 + 1e-9],
                     _tune("loguniform"), False),
        # Its ends, and the value after the first (two neighbours: what a divisibility needs).
        Distribution("randint", _range("randint"), lambda v: sorted({v[0], min(v[0] + 1, v[1] - 1), v[1] - 1}),
                     _tune("randint"), False),
    )
}


def dist_problem(dist: Any) -> str | None:
    """Why `dist` is not a `{kind: values}` entry of a known kind (None if it is).

    Example:
        >>> dist_problem({"grid": []})
        'grid: must be a non-empty list, got []'
    """
    if not isinstance(dist, Mapping) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        kinds = ", ".join(f"{{{k}: {'[..]' if d.discrete else '[lo, hi]'}}}" for k, d in DISTRIBUTIONS.items())
        return f"expected one of {kinds}; got {dist!r}"
    (kind, values), = dist.items()
    bad = DISTRIBUTIONS[kind].shape_problem(values)
    return f"{kind}: {bad}" if bad else None


def ray_space(space: Mapping[str, Mapping[str, list]]) -> dict[str, Any]:
    """Tune param_space of a validated search space."""
    out: dict[str, Any] = {}
    for key, dist in space.items():
        (kind, values), = dist.items()
        out[key] = DISTRIBUTIONS[kind].tune(list(values))
    return out


# ---- search algorithms -------------------------------------------------------------
@dataclass(frozen=True)
class Searcher:
    """A `search.algorithm`: `problems(space)` lists what it cannot search (key, message);
    `build(spec)` returns (Tune search algorithm, whether it caps concurrency itself)."""

    name: str
    problems: Callable[[Mapping[str, Mapping[str, list]]], list[tuple[str, str]]]
    build: Callable[["SweepSpec"], tuple[Any, bool]]
    # True: every trial is a new proposal (its Tune trial id tells samples apart); False:
    # `num_samples` repeats the space, and each repeat's index is part of the trial key.
    proposes: bool = False


def _basic_variants(spec: "SweepSpec") -> tuple[Any, bool]:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune ignores max_concurrent_trials with a generator: give it the cap itself.
    return BasicVariantGenerator(random_state=spec.search_seed, max_concurrent=spec.max_concurrent or 0), True


def _optuna(spec: "SweepSpec") -> tuple[Any, bool]:
    from orchestrator.optuna_search import RcigOptunaSearch

    return RcigOptunaSearch(metric=spec.metric, mode=spec.mode, seed=spec.search_seed), False


def _no_problems(space: Mapping[str, Mapping[str, list]]) -> list[tuple[str, str]]:
    return []


def _grid_only(space: Mapping[str, Mapping[str, list]]) -> list[tuple[str, str]]:
    return [(f"search.space.{k}", f"algorithm grid takes only {{grid: [..]}} entries, got {next(iter(d))}")
            for k, d in space.items() if "grid" not in d]


def _optuna_problems(space: Mapping[str, Mapping[str, list]]) -> list[tuple[str, str]]:
    out = [(f"search.space.{k}", "grid is not supported with algorithm optuna; use choice")
           for k, d in space.items() if "grid" in d]
    if importlib.util.find_spec("optuna") is None:
        out.insert(0, ("search.algorithm", "optuna is not installed (pip install optuna), or use `random`"))
    return out


SEARCHERS: dict[str, Searcher] = {
    s.name: s for s in (
        # Grid entries are crossed, random ones drawn; num_samples repeats the grid.
        Searcher("random", _no_problems, _basic_variants),
        Searcher("grid", _grid_only, _basic_variants),
        Searcher("optuna", _optuna_problems, _optuna, proposes=True),
    )
}


# ---- trial schedulers --------------------------------------------------------------
@dataclass(frozen=True)
class AshaOptions:
    """`scheduler: {type: asha, metric, mode, grace_period, reduction_factor, max_t}`;
    `grace_period` and `max_t` count outer steps."""

    metric: str
    type: str = "asha"
    mode: Literal["min", "max"] = "min"
    grace_period: int = 10
    reduction_factor: float = 2.0
    max_t: int | None = None

    def problems(self) -> list[tuple[str, str]]:
        return _failed(
            ("metric", bool(self.metric), "must name an intermediate metric such as outer/loss"),
            ("grace_period", self.grace_period >= 1, f"must be >= 1, got {self.grace_period}"),
            ("reduction_factor", self.reduction_factor > 1, f"must be a number > 1, got {self.reduction_factor}"),
            ("max_t", self.max_t is None or self.max_t >= 1, f"must be >= 1, got {self.max_t}"),
        )


def _asha_trial_problems(opts: AshaOptions, steps: Sequence[int]) -> list[tuple[str, str]]:
    """What ASHA needs of trials that run `steps` outer steps (each trial's own)."""
    out = []
    if steps and opts.grace_period > min(steps):
        out.append(("scheduler.grace_period", f"{opts.grace_period} is more than the {min(steps)} steps "
                    f"a trial runs; ASHA could never stop one early (lower it, or raise steps)"))
    if steps and opts.max_t is not None and opts.max_t <= max(steps):
        out.append(("scheduler.max_t", f"{opts.max_t} stops trials before their last step "
                    f"({max(steps)}), so they are never evaluated; leave it unset or make it > steps"))
    return out


def max_steps(spec: "SweepSpec") -> int:
    """The most outer steps a trial of the spec can run (`steps` may be searched)."""
    steps = [spec.base_config().steps]
    if "steps" in spec.space:
        (kind, values), = spec.space["steps"].items()
        steps += [int(v) for v in DISTRIBUTIONS[kind].probes(values)]
    return max(steps)


def _asha(opts: AshaOptions, spec: "SweepSpec") -> Any:
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="step", metric=opts.metric, mode=opts.mode,
                         grace_period=opts.grace_period, reduction_factor=opts.reduction_factor,
                         # ASHA stops a trial that reaches max_t: past the last step of
                         # the longest trial, so a surviving trial still runs its eval.
                         max_t=opts.max_t or max_steps(spec) + 1)


# Fields a PBT exploit may perturb: used by the compiled step as constants (a restarted
# trial compiles with the new value) and held nowhere in the state, so the donor's state
# continues exactly under the new value. Not `inner.lr` / `hinv.lr`: they only seed
# `state["lr"]` (adapted online), which an exploit inherits from the donor as it is.
PBT_MUTABLE: dict[str, str] = {
    "outer.proto_lr": "coreset (images and labels) learning rate",
    "outer.temp_lr": "temperature learning rate",
    "pool.lr": "learning rate of the model pool trained online (the inner networks)",
}
_STATE_HELD = {"inner.lr": "state.lr.inner", "hinv.lr": "state.lr.hvp"}


def _str_list(value: Any, key: str, problems: list[str]) -> Any:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        problems.append(f"{key}: must be a list of search.space keys, got {value!r}")
        return ()
    return tuple(value)


def _factors(value: Any, key: str, problems: list[str]) -> Any:
    if (not isinstance(value, (list, tuple)) or not value
            or not all(_is_num(v) and v > 0 for v in value)):
        problems.append(f"{key}: must be a list of numbers > 0 such as [1.2, 0.8], got {value!r}")
        return (1.2, 0.8)
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class PbtOptions:
    """`scheduler: {type: pbt, metric, mode, perturbation_interval, mutations, ...}`
    (`orchestrator.pbt`). Every `perturbation_interval` outer steps (counted on the step
    of the intermediate metric, `val/step`) a trial in the bottom `quantile_fraction`
    copies a top trial's committed checkpoint and perturbs `mutations` (search.space keys;
    default: all of them): a range's value times one of `perturbation_factors`, or, with
    `resample_probability`, a fresh draw; a listed value moves to a neighbour."""

    metric: str
    type: str = "pbt"
    mode: Literal["min", "max"] = "max"
    perturbation_interval: int = 25
    burn_in: int = 0
    mutations: tuple = field(default=(), metadata={"parse": _str_list})
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    perturbation_factors: tuple = field(default=(1.2, 0.8), metadata={"parse": _factors})
    synch: bool = False

    def problems(self) -> list[tuple[str, str]]:
        return _failed(
            ("metric", bool(self.metric), "must name an intermediate metric such as val/acc"),
            ("perturbation_interval", self.perturbation_interval >= 1, f"must be >= 1, got {self.perturbation_interval}"),
            ("burn_in", self.burn_in >= 0, f"must be >= 0, got {self.burn_in}"),
            ("quantile_fraction", 0 < self.quantile_fraction <= 0.5, f"must be in (0, 0.5], got {self.quantile_fraction}"),
            ("resample_probability", 0 <= self.resample_probability <= 1,
             f"must be in [0, 1], got {self.resample_probability}"),
        )


def pbt_mutations(opts: PbtOptions, space: Mapping[str, Any]) -> list[str]:
    """The search.space keys a PBT sweep perturbs."""
    return list(opts.mutations) if opts.mutations else list(space)


def _pbt_trial_problems(opts: PbtOptions, steps: Sequence[int]) -> list[tuple[str, str]]:
    if steps and opts.perturbation_interval + opts.burn_in >= min(steps):
        return [("scheduler.perturbation_interval", f"{opts.perturbation_interval} (after burn_in "
                 f"{opts.burn_in}) is not below the {min(steps)} steps a trial runs; no trial "
                 f"would ever exploit another (lower it, or raise steps)")]
    return []


def _pbt_spec_problems(opts: PbtOptions, raw: Mapping[str, Any], cfg: Any) -> list[tuple[str, str]]:
    """What PBT needs of the rest of the spec (`cfg`: the base config)."""
    search = raw.get("search") if isinstance(raw.get("search"), Mapping) else {}
    space = search.get("space") if isinstance(search.get("space"), Mapping) else {}
    out = []
    algo = search.get("algorithm", "random")
    if algo not in ("random", "grid"):
        out.append(("search.algorithm", f"pbt draws its population with `random` or `grid`; "
                    f"{algo} proposes trials itself, which Tune's PBT cannot take"))
    keys = pbt_mutations(opts, space)
    if not keys:
        out.append(("scheduler.mutations", f"nothing to perturb: give search.space entries for "
                    f"{', '.join(PBT_MUTABLE)}"))
    for k in keys:
        if k not in space:
            out.append(("scheduler.mutations", f"{k} is not a search.space key; PBT perturbs "
                        f"searched fields only"))
        elif k in _STATE_HELD:
            out.append((f"search.space.{k}", f"a checkpoint holds this rate ({_STATE_HELD[k]}, "
                        f"adapted online) and an exploit inherits the donor's; PBT can perturb "
                        f"{', '.join(PBT_MUTABLE)}"))
        elif k not in PBT_MUTABLE:
            out.append((f"search.space.{k}", f"PBT cannot perturb {k} on a running trial; it can "
                        f"perturb {', '.join(PBT_MUTABLE)} (list the others' keys out of "
                        f"scheduler.mutations)"))
    every = getattr(getattr(cfg, "eval", None), "every_steps", 0)
    if every and opts.perturbation_interval % every:
        out.append(("scheduler.perturbation_interval", f"{opts.perturbation_interval} is not a "
                    f"multiple of eval.every_steps ({every}): PBT decides on fresh estimates"))
    ck = getattr(getattr(cfg, "checkpoint", None), "every_steps", 0)
    if not ck or opts.perturbation_interval % ck:
        out.append(("checkpoint.every_steps", f"{ck} does not divide scheduler.perturbation_interval "
                    f"({opts.perturbation_interval}): an exploit copies the donor's checkpoint at "
                    f"the step it was ranked on"))
    return out


def _pbt(opts: PbtOptions, spec: "SweepSpec") -> Any:
    from orchestrator.pbt import build_pbt

    return build_pbt(opts, spec)


@dataclass(frozen=True)
class Scheduler:
    """A `scheduler` type: its options class (None: takes none, Tune's FIFO), what it
    needs of the trials' step counts and of the rest of the spec (raw spec, base config),
    and how to build it."""

    name: str
    options: type | None
    trial_problems: Callable[[Any, Sequence[int]], list[tuple[str, str]]] | None
    build: Callable[[Any, "SweepSpec"], Any] | None
    spec_problems: Callable[[Any, Mapping[str, Any], Any], list[tuple[str, str]]] | None = None


SCHEDULERS: dict[str, Scheduler] = {
    s.name: s for s in (
        Scheduler("none", None, None, None),
        Scheduler("fifo", None, None, None),
        Scheduler("asha", AshaOptions, _asha_trial_problems, _asha),
        Scheduler("pbt", PbtOptions, _pbt_trial_problems, _pbt, _pbt_spec_problems),
    )
}


def build_search(spec: "SweepSpec", restored_space: bool = False) -> tuple[Any, Any, str | None, str | None, int | None]:
    """(search_alg, scheduler, metric, mode, max_concurrent_trials) for `tune.TuneConfig`.

    `restored_space`: the param space is a fixed list of recorded trials (a sweep rebuilt
    from its manifest), which only the basic generator can replay; PBT's population state
    went with Ray's, so its trials then run to their end under FIFO.
    """
    scheduler = None
    metric, mode = spec.metric, spec.mode
    if spec.scheduler is not None and not (restored_space and spec.scheduler.type == "pbt"):
        entry = SCHEDULERS[spec.scheduler.type]
        scheduler = entry.build(spec.scheduler, spec)
        metric = mode = None  # Tune refuses a metric set in both places
    searcher = SEARCHERS["random"] if restored_space else SEARCHERS[spec.algorithm]
    search_alg, caps_itself = searcher.build(spec)
    return search_alg, scheduler, metric, mode, (None if caps_itself else spec.max_concurrent)
