"""Search algorithms and schedulers end to end on a real local Ray (digits, tiny trials):
Optuna proposes, learns from every trial's validation metric and repeats itself for a
seed; ASHA stops trials early on the intermediate validation metric, and a stopped trial
is STOPPED with its checkpoint and ranked on what it reached.

The searched parameters are ones that do not change the compiled distillation step
(the run seed, the probe's learning rate), so every trial reuses one program from JAX's
disk cache; they still change the validation metric the search sees.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
from pathlib import Path

import pytest

from orchestrator import manifest as mf
from orchestrator.results import best, committed_steps
from orchestrator.search import build_search, ray_space
from orchestrator.spec import load_spec
from orchestrator.sweep import launch

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
OPTUNA = str(ROOT / "sweeps" / "digits_optuna.yaml")
ASHA = str(ROOT / "sweeps" / "digits_asha.yaml")
TINY = ["model.width=8", "outer.real_batch_size=64", "pool.model_count=2", "lr_tune.skip=true",
        "eval.runs=1", "eval.steps=30", "eval.baseline=false", "eval.every_steps=5",
        "eval.probe_steps=30", "checkpoint.every_steps=5", "checkpoint.every_seconds=0",
        "log_every=5", "steps=10", "max_concurrent=2"]
TEST_ENV = {"RCIG_LEASE_HEARTBEAT_S": "1", "RCIG_RECORD_MIN_INTERVAL_S": "0.3",
            "RCIG_TUNE_VERBOSE": "0"}
OPTUNA_SPACE = "search.space={seed: {randint: [0, 1000]}, eval.probe_lr: {loguniform: [0.00001, 0.1]}}"


def _searcher_study(sweep_uri: str):
    """The Optuna study inside the searcher state Tune saved in the experiment folder."""
    files = sorted(glob.glob(os.path.join(sweep_uri, "searcher-state-*.pkl")))
    assert files, f"no searcher state in {sweep_uri}"
    with open(files[-1], "rb") as f:
        state = pickle.load(f)
    # ConcurrencyLimiter (max_concurrent) wraps the searcher; its state holds the inner one.
    while isinstance(state, dict) and "_ot_study" not in state:
        inner = state.get("searcher")
        state = inner.__dict__ if hasattr(inner, "__dict__") else inner
    return state["_ot_study"]


def test_optuna_same_seed_same_first_proposals():
    spec = load_spec(OPTUNA, sets=TINY + [OPTUNA_SPACE])

    def proposals(seed: int) -> list[dict]:
        s = load_spec(OPTUNA, sets=TINY + [OPTUNA_SPACE, f"search.seed={seed}"])
        alg = build_search(s)[0]
        alg.set_search_properties(None, None, ray_space(s.space))
        return [alg.suggest(f"t{i}") for i in range(4)]

    first = proposals(spec.search_seed)
    assert first == proposals(spec.search_seed)
    assert first != proposals(spec.search_seed + 1)
    assert all(set(p) == {"seed", "eval.probe_lr"} for p in first)


def test_optuna_sweep_completes_and_every_result_reaches_the_searcher(ray_local, tmp_path):
    out = launch(OPTUNA, storage_uri=str(tmp_path), sets=TINY + [OPTUNA_SPACE])
    assert out.counts == {mf.COMPLETED: 8}, out
    recs = mf.read_records(out.sweep_uri)
    study = _searcher_study(out.sweep_uri)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 8
    # Each Optuna trial holds its sweep trial's final validation accuracy, and the
    # intermediate val/acc reports it got on the way.
    finals = sorted(r.eval["val_mean"] for r in recs)
    assert sorted(t.value for t in done) == pytest.approx(finals)
    assert all(len(t.intermediate_values) >= 2 for t in done)
    # The same seed proposes the same trials: TPE's first proposals are its seeded
    # start-up draws, so a fresh searcher with the seed repeats all 8.
    spec = load_spec(OPTUNA, sets=TINY + [OPTUNA_SPACE])
    alg = build_search(spec)[0]
    alg.set_search_properties(None, None, ray_space(spec.space))
    fresh = [alg.suggest(f"t{i}") for i in range(8)]
    key = lambda p: (p["seed"], p["eval.probe_lr"])  # noqa: E731
    assert sorted(map(key, (r.params for r in recs))) == sorted(map(key, fresh))
    # Ranking is on validation; test is reported beside it.
    rows = best(out.sweep_uri, top=8)
    assert rows[0]["metric"] == "val/acc" and rows[0]["val_source"] == "eval"
    assert [r["value"] for r in rows] == sorted((r["value"] for r in rows), reverse=True)
    assert all(r["eval_mean"] is not None for r in rows)


def test_asha_stops_weak_trials_which_keep_checkpoints_and_rank_on_what_they_reached(ray_local, tmp_path):
    # Two trials whose probe learns (val/acc well above chance; the same run twice, told
    # apart by `checkpoint.keep`, which changes nothing they compute) and then two whose
    # probe's learning rate is too small to learn (chance). Rungs at steps 5, 10, 20 of 30
    # (max_t = 31, one past the last step): a weak trial is below the cutoff of the rung
    # it reaches first and is stopped there; the strong pair ties, so neither is stopped.
    space = ("search.space={eval.probe_lr: {grid: [0.03, 0.000001]}, "
             "checkpoint.keep: {grid: [2, 3]}}")
    out = launch(ASHA, storage_uri=str(tmp_path),
                 sets=TINY + [space, "num_samples=1", "scheduler.grace_period=5", "steps=30"])
    recs = mf.read_records(out.sweep_uri)
    assert len(recs) == 4
    status = sorted((r.params["eval.probe_lr"], r.status) for r in recs)
    assert status == [(0.000001, mf.STOPPED)] * 2 + [(0.03, mf.COMPLETED)] * 2, status
    stopped = [r for r in recs if r.status == mf.STOPPED]
    for r in stopped:
        assert r.failures == 0 and r.preemptions == 0 and r.eval is None
        folder = Path(mf.trial_uri(out.sweep_uri, r.key))
        assert not (folder / "eval.json").exists()
        ran = [json.loads(ln)["step"] for ln in (folder / "metrics.jsonl").read_text().splitlines()]
        assert max(ran) < 30, "stopped before its last step"
        assert committed_steps(str(folder)), "a stopped trial keeps its checkpoint"
    # Tune ended them as TERMINATED (stopped), not ERROR.
    from ray.tune import ExperimentAnalysis

    ea = ExperimentAnalysis(out.sweep_uri)
    assert {t.status for t in ea.trials} == {"TERMINATED"}
    # best ranks every trial on the validation accuracy it reached: the stopped ones on
    # their last intermediate estimate (at the rung where they stopped).
    rows = best(out.sweep_uri, top=4)
    assert len(rows) == 4
    by_key = {r["key"]: r for r in rows}
    for r in stopped:
        row = by_key[r.key]
        assert row["val_source"] == "probe" and row["value"] < 0.3
    assert [r["status"] for r in rows if r["val_source"] == "eval"] == [mf.COMPLETED] * 2
