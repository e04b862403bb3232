"""The learning-rate search (`rcig.lr_search`) against fake probes, and once for real."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcig import lr_search, step
from rcig.lr_search import FAIL, MONOTONIC, UNSTABLE, SearchStopped, search_learning_rates, search_lr


def threshold_probe(limit: float, bad: int = FAIL, calls: list | None = None):
    """Monotonic below `limit`, `bad` at and above it; records every call."""

    def probe(which, lrs):
        if calls is not None:
            calls.append((which, list(lrs)))
        return [MONOTONIC if lr < limit else bad for lr in lrs]

    return probe


def first_index_at_or_above(lr0, growth, limit):
    i = 0
    while lr0 * growth**i < limit:
        i += 1
    return i


@pytest.mark.parametrize("method", ["bracket", "linear"])
@pytest.mark.parametrize("limit", [1e-5, 1.3e-5, 3e-4, 2e-3, 0.5])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_both_methods_find_the_first_non_monotonic_candidate(method, limit, batch):
    lr0, growth, backoff = 1e-5, 1.2, 0.7
    i_bad = first_index_at_or_above(lr0, growth, limit)
    r = search_lr(threshold_probe(limit), "inner", lr0, growth=growth, backoff=backoff, max_index=100,
                  max_probes=200, method=method, batch=batch)
    assert r.first_bad_index == i_bad and not r.capped
    assert math.isclose(r.lr, backoff * lr0 * growth**i_bad, rel_tol=1e-12)
    # the record holds every candidate probed, with its label; the answer's boundary is in it
    by_index = {p["index"]: p["label"] for p in r.probes}
    assert by_index[i_bad] == FAIL and (i_bad == 0 or by_index[i_bad - 1] == MONOTONIC)
    assert all(p["label"] == (MONOTONIC if p["lr"] < limit else FAIL) for p in r.probes)
    assert len(by_index) == len(r.probes)  # no candidate probed twice


def test_bracket_needs_logarithmically_many_probes():
    r_lin = search_lr(threshold_probe(2e-3), "inner", 1e-5, method="linear", max_index=100, max_probes=200)
    r_br = search_lr(threshold_probe(2e-3), "inner", 1e-5, method="bracket", max_index=100, max_probes=200)
    assert r_lin.lr == r_br.lr
    assert len(r_lin.probes) == r_lin.first_bad_index + 1 == 31
    assert len(r_br.probes) <= 2 * math.ceil(math.log2(32)) + 1


def test_first_probe_not_monotonic_returns_backed_off_start():
    calls = []
    r = search_lr(threshold_probe(0.0, bad=UNSTABLE, calls=calls), "hvp", 5e-5, method="bracket")
    assert r.first_bad_index == 0 and math.isclose(r.lr, 0.7 * 5e-5) and not r.capped
    assert calls == [("hvp", [5e-5])]
    assert r.probes[0]["name"] == "unstable"


@pytest.mark.parametrize("method", ["bracket", "linear"])
def test_grid_cap(method):
    """Every candidate up to max_index monotonic: capped, one grid step past it, backed off."""
    r = search_lr(threshold_probe(math.inf), "hvp", 5e-5, method=method, max_index=59, max_probes=60)
    assert r.capped and r.first_bad_index is None
    assert math.isclose(r.lr, 0.7 * 5e-5 * 1.2**60, rel_tol=1e-12)  # the earlier engine's 60-probe cap
    assert max(p["index"] for p in r.probes) == 59
    if method == "linear":
        assert [p["index"] for p in r.probes] == list(range(60))
    else:
        assert len(r.probes) <= 8


def test_probe_budget_caps_linear_search_before_the_grid_end():
    r = search_lr(threshold_probe(math.inf), "inner", 1e-5, method="linear", max_index=100, max_probes=5)
    assert r.capped and len(r.probes) == 5 and math.isclose(r.lr, 0.7 * 1e-5 * 1.2**5)


def test_probe_budget_while_bisecting_keeps_the_smallest_bad_seen():
    # gallop 0,1,3,7,15,31 (31 bad) then one bisection probe (23, still monotonic): budget gone
    r = search_lr(threshold_probe(1e-5 * 1.2**25), "inner", 1e-5, method="bracket", max_index=100, max_probes=7)
    assert [p["index"] for p in r.probes] == [0, 1, 3, 7, 15, 31, 23]
    assert r.first_bad_index == 31 and not r.capped and math.isclose(r.lr, 0.7 * 1e-5 * 1.2**31)


def test_non_monotone_label_pattern_linear_takes_the_first_bracket_a_boundary():
    """Labels monotonic, unstable at 5, monotonic again 6..19, fail from 20."""
    labels = {i: (UNSTABLE if i == 5 else MONOTONIC if i < 20 else FAIL) for i in range(101)}
    probe = lambda which, lrs: [labels[round(math.log(lr / 1e-5, 1.2))] for lr in lrs]  # noqa: E731
    lin = search_lr(probe, "inner", 1e-5, method="linear", max_index=100)
    br = search_lr(probe, "inner", 1e-5, method="bracket", max_index=100)
    assert lin.first_bad_index == 5
    assert br.first_bad_index == 20  # a monotonic/non-monotonic boundary, not the first one
    by = {p["index"]: p["label"] for p in br.probes}
    assert by[br.first_bad_index] != MONOTONIC and by[br.first_bad_index - 1] == MONOTONIC


def test_both_searches_in_order_and_the_inner_result_is_held_for_the_hvp_search():
    calls, held = [], []
    probe = threshold_probe(1e-3, calls=calls)
    out = search_learning_rates(probe, 1e-5, 5e-5, set_inner=held.append, method="bracket")
    whiches = [w for w, _ in calls]
    assert whiches == sorted(whiches, key=["inner", "hvp"].index)  # all inner probes first
    assert held == [out["inner"]]
    assert out["probes"] == len(out["record"]) == len(calls)
    assert out["capped"] == [] and out["inner"] < 1e-3 and out["hvp"] < 1e-3
    assert {p["which"] for p in out["record"]} == {"inner", "hvp"}


def test_should_stop_is_checked_before_every_probe_and_stops_promptly():
    calls = []
    asked = {"n": 0}

    def should_stop():
        asked["n"] += 1
        return asked["n"] > 3

    with pytest.raises(SearchStopped) as e:
        search_learning_rates(threshold_probe(1e-3, calls=calls), 1e-5, 5e-5, should_stop=should_stop)
    assert len(calls) == 3 and asked["n"] == 4  # no probe after the request
    assert len(e.value.record) == 3


def test_probe_returning_the_wrong_number_of_labels_is_an_error():
    with pytest.raises(ValueError, match="labels"):
        search_lr(lambda which, lrs: [1], "inner", 1e-5, batch=4)


@pytest.mark.parametrize("values,label", [
    ([3.0, 2.0, 1.0], MONOTONIC),            # strictly decreasing
    ([3.0, 2.0, 2.0], UNSTABLE),             # a flat step is not a decrease, ends below start
    ([1.0, 0.5, 2.0], FAIL),                 # ends above its start
    ([0.0, -1.0, -0.5], UNSTABLE),           # H-solve style: r_0 = 0, not monotonic, ends negative
    ([0.0, -1.0, -2.0], MONOTONIC),
    ([0.0, 1.0, 0.5], FAIL),                 # the quadratic ended positive
])
def test_classification_every_branch_host_and_device_agree(values, label):
    assert lr_search.classify_values(values) == label
    assert int(step.classify(jnp.asarray(values, jnp.float32))) == label


@pytest.mark.slow  # ~10 s idle, mostly the three probe compiles; over a minute under heavy load
def test_real_search_on_small_digits_config():
    """The engine's search with real probes (no lr_tune.skip) on a small digits config: both
    searches end at a real monotonic -> non-monotonic boundary of the grid, uncapped."""
    from rcig.config import make_config
    from rcig.data import init_proto_indices, load_dataset, real_batch_indices, shifted_one_hot
    from rcig.engine import Engine

    ds = load_dataset("digits")
    cfg = make_config("digits", 1, overrides=["model.width=8", "outer.real_batch_size=32", "pool.model_count=1",
                                              "inner.n_steps=6", "hinv.n_steps=6"])
    eng = Engine(cfg, ds.image_shape, ds.num_classes, devices=jax.local_devices()[:1])
    idx = init_proto_indices(ds.y_train, 10, 1, 0)
    cs = {"x": ds.x_train[idx].astype(np.float32), "y": shifted_one_hot(ds.y_train[idx], 10), "log_temp": np.float32(0)}
    bi = real_batch_indices(0, 0, len(ds.x_train), 32)
    batch = eng.put_batch(ds.x_train[bi], shifted_one_hot(ds.y_train[bi], 10))
    out = eng.tune_learning_rates(cs, batch, jax.random.PRNGKey(1), 1e-5, 5e-5)
    assert out["capped"] == [] and out["method"] == "bracket"
    assert out["probes"] <= 30  # the one-at-a-time search would need first_bad_index + 1 per LR
    for which, lr0 in (("inner", 1e-5), ("hvp", 5e-5)):
        by = {p["index"]: p["label"] for p in out["record"] if p["which"] == which}
        i = out["first_bad_index"][which]
        assert by[i] != MONOTONIC and (i == 0 or by[i - 1] == MONOTONIC)
        assert math.isclose(out[which], 0.7 * lr0 * 1.2**i, rel_tol=1e-9)
