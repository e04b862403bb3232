"""Ray cluster-launcher configs: validate them offline, then hand them to `ray up/down`.

`rcig cluster up|down|status CONFIG` are thin wrappers over Ray's cluster launcher. Before
any of them runs a `ray` command, the config is checked here, without touching a cloud:

1. Ray's own schema and semantic checks (`prepare_config` + `validate_config` from
   `ray.autoscaler._private.util`, the same ones `ray up` runs first);
2. our checks (`orchestrator.cluster_checks`): declared resources match the hardware,
   node-type setup commands, placeholders left in the file;
3. every sweep spec that should run on this cluster can be scheduled on some node type
   (`node_types_satisfying`), so no trial waits PENDING forever.

A failure raises `ClusterConfigError` with one line naming the file and the key.

Example:
    >>> cfg = load_cluster_config("infra/gcp-tpu.yaml")
    >>> node_types_satisfying(cfg, {"TPU": 4, "accelerator_type:TPU-V4": 0.001})
    ['tpu_v4_8', 'tpu_v4_16']
"""

from __future__ import annotations

import importlib.util
import logging
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from orchestrator.cluster_checks import (
    gcp_node_type_problems,
    placeholder_problems,
    setup_command_problems,
)
from orchestrator.devices import ray_bundle

REPO_ROOT = Path(__file__).resolve().parents[1]


class ClusterConfigError(ValueError):
    """A cluster config (or a spec checked against it) is unusable; one line, names file and key."""


@dataclass
class ClusterCheck:
    """Outcome of `check_cluster`: the raw config, Ray's prepared config, and notes."""

    path: Path
    config: dict
    prepared: dict
    notes: list[str] = field(default_factory=list)


# ---- loading and Ray's validator ----------------------------------------------------


def load_cluster_config(path: str | Path) -> dict:
    """Read a cluster-launcher YAML file into a dict.

    Example:
        >>> load_cluster_config("infra/gcp-gpu.yaml")["provider"]["type"]
        'gcp'
    """
    p = Path(path)
    if not p.is_file():
        raise ClusterConfigError(f"{p}: no such cluster config file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ClusterConfigError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ClusterConfigError(f"{p}: a cluster config must be a YAML mapping")
    return data


def ray_validate(config: Mapping[str, Any], source: str = "<config>") -> dict:
    """Run Ray's own config preparation and validator; return the prepared config.

    This is what `ray up` does before it contacts the cloud: merge the provider's
    defaults, then check the result against `ray/autoscaler/ray-schema.json`.

    Example:
        >>> try:
        ...     ray_validate({"cluster_name": "x", "provider": {"type": "gcp"}, "bad": 1}, "c.yaml")
        ... except ClusterConfigError as exc:
        ...     print(exc)
        c.yaml: (top level): Additional properties are not allowed ('bad' was unexpected)
    """
    import copy

    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    if "provider" not in config or not isinstance(config.get("provider"), dict):
        raise ClusterConfigError(f"{source}: provider: missing (Ray needs provider.type)")
    quiet = logging.getLogger("ray.autoscaler._private.util")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # prepare_config logs each max_workers default at INFO
    try:
        # The file as written first (errors name the user's key, not a merged default),
        # against the schema Ray ships; then Ray's full preparation and validator.
        jsonschema.validate(dict(config), _ray_schema())
        prepared = prepare_config(copy.deepcopy(dict(config)))
        validate_config(prepared)
    except jsonschema.ValidationError as exc:
        key = ".".join(str(k) for k in exc.absolute_path) or "(top level)"
        raise ClusterConfigError(f"{source}: {key}: {exc.message}") from None
    except (ValueError, KeyError, AssertionError, RuntimeError, FileNotFoundError) as exc:
        raise ClusterConfigError(f"{source}: {exc}") from None
    finally:
        quiet.setLevel(level)
    return prepared


def _ray_schema() -> dict:
    """The cluster-config JSON schema Ray ships (`ray/autoscaler/ray-schema.json`)."""
    import json

    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# ---- resources: trial bundles vs node types -----------------------------------------


def bundle_from_resources(resources: Mapping[str, Any] | None) -> dict[str, float]:
    """Map a spec's per-trial `resources:` block to the Ray resource bundle a trial asks:
    the block is checked as the spec loader checks it (`orchestrator.spec.Resources`),
    then `orchestrator.devices.ray_bundle` names it for Ray.

    Example:
        >>> bundle_from_resources({"cpu": 8, "tpu": 4, "accelerator_type": "TPU-V4"})
        {'CPU': 8.0, 'TPU': 4.0, 'accelerator_type:TPU-V4': 0.001}
        >>> bundle_from_resources({"cpu": 2})
        {'CPU': 2.0}
    """
    from orchestrator.spec import Resources, from_mapping

    problems: list[str] = []
    res = from_mapping(Resources, resources, "resources", problems)
    if res is None:
        raise ClusterConfigError("; ".join(problems))
    return ray_bundle(res)


def launchable_node_types(cluster_config: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Node types the autoscaler may start (or the head), with their declared resources.

    A worker type with `max_workers: 0` is declared but never launched, so it is left out.
    """
    head = cluster_config.get("head_node_type")
    default_max = cluster_config.get("max_workers", 2)
    out = {}
    for name, node_type in (cluster_config.get("available_node_types") or {}).items():
        if name != head and node_type.get("max_workers", default_max) <= 0:
            continue
        out[name] = dict(node_type.get("resources") or {})
    return out


def node_types_satisfying(cluster_config: Mapping[str, Any], bundle: Mapping[str, float]) -> list[str]:
    """Names of the launchable node types whose resources cover one trial's bundle.

    Reusable by the sweep preflight: an empty list means the trial would stay PENDING.

    Example:
        >>> cfg = {"head_node_type": "h", "max_workers": 2, "available_node_types": {
        ...     "h": {"resources": {"CPU": 0}},
        ...     "g": {"resources": {"CPU": 12, "GPU": 1, "accelerator_type:A100": 1}}}}
        >>> node_types_satisfying(cfg, {"CPU": 4, "GPU": 1, "accelerator_type:A100": 0.001})
        ['g']
        >>> node_types_satisfying(cfg, {"GPU": 2})
        []
    """
    return [
        name
        for name, res in launchable_node_types(cluster_config).items()
        if all(float(res.get(k, 0)) >= float(v) for k, v in bundle.items() if v)
    ]


def cluster_accelerators(cluster_config: Mapping[str, Any]) -> set[str]:
    """Accelerator families ("TPU", "GPU") any node type of the cluster declares."""
    kinds = set()
    for node_type in (cluster_config.get("available_node_types") or {}).values():
        res = node_type.get("resources") or {}
        kinds |= {k for k in ("TPU", "GPU") if res.get(k)}
    return kinds


# ---- sweep specs ---------------------------------------------------------------------


def shipped_specs(root: str | Path = REPO_ROOT) -> list[Path]:
    """The sweep specs shipped in `<root>/sweeps/*.yaml` (sorted)."""
    return sorted((Path(root) / "sweeps").glob("*.yaml"))


def spec_bundle(spec_path: str | Path) -> dict[str, float]:
    """Read a sweep spec's `resources:` block (plain YAML: the rest of the spec is not
    needed here) and return its per-trial Ray bundle; a spec without one asks for one CPU.
    The block is checked by the spec loader's own rules (`bundle_from_resources`)."""
    p = Path(spec_path)
    try:
        spec = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ClusterConfigError(f"{p}: cannot read sweep spec: {exc}") from None
    res = spec.get("resources") if isinstance(spec, dict) else None
    try:
        return bundle_from_resources(res)
    except ClusterConfigError as exc:
        raise ClusterConfigError(f"{p}: {exc}") from None


def spec_runs_on(bundle: Mapping[str, float], cluster_config: Mapping[str, Any]) -> bool:
    """Whether a spec belongs on this cluster: TPU specs on TPU clusters, GPU specs on
    GPU clusters, CPU-only specs on every cluster."""
    kinds = cluster_accelerators(cluster_config)
    needs = {k for k in ("TPU", "GPU") if bundle.get(k)}
    return not needs or needs <= kinds


def spec_fit_problems(
    cluster_config: Mapping[str, Any],
    spec_paths: Iterable[str | Path],
    source: str = "<config>",
    *,
    only_relevant: bool = True,
) -> list[str]:
    """One line per spec whose trials no launchable node type of the cluster can hold.

    With `only_relevant`, specs for another accelerator family are skipped (a GPU spec is
    not expected to fit the TPU cluster).
    """
    problems = []
    for spec in spec_paths:
        bundle = spec_bundle(spec)
        if only_relevant and not spec_runs_on(bundle, cluster_config):
            continue
        if not node_types_satisfying(cluster_config, bundle):
            problems.append(
                f"{source}: available_node_types: no launchable node type offers {bundle} "
                f"that {spec} asks per trial"
            )
    return problems


# ---- the whole check and the ray commands -------------------------------------------


def check_cluster(
    path: str | Path,
    spec_paths: Iterable[str | Path] | None = None,
    *,
    require_ready: bool = True,
) -> ClusterCheck:
    """Validate a launcher config fully; raise `ClusterConfigError` on the first problem.

    `spec_paths=None` checks the shipped `sweeps/*.yaml` meant for this kind of cluster;
    explicit specs must all fit. `require_ready=False` skips the placeholder check (for
    validating the shipped templates).

    Example:
        >>> check_cluster("infra/gcp-gpu.yaml", require_ready=False).config["cluster_name"]
        'rcig-gpu'
    """
    p = Path(path)
    source = str(path)
    config = load_cluster_config(p)
    prepared = ray_validate(config, source)
    problems = []
    if require_ready:
        problems += placeholder_problems(config, source)
    problems += setup_command_problems(config, source)
    if config["provider"].get("type") == "gcp":
        problems += gcp_node_type_problems(config, source)
    if spec_paths is None:
        problems += spec_fit_problems(prepared, shipped_specs(), source, only_relevant=True)
    else:
        problems += spec_fit_problems(prepared, spec_paths, source, only_relevant=False)
    if problems:
        raise ClusterConfigError(problems[0])
    return ClusterCheck(path=p, config=config, prepared=prepared)


def ray_command(action: str, path: str | Path, *, yes: bool = False) -> list[str]:
    """The `ray` command line for `up`, `down` or `status` of a cluster config.

    Example:
        >>> ray_command("up", "infra/gcp-tpu.yaml", yes=True)[1:]
        ['up', 'infra/gcp-tpu.yaml', '--yes']
        >>> ray_command("status", "infra/gcp-tpu.yaml")[1:]
        ['exec', 'infra/gcp-tpu.yaml', 'ray status']
    """
    ray = shutil.which("ray") or "ray"
    if action == "up":
        return [ray, "up", str(path)] + (["--yes"] if yes else [])
    if action == "down":
        return [ray, "down", str(path)] + (["--yes"] if yes else [])
    if action == "status":
        return [ray, "exec", str(path), "ray status"]
    raise ValueError(f"unknown cluster action {action!r}")


CLIENT_ADDRESS = "ray://127.0.0.1:10001"  # the head's Ray Client port, through `ray attach -p 10001`


def sweep_root(config: Mapping[str, Any]) -> str:
    """The bucket folder a launcher config wires in for sweeps (`RCIG_SWEEP_ROOT`, set on
    the head by `head_setup_commands`), else a `gs://BUCKET/sweeps` placeholder.

    Example:
        >>> sweep_root({"head_setup_commands": ["sed -i '1i export RCIG_SWEEP_ROOT=gs://p-sweeps/sweeps' ~/.bashrc"]})
        'gs://p-sweeps/sweeps'
        >>> sweep_root({})
        'gs://BUCKET/sweeps'
    """
    import re

    for cmd in config.get("head_setup_commands") or []:
        m = re.search(r"RCIG_SWEEP_ROOT=(gs://[^\s'\"]+)", str(cmd))
        if m:
            return m.group(1)
    return "gs://BUCKET/sweeps"


def next_steps(path: str | Path, config: Mapping[str, Any]) -> str:
    """What to run after `ray up` succeeded (printed by `rcig cluster up`): the address to
    launch against and the exact launch line, with the config's bucket."""
    spec = "sweeps/<spec>.yaml"
    try:
        fits = [
            s for s in shipped_specs()
            if spec_runs_on(spec_bundle(s), config) and node_types_satisfying(config, spec_bundle(s))
        ]
        accel = [s for s in fits if set(spec_bundle(s)) & cluster_accelerators(config)]
        if accel or fits:
            pick = (accel or fits)[0]
            spec = str(pick.relative_to(REPO_ROOT)) if pick.is_relative_to(REPO_ROOT) else str(pick)
    except ClusterConfigError:
        pass
    root = sweep_root(config)
    return "\n".join(
        [
            f"Ray address: {CLIENT_ADDRESS} (the head's Ray Client port, through the SSH tunnel below)",
            f"Sweep storage: {root}",
            "Next steps:",
            f"  ray attach {path} -p 10001        # keep open: tunnels the Ray Client port over SSH",
            f"  rcig sweep launch {spec} --address {CLIENT_ADDRESS} --storage {root}",
            "  rcig sweep status NAME_OR_URI  |  rcig best NAME_OR_URI  |  rcig fetch NAME_OR_URI --to DIR",
            f"  ray dashboard {path}             # Ray dashboard on http://127.0.0.1:8265",
            f"  rcig cluster down {path}         # when done (spot workers also scale to zero when idle)",
        ]
    )


def run_cluster_action(
    action: str,
    path: str | Path,
    *,
    yes: bool = False,
    dry_run: bool = False,
    spec_paths: Iterable[str | Path] | None = None,
    echo: Callable[[str], None] = print,
) -> int:
    """Check the config, then run (or with `dry_run`, only print) the `ray` command.

    `up` and `status` run every check; `down` runs Ray's validator and the placeholder
    check only, so a cluster can always be torn down. Returns the ray command's exit code (0 for a dry run).
    Raises `ClusterConfigError` before any command runs if a check fails.
    """
    if action == "down":
        config = load_cluster_config(path)
        prepared = ray_validate(config, str(path))
        problems = placeholder_problems(config, str(path))
        if problems:
            raise ClusterConfigError(problems[0])
        check = ClusterCheck(path=Path(path), config=config, prepared=prepared)
    else:
        check = check_cluster(path, spec_paths)
    cmd = ray_command(action, path, yes=yes)
    if dry_run:
        echo(f"config ok: {path}")
        echo("would run: " + shlex.join(cmd))
        return 0
    if check.config["provider"].get("type") == "gcp" and importlib.util.find_spec("googleapiclient") is None:
        raise ClusterConfigError(
            f"{path}: provider.type gcp: `ray {action}` needs the Google API client in this "
            f"Python environment: pip install google-api-python-client"
        )
    if shutil.which("ray") is None:
        raise ClusterConfigError("the `ray` command is not on PATH: pip install 'ray[default]'")
    code = subprocess.run(cmd, check=False).returncode
    if code == 0 and action == "up":
        echo(next_steps(path, check.prepared))
    return code
