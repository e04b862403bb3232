"""A lease on a run folder: one writer at a time, decided by the storage itself.

`<folder>/lease.json` names the attempt that may write the folder. Every change to it is a
conditional write (`rcig.storage.write_if`: an `ifGenerationMatch` precondition on gs://,
a compare-and-replace under `flock` locally), so of several contenders exactly one wins:

- **acquire**: create the lease if there is none; take it over if it is released, or
  stale (not renewed for `stale_s`: its holder is gone); otherwise wait, up to `wait_s`,
  then raise `LeaseHeld` naming the holder. A takeover names the version it replaces, so
  two contenders taking over the same stale lease cannot both win.
- **renew**: a heartbeat thread rewrites the lease every `heartbeat_s`, again naming the
  version it last wrote. If that fails with a precondition, another attempt has taken the
  folder: the lease is lost, `on_lost` runs (the holder must stop writing at once).
- **release**: mark it released, so the next attempt takes it without waiting.

Staleness is judged on the observer's clock (the lease unchanged for `stale_s` while
watched) or, for a lease long dead, on the holder's own timestamp.

Example:
    >>> lease = acquire("runs/demo", wait_s=0)                    # doctest: +SKIP
    >>> lease.release()  # after writing checkpoints and records  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from rcig import storage

LEASE = "lease.json"


class LeaseHeld(RuntimeError):
    """Another live attempt holds the folder; the message names it."""


def heartbeat_s() -> float:
    """How often a lease is renewed (env `RCIG_LEASE_HEARTBEAT_S`, default 5 s)."""
    return float(os.environ.get("RCIG_LEASE_HEARTBEAT_S", "5"))


def stale_after_s(heartbeat: float | None = None) -> float:
    """A lease not renewed for 3 heartbeats is stale."""
    return 3 * (heartbeat_s() if heartbeat is None else heartbeat)


def lease_uri(folder_uri: str) -> str:
    return storage.join(folder_uri, LEASE)


def parse(text: str) -> dict[str, Any] | None:
    """The lease document, or None if it is not one (damaged)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and "owner" in doc else None


def describe(doc: dict[str, Any] | None, now: float | None = None) -> str:
    """One line about a lease's holder, for errors and `doctor`."""
    if doc is None:
        return "a damaged lease file"
    now = time.time() if now is None else now
    age = now - float(doc.get("t", 0))
    state = "released" if doc.get("released") else f"renewed {age:.0f} s ago"
    return (f"attempt {doc.get('attempt')} (pid {doc.get('pid')} on {doc.get('host')}), "
            f"{state}")


def holder_is_stale(doc: dict[str, Any] | None, stale_s: float, now: float | None = None) -> bool:
    """Whether the holder's own timestamp says it stopped renewing (long-dead fast path)."""
    if doc is None:
        return True
    now = time.time() if now is None else now
    return bool(doc.get("released")) or now - float(doc.get("t", 0)) > 2 * stale_s


class Lease:
    """A held lease; renewed from a thread until `release()`."""

    def __init__(self, uri: str, owner: str, doc: dict[str, Any], version: str,
                 heartbeat: float, on_lost: Callable[[str], None] | None):
        self.uri, self.owner, self.doc, self.version = uri, owner, doc, version
        self.heartbeat = heartbeat
        self.on_lost = on_lost
        self.lost = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="rcig-lease", daemon=True)
        self._thread.start()

    def _write(self, **changes: Any) -> None:
        doc = {**self.doc, **changes, "t": time.time()}
        self.version = storage.write_if(self.uri, json.dumps(doc, sort_keys=True), self.version)
        self.doc = doc

    def renew(self) -> bool:
        """One renewal; False once the lease is lost (another attempt took it)."""
        with self._lock:
            if self.lost.is_set() or self._done.is_set():
                return not self.lost.is_set()
            try:
                self._write()
                return True
            except storage.PreconditionFailed:
                self.lost.set()
            except storage.StorageError:
                return True  # transient: a later renewal (or a takeover) decides
        why = f"{self.uri}: lease taken over by another attempt; this one stops writing"
        if self.on_lost is not None:
            self.on_lost(why)
        return False

    def _loop(self) -> None:
        while not self._done.wait(self.heartbeat):
            if not self.renew():
                return

    def release(self) -> None:
        """Stop renewing and mark the lease released (a no-op once lost)."""
        self._done.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.heartbeat + 5)
        with self._lock:
            if self.lost.is_set():
                return
            try:
                self._write(released=True)
            except storage.StorageError:
                pass  # it goes stale instead; the next attempt waits a little longer


def acquire(folder_uri: str, *, wait_s: float | None = None, heartbeat: float | None = None,
            info: dict[str, Any] | None = None, on_lost: Callable[[str], None] | None = None,
            poll_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> Lease:
    """Take the folder's lease (see the module docstring); raises `LeaseHeld` after
    `wait_s` (default: 4 stale periods) while a live holder keeps renewing it."""
    hb = heartbeat_s() if heartbeat is None else heartbeat
    stale_s = stale_after_s(hb)
    wait_s = 4 * stale_s if wait_s is None else wait_s
    poll_s = min(1.0, hb / 3) if poll_s is None else poll_s
    uri = lease_uri(folder_uri)
    owner = uuid.uuid4().hex
    doc = {"owner": owner, "pid": os.getpid(), "host": socket.gethostname(),
           "released": False, **(info or {})}
    deadline = clock() + wait_s
    seen: tuple[str, float] | None = None  # (version, when first seen) of the holder's lease
    while True:
        cur = storage.read_versioned(uri)
        now = clock()
        try:
            if cur is None:
                version = storage.write_if(uri, json.dumps({**doc, "t": time.time()}, sort_keys=True), None)
                return Lease(uri, owner, {**doc}, version, hb, on_lost)
            held = parse(cur.text)
            if seen is None or seen[0] != cur.version:
                seen = (cur.version, now)
            if holder_is_stale(held, stale_s) or now - seen[1] >= stale_s:
                version = storage.write_if(uri, json.dumps({**doc, "t": time.time()}, sort_keys=True),
                                           cur.version)
                return Lease(uri, owner, {**doc}, version, hb, on_lost)
        except storage.PreconditionFailed:
            seen = None  # someone else moved first: look again
            continue
        if now >= deadline:
            raise LeaseHeld(f"{folder_uri}: in use by {describe(held)}; not writing to it "
                            f"(wait for it to finish, or stop it)")
        time.sleep(poll_s)
