"""Checkpoints (real Orbax, local and on a real GCS-protocol server) and stop requests."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from faultproxy import FaultProxy
from rcig.checkpoint import CheckpointError, CheckpointStore, ConfigMismatchError, should_save
from rcig.config import (DistillConfig, apply_overrides, identity_hash, make_config, run_differences,
                         run_identity)
from rcig.preemption import (EXIT_PREEMPTED, GcePreemptionWatcher, StopSignal, on_gce,
                             stop_reason, stop_requested)


# ---- a state shaped like the run's (pool stacked on a leading axis of 30) ---------------
def make_state(seed: int, pool: int = 30):
    """Nested pytree: pool params + optax Adam state [pool,...], coreset, int step, uint32 key.

    Built from numpy (no per-op jit compiles), then placed on a 4-device CPU mesh:
    replicated everywhere except `x_proto`, which is sharded over `data`."""
    mesh = jax.make_mesh((4,), ("data",))
    rep, by_data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(seed)
    params = {"conv": {"kernel": rng.standard_normal((pool, 3, 3, 1, 8), np.float32)},
              "dense": {"kernel": rng.standard_normal((pool, 32, 10), np.float32),
                        "bias": np.full((pool, 10), seed, np.float32)}}
    opt = optax.adam(1e-3).init(params)  # (ScaleByAdamState(count, mu, nu), EmptyState())
    state = {
        "pool": {"params": params, "opt": opt, "steps": np.arange(pool, dtype=np.int32) + seed},
        "coreset": {"x_proto": rng.standard_normal((8, 8, 8, 1), np.float32),
                    "log_temp": np.float32(seed)},
        "step": np.int32(seed),
        "key": np.asarray([0, seed], np.uint32),  # jax.random.key_data(jax.random.key(seed))
    }
    state = jax.tree.map(lambda a: jax.device_put(a, rep), state)
    state["coreset"]["x_proto"] = jax.device_put(state["coreset"]["x_proto"], by_data)
    return state


def abstract_of(state):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def assert_same(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(expected)):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert np.array_equal(np.asarray(a), np.asarray(b)), f"values differ at {path}"
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), f"sharding differs at {path}"


CFG = make_config(dataset="digits", ipc=1).to_dict()


def _roundtrip(uri: str):
    state = make_state(7)
    assert state["key"].dtype == jnp.uint32
    with CheckpointStore(uri, keep=2) as store:
        assert store.latest_step() is None and store.read_config() is None
        assert store.save(7, state, CFG)
        store.wait()
        assert store.latest_step() == 7
    store = CheckpointStore(uri)  # a fresh process-like view of the folder
    restored, cfg = store.restore(abstract_of(state))
    assert_same(restored, state)
    assert cfg == json.loads(json.dumps(CFG))
    # jax.eval_shape output (shardings over an AbstractMesh) is a restore target too
    assert_same(store.restore(jax.eval_shape(lambda: make_state(0)), step=7)[0], state)
    # and leaves without a sharding land on device 0
    bare = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    plain = store.restore(bare)[0]
    assert plain["coreset"]["x_proto"].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert np.array_equal(np.asarray(plain["key"]), np.asarray(state["key"]))
    store.close()


def test_roundtrip_local_and_file_uri(tmp_path):
    _roundtrip(str(tmp_path / "run"))
    _roundtrip(f"file://{tmp_path}/run2")
    assert (tmp_path / "run" / "checkpoints" / "7" / "state").is_dir()


@pytest.mark.gcs
def test_roundtrip_gcs(gcs_bucket):
    _roundtrip(f"{gcs_bucket}/runs/a")


def test_retention_keeps_last_k_plus_final(tmp_path):
    uri = str(tmp_path / "run")
    small = {"w": jnp.arange(3.0)}
    with CheckpointStore(uri, keep=2) as store:
        for s in (1, 2, 3):
            store.save(s, {"w": small["w"] + s}, CFG, final=(s == 3))
        for s in (4, 5, 6):  # the run is extended past its final step
            store.save(s, {"w": small["w"] + s}, CFG)
        store.wait()
        assert store.all_steps() == [3, 5, 6]
        assert not store.save(6, small, CFG)  # an existing step is left alone
    with CheckpointStore(uri, keep=2) as store:  # the final mark survives a reopen
        store.save(7, small, CFG)
        store.wait()
        assert store.all_steps() == [3, 6, 7]
        # marking an existing step final rewrites it in place
        assert store.save(7, {"w": small["w"] * 0}, CFG, final=True)
        store.save(8, small, CFG)
        store.save(9, small, CFG)
        store.wait()
        assert store.all_steps() == [3, 7, 8, 9]
        assert float(store.restore(small, step=7)[0]["w"][1]) == 0.0
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["3", "7", "8", "9"]


def _save_two(uri):
    with CheckpointStore(uri, keep=3, async_save=False) as store:
        store.save(1, make_state(1, pool=2), CFG)
        store.save(2, make_state(2, pool=2), CFG)


def test_partial_newest_step_local_restores_previous(tmp_path):
    import shutil

    uri = str(tmp_path / "run")
    _save_two(uri)
    ck = tmp_path / "run" / "checkpoints"
    # what a save cut off mid-way leaves on a local disk (atomic rename): a temp folder
    shutil.copytree(ck / "2", ck / "3.orbax-checkpoint-tmp-1712345678")
    os.remove(ck / "3.orbax-checkpoint-tmp-1712345678" / "commit_success.txt")
    store = CheckpointStore(uri)
    assert store.latest_step() == 2 and store.all_steps() == [1, 2]
    restored, _ = store.restore(abstract_of(make_state(0, pool=2)))
    assert_same(restored, make_state(2, pool=2))
    assert (ck / "3.orbax-checkpoint-tmp-1712345678").is_dir()  # a reader deletes nothing
    assert store.save(3, make_state(3, pool=2), CFG)  # a writer clears the leftovers first
    store.close()
    assert CheckpointStore(uri).all_steps() == [1, 2, 3]
    assert sorted(os.listdir(ck)) == ["1", "2", "3"]
    assert not CheckpointStore(str(tmp_path / "typo")).all_steps()
    assert not (tmp_path / "typo").exists()  # reading creates no folders


@pytest.mark.gcs
def test_partial_newest_step_gcs_restores_previous(gcs_bucket):
    from rcig import storage

    uri = f"{gcs_bucket}/run"
    _save_two(uri)
    fs, root = storage.filesystem(f"{uri}/checkpoints")
    fs.copy(f"{root}/2", f"{root}/3", recursive=True)
    fs.rm(f"{root}/3/commit_success.txt")  # on GCS, Orbax commits with this file
    fs.invalidate_cache()
    assert fs.exists(f"{root}/3/state")
    store = CheckpointStore(uri)
    assert store.latest_step() == 2
    assert_same(store.restore(abstract_of(make_state(0, pool=2)))[0], make_state(2, pool=2))
    assert store.save(4, make_state(4, pool=2), CFG)
    store.close()
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/3") and CheckpointStore(uri).all_steps() == [1, 2, 4]


def test_config_mismatch_names_fields(tmp_path):
    uri = str(tmp_path / "run")
    with CheckpointStore(uri) as store:
        store.check_config(CFG)  # nothing saved yet: nothing to compare
        store.save(5, {"w": jnp.zeros(2)}, CFG)
        store.wait()
        same_but_longer = make_config(dataset="digits", ipc=1, overrides=[
            "steps=999", "checkpoint.every_steps=7", "eval.runs=2", "loop=unroll", "data_dir=/elsewhere"])
        store.check_config(same_but_longer.to_dict())
        other = make_config(dataset="digits", ipc=10, overrides=["model.width=8"]).to_dict()
        with pytest.raises(ConfigMismatchError) as e:
            store.check_config(other)
    msg = str(e.value)
    assert "ipc (saved 1, now 10)" in msg and "model.width (saved 32, now 8)" in msg
    assert "step 5" in msg and str(tmp_path) in msg and "steps (" not in msg


# ---- run identity: one definition for trial keys, resume and checkpoint checks ----------
def test_identity_ignores_fields_at_their_default_and_non_identity_fields():
    cfg = make_config("digits", 1, overrides=["steps=20"])
    # A config written before a field existed (the field absent) is the same run as one
    # with the field at its default: drop a defaulted field from the dict and compare.
    d = json.loads(cfg.to_json())
    assert d["outer"]["solve"] == DistillConfig().outer.solve
    del d["outer"]["solve"], d["lr_tune"]["batch"]
    assert identity_hash(d) == identity_hash(cfg) and run_differences(d, cfg) == []
    # evaluation, checkpoint policy, logging, data location, loop form: not identity
    same = apply_overrides(cfg, ["eval.runs=10", "checkpoint.keep=9", "log_every=3",
                                 "data_dir=/x", "loop=unroll"])
    assert identity_hash(same) == identity_hash(cfg) and run_differences(cfg, same) == []
    ident = run_identity(cfg)
    assert list(ident) == sorted(ident)
    assert {"dataset", "ipc", "seed", "steps"} <= set(ident) and json.loads(json.dumps(ident)) == ident
    assert not any(k.startswith(("eval.", "checkpoint.")) for k in ident)


def test_identity_changes_with_fields_that_change_the_distilled_set():
    cfg = make_config("digits", 1, overrides=["steps=20"])
    h = identity_hash(cfg)
    assert len(h) == 64 and int(h, 16) >= 0
    for o in ["model.width=64", "seed=1", "ipc=2", "steps=21", "inner.n_steps=5", "compute_dtype=bfloat16"]:
        assert identity_hash(apply_overrides(cfg, [o])) != h, o
    assert run_differences(cfg, apply_overrides(cfg, ["model.width=64"])) == ["model.width (saved 32, now 64)"]
    # resume may extend steps; nothing else
    longer = apply_overrides(cfg, ["steps=40"])
    assert run_differences(cfg, longer) == ["steps (saved 20, now 40)"]
    assert run_differences(cfg, longer, resume=True) == []
    # a field a later release removed (unknown here) still counts
    d = cfg.to_dict() | {"future": 3}
    assert run_differences(cfg, d) == ["future (saved <absent>, now 3)"]


def test_unreadable_checkpoints_raise_checkpoint_error(tmp_path):
    uri = str(tmp_path / "run")
    with CheckpointStore(uri) as store:
        with pytest.raises(CheckpointError, match="no committed checkpoint"):
            store.restore({"w": jnp.zeros(3)})
        store.save(4, {"w": jnp.arange(3.0)}, CFG)
        store.wait()
        with pytest.raises(CheckpointError, match="step 9"):
            store.restore({"w": jnp.zeros(3)}, step=9)
        with pytest.raises(CheckpointError, match=r"checkpoints step 4"):
            store.restore({"v": jnp.zeros(3)})  # a tree the checkpoint does not hold
    for d, _, files in os.walk(tmp_path / "run" / "checkpoints" / "4" / "state"):
        for f in files:
            if "manifest" in f or os.path.basename(d) == "d":
                os.remove(os.path.join(d, f))
    with pytest.raises(CheckpointError, match=r"checkpoints step 4"):
        CheckpointStore(uri).restore({"w": jnp.zeros(3)})


# ---- transient storage faults through a fault-injecting proxy ---------------------------
_FAULT_CHILD = r"""
import json, sys, time
sys.path.insert(0, "tests")
import jax, numpy as np
from test_checkpoint import make_state, abstract_of, CFG
from rcig.checkpoint import CheckpointStore
uri = sys.argv[1]
t = time.time()
store = CheckpointStore(uri, keep=1)
for s in (1, 2):                      # keep=1: the retention delete also runs through faults
    store.save(s, make_state(s, pool=4), CFG, final=False)
store.wait()
steps = store.all_steps()
restored, cfg = store.restore(abstract_of(make_state(0, pool=4)))
same = all(np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(make_state(2, pool=4))))
store.close()
print(json.dumps({"steps": steps, "same": same, "cfg_ok": cfg == json.loads(json.dumps(CFG)),
                  "seconds": time.time() - t}))
"""


@pytest.mark.gcs
@pytest.mark.slow
def test_saves_and_restores_survive_transient_faults(gcs, gcs_bucket):
    import conftest  # imported here: the child process imports this module and must keep its env

    rates = {"503": 0.025, "drop": 0.02, "drop_after": 0.02}  # ~1 request in 15 fails
    uri = f"{gcs_bucket}/faulty"
    with FaultProxy(gcs.url, rates=rates, seed=1234) as proxy:
        env = {**os.environ, **conftest.loopback_env(),
               "STORAGE_EMULATOR_HOST": proxy.url, "TENSORSTORE_GCS_HTTP_URL": proxy.url}
        out = subprocess.run([sys.executable, "-c", _FAULT_CHILD, uri], env=env, cwd=conftest.ROOT,
                             capture_output=True, text=True, timeout=300)
        counts = dict(proxy.counts)
    assert out.returncode == 0, f"{counts}\n{out.stderr[-3000:]}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["503"] and counts["drop"] and counts["drop_after"], counts  # faults really hit
    assert result == {**result, "steps": [2], "same": True, "cfg_ok": True}
    # Read back directly from the emulator (no proxy): what was committed is intact.
    store = CheckpointStore(uri)
    assert store.all_steps() == [2]
    assert_same(store.restore(abstract_of(make_state(0, pool=4)))[0], make_state(2, pool=4))
    store.close()


# ---- "is it time?" ------------------------------------------------------------------------
def test_should_save_with_injected_clock():
    clock = iter([0.0, 5.0, 9.9, 10.0, 31.0])
    args = dict(last_step=0, last_time=0.0, every_steps=0, every_seconds=10.0)
    assert [should_save(s, next(clock), **args) for s in (1, 2, 3, 4, 5)] == [False, False, False, True, True]
    assert should_save(50, 0.0, 49, 0.0, 50, 0) and not should_save(51, 1e9, 50, 0.0, 50, 0)
    assert not should_save(50, 1e9, 50, 0.0, 50, 10.0)   # never twice for one step
    assert should_save(100, 0.0, None, 0.0, 50, 0)
    assert not should_save(99, 1e9, 10, 0.0, 0, 0)       # both triggers off


# ---- stop requests ------------------------------------------------------------------------
def test_stop_signal_catches_real_sigterm_and_sigint():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as sig:
        assert not stop_requested(sig)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not sig.requested() and time.time() < deadline:
            time.sleep(0.01)
        assert stop_requested(sig, None) and sig.reason == "SIGTERM" == stop_reason(None, sig)
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: only the flag
        time.sleep(0.05)
        assert sig.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    with StopSignal() as sig2:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert sig2.reason == "SIGINT"
    assert EXIT_PREEMPTED == 75


def test_stop_signal_off_main_thread_warns():
    caught = []

    def run():
        with pytest.warns(RuntimeWarning, match="main thread"):
            caught.append(StopSignal().install())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert caught and not caught[0].requested()


class _Metadata(http.server.BaseHTTPRequestHandler):
    preempted = "FALSE"
    seen: list = []

    def do_GET(self):
        type(self).seen.append((self.path, self.headers.get("Metadata-Flavor")))
        body = type(self).preempted.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_gce_watcher_polls_injected_metadata_server(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/computeMetadata/v1/instance/preempted"
    not_gce, gce = tmp_path / "pc", tmp_path / "gce"
    not_gce.write_text("Standard PC (Q35 + ICH9, 2009)\n")
    gce.write_text("Google Compute Engine\n")
    try:
        assert not on_gce(str(not_gce)) and on_gce(str(gce)) and not on_gce(str(tmp_path / "none"))
        with GcePreemptionWatcher(url=url, product_name_path=str(not_gce), interval_s=0.02) as w:
            time.sleep(0.2)
        assert not w.requested() and _Metadata.seen == []  # off GCE: never polls
        with GcePreemptionWatcher(url=url, product_name_path=str(gce), interval_s=0.02) as w:
            time.sleep(0.2)
            assert not w.requested() and len(_Metadata.seen) >= 2
            _Metadata.preempted = "TRUE"
            deadline = time.time() + 5
            while not w.requested() and time.time() < deadline:
                time.sleep(0.02)
            assert stop_requested(None, w) and "GCE" in w.reason
        assert _Metadata.seen[0] == ("/computeMetadata/v1/instance/preempted", "Google")
    finally:
        server.shutdown()
        _Metadata.preempted, _Metadata.seen = "FALSE", []


# ---- storage faults on the command line: one error line, no traceback ----------------------
@pytest.mark.gcs
@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["distill", "--out", "gs://unreachable-bucket/run", "--steps", "2", "--no-eval", "--set", "model.width=8"],
    ["eval", "gs://unreachable-bucket/run"],
], ids=["distill", "eval"])
def test_cli_with_unreachable_storage_prints_one_line_and_no_traceback(argv):
    import shutil
    from pathlib import Path

    import conftest

    closed = f"http://127.0.0.1:{conftest.CLOSED_PORT}"  # nothing listens there
    env = {**conftest.loopback_env(), "PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "STORAGE_EMULATOR_HOST": closed, "TENSORSTORE_GCS_HTTP_URL": closed}
    exe = Path(sys.executable).parent / "rcig"
    exe = str(exe) if exe.exists() else (shutil.which("rcig") or "rcig")
    proc = subprocess.run([exe, *argv], env=env, cwd=conftest.ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode not in (0, EXIT_PREEMPTED), proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unreachable-bucket" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and 'File "' not in proc.stderr, proc.stderr[-3000:]
