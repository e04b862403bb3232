"""Everything a spec's trials would fail on every attempt is refused when the spec loads.

Each case here is a spec the file-shape checks accept but whose trials could not run:
the loader builds every trial's config (as `SweepSpec.trial_config` does) and checks it
against the trial's devices, its data and the scheduler. None of these tests starts Ray.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from orchestrator import cluster
from orchestrator.devices import ray_bundle, trial_device_env, trial_devices
from orchestrator.search import SEARCHERS, build_search
from orchestrator.spec import SpecError, load_spec, parse_spec
from orchestrator.spec_check import DATASET_FACTS

ROOT = Path(__file__).resolve().parents[1]
GOOD = """
name: t
base: {dataset: digits, ipc: 1, overrides: {steps: 20}}
search: {space: {outer.proto_lr: {grid: [0.003, 0.01]}}}
"""


def _problems(text: str, **kw) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="bad.yaml", **kw)
    return [ln[len("bad.yaml: "):] for ln in str(info.value).splitlines()]


def _one(lines: list[str], key: str, *words: str) -> str:
    hits = [ln for ln in lines if ln.startswith(f"{key}: ")]
    assert hits, f"nothing names {key}: {lines}"
    assert any(all(w in ln for w in words) for ln in hits), (words, hits)
    return hits[0]


# ---- the real batch splits over the trial's devices ------------------------------------
@pytest.mark.parametrize("resources,unit,n", [("{cpu: 3}", "cpu", 3), ("{cpu: 8, gpu: 3}", "gpu", 3),
                                              ("{cpu: 8, tpu: 8}", "tpu", 8)])
def test_real_batch_must_split_over_the_trials_devices(resources, unit, n):
    text = GOOD + f"resources: {resources}\n" + ("base: {dataset: digits, overrides: {outer.real_batch_size: 12}}\n"
                                                if unit == "tpu" else "")
    if unit == "tpu":
        text = text.replace("base: {dataset: digits, ipc: 1, overrides: {steps: 20}}\n", "")
    lines = _problems(text)
    key = "base.overrides.outer.real_batch_size" if unit == "tpu" else f"resources.{unit}"
    _one(lines, key, f"over the {n} {unit} devices", f"multiple of {n}")
    assert trial_devices(parse_spec(text.replace(f"resources: {resources}", "resources: {cpu: 4}"))
                         .resources) == (4, "cpu")


def test_each_searched_batch_is_checked_against_the_devices():
    text = GOOD.replace("outer.proto_lr: {grid: [0.003, 0.01]}",
                        "outer.real_batch_size: {grid: [256, 100, 64]}") + "resources: {cpu: 8}\n"
    lines = _problems(text)
    _one(lines, "search.space.outer.real_batch_size.grid[1]", "real batch of 100", "8 cpu devices")
    assert not any("grid[0]" in ln or "grid[2]" in ln for ln in lines)
    # A range: any integer of it is what a trial can get; two neighbours never both split.
    lines = _problems(GOOD.replace("outer.proto_lr: {grid: [0.003, 0.01]}",
                                   "outer.real_batch_size: {randint: [128, 301]}") + "resources: {cpu: 4}\n")
    _one(lines, "search.space.outer.real_batch_size", "real batch of 129")
    # On one device, any batch splits.
    assert parse_spec(GOOD.replace("outer.proto_lr: {grid: [0.003, 0.01]}",
                                   "outer.real_batch_size: {randint: [128, 301]}"))


def test_a_batch_that_splits_loads():
    spec = parse_spec(GOOD + "resources: {cpu: 4}\n")
    assert spec.base_config().outer.real_batch_size % 4 == 0
    # The trial sees exactly the devices the check assumed.
    assert trial_device_env(spec.resources, {})["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"


# ---- ipc against the training split ----------------------------------------------------
def test_ipc_larger_than_the_smallest_class_is_refused():
    _one(_problems(GOOD.replace("ipc: 1", "ipc: 200")), "base.ipc", "200 images per class", "only 139")
    lines = _problems(GOOD.replace("outer.proto_lr: {grid: [0.003, 0.01]}", "ipc: {grid: [1, 500]}"))
    _one(lines, "search.space.ipc.grid[1]", "500 images per class")


def test_digits_class_sizes_match_the_loader():
    from rcig.data import load_dataset

    ds = load_dataset("digits")
    assert DATASET_FACTS["digits"][:2] == (ds.num_classes, int(np.bincount(ds.y_train).min()))


# ---- optional batch sizes --------------------------------------------------------------
def test_optional_batch_sizes_must_be_positive():
    text = GOOD.replace("overrides: {steps: 20}", "overrides: {steps: 20, outer.max_forward_batch_size: 0}")
    _one(_problems(text), "base.overrides.outer.max_forward_batch_size", ">= 1")
    text = GOOD.replace("outer.proto_lr: {grid: [0.003, 0.01]}", "inner.train_batch_size: {choice: [null, 0]}")
    _one(_problems(text), "search.space.inner.train_batch_size.choice[1]", ">= 1")


# ---- the scheduler against the trials' steps -------------------------------------------
def test_asha_grace_period_must_not_exceed_steps():
    lines = _problems(GOOD + "scheduler: {type: asha, metric: outer/loss, grace_period: 50}\n")
    _one(lines, "scheduler.grace_period", "50", "20 steps")
    searched = GOOD.replace("overrides: {steps: 20}", "overrides: {}").replace(
        "outer.proto_lr: {grid: [0.003, 0.01]}", "steps: {grid: [100, 10]}")
    _one(_problems(searched + "scheduler: {type: asha, metric: outer/loss, grace_period: 50}\n"),
         "scheduler.grace_period", "10 steps")
    parse_spec(GOOD + "scheduler: {type: asha, metric: outer/loss, grace_period: 5}\n")


def test_asha_max_t_must_let_trials_finish():
    lines = _problems(GOOD + "scheduler: {type: asha, metric: outer/loss, grace_period: 5, max_t: 20}\n")
    _one(lines, "scheduler.max_t", "never evaluated")
    parse_spec(GOOD + "scheduler: {type: asha, metric: outer/loss, grace_period: 5, max_t: 21}\n")


# ---- the data the trials read ----------------------------------------------------------
MNIST = "name: m\nbase: {dataset: mnist, ipc: 1, overrides: {steps: 20}}\n"


def test_dataset_that_reads_files_needs_data_dir_at_launch():
    _one(_problems(MNIST, check_data=True), "base.data_dir", "dataset 'mnist'", "none given")
    assert parse_spec(MNIST).dataset == "mnist"  # a template loads when not launching


def test_local_data_dir_must_exist_at_launch(tmp_path):
    missing = tmp_path / "nowhere"
    text = MNIST.replace("ipc: 1,", f"ipc: 1, data_dir: {missing},")
    _one(_problems(text, check_data=True), "base.data_dir", str(missing), "does not exist")
    missing.mkdir()
    assert parse_spec(text, check_data=True).data_dir == str(missing)
    # gs:// is not looked up here (the trials read it with their own credentials).
    assert parse_spec(MNIST.replace("ipc: 1,", "ipc: 1, data_dir: gs://b/mnist,"), check_data=True)
    # Set as a config override, it is named where it was set.
    text = MNIST.replace("overrides: {steps: 20}", f"overrides: {{steps: 20, data_dir: {tmp_path / 'x'}}}")
    _one(_problems(text, check_data=True), "base.overrides.data_dir", "does not exist")


@pytest.fixture
def no_ray(monkeypatch):
    import orchestrator.sweep as sw

    def tripwire(*a, **k):
        raise AssertionError("Ray must not start for a spec whose trials cannot run")

    monkeypatch.setattr(sw, "init_ray", tripwire)


@pytest.mark.parametrize("spec,sets,key", [
    ("sweeps/mnist_ipc1.yaml", [], "base.data_dir"),
    # quickstart sets its real batch in base.overrides: the problem is named there
    ("sweeps/quickstart.yaml", ["resources.cpu=3"], "base.overrides.outer.real_batch_size"),
    ("sweeps/quickstart.yaml", ["ipc=1000"], "base.overrides.ipc"),
])
def test_cli_launch_refuses_before_ray(tmp_path, no_ray, spec, sets, key):
    argv = ["sweep", "launch", str(ROOT / spec), "--storage", str(tmp_path / "s")]
    for s in sets:
        argv += ["--set", s]
    res = CliRunner().invoke(cli.app, argv)
    assert res.exit_code == 2, res.output
    assert f": {key}: " in res.output and "Traceback" not in res.output
    assert not (tmp_path / "s").exists()


def test_shipped_templates_load_and_fit_their_devices():
    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        load_spec(path)  # every paper setting's real batch splits over its GPUs ...
        load_spec(path, sets=["resources.gpu=0", "resources.tpu=4", "resources.accelerator_type=TPU-V4"])  # ... or chips


# ---- one report, every problem ---------------------------------------------------------
def test_trial_problems_come_with_the_files_other_problems():
    lines = _problems(GOOD + "resources: {cpu: 3}\nmode: maximize\nmax_failures: -1\n")
    _one(lines, "resources.cpu", "3 cpu devices")
    _one(lines, "mode", "expected one of")
    _one(lines, "max_failures", ">= 0")


# ---- the registry: names, what each accepts, what each builds --------------------------
def test_grid_algorithm_takes_only_grids():
    text = GOOD.replace("search: {space:", "search: {algorithm: grid, space:")
    assert parse_spec(text).algorithm == "grid"
    bad = text.replace("{grid: [0.003, 0.01]}", "{choice: [0.003, 0.01]}")
    _one(_problems(bad), "search.space.outer.proto_lr", "grid takes only")


def test_scheduler_names_and_options():
    assert parse_spec(GOOD + "scheduler: fifo\n").scheduler is None
    assert parse_spec(GOOD + "scheduler: {type: none}\n").scheduler is None
    _one(_problems(GOOD + "scheduler: {type: fifo, metric: x}\n"), "scheduler.metric", "takes no options")
    _one(_problems(GOOD + "scheduler: {type: asha, metric: outer/loss, reduction_factor: 1}\n"),
         "scheduler.reduction_factor", "> 1")
    _one(_problems(GOOD + "scheduler: {type: asha, metric: outer/loss, grace_perod: 3}\n"),
         "scheduler.grace_perod", "did you mean 'grace_period'")


def test_build_search_constructs_what_the_spec_names():
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec = parse_spec(GOOD + "max_concurrent: 2\nscheduler: {type: asha, metric: outer/loss, mode: min, grace_period: 5}\n")
    alg, sched, metric, mode, cap = build_search(spec)
    assert isinstance(alg, BasicVariantGenerator) and isinstance(sched, ASHAScheduler)
    assert (metric, mode, cap) == (None, None, None)  # the generator holds the cap itself
    assert sched._max_t == 21 and sched._metric == "outer/loss"  # past the last step: eval still runs
    searched = parse_spec(GOOD.replace("outer.proto_lr: {grid: [0.003, 0.01]}", "steps: {grid: [20, 40]}")
                          + "scheduler: {type: asha, metric: outer/loss, grace_period: 5}\n")
    assert build_search(searched)[1]._max_t == 41  # past the longest trial's last step
    alg, sched, metric, mode, cap = build_search(parse_spec(GOOD))
    assert sched is None and (metric, mode) == ("val/acc", "max")
    assert set(SEARCHERS) >= {"random", "grid", "optuna"}


# ---- one bundle rule ---------------------------------------------------------------------
def test_one_bundle_function_and_rule_for_spec_and_cluster():
    block = {"cpu": 4, "tpu": 4, "accelerator_type": "TPU-V4"}
    spec = parse_spec(GOOD.replace("overrides: {steps: 20}", "overrides: {steps: 20, outer.real_batch_size: 8}")
                      + "resources: {cpu: 4, tpu: 4, accelerator_type: TPU-V4}\n")
    assert spec.ray_resources() == cluster.bundle_from_resources(block) == ray_bundle(block)
    # What the spec refuses, the cluster check refuses too (it used to ask Ray for it).
    for bad in ({"tpu": 3}, {"cpu": 0}, {"gpu": 1, "tpu": 4}):
        with pytest.raises(cluster.ClusterConfigError, match="resources"):
            cluster.bundle_from_resources(bad)


def test_asha_on_val_acc_needs_the_intermediate_estimate():
    """A scheduler selecting on val/acc during the run with eval.every_steps=0 would never
    see its metric and stop nothing: refused at load."""
    from orchestrator.spec import SpecError, load_spec

    path = ROOT / "sweeps" / "digits_asha.yaml"
    load_spec(path)  # as shipped: every_steps > 0
    with pytest.raises(SpecError) as e:
        load_spec(path, sets=["eval.every_steps=0"])
    assert any("eval.every_steps > 0" in p for p in e.value.problems), e.value.problems
