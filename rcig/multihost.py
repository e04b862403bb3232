"""One run over several processes (hosts): `jax.distributed`, the global mesh, each
process's share of the real batch, and the collective stop flag.

A multi-host run starts one process per host. Every process calls
`initialize(Distributed(coordinator, num_processes, process_id))` before its first JAX
computation; process 0 hosts the coordination service at `coordinator` (``host:port``).
After that `jax.devices()` lists the devices of every process and the run's mesh spans
them all (`rcig.engine.Engine(..., devices=jax.devices())`), exactly as a single process
with that many local devices would: the state is replicated, the real batch and the
support rows are split over the `data` axis.

- On CPU the processes exchange collectives through gloo
  (``jax_cpu_collectives_implementation``), over loopback or the hosts' network; each
  process's CPU device count is ``--xla_force_host_platform_device_count``.
- `global_batch(sharding, shape, rows)` builds the step's real batch from each process's
  own rows: ``rows(lo, hi)`` is asked only for the rows this process's devices hold, and
  the batch of a step is a pure function of ``(seed, step)`` (`rcig.data.real_batch_indices`),
  so no process reads another's share and the global batch equals the single-process one.
- `agree(stop, save)` (and `any_process(flag)`) is the collective OR behind a stop
  request: a notice reaching any one host stops every process at the same step (each
  asks after every step), and a checkpoint due by one host's clock is saved by all.
- Only process 0 writes run files (metrics, distilled set, evaluation, records): see
  `is_primary`. Checkpoints are written by every process (`rcig.checkpoint`).

Example (two processes on one machine, 2 CPU devices each: a 4-device mesh)::

    # process i of 2
    initialize(Distributed("127.0.0.1:12345", 2, i))
    mesh = jax.make_mesh((jax.device_count(),), ("data",), devices=jax.devices())
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

COORDINATOR_ENV = "RCIG_COORDINATOR"  # host:port of process 0's coordination service
NUM_PROCESSES_ENV = "RCIG_NUM_PROCESSES"
PROCESS_ID_ENV = "RCIG_PROCESS_ID"


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a multi-process run.

    Example:
        >>> d = Distributed("10.0.0.2:8476", 2, 1)
        >>> d.primary, Distributed.from_dict(d.to_dict()) == d
        (False, True)
    """

    coordinator: str
    num_processes: int
    process_id: int
    init_timeout_s: int = 300
    heartbeat_timeout_s: int = 30  # a process gone this long ends the others

    def __post_init__(self) -> None:
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id {self.process_id} outside 0..{self.num_processes - 1}")
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"coordinator must be host:port, got {self.coordinator!r}")

    @property
    def primary(self) -> bool:
        return self.process_id == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any] | None) -> "Distributed | None":
        return cls(**doc) if doc else None

    @classmethod
    def from_env(cls, environ=os.environ) -> "Distributed | None":
        """From ``RCIG_COORDINATOR``, ``RCIG_NUM_PROCESSES`` and ``RCIG_PROCESS_ID``; None
        when they are not set (a single-process run)."""
        if not environ.get(COORDINATOR_ENV):
            return None
        return cls(environ[COORDINATOR_ENV], int(environ[NUM_PROCESSES_ENV]), int(environ[PROCESS_ID_ENV]))


_ACTIVE: Distributed | None = None


def initialize(dist: Distributed | None) -> None:
    """Join the multi-process run `dist` (no-op for None or a 1-process run). Call before
    the first JAX computation of the process; on CPU, collectives go through gloo."""
    global _ACTIVE
    if dist is None or dist.num_processes == 1 or _ACTIVE == dist:
        return
    import jax

    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if not platforms or platforms.split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=dist.coordinator, num_processes=dist.num_processes,
        process_id=dist.process_id, initialization_timeout=dist.init_timeout_s,
        heartbeat_timeout_seconds=dist.heartbeat_timeout_s)
    _ACTIVE = dist


def active() -> Distributed | None:
    """The multi-process run this process joined, or None."""
    return _ACTIVE


def process_index() -> int:
    """This process's index (0 without `jax.distributed`); never starts a backend itself
    when no run was joined."""
    if _ACTIVE is None:
        return 0
    import jax

    return jax.process_index()


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return process_index() == 0


def process_count() -> int:
    return 1 if _ACTIVE is None else _ACTIVE.num_processes


def local_rows(sharding, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """The row ranges ``[lo, hi)`` (axis 0) that this process's devices hold of an array of
    `shape` laid out by `sharding`, merged and sorted.

    Example (one process, 4 devices, rows split over them):
        >>> import jax                                                      # doctest: +SKIP
        >>> mesh = jax.make_mesh((4,), ("data",))                            # doctest: +SKIP
        >>> s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))  # doctest: +SKIP
        >>> local_rows(s, (8, 3))                                           # doctest: +SKIP
        [(0, 8)]
    """
    spans = set()
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        sl = index[0] if index else slice(None)
        lo, hi, _ = sl.indices(shape[0])
        spans.add((lo, hi))
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def global_batch(sharding, shape: tuple[int, ...], rows: Callable[[int, int], np.ndarray],
                 dtype=np.float32):
    """A global `jax.Array` of `shape` laid out by `sharding`, built from this process's
    own rows only: ``rows(lo, hi)`` returns rows ``lo..hi-1`` (asked once per distinct
    range this process's devices hold). On one process this is `jax.device_put`."""
    import jax

    cache: dict[tuple[int, int], np.ndarray] = {}

    def piece(index) -> np.ndarray:
        sl = index[0] if index else slice(None)
        lo, hi, _ = sl.indices(shape[0])
        if (lo, hi) not in cache:
            cache[(lo, hi)] = np.asarray(rows(lo, hi), dtype)
        block = cache[(lo, hi)]
        return block[(slice(None),) + tuple(index[1:])] if len(index) > 1 else block

    return jax.make_array_from_callback(tuple(shape), sharding, piece)


_FLAG_OR: dict[int, Any] = {}


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (a collective: every process must
    call it at the same point). One process: `flag` itself."""
    return max_over_processes(1 if flag else 0) > 0


def agree(stop: bool, save: bool) -> tuple[bool, bool]:
    """(stop, save) as every process will act on them after a step: a stop asked of any
    process stops all (and saves), a save due on any process's clock saves on all. One
    collective; one process: the values themselves.

    Example:
        >>> agree(False, True)
        (False, True)
    """
    if process_count() == 1:
        return bool(stop), bool(save)
    m = max_over_processes(2 if stop else (1 if save else 0))
    return m >= 2, m >= 1


def max_over_processes(value: int) -> int:
    """The largest of every process's `value` (a collective; one process: `value`).

    One int per device (this process's value on each of its devices), reduced by a max
    that is compiled once: a few all-reduced bytes per call."""
    if process_count() == 1:
        return int(value)
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    n = jax.device_count()
    if n not in _FLAG_OR:
        mesh = jax.make_mesh((n,), ("flags",), devices=jax.devices())
        _FLAG_OR[n] = (NamedSharding(mesh, P("flags")),
                       jax.jit(lambda v: v.max(), out_shardings=NamedSharding(mesh, P())))
    sharding, reduce_max = _FLAG_OR[n]
    mine = np.int32(value)
    values = jax.make_array_from_callback(
        (n,), sharding, lambda index: np.full((len(range(*index[0].indices(n))),), mine, np.int32))
    return int(np.asarray(reduce_max(values)))


def sync(name: str) -> None:
    """A barrier across processes (no-op on one)."""
    if process_count() == 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def broadcast_from_primary(value: Any) -> Any:
    """`value` as process 0 has it, on every process (a pytree of arrays or numbers)."""
    if process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(value)
