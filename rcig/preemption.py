"""Stop requests: SIGTERM/SIGINT and GCE's preemption notice, as flags the run loop polls.

A preempted GCE/GKE spot VM gets SIGTERM (ACPI soft-off) about 30 s before it is switched
off, and its metadata server answers ``TRUE`` at ``instance/preempted``. Neither source
interrupts the step in progress: both only set a flag. The loop checks `stop_requested`
after each step, saves a checkpoint at that step, waits for it, and exits with
`EXIT_PREEMPTED` so a supervisor knows the run can be resumed.

Example:
    >>> with StopSignal() as sig, GcePreemptionWatcher() as gce:   # doctest: +SKIP
    ...     for step in range(start, steps):
    ...         state = train_step(state)
    ...         if stop_requested(sig, gce):
    ...             store.save(step + 1, state, cfg); store.wait()
    ...             raise SystemExit(EXIT_PREEMPTED)
"""

from __future__ import annotations

import logging
import signal
import threading
import urllib.request
import warnings
from typing import Callable

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
