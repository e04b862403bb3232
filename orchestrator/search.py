"""What a sweep searches and how Tune runs it: one registry per choice the spec makes.

- `DISTRIBUTIONS`: the kinds a `search.space` entry may be (`grid`, `choice`, `uniform`,
  `loguniform`, `randint`): the shape of their values, the values a check must try
  (every listed value, or a range's ends), and the Tune domain they become.
- `SEARCHERS`: `search.algorithm` (`random`, `grid`, `optuna`): what it accepts, and the
  Tune search algorithm it builds.
- `SCHEDULERS`: `scheduler` (`none`/`fifo`, `asha`): its options (a frozen dataclass the
  spec loader fills and checks), what it needs of the trials, and the Tune scheduler.

`build_search(spec)` is all `orchestrator.sweep.build_tuner` needs. Validation never
imports Ray; construction does.

Example:
    >>> sorted(SEARCHERS), sorted(SCHEDULERS)
    (['grid', 'optuna', 'random'], ['asha', 'fifo', 'none'])
    >>> DISTRIBUTIONS["randint"].probes([2, 5])
    [2, 3, 4]
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.spec import SweepSpec


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
        out = []
        if not self.metric:
            out.append(("metric", "must name an intermediate metric such as outer/loss"))
        if self.grace_period < 1:
            out.append(("grace_period", f"must be >= 1, got {self.grace_period}"))
        if self.reduction_factor <= 1:
            out.append(("reduction_factor", f"must be a number > 1, got {self.reduction_factor}"))
        if self.max_t is not None and self.max_t < 1:
            out.append(("max_t", f"must be >= 1, got {self.max_t}"))
        return out


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


@dataclass(frozen=True)
class Scheduler:
    """A `scheduler` type: its options class (None: takes none, Tune's FIFO), what it
    needs of the trials' step counts, and how to build it."""

    name: str
    options: type | None
    trial_problems: Callable[[Any, Sequence[int]], list[tuple[str, str]]] | None
    build: Callable[[Any, "SweepSpec"], Any] | None


SCHEDULERS: dict[str, Scheduler] = {
    s.name: s for s in (
        Scheduler("none", None, None, None),
        Scheduler("fifo", None, None, None),
        Scheduler("asha", AshaOptions, _asha_trial_problems, _asha),
    )
}


def build_search(spec: "SweepSpec", restored_space: bool = False) -> tuple[Any, Any, str | None, str | None, int | None]:
    """(search_alg, scheduler, metric, mode, max_concurrent_trials) for `tune.TuneConfig`.

    `restored_space`: the param space is a fixed list of recorded trials (a sweep rebuilt
    from its manifest), which only the basic generator can replay.
    """
    scheduler = None
    metric, mode = spec.metric, spec.mode
    if spec.scheduler is not None:
        entry = SCHEDULERS[spec.scheduler.type]
        scheduler = entry.build(spec.scheduler, spec)
        metric = mode = None  # Tune refuses a metric set in both places
    searcher = SEARCHERS["random"] if restored_space else SEARCHERS[spec.algorithm]
    search_alg, caps_itself = searcher.build(spec)
    return search_alg, scheduler, metric, mode, (None if caps_itself else spec.max_concurrent)
