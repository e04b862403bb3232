"""Sweep specs: every shipped spec validates; malformed specs name the key and the file.

None of these tests starts Ray: the CLI tests replace `init_ray` with a tripwire.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import cli
from orchestrator import manifest as mf
from orchestrator.spec import SpecError, load_spec, parse_spec
from rcig.config import make_config

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "sweeps").glob("*.yaml"))
GOOD = """
name: t
base: {dataset: digits, ipc: 1, overrides: {steps: 5}}
search: {space: {outer.proto_lr: {grid: [0.003, 0.01]}}}
"""


def _problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="bad.yaml")
    lines = str(info.value).splitlines()
    assert all(ln.startswith("bad.yaml: ") for ln in lines), lines
    return lines


def _base(fields: str) -> str:
    """A spec whose base is the digits dataset with `fields` added."""
    return f"name: t\nbase: {{dataset: digits, {fields}}}\n"


def _space(entry: str) -> str:
    """GOOD with its one search-space entry replaced by `entry`."""
    return GOOD.replace("outer.proto_lr: {grid: [0.003, 0.01]}", entry)


# (case id, spec text, key path that must be named, words the message must contain)
MALFORMED = [
    ("typo-top-key", GOOD + "max_concurent: 2\n", "max_concurent", "did you mean 'max_concurrent'"),
    ("no-name", "base: {dataset: digits}\n", "name", "missing"),
    ("bad-name", GOOD.replace("name: t", "name: 'a b/c'"), "name", "not a valid name"),
    ("no-dataset", "name: t\nbase: {ipc: 1}\n", "base.dataset", "missing"),
    ("unknown-dataset", "name: t\nbase: {dataset: imagenet}\n", "base.dataset", "unknown dataset"),
    ("ipc-zero", _base("ipc: 0"), "base.ipc", ">= 1"),
    ("ipc-string", _base("ipc: ten"), "base.ipc", "integer"),
    ("unknown-preset", _base("preset: depth_9"), "base.preset", "unknown preset"),
    ("unknown-field", _base("overrides: {model.widht: 8}"), "base.overrides.model.widht", "unknown config key 'widht'"),
    ("wrong-type", _base("overrides: {steps: many}"), "base.overrides.steps", "expected an integer"),
    ("negative-steps", _base("overrides: {steps: -3}"), "base.overrides.steps", ">= 0"),
    ("eval-block", GOOD + "eval: {runs: 0}\n", "eval.runs", ">= 1"),
    ("eval-block-key", GOOD + "eval: {runz: 2}\n", "eval.runz", "unknown config key"),
    ("algorithm", GOOD.replace("search: {space:", "search: {algorithm: bayes, space:"), "search.algorithm",
     "unknown algorithm"),
    ("tpu-chips", GOOD + "resources: {cpu: 4, tpu: 3}\n", "resources.tpu", "one of [0, 1, 2, 4, 8]"),
    ("gpu-and-tpu", GOOD + "resources: {gpu: 1, tpu: 4}\n", "resources", "not both"),
    ("acc-type-alone", GOOD + "resources: {accelerator_type: A100}\n", "resources.accelerator_type", "needs resources.gpu"),
    ("cpu-zero", GOOD + "resources: {cpu: 0}\n", "resources.cpu", ">= 1"),
    ("resource-typo", GOOD + "resources: {gpus: 1}\n", "resources.gpus", "did you mean 'gpu'"),
    ("asha-metric", GOOD + "scheduler: {type: asha}\n", "scheduler.metric", "missing"),
    ("scheduler-type", GOOD + "scheduler: {type: hyperband, metric: outer/loss}\n", "scheduler.type", "asha"),
    ("mode", GOOD + "mode: maximize\n", "mode", "expected one of ['min', 'max']"),
    ("max-failures", GOOD + "max_failures: -1\n", "max_failures", ">= 0"),
    ("concurrency", GOOD + "max_concurrent: 0\n", "max_concurrent", ">= 1"),
    ("cost", GOOD + "cost: {per_accelerator_hour: -2}\n", "cost.per_accelerator_hour", ">= 0"),
    ("storage", GOOD + "storage: 12\n", "storage", "path or URI"),
    ("not-yaml", "name: t\nbase: {dataset: digits\n", "line", "not valid YAML"),
    ("empty", "", "empty", "name"),
    ("list", "- a\n- b\n", "top level", "mapping"),
]
# (case id, the search-space entry, key path below search.space, words)
MALFORMED += [(case, _space(entry), "search.space." + key, words) for case, entry, key, words in [
    ("dist-kind", "outer.proto_lr: {normal: [0, 1]}", "outer.proto_lr", "expected one of"),
    ("grid-empty", "outer.proto_lr: {grid: []}", "outer.proto_lr.grid", "non-empty"),
    ("grid-value", "outer.proto_lr: {grid: [0.003, fast]}", "outer.proto_lr.grid[1]", "expected a number"),
    ("uniform-order", "outer.proto_lr: {uniform: [0.1, 0.01]}", "outer.proto_lr.uniform", "lo must be < hi"),
    ("loguniform-zero", "outer.proto_lr: {loguniform: [0, 0.01]}", "outer.proto_lr.loguniform", "lo must be > 0"),
    ("uniform-int-field", "model.width: {uniform: [8, 32]}", "model.width", "use randint or grid"),
    ("randint-floats", "seed: {randint: [0, 2.5]}", "seed.randint", "integers"),
    ("search-unknown-field", "outer.proto_rate: {grid: [0.003, 0.01]}", "outer.proto_rate", "unknown config key"),
]]


@pytest.mark.parametrize("text,key,words", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_spec_names_key(text, key, words):
    lines = _problems(text)
    hits = [ln for ln in lines if re.search(rf"bad\.yaml: {re.escape(key)}\b", ln) or key in ln]
    assert hits, f"no problem names {key!r}: {lines}"
    assert any(words in ln for ln in hits), f"{words!r} not in {hits}"


def test_every_problem_is_reported_at_once():
    text = """
name: t
base: {dataset: digits, ipc: 0, overrides: {model.widht: 3}}
search: {space: {model.width: {uniform: [1, 3]}}}
resources: {tpu: 3}
eval: {runz: 1}
foo: 1
"""
    lines = _problems(text)
    for key in ("foo", "base.ipc", "base.overrides.model.widht", "search.space.model.width",
                "resources.tpu", "eval.runz"):
        assert any(f": {key}" in ln for ln in lines), (key, lines)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.yaml: file not found"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_spec_validates(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    head = path.read_text().split("\nname:")[0]
    for word in ("Command:", "Resources:", "rcig sweep launch sweeps/" + path.name):
        assert word in head, f"{path.name}: header lacks {word!r}"
    assert ("Paper:" in head) or ("Expected:" in head)
    cfg = spec.base_config()
    assert cfg.dataset == spec.dataset and cfg.ipc == spec.ipc
    assert spec.grid_size() >= 1


PAPER = {  # (dataset, ipc) -> (preset, steps), docs/algorithm.md §11.2/§11.3
    ("mnist", 1): ("depth_3_no_flip", 10000), ("mnist", 10): ("depth_3_no_flip", 10000),
    ("mnist", 50): ("depth_3_no_flip", 10000), ("fashion_mnist", 1): ("depth_3_no_flip", 10000),
    ("fashion_mnist", 10): ("depth_3_no_flip", 10000), ("fashion_mnist", 50): ("depth_3_no_flip", 10000),
    ("cifar10", 1): ("depth_3", 15000), ("cifar10", 10): ("depth_3", 10000),
    ("cifar10", 50): ("depth_3", 10000), ("cifar100", 1): ("depth_3", 10000),
    ("cifar100", 10): ("depth_3", 10000), ("cifar100", 50): ("cifar100_50", 10000),
    ("tiny_imagenet", 1): ("depth_4_200", 5000), ("tiny_imagenet", 10): ("depth_4_big", 10000),
}


def test_one_spec_per_paper_setting():
    found = {}
    for p in SPECS:
        if p.stem == "quickstart":
            continue
        cfg = load_spec(p).base_config()
        if cfg.dataset == "digits":  # the laptop specs (one per search algorithm), not the paper's
            continue
        found[(cfg.dataset, cfg.ipc)] = (cfg.preset, cfg.steps)
    assert found == PAPER


def test_quickstart_is_laptop_sized():
    spec = load_spec(ROOT / "sweeps/quickstart.yaml")
    assert spec.dataset == "digits" and spec.resources.as_dict() == {"cpu": 1, "gpu": 0, "tpu": 0, "accelerator_type": None, "custom": {}, "hosts": 1}
    assert 2 <= spec.grid_size() <= 6 and spec.max_concurrent <= 2


def test_set_overrides_config_and_spec_and_pins_search():
    spec = parse_spec(GOOD, sets=["steps=7", "max_concurrent=1", "outer.proto_lr=0.005",
                                  "resources.cpu=2", "search.space.model.width={grid: [8, 16]}"])
    assert spec.base_overrides["steps"] == 7 and spec.max_concurrent == 1
    assert spec.base_overrides["outer.proto_lr"] == 0.005 and "outer.proto_lr" not in spec.space
    assert spec.space["model.width"] == {"grid": [8, 16]} and spec.resources["cpu"] == 2
    assert spec.trial_config({"model.width": 8}).steps == 7
    with pytest.raises(SpecError, match="--set steps: expected key=value"):
        parse_spec(GOOD, sets=["steps"])
    with pytest.raises(SpecError, match="base.overrides.steps: expected an integer"):
        parse_spec(GOOD, sets=["steps=lots"])


def test_ray_resources_bundle():
    spec = parse_spec(GOOD + "resources: {cpu: 4, tpu: 4, accelerator_type: TPU-V4}\n")
    assert spec.ray_resources() == {"CPU": 4.0, "TPU": 4.0, "accelerator_type:TPU-V4": 0.001}
    assert spec.accelerators_per_trial() == (4, "tpu")


def test_trial_key_is_stable_and_distinct():
    a = make_config("digits", 1, overrides={"outer.proto_lr": 0.003})
    k1 = mf.trial_key({"outer.proto_lr": 0.003}, a)
    assert k1 == mf.trial_key({"outer.proto_lr": 0.003}, make_config("digits", 1, overrides={"outer.proto_lr": 0.003}))
    assert k1.startswith("proto_lr=0.003_") and re.fullmatch(r"[A-Za-z0-9._=,+-]+", k1)
    assert k1 != mf.trial_key({"outer.proto_lr": 0.003}, make_config("digits", 1, seed=1, overrides={"outer.proto_lr": 0.003}))
    assert k1 != mf.trial_key({"outer.proto_lr": 0.003}, make_config("digits", 1, overrides={"outer.proto_lr": 0.003, "steps": 9}))


@pytest.fixture
def no_ray(monkeypatch):
    import orchestrator.sweep as sw

    def tripwire(*a, **k):
        raise AssertionError("Ray must not start for a bad spec")

    monkeypatch.setattr(sw, "init_ray", tripwire)


@pytest.mark.parametrize("case", ["typo-top-key", "unknown-field", "tpu-chips", "not-yaml"])
def test_cli_launch_bad_spec_exits_nonzero_without_ray(tmp_path, no_ray, case):
    text, key = next((m[1], m[2]) for m in MALFORMED if m[0] == case)
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    res = CliRunner().invoke(cli.app, ["sweep", "launch", str(p), "--storage", str(tmp_path / "s")])
    assert res.exit_code == 2, res.output
    assert str(p) in res.output and key in res.output and "Traceback" not in res.output
    assert not (tmp_path / "s").exists()  # nothing written


def test_cli_launch_bad_set_without_ray(tmp_path, no_ray):
    res = CliRunner().invoke(cli.app, ["sweep", "launch", str(ROOT / "sweeps/quickstart.yaml"),
                                       "--set", "model.widht=8", "--storage", str(tmp_path)])
    assert res.exit_code == 2 and "base.overrides.model.widht" in res.output


def test_cli_unknown_sweep_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RCIG_SWEEP_ROOT", str(tmp_path))
    for argv in (["sweep", "status", "nosuch"], ["best", "nosuch"], ["fetch", "nosuch", "--to", str(tmp_path / "o")],
                 ["sweep", "resume", "nosuch"]):
        res = CliRunner().invoke(cli.app, argv)
        assert res.exit_code == 2, (argv, res.output)
        assert "no sweep named 'nosuch'" in res.output and "Traceback" not in res.output


def test_spec_yaml_roundtrip_from_manifest():
    from orchestrator.spec import spec_from_raw

    spec = load_spec(ROOT / "sweeps/quickstart.yaml", sets=["steps=3"])
    again = spec_from_raw(yaml.safe_load(yaml.safe_dump(spec.raw)))
    assert again.base_overrides == spec.base_overrides and again.space == spec.space


def test_spec_is_nested_frozen_dataclasses_with_config_coercion():
    import dataclasses

    from orchestrator.search import AshaOptions
    from orchestrator.spec import BaseSpec, Cost, Resources

    spec = parse_spec(GOOD + "resources: {cpu: 2}\ncost: {per_accelerator_hour: 1.5}\n"
                      "scheduler: {type: asha, metric: outer/loss, grace_period: 2}\n")
    assert isinstance(spec.base, BaseSpec) and spec.base.dataset == spec.dataset == "digits"
    assert isinstance(spec.resources, Resources) and spec.resources.cpu == spec.resources["cpu"] == 2
    assert isinstance(spec.cost, Cost) and spec.cost["per_accelerator_hour"] == 1.5 and spec.cost.currency == "USD"
    assert isinstance(spec.scheduler, AshaOptions) and spec.scheduler.reduction_factor == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.resources.cpu = 3
    # rcig.config's coercion, as for DistillConfig overrides: "3" is 3, a bool is no integer
    assert parse_spec(GOOD + "max_concurrent: '3'\n").max_concurrent == 3
    assert any("num_samples: expected an integer" in ln for ln in _problems(GOOD + "num_samples: true\n"))
    # a search key that names no config field is one problem, not one per value
    lines = _problems(GOOD.replace("outer.proto_lr", "outer.proto_rate"))
    assert len([ln for ln in lines if "proto_rate" in ln]) == 1, lines


def test_custom_resources_reach_the_bundle_and_bad_ones_are_refused():
    spec = load_spec(ROOT / "sweeps/quickstart.yaml", sets=["resources.custom={TPU-v4-8-head: 1, spot: 0.5}"])
    assert spec.ray_resources() == {"CPU": 1.0, "TPU-v4-8-head": 1.0, "spot": 0.5}
    with pytest.raises(SpecError) as e:
        load_spec(ROOT / "sweeps/quickstart.yaml", sets=["resources.custom={GPU: 1, x: 0, y: yes}"])
    assert len(e.value.problems) == 3
    assert any("resources.custom.GPU" in p for p in e.value.problems)
