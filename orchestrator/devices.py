"""Make a trial's process see the devices Ray gave it, on TPU, GPU and CPU nodes.

Call `configure_trial_devices(resources)` first thing in a trial, before JAX creates its
backends (XLA and libtpu read these variables when the first device is touched;
`JAX_PLATFORMS` is read when jax is imported, and is also applied through
`jax.config` if jax is already imported but has no backend yet).

What each kind of node needs:

- TPU host: Ray sets `TPU_VISIBLE_CHIPS` (and the chip bounds) for a trial that holds
  part of the host, and clears it for a trial that holds every chip, so the trial's mesh
  is exactly "all local devices". Only one process may own a chip; a process that died
  without cleanup leaves `/tmp/libtpu_lockfile`, which makes the next trial's libtpu
  refuse to start. It is removed when no live process holds it open.
- GPU node: Ray sets `CUDA_VISIBLE_DEVICES` to the GPUs it assigned. XLA would grab 75 %
  of each visible GPU at start; preallocation is turned off and a memory fraction is
  set, so trials sharing a node (or a GPU) leave memory for each other.
- CPU only: XLA shows one CPU device unless told otherwise; the trial's CPU count becomes
  `--xla_force_host_platform_device_count`, so the data-parallel mesh has one shard per
  CPU Ray gave the trial.

Example:
    >>> trial_device_env({"cpu": 4}, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, MutableMapping

LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"
GPU_MEMORY_FRACTION = 0.9  # of the trial's share of a GPU; the rest is for cuDNN/NCCL workspaces
_FORCE_DEVICES = re.compile(r"\s*--xla_force_host_platform_device_count=\S*")


ACCELERATOR_TYPE_DEMAND = 0.001  # what a trial asks of `accelerator_type:<X>` (Ray's convention)


def _amount(resources: Any, name: str) -> float:
    # Accept the spec's block (typed, or a mapping with cpu/gpu/tpu) and Ray's bundle keys.
    if not isinstance(resources, Mapping):
        return float(getattr(resources, name.lower(), 0) or 0)
    value = resources.get(name.lower(), resources.get(name.upper(), 0))
    return float(value or 0)


def ray_bundle(resources: Any) -> dict[str, float]:
    """The Ray resource bundle one trial asks for: the only place a spec's `resources`
    block (cpu, gpu, tpu, accelerator_type) becomes Ray's names.

    Example:
        >>> ray_bundle({"cpu": 8, "tpu": 4, "accelerator_type": "TPU-V4"})
        {'CPU': 8.0, 'TPU': 4.0, 'accelerator_type:TPU-V4': 0.001}
        >>> ray_bundle({"cpu": 2})
        {'CPU': 2.0}
        >>> ray_bundle({"cpu": 1, "custom": {"TPU-v4-8-head": 1}})
        {'CPU': 1.0, 'TPU-v4-8-head': 1.0}
    """
    bundle = {ray_key: _amount(resources, ray_key) for ray_key in ("CPU", "GPU", "TPU")}
    bundle = {k: v for k, v in bundle.items() if v}
    acc = (resources.get("accelerator_type") if isinstance(resources, Mapping)
           else getattr(resources, "accelerator_type", None))
    if acc:
        bundle[f"accelerator_type:{acc}"] = ACCELERATOR_TYPE_DEMAND
    custom = (resources.get("custom") if isinstance(resources, Mapping)
              else getattr(resources, "custom", None)) or {}
    bundle.update({str(k): float(v) for k, v in custom.items()})
    return bundle


def trial_devices(resources: Any) -> tuple[int, str]:
    """(devices, unit) a trial's JAX mesh has: its TPU chips, else its GPUs, else one CPU
    device per CPU (see `trial_device_env`). Also the accelerator count it is billed for.

    Example:
        >>> trial_devices({"cpu": 8, "tpu": 4}), trial_devices({"cpu": 3})
        ((4, 'tpu'), (3, 'cpu'))
    """
    for unit in ("tpu", "gpu"):
        if _amount(resources, unit) > 0:
            return max(1, int(_amount(resources, unit))), unit
    return max(1, int(_amount(resources, "cpu") or 1)), "cpu"


def trial_device_env(resources: Any, environ: Mapping[str, str]) -> dict[str, str]:
    """Environment variables a trial with these resources should set (pure function).

    `resources` is the spec's per-trial block (`cpu`, `gpu`, `tpu`, `accelerator_type`;
    the typed `orchestrator.spec.Resources` or a mapping) or a Ray bundle (`CPU`, `GPU`, `TPU`). `environ` is the current environment; values
    the user already set for the GPU memory variables are kept. Variables Ray manages
    (`TPU_VISIBLE_CHIPS`, `CUDA_VISIBLE_DEVICES`) are never changed here.

    Example:
        >>> trial_device_env({"gpu": 1}, {})
        {'JAX_PLATFORMS': 'cuda,cpu', 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false', 'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.90'}
        >>> trial_device_env({"tpu": 4, "cpu": 8}, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
        {'JAX_PLATFORMS': 'tpu,cpu', 'XLA_FLAGS': ''}
    """
    tpu, gpu = _amount(resources, "tpu"), _amount(resources, "gpu")
    flags = environ.get("XLA_FLAGS", "")
    stripped = _FORCE_DEVICES.sub("", flags).strip()
    env: dict[str, str] = {}
    if tpu > 0:
        env["JAX_PLATFORMS"] = "tpu,cpu"
    elif gpu > 0:
        env["JAX_PLATFORMS"] = "cuda,cpu"
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        share = min(gpu, 1.0)  # a fractional GPU shares the device with other trials
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = environ.get(
            "XLA_PYTHON_CLIENT_MEM_FRACTION", f"{GPU_MEMORY_FRACTION * share:.2f}"
        )
    else:
        env["JAX_PLATFORMS"] = "cpu"
        count, _ = trial_devices(resources)
        stripped = f"{stripped} --xla_force_host_platform_device_count={count}".strip()
    if stripped != flags:
        env["XLA_FLAGS"] = stripped
    return env


def lockfile_holders(path: str | Path = LIBTPU_LOCKFILE, proc: str | Path = "/proc") -> list[int]:
    """PIDs of live processes (visible to this user) that have `path` open.

    Example:
        >>> lockfile_holders("/nonexistent/lockfile")
        []
    """
    target = os.path.realpath(path)
    holders = []
    for pid_dir in Path(proc).glob("[0-9]*"):
        try:
            for fd in (pid_dir / "fd").iterdir():
                if os.readlink(fd) == target:
                    holders.append(int(pid_dir.name))
                    break
        except OSError:  # process gone, or another user's: not ours to judge
            continue
    return holders


def clean_stale_libtpu_lockfile(path: str | Path = LIBTPU_LOCKFILE) -> bool:
    """Remove libtpu's lockfile if no live process holds it; True if it was removed.

    A lockfile held open by a running process (another trial on the same host) is left
    alone.

    Example:
        >>> clean_stale_libtpu_lockfile("/nonexistent/libtpu_lockfile")
        False
    """
    p = Path(path)
    if not p.exists() or lockfile_holders(p):
        return False
    try:
        p.unlink()
    except FileNotFoundError:
        return False
    return True


def configure_trial_devices(
    resources: Any,
    environ: MutableMapping[str, str] | None = None,
    *,
    lockfile: str | Path = LIBTPU_LOCKFILE,
) -> dict[str, str]:
    """Set up this process's environment for a trial's devices; return what was set.

    `environ` defaults to `os.environ`. On a TPU trial, a stale libtpu lockfile is
    removed first. If jax is already imported (without a backend yet), its
    `jax_platforms` setting is updated too.

    Example:
        >>> env = {}
        >>> configure_trial_devices({"cpu": 2}, env)
        {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
        >>> env["XLA_FLAGS"]
        '--xla_force_host_platform_device_count=2'
    """
    target = os.environ if environ is None else environ
    changes = trial_device_env(resources, target)
    if _amount(resources, "tpu") > 0:
        clean_stale_libtpu_lockfile(lockfile)
    target.update(changes)
    if environ is None and "jax" in sys.modules:
        _apply_to_imported_jax(changes["JAX_PLATFORMS"])
    return changes


def _apply_to_imported_jax(platforms: str) -> None:
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if jax.default_backend() not in platforms.split(","):
            raise RuntimeError(
                f"jax already initialized its '{jax.default_backend()}' backend in this process; "
                f"call configure_trial_devices before the first jax computation"
            )
        wanted = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
        if platforms == "cpu" and wanted and int(wanted.group(1)) != jax.local_device_count():
            warnings.warn(
                f"jax was initialized with {jax.local_device_count()} CPU devices before "
                f"configure_trial_devices asked for {wanted.group(1)}; keeping {jax.local_device_count()}",
                stacklevel=3,
            )
        return
    jax.config.update("jax_platforms", platforms)


def describe_local_devices() -> dict[str, Any]:
    """What JAX sees in this process: backend, device kinds and counts, relevant env.

    Example:
        >>> d = describe_local_devices()  # doctest: +SKIP
        >>> d["backend"], d["local_device_count"]  # doctest: +SKIP
        ('tpu', 4)
    """
    import jax

    devices = jax.local_devices()
    env_keys = (
        "JAX_PLATFORMS",
        "XLA_FLAGS",
        "TPU_VISIBLE_CHIPS",
        "TPU_CHIPS_PER_HOST_BOUNDS",
        "TPU_HOST_BOUNDS",
        "CUDA_VISIBLE_DEVICES",
        "XLA_PYTHON_CLIENT_PREALLOCATE",
        "XLA_PYTHON_CLIENT_MEM_FRACTION",
    )
    return {
        "backend": jax.default_backend(),
        "local_device_count": jax.local_device_count(),
        "device_count": jax.device_count(),
        "process_index": jax.process_index(),
        "device_kinds": sorted({d.device_kind for d in devices}),
        "devices": [str(d) for d in devices],
        "env": {k: os.environ[k] for k in env_keys if k in os.environ},
    }
