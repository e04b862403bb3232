"""A trial over several hosts: one Ray placement group, one worker process per host.

A spec with `resources.hosts: N` (or a multi-host TPU slice type, `tpu: v4-16`) gives each
trial a placement group of N bundles, one per host, placed `STRICT_SPREAD` (one node each;
`trainable_resources`). Tune runs the trial function in bundle 0; there the trial's
worker for process 0 runs as in a one-host trial (`orchestrator.trial`), and `HostGroup`
starts one `_HostWorker` actor in each other bundle, which runs the same worker module
for its process. Every worker joins the run with
``jax.distributed.initialize(coordinator, num_processes=N, process_id=i)``
(`rcig.multihost`); the coordinator is process 0's node address and a free port there.

Only process 0 talks to the trial: it holds the folder's lease, reports metrics and
writes the run's files; the others compute their share of each step and write their
shards of each checkpoint. How an attempt ends:

- process 0 ends: the others are asked to stop (SIGTERM) and, after a grace period,
  their actors are killed;
- another host's worker ends first (its process killed, an error, a notice it honoured)
  or its actor dies with its node: process 0 is sent SIGTERM; all processes stop at the
  same step when they can still agree on it (`rcig.multihost.any_process`), else the stop
  deadline ends them (`rcig.preemption.StopControl`). The attempt counts as a preemption
  when a host was lost or stopped on a notice, as a failure when a host's worker raised
  or was killed; either way Tune reruns the trial on a new placement group and it
  resumes from its last committed checkpoint.

Example:
    >>> tune.with_resources(fn, trainable_resources(spec))   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rcig.preemption import EXIT_PREEMPTED

STOP_GRACE_S = float(os.environ.get("RCIG_HOST_STOP_GRACE_S", "30"))  # peers' time to stop


def trainable_resources(spec) -> Any:
    """What Tune reserves per trial: the one-host bundle, or a STRICT_SPREAD placement
    group with one bundle per host (Tune runs the trial function in bundle 0)."""
    bundles = spec.ray_bundles()
    if len(bundles) == 1:
        return bundles[0]
    from ray import tune

    return tune.PlacementGroupFactory(bundles, strategy="STRICT_SPREAD")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host.startswith("127.") else "", 0))
        return s.getsockname()[1]


def coordinator_address() -> str:
    """``host:port`` for process 0's coordination service: this node's Ray address and a
    port free on it now."""
    import ray

    ip = ray.util.get_node_ip_address()
    return f"{ip}:{_free_port(ip)}"


def _actor_options(bundle: dict[str, float]) -> dict[str, Any]:
    """Ray actor options that take exactly one host bundle."""
    opts: dict[str, Any] = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0)}
    rest = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    if rest:
        opts["resources"] = rest
    return opts


class _HostWorkerImpl:
    """Runs one host's trial worker process (`orchestrator.trial_worker`) on its node."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.stopping = False

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def run(self, job: dict, resources: dict) -> dict:
        """Start the worker for `job` (process `job['distributed']['process_id']`) and wait
        for it; returns ``{"code", "error", "node_id"}``."""
        from orchestrator.devices import configure_trial_devices

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        configure_trial_devices(resources, env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        cache_root = env.get("RCIG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rcig-sweep")
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(cache_root, "jax"))
        job = {**job, "parent_pid": os.getpid()}
        fd, job_path = tempfile.mkstemp(prefix="rcig-host-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(job, f)
        r, w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.trial_worker", job_path, str(w)],
                env=env, pass_fds=(w,), cwd=root, start_new_session=True)
        finally:
            os.close(w)
        error = None
        with os.fdopen(r, "rb") as events:
            for line in events:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") == "error":
                    error = ev.get("traceback")
        code = self.proc.wait()
        os.unlink(job_path)
        return {"code": code, "error": error, "node_id": self.node(), "stopped": self.stopping}

    def terminate(self) -> bool:
        """SIGTERM to the worker (a stop request); False if it is not running."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        self.stopping = True
        self.proc.terminate()
        return True


@dataclass
class PeerEnd:
    """How another host's worker ended."""

    process_id: int
    code: int | None          # exit code (negative: a signal); None: its actor died
    error: str | None = None
    asked: bool = False       # it was stopped by us (after process 0 ended)

    @property
    def kind(self) -> str:
        """"ok", "preempted" (a notice, or its host was lost) or "failed"."""
        if self.code == 0:
            return "ok"
        if self.code is None or self.code == EXIT_PREEMPTED or self.asked:
            return "preempted"
        return "failed"

    def describe(self) -> str:
        if self.code is None:
            return f"host {self.process_id} was lost (its worker's actor died: {self.error})"
        if self.code < 0:
            return f"host {self.process_id}'s worker was killed by signal {-self.code}"
        if self.code == EXIT_PREEMPTED:
            return f"host {self.process_id}'s worker stopped on a notice"
        return f"host {self.process_id}'s worker exited with code {self.code}" + (
            f":\n{self.error}" if self.error else "")


@dataclass
class HostGroup:
    """The other hosts of a multi-host trial attempt (processes 1..N-1).

    `start(job, proc0)` launches them; a watcher sends `proc0` SIGTERM as soon as one of
    them ends while process 0 still runs. `stop()` asks the rest to stop, waits up to
    `STOP_GRACE_S` and kills their actors. `first_end` is the first peer that ended on
    its own (before process 0), if any.
    """

    bundles: list[dict[str, float]]
    resources: dict[str, Any]
    coordinator: str = ""
    actors: list = field(default_factory=list)
    refs: list = field(default_factory=list)
    ends: dict[int, PeerEnd] = field(default_factory=dict)
    first_end: PeerEnd | None = None
    _done: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def num_processes(self) -> int:
        return len(self.bundles)

    def distributed(self, process_id: int) -> dict[str, Any]:
        from rcig.multihost import Distributed

        return Distributed(self.coordinator, self.num_processes, process_id).to_dict()

    def prepare(self) -> "HostGroup":
        self.coordinator = coordinator_address()
        return self

    def start(self, job: dict, on_peer_end: Callable[[PeerEnd], None]) -> None:
        """Start processes 1..N-1 of `job` in bundles 1..N-1 of this trial's placement group."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = ray.util.get_current_placement_group()
        if pg is None:
            raise RuntimeError("a multi-host trial runs inside its placement group (Tune's "
                               "PlacementGroupFactory); none found")
        cls = ray.remote(_HostWorkerImpl)
        for i in range(1, self.num_processes):
            actor = cls.options(
                max_concurrency=4, max_restarts=0, name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=i, placement_group_capture_child_tasks=False),
                **_actor_options(self.bundles[i])).remote()
            self.actors.append(actor)
            self.refs.append(actor.run.remote({**job, "distributed": self.distributed(i)},
                                              dict(self.resources)))
        self._thread = threading.Thread(target=self._watch, args=(on_peer_end,), daemon=True,
                                        name="rcig-host-watch")
        self._thread.start()

    def _collect(self, ref) -> PeerEnd:
        import ray

        i = self.refs.index(ref) + 1
        try:
            out = ray.get(ref)
            return PeerEnd(i, out["code"], out.get("error"), asked=bool(out.get("stopped")))
        except Exception as e:  # noqa: BLE001 - RayActorError: the node or the actor died
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return PeerEnd(i, None, f"{type(e).__name__}: {first}")

    def _watch(self, on_peer_end: Callable[[PeerEnd], None]) -> None:
        import ray

        pending = list(self.refs)
        while pending and not self._done.is_set():
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in ready:
                end = self._collect(ref)
                self.ends[end.process_id] = end
                if self.first_end is None and not self._done.is_set() and end.kind != "ok":
                    self.first_end = end
                    on_peer_end(end)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Process 0 has ended: ask every peer still running to stop, wait, kill actors."""
        import ray

        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        live = [(a, r) for a, r in zip(self.actors, self.refs)]
        for actor, ref in live:
            try:
                actor.terminate.remote()
            except Exception:  # noqa: BLE001 - its actor is gone already
                pass
        pending = [r for _, r in live]
        deadline = time.time() + grace_s
        while pending and time.time() < deadline:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=max(0.1, deadline - time.time()))
            for ref in ready:
                end = self._collect(ref)
                self.ends.setdefault(end.process_id, end)
                if self.first_end is None and end.kind != "ok" and not end.asked:
                    self.first_end = end  # it ended on its own, unseen before process 0 did
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass

    def peer_pids(self, timeout: float = 10.0) -> dict[int, int | None]:
        """Process id -> OS pid of each peer's worker (for tests and status)."""
        import ray

        return {i + 1: ray.get(a.pid.remote(), timeout=timeout) for i, a in enumerate(self.actors)}


def attempt_ending(code: int, first_end: PeerEnd | None, kind0: str) -> tuple[str, str | None]:
    """(ending kind, error) of a multi-host attempt from process 0's exit code and its own
    ending kind, and the peer that ended first (before process 0), if any.

    Example:
        >>> attempt_ending(75, PeerEnd(1, -9), "preempted")
        ('failed', "host 1's worker was killed by signal 9")
        >>> attempt_ending(75, PeerEnd(1, None, "ActorDiedError"), "preempted")[0]
        'preempted'
        >>> attempt_ending(0, None, "completed")
        ('completed', None)
    """
    if first_end is None or first_end.kind == "ok" or kind0 == "completed":
        return kind0, None
    return first_end.kind, first_end.describe()
