"""Checkpoints of a run on any storage URI (local path, `file://`, `gs://`) with Orbax.

A run folder's checkpoints live in ``<run_uri>/checkpoints/<step>/`` and hold two items:
``state`` (the whole JAX pytree the next step depends on, saved with `StandardSave`) and
``config`` (the resolved config as JSON). Orbax's atomic commit (`AtomicityOptions`, mode
AUTO: atomic rename on POSIX, a `commit_success.txt` file on GCS) means a step that was
cut off mid-save is never listed and never restored. Retention keeps the newest `keep`
steps plus the step saved with ``final=True`` (an Orbax preservation policy).

Storage faults: tensorstore (array data) and gcsfs (metadata, JSON, listing, commit file)
already retry HTTP 5xx/429 and dropped connections with backoff. On top of that, every
save, restore and listing here gets a bounded retry: a save whose background write
failed is written again from the same arrays, after its partial folder is removed.

Several processes (`rcig.multihost`): every process calls `save`, `restore` and
`latest_step` at the same points of the run; Orbax writes each process's shards of the
arrays and commits the step once, after all have written (its barriers). Only process 0
creates the folder and removes what an interrupted save left. The state restores onto
any layout of the same devices (one process with 4 devices, or 2 with 2 each), because
the restore target's shardings, not the saved ones, decide where the arrays go.

Example:
    >>> store = CheckpointStore("/tmp/run1", keep=3)            # doctest: +SKIP
    >>> store.save(10, {"w": jnp.ones(3)}, {"ipc": 1})           # doctest: +SKIP
    True
    >>> store.wait(); store.latest_step()                        # doctest: +SKIP
    10
    >>> abstract = jax.eval_shape(lambda: {"w": jnp.ones(3)})    # doctest: +SKIP
    >>> state, config = store.restore(abstract)                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

import jax

from rcig import storage
from rcig.config import run_differences
from rcig.multihost import is_primary, process_count, sync

log = logging.getLogger(__name__)

_TRANSIENT_MARKERS = (
    "unavailable", "deadline", "timed out", "timeout", "connection", "temporar",
    "reset by peer", "broken pipe", "disconnected", "empty reply", "out of retries",
    "internal server error", "service unavailable", "too many requests", "aborted",
)
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or unreadable; the message names the URI and step."""


class ConfigMismatchError(CheckpointError):
    """The checkpoint was written with another config; the message names each differing key."""


def should_save(
    step: int,
    now: float,
    last_step: int | None,
    last_time: float,
    every_steps: int,
    every_seconds: float,
) -> bool:
    """The one "is it time?" rule for periodic checkpoints (pure; clock passed in).

    True when `step` is a multiple of `every_steps`, or `every_seconds` have passed since
    `last_time`; never for a step at or before `last_step` (None: nothing saved yet).
    A trigger set to 0 is off.

    Example:
        >>> should_save(50, now=0.0, last_step=0, last_time=0.0, every_steps=50, every_seconds=0)
        True
        >>> should_save(51, now=9.0, last_step=50, last_time=0.0, every_steps=50, every_seconds=10)
        False
        >>> should_save(52, now=10.0, last_step=50, last_time=0.0, every_steps=50, every_seconds=10)
        True
    """
    if last_step is not None and step <= last_step:
        return False
    by_steps = every_steps > 0 and step % every_steps == 0
    by_time = every_seconds > 0 and (now - last_time) >= every_seconds
    return bool(by_steps or by_time)


def is_transient(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) looks like a passing storage fault."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if isinstance(e, (CheckpointError, KeyError, TypeError, FileNotFoundError)):
            return False
        if getattr(e, "code", None) in _TRANSIENT_HTTP or getattr(e, "status", None) in _TRANSIENT_HTTP:
            return True
        text = f"{type(e).__name__}: {e}".lower()
        if any(m in text for m in _TRANSIENT_MARKERS):
            return True
        e = e.__cause__ or e.__context__
    return False


def _save_retryable(exc: BaseException) -> bool:
    """Whether writing the whole step again may help. A failed background write is retried
    whatever the storage layer raised (a lost answer comes back as 404/412 on its retry,
    e.g. a finished resumable upload; tensorstore reports failed conditional writes as
    ValueError): a fresh write of the step is always safe. Only errors about the tree
    itself (TypeError, KeyError) are not retried."""
    return not isinstance(exc, (TypeError, KeyError, CheckpointError))


_MESHES: dict[Any, Any] = {}


def _concrete(sharding: Any) -> Any:
    """`jax.eval_shape` gives NamedShardings over an AbstractMesh; restoring needs devices:
    use `jax.make_mesh` with the same axis sizes, names and types (cached)."""
    if sharding is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mesh = getattr(sharding, "mesh", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(mesh, jax.sharding.AbstractMesh):
        key = (mesh.axis_sizes, mesh.axis_names, mesh.axis_types)
        if key not in _MESHES:
            _MESHES[key] = jax.make_mesh(mesh.axis_sizes, mesh.axis_names, axis_types=mesh.axis_types)
        return jax.sharding.NamedSharding(_MESHES[key], sharding.spec)
    return sharding


def _abstract_leaf(x: Any) -> Any:
    """A restore target leaf: ShapeDtypeStruct with a concrete sharding (device 0 if none)."""
    if isinstance(x, (int, float, bool)) and not hasattr(x, "shape"):
        x = jax.ShapeDtypeStruct((), jax.numpy.asarray(x).dtype)
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_concrete(getattr(x, "sharding", None)))
    return x


class _KeepFinal:
    """Orbax preservation policy: keep every step saved with metrics ``{"final": 1}``."""

    def should_preserve(self, checkpoints, *, context):  # noqa: D401 - Orbax protocol
        return [bool((c.metrics or {}).get("final")) for c in checkpoints]


class CheckpointStore:
    """Orbax checkpoints of one run under ``<run_uri>/checkpoints``.

    Args:
        run_uri: the run folder (local path, ``file://...`` or ``gs://bucket/prefix``).
        keep: how many newest steps to keep (the ``final=True`` step is kept as well).
        async_save: write in a background thread; `save` returns after the
            device-to-host copy. Call `wait()` (or `close()`) before exiting.
        retries: attempts per save/restore/listing for transient storage faults.
        backoff_s: first retry delay; doubles each attempt (capped at 8 s).

    Example:
        >>> with CheckpointStore("gs://bucket/runs/a") as store:      # doctest: +SKIP
        ...     store.save(5, state, cfg.to_dict())
        ...     store.save(6, state2, cfg.to_dict(), final=True)
    """

    def __init__(self, run_uri: str, *, keep: int = 3, async_save: bool = True,
                 retries: int = 4, backoff_s: float = 0.5):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as cm
        from orbax.checkpoint import options as ocp_options

        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self._ocp = ocp
        self.run_uri = storage.normalize(run_uri)
        self.uri = storage.join(self.run_uri, "checkpoints")
        self.keep, self.async_save = keep, async_save
        self.retries, self.backoff_s = max(1, retries), backoff_s
        self._options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            atomicity_options=ocp_options.AtomicityOptions(mode=ocp_options.AtomicityMode.AUTO),
            preservation_policy=cm.AnyPreservationPolicy([cm.LatestN(n=keep), _KeepFinal()]),
            # `best_fn` only makes Orbax write each step's metrics ({"final": 0/1}),
            # which `_KeepFinal` reads; retention itself is the preservation policy.
            best_fn=lambda m: float(m.get("final", 0)),
            # A store that only reads (status, eval, a test polling a live run) must not
            # create folders or delete another process's in-flight temp folders: both
            # happen only when this store first writes (`_prepare_to_write`).
            create=False,
            cleanup_tmp_directories=False,
        )
        self._pending: tuple | None = None  # (step, state, config, final) being written
        self._prepared = False
        self._mgr = self._retry("open", None, self._open)

    # ---- internals -------------------------------------------------------------------
    def _open(self):
        return self._ocp.CheckpointManager(self.uri, options=self._options,
                                           item_names=("state", "config"))

    def _retry(self, what: str, step: int | None, fn: Callable[[], Any],
               on_error: Callable[[], None] | None = None,
               retryable: Callable[[BaseException], bool] = is_transient) -> Any:
        where = f"{self.uri}" + (f" step {step}" if step is not None else "")
        for attempt in range(self.retries):
            try:
                return fn()
            except (CheckpointError, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 - classified below
                if not retryable(e) or attempt == self.retries - 1:
                    tag = "storage fault persisted" if retryable(e) else "failed"
                    raise CheckpointError(f"{where}: {what} {tag}: {type(e).__name__}: {e}") from e
                delay = min(self.backoff_s * 2**attempt, 8.0)
                log.warning("%s: %s hit a storage fault (%s); retry %d/%d in %.1fs", where,
                            what, e, attempt + 1, self.retries - 1, delay)
                time.sleep(delay)
                if on_error is not None:
                    try:
                        on_error()
                    except Exception as e2:  # noqa: BLE001 - retried next round
                        log.warning("%s: cleanup before retry failed: %s", where, e2)
        raise AssertionError("unreachable")

    def _delete_uncommitted(self, only_step: int | None = None) -> None:
        """Delete temp folders and uncommitted step folders (of `only_step`, or all)."""
        from etils import epath

        root = epath.Path(self.uri)
        self._mgr.reload()
        committed = set(self._mgr.all_steps())
        for p in root.iterdir() if root.exists() else []:
            name, tmp, _ = p.name.partition(".orbax-checkpoint-tmp")
            if not name.isdigit() or (only_step is not None and int(name) != only_step):
                continue
            if tmp or int(name) not in committed:
                log.warning("%s: removing %s left by an interrupted save", self.uri, p.name)
                p.rmtree(missing_ok=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _prepare_to_write(self) -> None:
        """Before this store's first save: create the folder and clear what a writer that
        was killed mid-save left behind. (Readers never do either: they could be looking
        at a live run whose save is in flight.)"""
        from etils import epath

        if not self._prepared:
            if is_primary():  # with several processes: process 0 alone, then all go on together
                epath.Path(self.uri).mkdir(parents=True, exist_ok=True)  # GCS: virtual, may stay absent
                self._delete_uncommitted()
            sync("rcig-checkpoint-prepare")
            self._prepared = True

    def _committed_steps(self) -> list[int]:
        steps = list(self._mgr.all_steps())
        if self._pending is not None and self._mgr.is_saving_in_progress():
            steps = [s for s in steps if s != self._pending[0]]
        return sorted(steps)

    def _launch(self, step: int, state, config: dict, final: bool) -> None:
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(state),
            config=self._ocp.args.JsonSave(json.loads(json.dumps(config))),
        )
        self._mgr.save(step, args=args, metrics={"final": int(final)}, force=True)

    def _write_sync(self, step: int, state, config: dict, final: bool) -> None:
        """Write one step to completion (used for retries), raising on failure."""
        self._mgr.reload()
        if step in self._mgr.all_steps():
            return
        self._launch(step, state, config, final)
        self._mgr.wait_until_finished()

    def _finish_pending(self) -> None:
        if self._pending is None:
            return
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._save_again(e, "background save failed")
        self._pending = None

    def _save_again(self, exc: BaseException, what: str) -> None:
        """The pending save hit a fault (while starting, or in the background): write that
        step again, synchronously, with bounded retries, or raise `CheckpointError` if the
        fault is not one a retry can cure. With several processes a save is collective and
        a retry on one process alone would wait for the others forever: it raises, and the
        run resumes from its last committed step."""
        step, state, config, final = self._pending
        self._pending = None
        if not _save_retryable(exc) or process_count() > 1:
            raise CheckpointError(f"{self.uri} step {step}: save failed: {exc}") from exc
        log.warning("%s step %d: %s (%s); writing it again", self.uri, step, what, exc)
        self._retry("save", step, lambda: self._write_sync(step, state, config, final),
                    on_error=lambda: self._delete_uncommitted(step), retryable=_save_retryable)

    # ---- public API --------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """Newest committed step (re-read from storage when no save is in flight), or None."""
        if self._pending is None or not self._mgr.is_saving_in_progress():
            self._retry("list", None, self._mgr.reload)
        steps = self._committed_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Committed steps, ascending."""
        if self._pending is None or not self._mgr.is_saving_in_progress():
            self._retry("list", None, self._mgr.reload)
        return self._committed_steps()

    def save(self, step: int, state, config: dict, *, final: bool = False, force: bool = False) -> bool:
        """Start writing `state` and `config` as checkpoint `step`; returns once the arrays
        are copied to host (async) or written (sync). Waits for (and if needed retries) the
        previous save first. A step that already exists is left alone (returns False)
        unless `force`, or `final` is asked for a step not yet marked final: then it is
        written again.

        Example: ``store.save(100, state, cfg.to_dict(), final=True)``
        """
        self._finish_pending()
        self._retry("prepare", step, self._prepare_to_write)
        if step in self._mgr.all_steps():
            already_final = bool((self._mgr.metrics(step) or {}).get("final"))
            if not (force or (final and not already_final)):
                return False
            self._retry("delete", step, lambda: self._mgr.delete(step))
        self._pending = (step, state, config, final)
        try:
            self._launch(step, state, config, final)
        except Exception as e:  # noqa: BLE001 - the blocking part of the save hit a fault
            self._save_again(e, "save failed")
            return True
        if not self.async_save:
            self._finish_pending()
        return True

    def wait(self) -> None:
        """Block until the last save is committed (retrying it through storage faults)."""
        self._finish_pending()

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
        """(state, config) of `step` (default: the newest committed one).

        `abstract_state` is the restore target: `jax.eval_shape(...)` output or a tree of
        `jax.ShapeDtypeStruct` whose `.sharding` the restored arrays get (device 0 where a
        leaf has none); concrete arrays also work.

        Example: ``state, cfg = store.restore(jax.eval_shape(init_state, key))``
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"{self.uri}: no committed checkpoint to restore")
        target = jax.tree.map(_abstract_leaf, abstract_state)
        args = self._ocp.args.Composite(state=self._ocp.args.StandardRestore(target),
                                        config=self._ocp.args.JsonRestore())

        def go():
            if step not in self._mgr.all_steps():
                self._mgr.reload()
                if step not in self._mgr.all_steps():
                    raise CheckpointError(f"{self.uri}: no committed checkpoint at step {step}")
            return self._mgr.restore(step, args=args)

        out = self._retry("restore", step, go)
        return out["state"], dict(out["config"])

    def read_config(self, step: int | None = None) -> dict | None:
        """Config saved with `step` (default newest committed), or None if there is none."""
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                return None
        args = self._ocp.args.Composite(config=self._ocp.args.JsonRestore())
        out = self._retry("read config", step, lambda: self._mgr.restore(step, args=args))
        return dict(out["config"])

    def check_config(self, config: dict) -> None:
        """Raise `ConfigMismatchError` naming every identity field where `config` is
        another run than the newest checkpoint's (`rcig.config.run_differences`, resume
        rules: `steps` may change); no checkpoint: no-op.

        Example: ``store.check_config(cfg.to_dict())`` ->
        ``ConfigMismatchError: gs://b/run/checkpoints step 50: ... ipc (saved 1, now 10)``
        """
        step = self.latest_step()
        if step is None:
            return
        saved = self.read_config(step)
        diffs = run_differences(saved or {}, config, resume=True)
        if diffs:
            raise ConfigMismatchError(
                f"{self.uri} step {step}: checkpoint was written with a different config: "
                + "; ".join(diffs))

    def close(self) -> None:
        """Wait for the last save, then release Orbax's threads."""
        try:
            self.wait()
        finally:
            self._mgr.close()

    def __enter__(self) -> "CheckpointStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
