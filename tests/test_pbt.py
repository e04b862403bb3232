"""PBT end to end on a real local Ray (digits, tiny trials): an exploit happens, the
exploiting trial continues from exactly the donor's committed state at the step it
copied (every array equal), keeps its own folder and records where its state came from.

Two trials differ in the probe's learning rate (not perturbed, so the exploiter takes the
donor's): one probe learns, one does not (chance), so the weak trial is in the bottom half
at the first decision (step 5) and exploits the strong one. PBT runs synchronously here:
each decision waits for both trials, so however far one runs ahead of the other while
they compile, they are ranked together. The perturbed field is the coreset learning rate,
over two listed values (a shift moves to the other one or stays), so every program the
trials run is compiled at most twice and comes from JAX's disk cache after that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import manifest as mf
from orchestrator.pbt import COMMIT, LINEAGE, lineage
from orchestrator.spec import load_spec
from orchestrator.sweep import launch
from tests.test_search_e2e import TINY

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
PBT = str(ROOT / "sweeps" / "digits_pbt.yaml")
SETS = TINY + [
    "steps=20", "num_samples=1", "max_concurrent=2", "checkpoint.keep=100",
    "search.space={outer.proto_lr: {choice: [0.003, 0.004]}, eval.probe_lr: {grid: [0.03, 0.000001]}}",
    "scheduler.perturbation_interval=5", "scheduler.quantile_fraction=0.5",
    "scheduler.resample_probability=0", "scheduler.mutations=[outer.proto_lr]",
    "scheduler.synch=true",
]


def _arrays(run: Path, step: int) -> dict[str, object]:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as c:
        tree = c.restore(run / "checkpoints" / str(step) / "state")
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _files(step_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(step_dir)): p.read_bytes() for p in step_dir.rglob("*") if p.is_file()}


def test_pbt_spec_refuses_what_it_cannot_do():
    from orchestrator.spec import SpecError

    with pytest.raises(SpecError) as e:
        load_spec(PBT, sets=["search.space={inner.lr: {loguniform: [0.00001, 0.001]}}",
                             "scheduler.mutations=[inner.lr]", "scheduler.perturbation_interval=30"])
    msg = str(e.value)
    assert "search.space.inner.lr: a checkpoint holds this rate" in msg
    assert "perturbation_interval: 30 is not a multiple of eval.every_steps (25)" in msg
    assert "checkpoint.every_steps: 25 does not divide" in msg
    with pytest.raises(SpecError, match="search.algorithm: pbt draws its population"):
        load_spec(PBT, sets=["search.algorithm=optuna"])


def _fake_step(run: str, step: int, cfg: dict) -> dict[str, bytes]:
    from rcig import storage

    files = {"state/d/abc": bytes(range(256)) * 4, "state/_METADATA": b'{"tree": 1}',
             "config/metadata": json.dumps(cfg).encode(), "config/commit_success.txt": b"ok",
             "_CHECKPOINT_METADATA": b"{}", COMMIT: b"ok"}
    for rel, data in files.items():
        storage.write_bytes(storage.join(run, "checkpoints", str(step), rel), data)
    return files


@pytest.mark.parametrize("where", ["local", "gs"])
def test_copy_step_replaces_own_steps_with_the_donors_byte_for_byte(where, tmp_path, request):
    from orchestrator.pbt import copy_step, donor_step
    from rcig import storage

    root = str(tmp_path) if where == "local" else request.getfixturevalue("gcs_bucket")
    donor, mine = storage.join(root, "donor"), storage.join(root, "mine")
    want = _fake_step(donor, 10, {"dataset": "digits", "steps": 20, "outer": {"proto_lr": 0.01}})
    _fake_step(donor, 15, {"dataset": "digits", "steps": 20})
    _fake_step(mine, 12, {"dataset": "digits", "steps": 20, "outer": {"proto_lr": 0.1}})
    assert donor_step(donor, 10, wait_s=0) == 10
    assert donor_step(donor, 5, wait_s=0) == 10  # pruned: the nearest later committed step
    new_cfg = {"dataset": "digits", "steps": 20, "outer": {"proto_lr": 0.012}}
    copy_step(donor, 10, mine, new_cfg)
    assert storage.listdir(storage.join(mine, "checkpoints")) == ["10"]
    for rel, data in want.items():
        got = storage.read_bytes(storage.join(mine, "checkpoints", "10", rel))
        assert got == (json.dumps(new_cfg).encode() if rel == "config/metadata" else data), rel


def test_pbt_exploit_continues_from_the_donors_committed_state(ray_local, tmp_path):  # noqa: F811
    out = launch(PBT, storage_uri=str(tmp_path), sets=SETS)
    assert out.counts == {mf.COMPLETED: 2}, out
    recs = {r.key: r for r in mf.read_records(out.sweep_uri)}
    trials = Path(out.sweep_uri) / mf.TRIALS
    exploits = [(key, e) for key in recs for e in lineage(str(trials / key))["exploits"]]
    assert exploits, "no trial exploited another"
    for key, e in exploits:  # each trial kept its own folder; its donor is the other one
        assert e["donor_key"] in recs and e["donor_key"] != key
        assert e["donor_uri"] == str(trials / e["donor_key"])
        assert e["step"] == e["pointer_step"] and e["step"] % 5 == 0  # keep=100: never pruned
        assert e["params"]["eval.probe_lr"] == e["donor_params"]["eval.probe_lr"] == 0.03
        assert set(e["perturbed"]) <= {"outer.proto_lr"}

    # The last exploit of the sweep: neither trial replaced its checkpoints after it, so
    # the donor's step and the exploiter's copy of it are both still there.
    key, e = max(exploits, key=lambda ke: ke[1]["at"])
    mine, donor, step = trials / key, trials / e["donor_key"], e["step"]
    ours, theirs = _files(mine / "checkpoints" / str(step)), _files(donor / "checkpoints" / str(step))
    assert COMMIT in ours and set(ours) == set(theirs)
    differ = sorted(f for f in ours if ours[f] != theirs[f])
    assert all(f.startswith("config/") for f in differ), differ  # arrays copied byte for byte
    a, b = _arrays(mine, step), _arrays(donor, step)
    assert sorted(a) == sorted(b) and len(a) > 10
    import numpy as np

    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # The copied step names the exploiter's own (perturbed) config, which its worker's
    # resume check accepted: it resumed at that step and ran on to the end.
    rec = recs[key]
    cfg_files = [f for f in differ if not f.endswith(COMMIT)]
    saved = json.loads(ours[cfg_files[0]]) if cfg_files else json.loads(theirs["config/metadata"])
    assert saved["outer"]["proto_lr"] == rec.config["outer"]["proto_lr"] == e["params"]["outer.proto_lr"]
    assert any(att.get("start_step") == step for att in rec.history), rec.history
    rows = [json.loads(ln) for ln in (mine / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and steps[-1] == 20 and step + 1 in steps
    donor_rows = {r["step"]: r for r in map(json.loads, (donor / "metrics.jsonl").read_text().splitlines())}
    assert all(r == donor_rows[r["step"]] for r in rows if r["step"] <= step)  # its history now
    assert (mine / LINEAGE).exists() and rec.params == e["params"]
    assert rec.eval is not None and rec.status == mf.COMPLETED
