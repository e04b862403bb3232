"""Offline checks of a Ray cluster-launcher config, beyond Ray's own schema.

Ray's validator (`ray.autoscaler._private.util.validate_config`) checks the shape of the
file; it cannot know that a node type declaring `{"TPU": 4}` really boots a 4-chip host,
that a GPU VM needs `onHostMaintenance: TERMINATE`, or that a node type with its own
`worker_setup_commands` silently drops the global `setup_commands`. These checks read the
config only: no cloud API is called.

Each check returns a list of one-line problems (`"<file>: <key path>: <what is wrong>"`);
an empty list means the config passed.

Example:
    >>> cfg = {"available_node_types": {"w": {"resources": {"TPU": 8},
    ...        "node_config": {"acceleratorType": "v4-8"}}}, "head_node_type": "h"}
    >>> print(gcp_node_type_problems(cfg, "tpu.yaml")[0])
    tpu.yaml: available_node_types.w.resources.TPU: declares 8 TPU chips but acceleratorType v4-8 has 4 chips per host
"""

from __future__ import annotations

import re
from typing import Any, Iterator

PLACEHOLDER = "YOUR_PROJECT_ID"

# Machine types with built-in GPUs end in "-<count>g" (a2-highgpu-1g, a3-highgpu-8g,
# a2-ultragpu-4g, g2-standard-* is the exception and carries its count in the table).
_BUILTIN_GPU_RE = re.compile(r"^(a2|a3|a4)-[a-z]+-(\d+)g$")


def placeholder_problems(config: Any, source: str) -> list[str]:
    """Name every value that still contains the `YOUR_PROJECT_ID` placeholder.

    Example:
        >>> print(placeholder_problems({"provider": {"project_id": "YOUR_PROJECT_ID"}}, "c.yaml")[0])
        c.yaml: provider.project_id: still the placeholder 'YOUR_PROJECT_ID'; run: sed -i "s/YOUR_PROJECT_ID/$PROJECT_ID/g" c.yaml
    """
    found = [path for path, value in _walk(config) if isinstance(value, str) and PLACEHOLDER in value]
    if not found:
        return []
    return [
        f"{source}: {found[0]}: still the placeholder '{PLACEHOLDER}'; "
        f'run: sed -i "s/{PLACEHOLDER}/$PROJECT_ID/g" {source}'
    ]


def setup_command_problems(config: dict, source: str) -> list[str]:
    """Node types with their own `worker_setup_commands` must repeat the global ones.

    Ray replaces (does not extend) `setup_commands + worker_setup_commands` with a node
    type's own list, so a type that forgets the common steps boots without them.
    """
    common = list(config.get("setup_commands") or [])
    problems = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        own = node_type.get("worker_setup_commands")
        if own is None or name == config.get("head_node_type"):
            continue
        if list(own[: len(common)]) != common:
            problems.append(
                f"{source}: available_node_types.{name}.worker_setup_commands: replaces the "
                f"global setup_commands (Ray does not merge them) but does not start with them"
            )
    return problems


def gcp_node_type_problems(config: dict, source: str) -> list[str]:
    """Check that each GCP node type's declared Ray resources match its hardware.

    - the head is a Compute Engine VM (a TPU VM cannot be the head);
    - `TPU` equals the chips per host of `acceleratorType`, and `accelerator_type:TPU-X`
      names that generation;
    - `GPU` equals the GPUs of the machine (`guestAccelerators` or an A2/A3 type), and
      a GPU VM sets `onHostMaintenance: TERMINATE`.
    """
    problems: list[str] = []
    head = config.get("head_node_type")
    for name, node_type in (config.get("available_node_types") or {}).items():
        where = f"{source}: available_node_types.{name}"
        res = node_type.get("resources") or {}
        node = node_type.get("node_config") or {}
        is_tpu = "machineType" not in node and ("acceleratorType" in node or "acceleratorConfig" in node)
        if name == head and is_tpu:
            problems.append(f"{where}.node_config: the head node cannot be a TPU VM; use a machineType")
            continue
        if "machineType" not in node and not is_tpu:
            problems.append(
                f"{where}.node_config: needs machineType (Compute Engine VM) or "
                f"acceleratorType/acceleratorConfig (TPU VM)"
            )
            continue
        if is_tpu:
            problems += _tpu_problems(where, res, node)
        else:
            if res.get("TPU"):
                problems.append(f"{where}.resources.TPU: declared on a Compute Engine VM (no TPU)")
            problems += _gpu_problems(where, res, node)
    return problems


def _tpu_problems(where: str, res: dict, node: dict) -> list[str]:
    from ray._private.accelerators import tpu

    if "acceleratorType" in node and "acceleratorConfig" in node:
        return [f"{where}.node_config: set acceleratorType or acceleratorConfig, not both"]
    if "acceleratorType" in node:
        acc = str(node["acceleratorType"])
        if not tpu.TPUAcceleratorManager.is_valid_tpu_accelerator_type(acc):
            return [f"{where}.node_config.acceleratorType: '{acc}' is not v<generation>-<size>"]
    else:
        conf = node["acceleratorConfig"] or {}
        if not re.fullmatch(r"\d+x\d+(x\d+)?", str(conf.get("topology", ""))):
            return [f"{where}.node_config.acceleratorConfig: needs type and topology like 2x2x1"]
        gen = str(conf.get("type", "")).lower().replace("v5lite_pod", "v5litepod")
        chips = tpu.get_num_chips_from_topology(conf["topology"])
        try:
            acc = f"{gen}-{chips * tpu.get_tpu_cores_per_chip(gen)}"
        except ValueError:
            return [f"{where}.node_config.acceleratorConfig.type: unknown TPU type '{conf.get('type')}'"]
    problems = []
    chips_per_host = tpu.get_num_tpu_visible_chips_per_host(acc)
    if res.get("TPU") != chips_per_host:
        problems.append(
            f"{where}.resources.TPU: declares {res.get('TPU')} TPU chips but acceleratorType "
            f"{acc} has {chips_per_host} chips per host"
        )
    generation = acc.split("-")[0].upper()
    for key in res:
        if key.startswith("accelerator_type:") and key != f"accelerator_type:TPU-{generation}":
            problems.append(
                f"{where}.resources: '{key}' does not match acceleratorType {acc} "
                f"(Ray calls it accelerator_type:TPU-{generation})"
            )
    return problems


def _gpu_problems(where: str, res: dict, node: dict) -> list[str]:
    machine = str(node.get("machineType", "")).rsplit("/", 1)[-1]
    attached = sum(int(a.get("acceleratorCount", 0)) for a in node.get("guestAccelerators") or [])
    match = _BUILTIN_GPU_RE.match(machine)
    gpus = attached + (int(match.group(2)) if match else 0)
    declared = res.get("GPU", 0)
    problems = []
    if declared != gpus and (declared or gpus):
        problems.append(
            f"{where}.resources.GPU: declares {declared} GPUs but machineType {machine} "
            f"with guestAccelerators has {gpus}"
        )
    if gpus and _on_host_maintenance(node.get("scheduling")) != "TERMINATE":
        problems.append(
            f"{where}.node_config.scheduling: GPU VMs need onHostMaintenance: TERMINATE"
        )
    return problems


def _on_host_maintenance(scheduling: Any) -> str | None:
    # Ray's examples write `scheduling` as a list of one-key dicts; the API uses a dict.
    items = scheduling if isinstance(scheduling, list) else [scheduling or {}]
    for item in items:
        if isinstance(item, dict) and "onHostMaintenance" in item:
            return str(item["onHostMaintenance"])
    return None


def _walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, value
