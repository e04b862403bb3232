"""The process that runs one trial attempt's distillation (started by `orchestrator.trial`).

Why a child process and not the Tune thread itself: Tune runs a function trainable in a
thread of its actor, and Ray's worker turns SIGTERM into an immediate exit of its main
thread. Here the distillation runs in the main thread of its own process, so:

- SIGTERM / SIGINT (a preemption notice) and GCE's `instance/preempted` flag reach
  `rcig.preemption.StopControl`: in the step loop the run checkpoints the step it is on;
  in any other phase (data loading, LR search, compilation, evaluation) the process
  ends at once; either way within seconds, with `EXIT_PREEMPTED` (75) and a `result`
  event saying which checkpoint is committed;
- the device environment (`orchestrator.devices`) is set before jax is imported, and
  all accelerator memory is returned when the attempt ends;
- if the Ray worker dies (node loss, driver loss, `ray.kill`), the kernel sends this
  process SIGTERM (`PR_SET_PDEATHSIG`), which is handled like a notice.

Protocol: argv = [job.json path, event fd]. One JSON object per line on the event fd:
``{"event": "metrics", "step": s, "metrics": {...}}``, ``{"event": "checkpoint", "step": s}``,
``{"event": "result", ...RunResult...}`` or ``{"event": "error", "traceback": "..."}``.
Before writing anything the process takes the trial folder's lease (`rcig.lease`, a
compare-and-swap lock renewed while it lives): a rerun elsewhere waits until this
attempt's notice checkpoint is committed, and two attempts never write one folder. Exit
76: another live attempt holds the folder; 77: the lease was taken over (this process
looked dead), and it stopped writing at once.

A multi-host trial (`orchestrator.multihost`) runs this module once per host; the job's
``distributed`` entry (coordinator, process count, this process's index) makes it join
the run with `rcig.multihost.initialize` before its first computation. Only process 0
takes the lease and reports to the trial; the others compute their share and write
their checkpoint shards.

Example (what `orchestrator.trial` runs)::

    python -m orchestrator.trial_worker /tmp/job.json 5
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import sys
import threading
import traceback

from rcig.preemption import EXIT_PREEMPTED  # 75: stopped, resumable

EXIT_LEASE_HELD = 76  # another live attempt holds the folder: nothing was written
EXIT_LEASE_LOST = 77  # the lease was taken over mid-run: stopped writing at once


def _set_parent_death_signal() -> None:
    """Ask Linux to send SIGTERM here when the parent (the Ray worker) dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def main(argv: list[str]) -> int:
    job_path, fd = argv[0], int(argv[1])
    _set_parent_death_signal()
    with open(job_path) as f:
        job = json.load(f)
    events = os.fdopen(fd, "w", buffering=1)

    def emit(doc: dict) -> None:
        try:
            events.write(json.dumps(doc, default=float) + "\n")
        except (BrokenPipeError, OSError):
            pass  # parent gone: keep going, the notice path checkpoints and exits

    from rcig.preemption import GcePreemptionWatcher, StopControl

    lease = None

    def report_stopped(phase: str) -> None:
        """Before a stop request ends the process outside the step loop (exit 75): tell
        the parent what is committed, and release the lease."""
        found: list = []

        def latest() -> None:
            try:
                from rcig.checkpoint import CheckpointStore

                found.append(CheckpointStore(job["out_uri"]).latest_step())
            except Exception:  # noqa: BLE001 - unknown: the parent keeps what it last heard
                pass

        t = threading.Thread(target=latest, daemon=True)
        t.start()
        t.join(timeout=1.5)  # slow storage: report without the step rather than not at all
        step = found[0] if found else None
        emit({"event": "result", "out_uri": job["out_uri"], "status": "preempted", "step": step,
              "final_metrics": {}, "eval": None, "checkpoint_step": step, "phase": phase})
        if lease is not None:
            lease.release()

    # GCE's instance/preempted flag is polled only on GCE (decided from DMI, no probe). A
    # stop request is honoured in every phase (rcig.preemption.StopControl): the step loop
    # checkpoints and returns; elsewhere the process exits 75 after `report_stopped`.
    with GcePreemptionWatcher() as gce, StopControl(sources=(gce,), on_abort=report_stopped) as stop:
        if os.getppid() != job["parent_pid"]:  # parent died before the death signal was armed
            os.kill(os.getpid(), signal.SIGTERM)
        from rcig.lease import LeaseHeld, acquire
        from rcig.multihost import Distributed

        dist = Distributed.from_dict(job.get("distributed"))

        def lost(why: str) -> None:  # another attempt owns the folder now: write nothing more
            emit({"event": "error", "traceback": why})
            os._exit(EXIT_LEASE_LOST)

        try:  # one writer per folder: process 0 of a multi-host trial holds it for all
            if dist is None or dist.primary:
                lease = acquire(job["out_uri"], info={"attempt": job["attempt"]}, on_lost=lost)
        except LeaseHeld as e:
            emit({"event": "error", "traceback": str(e)})
            return EXIT_LEASE_HELD
        try:
            from rcig.config import DistillConfig
            from rcig.distill import run_distillation
            from rcig.multihost import initialize
            from rcig.preemption import phase

            devices = None
            if dist is not None:  # every host of the trial joins before the first computation
                with phase("connect", abortable=True):
                    initialize(dist)
                    stop.reclaim_signals()  # JAX's preemption notifier took SIGTERM
                    import jax

                    devices = jax.devices()
            cfg = DistillConfig.from_dict(job["config"])
            result = run_distillation(
                cfg, job["out_uri"], run_eval=True, progress=False,
                on_metrics=lambda s, m: emit({"event": "metrics", "step": int(s), "metrics": m}),
                on_checkpoint=lambda s: emit({"event": "checkpoint", "step": int(s)}),
                stop_requested=stop.requested, devices=devices,
            )
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            emit({"event": "error", "traceback": traceback.format_exc()})
            if lease is not None:
                lease.release()
            return 1
    if lease is not None:
        lease.release()
    emit({"event": "result", **dataclasses.asdict(result)})
    if result.status != "completed" or dist is not None:
        # Committed. A stopped run must not spend the notice on shutdown; a process of a
        # multi-host run must not wait at jax.distributed's shutdown barrier for the others
        # (process 0 evaluates long after the rest have finished, and a barrier timeout
        # aborts the process).
        from rcig.preemption import exit_preempted

        events.flush()
        exit_preempted(EXIT_PREEMPTED if result.status != "completed" else 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
