"""Read a KubeRay `RayCluster` manifest as the Ray resources its groups advertise.

KubeRay starts Ray on each pod with CPU from the container's cpu limit, GPU from
`nvidia.com/gpu`, TPU chips from `google.com/tpu`, and custom resources from
`rayStartParams.resources`. `raycluster_node_types` turns a manifest into the same shape
as a launcher config's `available_node_types`, so `orchestrator.cluster.node_types_satisfying`
answers "can a trial of this spec ever be scheduled here?" for GKE too.

Example:
    >>> manifest = {"kind": "RayCluster", "spec": {
    ...     "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": {"spec": {
    ...         "containers": [{"resources": {"limits": {"cpu": "4"}}}]}}},
    ...     "workerGroupSpecs": [{"groupName": "tpu", "maxReplicas": 2,
    ...         "rayStartParams": {"resources": '"{\\\\"accelerator_type:TPU-V4\\\\": 1}"'},
    ...         "template": {"spec": {"containers": [{"resources": {"limits": {
    ...             "cpu": "96", "google.com/tpu": "4"}}}]}}}]}}
    >>> raycluster_node_types(manifest)["available_node_types"]["tpu"]["resources"]
    {'CPU': 96, 'TPU': 4, 'accelerator_type:TPU-V4': 1}
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

HEAD = "head"


def _quantity(value: Any) -> float:
    text = str(value).strip()
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _start_param_resources(params: Mapping[str, Any]) -> dict[str, float]:
    raw = params.get("resources")
    if not raw:
        return {}
    text = str(raw).strip()
    if text.startswith('"') and text.endswith('"'):
        text = text[1:-1]
    return {str(k): v for k, v in json.loads(text.replace('\\"', '"')).items()}


def group_resources(group: Mapping[str, Any]) -> dict[str, float]:
    """Ray resources one pod of a head or worker group advertises."""
    params = group.get("rayStartParams") or {}
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    res: dict[str, float] = {}
    if "num-cpus" in params:
        res["CPU"] = int(_quantity(params["num-cpus"]))
    elif "cpu" in limits:
        res["CPU"] = int(math.floor(_quantity(limits["cpu"])))
    if "num-gpus" in params or "nvidia.com/gpu" in limits:
        res["GPU"] = int(_quantity(params.get("num-gpus", limits.get("nvidia.com/gpu"))))
    if "google.com/tpu" in limits:
        res["TPU"] = int(_quantity(limits["google.com/tpu"]))
    res.update(_start_param_resources(params))
    return {k: v for k, v in res.items() if v or k == "CPU"}


def raycluster_node_types(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A launcher-config-shaped dict (`head_node_type`, `available_node_types`) of a RayCluster."""
    spec = manifest.get("spec") or {}
    types: dict[str, Any] = {HEAD: {"resources": group_resources(spec.get("headGroupSpec") or {})}}
    for group in spec.get("workerGroupSpecs") or []:
        types[group["groupName"]] = {
            "resources": group_resources(group),
            "min_workers": int(group.get("minReplicas", 0)),
            "max_workers": int(group.get("maxReplicas", 0)) * int(group.get("numOfHosts", 1)),
        }
    return {"head_node_type": HEAD, "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
            "available_node_types": types}
