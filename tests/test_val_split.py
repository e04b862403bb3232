"""The validation split (`rcig.data.split`), its use in evaluation, distillation and the
intermediate metric (`rcig.val_probe`): selection on validation, test reported beside it."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from rcig.config import ConfigError, EvalConfig, make_config
from rcig.data import load_dataset, load_run_dataset, shifted_one_hot, val_split, with_val_split
from rcig.data.errors import DatasetError
from rcig.evaluate import baseline_set, evaluate_distilled, evaluate_set
from rcig.val_probe import probe_due


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _row_hashes(x: np.ndarray) -> set[str]:
    return {hashlib.sha256(np.ascontiguousarray(r).tobytes()).hexdigest() for r in x}


def test_split_is_stratified_disjoint_and_sized():
    y = np.repeat(np.arange(4), [400, 300, 200, 100])
    sp = val_split(y, "toy")
    assert len(sp.val_idx) == 100  # 10 % of 1000
    assert np.bincount(y[sp.val_idx]).tolist() == [40, 30, 20, 10]
    assert not set(sp.val_idx) & set(sp.train_idx)
    assert sorted([*sp.val_idx, *sp.train_idx]) == list(range(len(y)))
    big = np.repeat(np.arange(10), 10_000)
    assert len(val_split(big, "toy").val_idx) == 5000  # at most 5,000 images
    assert len(val_split(big, "toy", fraction=0.2, max_images=300).val_idx) == 300
    assert len(val_split(y, "toy", fraction=0.0).val_idx) == 0


def test_split_is_seeded_by_the_dataset_not_the_run(digits):
    a = val_split(digits.y_train, "digits")
    b = val_split(digits.y_train, "digits")
    np.testing.assert_array_equal(a.val_idx, b.val_idx)
    other = val_split(digits.y_train, "mnist")  # another dataset: another draw
    assert not np.array_equal(a.val_idx, other.val_idx)
    # Every trial of a sweep (seeds, learning rates, widths) holds out the same images.
    cfgs = [make_config("digits", 1, overrides=o) for o in
            (["seed=0"], ["seed=3", "outer.proto_lr=0.01"], ["model.width=8"])]
    splits = [load_run_dataset(c) for c in cfgs]
    for ds in splits[1:]:
        np.testing.assert_array_equal(ds.x_val, splits[0].x_val)
        assert ds.split == splits[0].split


def test_digits_has_a_validation_split_outside_train(digits):
    ds = load_run_dataset(make_config("digits", 1))
    assert ds.split["n_val"] == len(ds.x_val) == 144 and len(ds.x_train) == 1437 - 144
    assert ds.split["n_train_total"] == len(digits.x_train)
    # The rest of train plus the validation images are the original train, each once.
    whole = np.concatenate([ds.x_train, ds.x_val])
    assert _row_hashes(whole) == _row_hashes(digits.x_train)
    # The random-real baseline is drawn from the rest of train, never from validation.
    xb, _ = baseline_set(ds, ipc=5, seed=0)
    val_rows = _row_hashes(ds.x_val) - _row_hashes(ds.x_train)  # images only in validation
    assert not (_row_hashes(xb) & val_rows)
    assert _row_hashes(xb) <= _row_hashes(ds.x_train)


def test_split_config_is_checked_and_a_class_keeps_ipc_images():
    with pytest.raises(ConfigError, match="val.fraction"):
        make_config("digits", 1, overrides=["val.fraction=1.5"])
    with pytest.raises(ConfigError, match="eval.every_steps"):
        make_config("digits", 1, overrides=["val.fraction=0", "eval.every_steps=10"])
    with pytest.raises(ConfigError, match="eval.every_steps"):
        make_config("digits", 1, overrides=["val.max_images=0", "eval.every_steps=10"])
    y = np.repeat(np.arange(2), [50, 3])
    with pytest.raises(DatasetError, match="classes \\[1\\]"):
        val_split(y, "toy", fraction=0.5, min_per_class=3)


def test_eval_reports_validation_and_test_from_the_same_networks(digits):
    ds = with_val_split(digits, 0.1)
    idx = np.concatenate([np.flatnonzero(ds.y_train == c)[:1] for c in range(10)])
    x, y = ds.x_train[idx], shifted_one_hot(ds.y_train[idx], 10)
    cfg = EvalConfig(runs=2, steps=40, lr=1e-3, protocol="noaug")
    r = evaluate_set(x, y, ds, use_flip=False, cfg=cfg, width=8)
    assert len(r["val"]["accs"]) == len(r["accs"]) == 2
    # Validation accuracies are counts over the 144 validation images, test over 360.
    for a in r["val"]["accs"]:
        assert abs(a * 144 - round(a * 144)) < 1e-6
    for a in r["accs"]:
        assert abs(a * 360 - round(a * 360)) < 1e-6
    # Without a split the test figures are unchanged (same keys, same networks).
    r0 = evaluate_set(x, y, digits, use_flip=False, cfg=cfg, width=8)
    assert r0["val"] is None and r0["accs"] == r["accs"]
    d = evaluate_distilled(x, y, ds, use_flip=False, cfg=cfg, width=8, ipc=1)
    assert d["val_mean"] == pytest.approx(np.mean(d["val"]["accs"]))
    assert d["baseline"]["val_mean"] is not None and d["split"]["n_val"] == 144


def test_probe_schedule_gives_every_report_a_value():
    reports = [s for s in range(1, 101) if s % 10 == 0]
    have, probed = False, []
    for s in range(1, 101):
        if probe_due(s, every=25, log_every=10, have_value=have):
            have = True
            probed.append(s)
        if s in reports:
            assert have, f"report at step {s} without the metric"
    assert probed == [10, 25, 50, 75, 100]
    assert not any(probe_due(s, 0, 10, False) for s in range(1, 50))


@pytest.mark.slow
def test_run_folder_records_split_and_reports_val_metric_at_every_report(tmp_path):
    """A tiny run with the intermediate metric: split.json, val/acc in every report to
    the callback (what a trial relays to Tune), final val/acc = the eval's validation mean."""
    from rcig.distill import run_distillation

    cfg = make_config("digits", 1, overrides=[
        "steps=20", "model.width=8", "lr_tune.skip=true", "pool.model_count=2",
        "outer.real_batch_size=64", "eval.runs=1", "eval.steps=30", "eval.every_steps=10",
        "eval.probe_steps=20", "log_every=5", "checkpoint.every_steps=10"])
    reports = []
    res = run_distillation(cfg, str(tmp_path / "run"), progress=False,
                           on_metrics=lambda s, m: reports.append((s, dict(m))))
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split == load_run_dataset(cfg).split and split["n_val"] == 144
    assert [s for s, _ in reports] == [5, 10, 15, 20]
    assert all("val/acc" in m for _, m in reports)
    assert [m["val/step"] for _, m in reports] == [5.0, 10.0, 10.0, 20.0]
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["val"]["mean"] == ev["val_mean"] and ev["split"] == split
    assert res.final_metrics["val/acc"] == ev["val_mean"]
    assert res.final_metrics["test/acc"] == ev["mean"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/acc" in r] == [5, 10, 20]


def test_stopped_eval_keeps_finished_runs_with_their_validation_scores(digits, tmp_path):
    """eval.partial.json: finished runs (test and validation) are reused, not retrained."""
    ds = with_val_split(digits, 0.1)
    idx = np.concatenate([np.flatnonzero(ds.y_train == c)[:1] for c in range(10)])
    x, y = ds.x_train[idx], shifted_one_hot(ds.y_train[idx], 10)
    cfg = EvalConfig(runs=2, steps=20, lr=1e-3, protocol="noaug", baseline=False)
    partial = str(tmp_path / "eval.partial.json")
    full = evaluate_distilled(x, y, ds, use_flip=False, cfg=cfg, width=8, ipc=1, partial_uri=partial)
    doc = json.loads((tmp_path / "eval.partial.json").read_text())
    assert doc["distilled"] == {"0": full["accs"][0], "1": full["accs"][1]}
    assert doc["val"]["distilled"] == {"0": full["val"]["accs"][0], "1": full["val"]["accs"][1]}
    # Planted numbers for run 0 are taken as finished: proof that run 0 is not retrained.
    doc["distilled"]["0"], doc["val"]["distilled"]["0"] = 0.5, 0.25
    (tmp_path / "eval.partial.json").write_text(json.dumps(doc))
    again = evaluate_distilled(x, y, ds, use_flip=False, cfg=cfg, width=8, ipc=1, partial_uri=partial)
    assert again["accs"] == [0.5, full["accs"][1]]
    assert again["val"]["accs"] == [0.25, full["val"]["accs"][1]]


def test_split_is_part_of_a_runs_identity_and_the_probe_is_not():
    from rcig.config import apply_overrides, identity_hash

    cfg = make_config("digits", 1)
    assert identity_hash(cfg) != identity_hash(apply_overrides(cfg, ["val.fraction=0.2"]))
    assert identity_hash(cfg) != identity_hash(apply_overrides(cfg, ["val.max_images=50"]))
    assert identity_hash(cfg) == identity_hash(apply_overrides(cfg, ["eval.every_steps=25", "eval.probe_lr=0.1"]))
