"""Stop requests: SIGTERM/SIGINT and GCE's preemption notice, honoured in every phase.

A preempted GCE/GKE spot VM gets SIGTERM (ACPI soft-off) about 30 s before it is switched
off, and its metadata server answers ``TRUE`` at ``instance/preempted``. Both sources set
a flag. The step loop checks `stop_requested` after each step, saves a checkpoint at that
step, waits for it, and exits with `EXIT_PREEMPTED` so a supervisor knows the run can be
resumed.

Outside the step loop a flag is not enough: a Python signal handler runs only when the
main thread executes bytecode, which it does not during data loading in C, an XLA
compile, the LR search's jitted probes or evaluation. `StopControl` therefore also
routes the signals to a watchdog thread (`signal.set_wakeup_fd`), and the run declares
what it is doing with `phase(name, abortable=...)`:

- in an *abortable* phase nothing uncommitted would be lost (everything worth keeping
  is already on storage), so a stop request ends the process at once with
  `EXIT_PREEMPTED` (`os._exit`, after the `on_abort` hooks);
- in any other phase (the step loop, a checkpoint commit, a file write) the run is given
  `deadline_s` (env ``RCIG_STOP_DEADLINE_S``, default 8 s) to stop by itself; past it the
  process exits with `EXIT_PREEMPTED` anyway: the last committed checkpoint stands
  (Orbax never lists a step whose save was cut off).

``RCIG_TRACE_PHASES=1`` prints each phase as it starts (``[phase] tune (abortable)``).

Example:
    >>> with StopSignal() as sig, GcePreemptionWatcher() as gce:   # doctest: +SKIP
    ...     for step in range(start, steps):
    ...         state = train_step(state)
    ...         if stop_requested(sig, gce):
    ...             store.save(step + 1, state, cfg); store.wait()
    ...             raise SystemExit(EXIT_PREEMPTED)
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import urllib.request
import warnings
from typing import Callable, Iterator

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" - the run resumes when rerun

GCE_PREEMPTED_URL = "http://metadata.google.internal/computeMetadata/v1/instance/preempted"
DMI_PRODUCT_NAME = "/sys/class/dmi/id/product_name"


class StopSignal:
    """SIGTERM/SIGINT handlers that only record that a stop was asked for.

    `install()` works on the main thread only (elsewhere it warns and does nothing);
    `restore()` puts the previous handlers back. Also a context manager.

    Example:
        >>> import os, signal
        >>> with StopSignal() as sig:
        ...     os.kill(os.getpid(), signal.SIGTERM)
        ...     sig.requested(), sig.reason
        (True, 'SIGTERM')
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.reason = ""
        self._event = threading.Event()
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if not self._event.is_set():
            self.reason = signal.Signals(signum).name
        self._event.set()

    def install(self) -> "StopSignal":
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("StopSignal.install(): not on the main thread; signals are not caught",
                          RuntimeWarning, stacklevel=2)
            return self
        for s in self.signals:
            if s not in self._previous:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, old in self._previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        self._previous.clear()

    def requested(self) -> bool:
        return self._event.is_set()

    def __enter__(self) -> "StopSignal":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


def on_gce(product_name_path: str = DMI_PRODUCT_NAME) -> bool:
    """True when the DMI product name says Google Compute Engine (reads a file; no network).

    Example: ``on_gce("/sys/class/dmi/id/product_name")`` -> ``True`` on a GCE VM.
    """
    try:
        with open(product_name_path) as f:
            return "google" in f.read().lower()
    except OSError:
        return False


def _http_get(url: str, timeout: float) -> str:
    req = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    # No proxies: the metadata server is link-local and must never go via a proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=timeout) as resp:
        return resp.read().decode(errors="replace")


class GcePreemptionWatcher:
    """Background thread polling GCE's ``instance/preempted`` flag every `interval_s`.

    Polls only when `on_gce(product_name_path)`; elsewhere `start()` returns False and no
    request is ever sent. `url` and `fetch(url, timeout) -> body` are injectable for tests.

    Example:
        >>> w = GcePreemptionWatcher(product_name_path="/nonexistent")
        >>> w.start(), w.requested()
        (False, False)
    """

    def __init__(self, *, interval_s: float = 5.0, url: str = GCE_PREEMPTED_URL,
                 product_name_path: str = DMI_PRODUCT_NAME,
                 fetch: Callable[[str, float], str] | None = None, timeout_s: float = 2.0):
        self.interval_s, self.url, self.timeout_s = interval_s, url, timeout_s
        self.product_name_path = product_name_path
        self._fetch = fetch or _http_get
        self.reason = ""
        self.polls = 0
        self._event = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> bool:
        """One poll; sets the flag if the body is ``TRUE``. Errors count as 'not preempted'."""
        self.polls += 1
        try:
            body = self._fetch(self.url, self.timeout_s)
        except Exception as e:  # noqa: BLE001 - a flaky metadata server must not kill the run
            if self.polls == 1:
                log.warning("GCE preemption poll of %s failed: %s", self.url, e)
            return False
        if body.strip().upper() == "TRUE":
            self.reason = "GCE preemption notice"
            self._event.set()
            return True
        return False

    def _run(self) -> None:
        while not self._stop.is_set() and not self._event.is_set():
            self.check_once()
            self._stop.wait(self.interval_s)

    def start(self) -> bool:
        """Start polling if on GCE; returns whether a thread was started."""
        if self._thread is not None or not on_gce(self.product_name_path):
            return self._thread is not None
        self._thread = threading.Thread(target=self._run, name="gce-preemption", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 1)
            self._thread = None

    def requested(self) -> bool:
        return self._event.is_set()

    def __enter__(self) -> "GcePreemptionWatcher":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_requested(*sources) -> bool:
    """True if any source (StopSignal, GcePreemptionWatcher, None) asks to stop.

    Example:
        >>> stop_requested(None, StopSignal())
        False
    """
    return any(s is not None and s.requested() for s in sources)


def stop_reason(*sources) -> str:
    """The reason of the first source that asks to stop, or ''."""
    return next((s.reason for s in sources if s is not None and s.requested()), "")


# ---- stop requests honoured in every phase ---------------------------------------------
def stop_deadline_s() -> float:
    """Seconds a non-abortable phase gets to stop by itself (env `RCIG_STOP_DEADLINE_S`, 8)."""
    return float(os.environ.get("RCIG_STOP_DEADLINE_S", "8"))


_ACTIVE: "StopControl | None" = None


class StopControl:
    """SIGTERM/SIGINT (and any extra `sources`, e.g. a `GcePreemptionWatcher`) as a stop
    request that is honoured in every phase of a run, within `deadline_s`.

    `install()` (main thread only) sets the signal handlers, a wakeup fd and a watchdog
    thread, and makes this the active control for `phase()`. On a request the watchdog
    ends the process with `exit_code` at once if the current phase is abortable, else
    after `deadline_s` unless the process has ended by then. Before such an exit the
    `on_abort(phase_name)` hooks run (each bounded to 3 s), and one line
    naming the phase goes to stderr. `requested()` and `reason` work like `StopSignal`'s,
    so the step loop can stop cooperatively.

    Example:
        >>> with StopControl() as ctl:                                 # doctest: +SKIP
        ...     with phase("tune", abortable=True):
        ...         lrs = search()            # SIGTERM here: exit 75 within a second
        ...     with phase("loop"):
        ...         for s in steps:           # SIGTERM here: checkpoint, return, exit 75
        ...             if ctl.requested(): ...
    """

    def __init__(self, *, sources: tuple = (), deadline_s: float | None = None,
                 exit_code: int = EXIT_PREEMPTED,
                 signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
                 on_abort: Callable[[str], None] | None = None, poll_s: float = 0.2):
        self.sources = tuple(s for s in sources if s is not None)
        self.deadline_s = stop_deadline_s() if deadline_s is None else float(deadline_s)
        self.exit_code, self.signals, self.poll_s = exit_code, signals, poll_s
        self.trace = os.environ.get("RCIG_TRACE_PHASES", "") not in ("", "0")
        self.reason = ""
        self.requested_at: float | None = None
        self._hooks: list[Callable[[str], None]] = [on_abort] if on_abort else []
        self._event = threading.Event()
        self._phase, self._abortable = "start", False
        self._lock = threading.RLock()
        self._aborting = False
        self._previous: dict[int, object] = {}
        self._old_wakeup: int | None = None
        self._sock: tuple[socket.socket, socket.socket] | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the run calls ---------------------------------------------------------------
    def requested(self) -> bool:
        return self._event.is_set()

    @property
    def current_phase(self) -> str:
        return self._phase

    def add_abort_hook(self, fn: Callable[[str], None]) -> None:
        self._hooks.append(fn)

    @contextlib.contextmanager
    def phase(self, name: str, abortable: bool = False) -> Iterator[None]:
        """Declare the phase the run is in; entering an abortable phase with a stop
        already requested exits at once."""
        with self._lock:
            prev = (self._phase, self._abortable)
            self._phase, self._abortable = name, abortable
        if self.trace:
            print(f"[phase] {name}{' (abortable)' if abortable else ''}", file=sys.stderr, flush=True)
        if abortable and self.requested():
            self.abort()
        try:
            yield
        finally:
            with self._lock:
                self._phase, self._abortable = prev
            if prev[1] and self.requested():
                self.abort()

    # -- the watchdog ------------------------------------------------------------------------
    def _request(self, reason: str) -> None:
        with self._lock:
            if not self._event.is_set():
                self.reason = reason
                self.requested_at = time.monotonic()
                self._event.set()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self._request(signal.Signals(signum).name)

    def abort(self) -> None:
        """Run the abort hooks (bounded) and end the process with `exit_code`."""
        with self._lock:
            if self._aborting:
                return
            self._aborting = True
            name = self._phase
        waited = time.monotonic() - (self.requested_at or time.monotonic())
        for fn in self._hooks:
            t = threading.Thread(target=self._run_hook, args=(fn, name), daemon=True)
            t.start()
            t.join(timeout=3.0)
        try:
            print(f"stopped by {self.reason or 'request'} during {name} ({waited:.1f} s after the "
                  f"request); what was committed is kept: rerun the same command to resume.",
                  file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - stderr closed: exit anyway
            pass
        os._exit(self.exit_code)

    @staticmethod
    def _run_hook(fn: Callable[[str], None], name: str) -> None:
        try:
            fn(name)
        except Exception as e:  # noqa: BLE001 - a failing hook must not block the exit
            log.warning("stop hook failed: %s", e)

    def _watch(self) -> None:
        rsock = self._sock[0] if self._sock else None
        while not self._done.is_set():
            if rsock is not None:
                ready, _, _ = select.select([rsock], [], [], self.poll_s)
                if ready:
                    try:
                        data = rsock.recv(64)
                    except OSError:
                        data = b""
                    for b in data:
                        if b in self.signals:
                            self._request(signal.Signals(b).name)
            else:
                self._done.wait(self.poll_s)
            if not self.requested():
                for src in self.sources:
                    if src.requested():
                        self._request(getattr(src, "reason", "") or type(src).__name__)
                        break
            if self._done.is_set() or not self.requested():
                continue
            with self._lock:
                abortable = self._abortable
            late = time.monotonic() - (self.requested_at or 0.0) >= self.deadline_s
            if abortable or late:
                self.abort()

    # -- install / restore -----------------------------------------------------------------
    def install(self) -> "StopControl":
        global _ACTIVE
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("StopControl.install(): not on the main thread; signals are not caught",
                          RuntimeWarning, stacklevel=2)
        else:
            for s in self.signals:
                if s not in self._previous:
                    self._previous[s] = signal.signal(s, self._handle)
            r, w = socket.socketpair()
            r.setblocking(False)
            w.setblocking(False)
            self._sock = (r, w)
            self._old_wakeup = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="rcig-stop-watchdog", daemon=True)
        self._thread.start()
        _ACTIVE = self
        return self

    def reclaim_signals(self) -> None:
        """Take the stop signals back from native code that replaced our handlers (the
        preemption notifier of `jax.distributed.initialize` installs its own for SIGTERM;
        a notice it swallows would never reach the step loop's collective stop flag)."""
        if threading.current_thread() is threading.main_thread():
            for s in self._previous:
                signal.signal(s, self._handle)

    def restore(self) -> None:
        global _ACTIVE
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.poll_s + 1)
            self._thread = None
        if self._sock is not None:
            signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
            for sk in self._sock:
                sk.close()
            self._sock = None
        for s, old in self._previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        self._previous.clear()
        if _ACTIVE is self:
            _ACTIVE = None

    def __enter__(self) -> "StopControl":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


def exit_preempted(code: int = EXIT_PREEMPTED) -> None:
    """End a process whose run stopped on request, once what it keeps is committed:
    flush stdout/stderr and `os._exit(code)`, skipping interpreter shutdown (joining
    library threads, atexit hooks), which can take longer than a notice's grace period."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001 - closed stream: exit anyway
            pass
    os._exit(code)


def active_control() -> StopControl | None:
    """The installed `StopControl`, or None."""
    return _ACTIVE


@contextlib.contextmanager
def phase(name: str, abortable: bool = False) -> Iterator[None]:
    """Declare a run phase to the installed `StopControl` (no-op when none is installed).

    Example:
        >>> with phase("eval", abortable=True):
        ...     pass
    """
    ctl = _ACTIVE
    if ctl is None:
        yield
        return
    with ctl.phase(name, abortable):
        yield
