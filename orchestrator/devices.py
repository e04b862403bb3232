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

A trial may span several hosts (`resources.hosts`, or a TPU slice type such as `v4-16`):
`trial_bundles` gives one Ray bundle per host, every count above is per host, and the
mesh spans all hosts' devices (`trial_devices`; `rcig.multihost`).

Example:
    >>> trial_device_env({"cpu": 4}, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, MutableMapping

LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"
GPU_MEMORY_FRACTION = 0.9  # of the trial's share of a GPU; the rest is for cuDNN/NCCL workspaces
_FORCE_DEVICES = re.compile(r"\s*--xla_force_host_platform_device_count=\S*")


ACCELERATOR_TYPE_DEMAND = 0.001  # what a trial asks of `accelerator_type:<X>` (Ray's convention)

# TPU slice types (`resources.tpu: v4-16`): generation -> (what the number in the name
# counts, chips per host in a multi-host slice, most chips on one host, Ray's accelerator
# type, the name Ray's `TPU-<type>-head` resource uses). v2/v3/v4/v5p names count
# TensorCores (2 per chip); v5e/v6e names count chips.
TPU_GENERATIONS: dict[str, tuple[str, int, int, str, str]] = {
    "v2": ("cores", 4, 4, "TPU-V2", "v2"),
    "v3": ("cores", 4, 4, "TPU-V3", "v3"),
    "v4": ("cores", 4, 4, "TPU-V4", "v4"),
    "v5p": ("cores", 4, 4, "TPU-V5P", "v5p"),
    "v5e": ("chips", 4, 8, "TPU-V5LITEPOD", "v5litepod"),
    "v5litepod": ("chips", 4, 8, "TPU-V5LITEPOD", "v5litepod"),
    "v6e": ("chips", 4, 8, "TPU-V6E", "v6e"),
}
_SLICE_RE = re.compile(r"^(v[0-9a-z]+)-([0-9]+)$")


@dataclass(frozen=True)
class TpuSlice:
    """A TPU slice type (`v4-16`): its hosts, chips per host and Ray's names for it.

    Example:
        >>> s = tpu_slice("v4-16")
        >>> s.hosts, s.chips_per_host, s.head_resource, s.accelerator_type
        (2, 4, 'TPU-v4-16-head', 'TPU-V4')
        >>> tpu_slice("v5e-16").hosts, tpu_slice("v5litepod-8").hosts, tpu_slice("v6e-16").hosts
        (4, 1, 4)
    """

    name: str
    chips: int
    hosts: int
    chips_per_host: int
    accelerator_type: str
    head_resource: str


def tpu_slice(name: str) -> TpuSlice:
    """Parse a TPU slice type; ValueError (one line) for an unknown or impossible one."""
    m = _SLICE_RE.match(str(name).strip().lower())
    known = ", ".join(sorted(TPU_GENERATIONS))
    if not m or m.group(1) not in TPU_GENERATIONS:
        raise ValueError(f"{name!r} is not a TPU slice type such as v4-16 or v5e-16 (generations: {known})")
    gen, count = m.group(1), int(m.group(2))
    counts, per_host, single_max, acc, ray_name = TPU_GENERATIONS[gen]
    chips = count // 2 if counts == "cores" else count
    if chips < 1 or (counts == "cores" and count % 2):
        raise ValueError(f"{name!r}: a {gen} slice type counts TensorCores (2 per chip), e.g. {gen}-8")
    if chips <= single_max:
        hosts, per_host = 1, chips
    elif chips % per_host:
        raise ValueError(f"{name!r}: {chips} chips do not split into hosts of {per_host}")
    else:
        hosts = chips // per_host
    return TpuSlice(f"{gen}-{count}", chips, hosts, per_host, acc, f"TPU-{ray_name}-{count}-head")


def _field(resources: Any, name: str, default: Any = None) -> Any:
    if isinstance(resources, Mapping):
        return resources.get(name, default)
    return getattr(resources, name, default)


def _slice_of(resources: Any) -> TpuSlice | None:
    tpu = _field(resources, "tpu", None)
    if tpu is None and isinstance(resources, Mapping):
        tpu = resources.get("TPU")
    return tpu_slice(tpu) if isinstance(tpu, str) else None


def _amount(resources: Any, name: str) -> float:
    # Accept the spec's block (typed, or a mapping with cpu/gpu/tpu) and Ray's bundle keys;
    # a TPU slice type counts its chips per host.
    sl = _slice_of(resources) if name.lower() == "tpu" else None
    if sl is not None:
        return float(sl.chips_per_host)
    if not isinstance(resources, Mapping):
        return float(getattr(resources, name.lower(), 0) or 0)
    value = resources.get(name.lower(), resources.get(name.upper(), 0))
    return float(value or 0)


def trial_hosts(resources: Any) -> int:
    """Hosts (one process each) a trial spans: `hosts`, or those of its TPU slice type.

    Example:
        >>> trial_hosts({"cpu": 2}), trial_hosts({"cpu": 2, "hosts": 2}), trial_hosts({"tpu": "v5e-16"})
        (1, 2, 4)
    """
    sl = _slice_of(resources)
    return sl.hosts if sl is not None else max(1, int(_field(resources, "hosts", 1) or 1))


def ray_bundle(resources: Any) -> dict[str, float]:
    """The Ray resource bundle a trial asks for on its first host (the only host of a
    one-host trial): the only place a spec's `resources` block (cpu, gpu, tpu,
    accelerator_type, custom) becomes Ray's names. A TPU slice type asks its head
    resource there, its chips per host and its accelerator type.

    Example:
        >>> ray_bundle({"cpu": 8, "tpu": 4, "accelerator_type": "TPU-V4"})
        {'CPU': 8.0, 'TPU': 4.0, 'accelerator_type:TPU-V4': 0.001}
        >>> ray_bundle({"cpu": 2})
        {'CPU': 2.0}
        >>> ray_bundle({"cpu": 1, "custom": {"TPU-v4-8-head": 1}})
        {'CPU': 1.0, 'TPU-v4-8-head': 1.0}
        >>> ray_bundle({"cpu": 8, "tpu": "v4-16"})
        {'CPU': 8.0, 'TPU': 4.0, 'accelerator_type:TPU-V4': 0.001, 'TPU-v4-16-head': 1.0}
    """
    return trial_bundles(resources)[0]


def trial_bundles(resources: Any) -> list[dict[str, float]]:
    """One Ray bundle per host of a trial (placed STRICT_SPREAD: one host per node). The
    first carries the TPU slice's head resource, if any, so it lands on the slice's
    worker 0.

    Example:
        >>> trial_bundles({"cpu": 2, "hosts": 2})
        [{'CPU': 2.0}, {'CPU': 2.0}]
        >>> [b.get('TPU-v4-16-head') for b in trial_bundles({"cpu": 8, "tpu": "v4-16"})]
        [1.0, None]
    """
    bundle = {ray_key: _amount(resources, ray_key) for ray_key in ("CPU", "GPU", "TPU")}
    bundle = {k: v for k, v in bundle.items() if v}
    sl = _slice_of(resources)
    acc = _field(resources, "accelerator_type") or (sl.accelerator_type if sl else None)
    if acc:
        bundle[f"accelerator_type:{acc}"] = ACCELERATOR_TYPE_DEMAND
    custom = _field(resources, "custom") or {}
    bundle.update({str(k): float(v) for k, v in custom.items()})
    head = dict(bundle)
    if sl is not None and sl.hosts > 1:
        head[sl.head_resource] = 1.0
    return [head] + [dict(bundle) for _ in range(trial_hosts(resources) - 1)]


def host_devices(resources: Any) -> tuple[int, str]:
    """(devices, unit) of one host of a trial: its TPU chips, else its GPUs, else one CPU
    device per CPU (see `trial_device_env`).

    Example:
        >>> host_devices({"cpu": 2, "hosts": 2}), host_devices({"tpu": "v4-16"})
        ((2, 'cpu'), (4, 'tpu'))
    """
    for unit in ("tpu", "gpu"):
        if _amount(resources, unit) > 0:
            return max(1, int(_amount(resources, unit))), unit
    return max(1, int(_amount(resources, "cpu") or 1)), "cpu"


def trial_devices(resources: Any) -> tuple[int, str]:
    """(devices, unit) a trial's JAX mesh has, over all its hosts: its TPU chips, else its
    GPUs, else one CPU device per CPU. Also the accelerator count it is billed for.

    Example:
        >>> trial_devices({"cpu": 8, "tpu": 4}), trial_devices({"cpu": 3})
        ((4, 'tpu'), (3, 'cpu'))
        >>> trial_devices({"cpu": 2, "hosts": 2}), trial_devices({"cpu": 8, "tpu": "v4-16"})
        ((4, 'cpu'), (8, 'tpu'))
    """
    n, unit = host_devices(resources)
    return n * trial_hosts(resources), unit


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
        count, _ = host_devices(resources)  # per process: each host runs its own
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
