"""Test-wide setup: 4 emulated CPU devices and loopback-only cloud clients.

Everything here runs before jax, gcsfs, google-auth or tensorstore is imported, so the
environment variables below decide where those libraries send requests: to the
loopback GCS emulator started by the `gcs` fixture, or to a closed loopback port.
No test may reach a real cloud endpoint or the GCE metadata server.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

# --- must happen before jax is imported anywhere -------------------------------------
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A port nothing listens on: the metadata server and any default endpoint go there.
CLOSED_PORT = _free_port()
GCS_PORT = _free_port()
GCS_URL = f"http://127.0.0.1:{GCS_PORT}"

_LOOPBACK_ENV = {
    "STORAGE_EMULATOR_HOST": GCS_URL,
    "TENSORSTORE_GCS_HTTP_URL": GCS_URL,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": f"127.0.0.1:{CLOSED_PORT}",
    "GCE_METADATA_IP": f"127.0.0.1:{CLOSED_PORT}",
    "GOOGLE_CLOUD_PROJECT": "rcig-test",
    "RCIG_GCS_TOKEN": "anon",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Every Ray the tests start binds 127.0.0.1, not the machine's network address: the
    # local Ray of `init_ray` (orchestrator.preflight.NODE_IP_ENV), and Ray's own address
    # lookup (bootstrap addresses, nodes an autoscaler launches) answers loopback.
    "RCIG_RAY_NODE_IP": "127.0.0.1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
os.environ.update(_LOOPBACK_ENV)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def wait_for(pred, timeout: float, what: str, every: float = 0.2):
    """Poll `pred()` until it returns something truthy (returned); AssertionError naming
    `what` after `timeout` seconds."""
    from orchestrator.polling import poll_until

    v = poll_until(pred, timeout, every)
    assert v, f"timed out after {timeout}s waiting for {what}"
    return v


@pytest.fixture(scope="module")
def ray_local(request):
    """A local Ray for the module's sweeps, started as `rcig sweep launch` starts it (bound
    to 127.0.0.1 under the tests), in its own temp dir so that a Ray started elsewhere on
    this machine (its address in /tmp/ray/ray_current_cluster) is never joined by mistake.
    The module's `TEST_ENV` (if any) is set first."""
    import tempfile

    import ray

    from orchestrator.sweep import init_ray

    os.environ.update(getattr(request.module, "TEST_ENV", {}))
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    init_ray(num_cpus=2)
    yield
    ray.shutdown()
    if before is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = before


def assert_same_distilled(a_path, b_path, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Two distilled.npz files hold the same set (floats to rtol/atol, the rest exactly)."""
    import numpy as np

    a, b = np.load(a_path), np.load(b_path)
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        if a[name].dtype.kind in "fc":
            np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def loopback_env() -> dict[str, str]:
    """Environment a subprocess (or Ray worker) needs to stay on loopback."""
    env = dict(_LOOPBACK_ENV)
    env["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
    env["JAX_PLATFORMS"] = "cpu"
    return env


_INSERT_LOCK = threading.Lock()  # one upload or download at a time in the emulator


def _emulator_sends_generation_headers() -> None:
    """Make gcp-storage-emulator's media downloads carry `x-goog-generation`, as real GCS
    does. Without it tensorstore's OCDBT (Orbax's array store) sometimes re-reads its
    manifest with no generation and then fails its next conditional write with
    "Malformed StorageGeneration" (seen flaking the gs:// checkpoint tests)."""
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.download, "_sends_generation", False):
        return
    plain_download = objects.download

    def download(request, response, storage, *args, **kwargs):
        with _INSERT_LOCK:  # content and generation of one version, as GCS serves them
            return _download(request, response, storage, *args, **kwargs)

    def _download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        except Exception:  # not found etc.: the plain handler answers
            pass
        return plain_download(request, response, storage, *args, **kwargs)

    download._sends_generation = True
    _replace_handler(plain_download, download)


def _replace_handler(plain, patched) -> None:
    """Install `patched` wherever the emulator uses `plain` (module and routing table)."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    setattr(objects, plain.__name__, patched)
    for _, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            if handler is plain:
                methods[method] = patched


def _emulator_honours_generation_preconditions() -> None:
    """Make gcp-storage-emulator's uploads honour `ifGenerationMatch`, as real GCS does
    (412 when the object is not at that generation; 0 means "must not exist"). The plain
    emulator ignores the parameter, so a compare-and-swap could not lose against it.
    Uploads run one at a time so that the check and the write are one step."""
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.insert, "_preconditions", False):
        return
    plain_insert = objects.insert

    def insert(request, response, storage, *args, **kwargs):
        with _INSERT_LOCK:
            want = (request.query.get("ifGenerationMatch") or [None])[0]
            if want is not None:
                name = (request.query.get("name") or [None])[0]
                if name is None and isinstance(request.data, dict):
                    name = (request.data.get("meta") or {}).get("name") or request.data.get("name")
                try:
                    have = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
                except NotFound:
                    have = "0"
                if have != str(want):
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    response.json({"error": {"code": 412, "message": "conditionNotMet",
                                             "errors": [{"reason": "conditionNotMet"}]}})
                    return None
            return plain_insert(request, response, storage, *args, **kwargs)

    insert._preconditions = True
    _replace_handler(plain_insert, insert)


class GcsEmulator:
    """A real GCS-protocol server (gcp-storage-emulator) on loopback."""

    def __init__(self, port: int):
        _emulator_sends_generation_headers()
        _emulator_honours_generation_preconditions()
        from gcp_storage_emulator.server import create_server

        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._server = create_server("127.0.0.1", port, in_memory=True)
        self._thread = threading.Thread(target=self._server.start, daemon=True)
        self._thread.start()
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"gcp-storage-emulator did not start on port {port}")

    def make_bucket(self, name: str) -> str:
        import gcsfs

        fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=self.url)
        try:
            fs.mkdir(name)
        except FileExistsError:
            pass
        fs.invalidate_cache()
        return f"gs://{name}"

    def stop(self) -> None:
        try:
            self._server.stop()
        except Exception:
            pass


@pytest.fixture(scope="session")
def gcs():
    """Session-wide loopback GCS emulator; `gcs.make_bucket(name)` returns `gs://name`."""
    emu = GcsEmulator(GCS_PORT)
    yield emu
    emu.stop()


@pytest.fixture
def gcs_bucket(gcs, request):
    """A fresh bucket for one test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50]
    name = name.strip("-") + f"-{int(time.time() * 1000) % 100000}"
    return gcs.make_bucket(name)


# --- Ray on loopback: which raylets the suite started, and where they bind ---------------

def _proc_table() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, argv) of every process this user can read."""
    table = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            table[int(d.name)] = (ppid, [a for a in argv if a])
        except (OSError, ValueError):
            continue
    return table


def suite_pids(roots: tuple[str, ...] = (), table=None, *, mine: bool = True,
               extra: tuple[int, ...] = ()) -> set[int]:
    """This test process's descendants (with `mine`), plus every process whose command line
    names one of `roots` (a Ray temp dir: processes an autoscaler or `ray start` launched)
    or is in `extra`, and their descendants."""
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seeds = ([os.getpid()] if mine else []) + list(extra) + [
        pid for pid, (_, argv) in table.items() if any(r and r in a for r in roots for a in argv)]
    seen: set[int] = set()
    while seeds:
        pid = seeds.pop()
        if pid not in seen:
            seen.add(pid)
            seeds.extend(children.get(pid, []))
    seen.discard(os.getpid())
    return seen


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def raylet_node_ips(roots: tuple[str, ...] = ()) -> dict[int, str]:
    """pid -> `--node_ip_address` of each raylet the suite started: descendants of this
    process, or naming one of `roots` (see `suite_pids`). Only raylets are looked at
    closely, so this stays cheap enough to run after every test."""
    out = {}
    me = os.getpid()
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if (d / "comm").read_text().strip() != "raylet":
                continue
            argv = [a for a in (d / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
            if not argv:  # exiting (a zombie has no command line): it binds nothing any more
                continue
            pid, ours = int(d.name), any(r and r in a for r in roots for a in argv)
            p = pid
            while not ours and p > 1:
                p = _parent(p)
                ours = p == me
        except (OSError, ValueError):
            continue
        if ours:
            ips = [a.split("=", 1)[1] for a in argv if a.startswith("--node_ip_address=")]
            out[pid] = ips[0] if ips else ""
    return out


_RAY_ROOTS: list[str] = []  # temp dirs of Ray clusters the suite started with `ray start`


@pytest.fixture(autouse=True)
def _ray_stays_on_loopback():
    """After every test: no raylet the suite started binds a non-loopback address."""
    yield
    if "ray" not in sys.modules and not _RAY_ROOTS:
        return  # nothing in this process has started Ray
    bad = {pid: ip for pid, ip in raylet_node_ips(tuple(_RAY_ROOTS)).items()
           if not ip.startswith("127.")}
    if bad:
        pytest.fail(f"raylets started by the tests bind non-loopback addresses: {bad}")


# --- an autoscaling Ray cluster on this machine -----------------------------------------

def _started(pid: int) -> int | None:
    """A process's start time (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


FAKE_HEAD_ID = "f" * 51 + "00000"  # the fake provider's head node id


class AutoscalingRay:
    """A real autoscaling Ray cluster on loopback: `ray start --head` with Ray's fake
    multi-node provider; worker nodes are real raylets that the autoscaler (v2, as `ray up`
    and KubeRay run it) starts and stops as demand comes and goes.

    Stopped by ending only the processes under its own temp dir (never `ray stop`).
    """

    def __init__(self, worker_types: dict, *, idle_timeout_s: float = 15, max_workers: int = 3):
        self.worker_types = worker_types
        self.idle_timeout_s = idle_timeout_s
        self.max_workers = max_workers
        self.proc = None
        self.dir: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def client_address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    def config(self) -> dict:
        return {
            "cluster_name": "rcig-fake",
            "max_workers": self.max_workers,
            "idle_timeout_minutes": self.idle_timeout_s / 60,
            "upscaling_speed": 1.0,
            "provider": {
                # Ray's fake multi-node provider, loaded as an external module: its
                # `fake_multinode` entry wants an example.yaml the wheel does not ship.
                "type": "external",
                "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                "gcs_address": self.address, "launch_multiple": True, "head_node_id": FAKE_HEAD_ID,
                "disable_node_updaters": True, "disable_launch_config_check": True,
                "use_node_id_as_ip": True,
            },
            "auth": {"ssh_user": "ubuntu"},
            "head_node_type": "ray.head.default",
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                **{name: {"node_config": {}, "min_workers": 0, **t} for name, t in self.worker_types.items()},
            },
            **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands",
                               "worker_start_ray_commands", "cluster_synced_files",
                               "rsync_exclude", "rsync_filter")},
            "file_mounts": {}, "file_mounts_sync_continuously": False,
        }

    def start(self, timeout: float = 90) -> "AutoscalingRay":
        import json
        import shutil
        import subprocess
        import tempfile

        # This process is a client of the cluster: token authentication on, as Ray itself
        # turns it on (`_enable_token_auth`: the variable, then Ray's config re-read).
        os.environ["RAY_AUTH_MODE"] = "token"
        from ray._private.authentication.authentication_token_setup import generate_and_save_token
        from ray._raylet import Config

        Config.initialize("")
        self.dir = Path(tempfile.mkdtemp(prefix="rcig-as-", dir="/tmp"))  # short: socket paths
        _RAY_ROOTS.append(str(self.dir))
        self.port, self.client_port = _free_port(), _free_port()
        if not os.environ.get("RAY_AUTH_TOKEN") and not Path("~/.ray/auth_token").expanduser().exists():
            generate_and_save_token()  # what a local `ray.init` does on first use
        cfg = self.dir / "autoscaling.yaml"
        cfg.write_text(json.dumps(self.config()))
        env = {**os.environ, **loopback_env(),
               "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_enable_autoscaler_v2": "1",
               "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_ID,
               "RAY_NODE_TYPE_NAME": "ray.head.default", "RAY_AUTH_MODE": "token"}
        ray_exe = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
        self.log = open(self.dir / "head.log", "wb")
        self.proc = subprocess.Popen(
            [ray_exe, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={self.port}", "--num-cpus=0", f"--autoscaling-config={cfg}",
             f"--temp-dir={self.dir / 'ray'}", "--include-dashboard=false",
             f"--ray-client-server-port={self.client_port}", "--disable-usage-stats"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(self.dir / 'head.log').read_text()[-3000:]}")
            try:
                if self.nodes():
                    return self
            except Exception:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("the autoscaling cluster's head did not come up")

    def set_max_workers(self, node_type: str, n: int) -> None:
        """Change a node type's `max_workers` in the live config: the autoscaler re-reads
        it every round; fewer than are running makes it terminate nodes through the provider."""
        import json

        self.worker_types[node_type]["max_workers"] = n
        tmp = self.dir / "autoscaling.yaml.tmp"
        tmp.write_text(json.dumps(self.config()))
        tmp.replace(self.dir / "autoscaling.yaml")

    def status(self):
        from ray._raylet import GcsClient
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(address=self.address).get_cluster_status(timeout_s=10))
        return reply

    def nodes(self) -> list[dict]:
        """Live nodes: type, id (hex), resources."""
        from ray.core.generated.autoscaler_pb2 import NodeStatus

        return [{"type": n.ray_node_type_name, "id": n.node_id.hex(), "resources": dict(n.total_resources)}
                for n in self.status().cluster_resource_state.node_states
                if n.status != NodeStatus.Value("DEAD")]

    def workers(self) -> list[dict]:
        return [n for n in self.nodes() if n["type"] != "ray.head.default"]

    def pids(self) -> set[int]:
        """Its own processes: `ray start`, everything naming its temp dir, their children."""
        extra = (self.proc.pid,) if self.proc is not None else ()
        return suite_pids((str(self.dir),), mine=False, extra=extra) - {os.getpid()}

    def stop(self) -> None:
        import shutil
        import signal

        if self.proc is None:
            return
        # Collected before anything dies (orphans lose their parent link), with start
        # times, so a pid the system reuses meanwhile is never signalled.
        doomed = {p: _started(p) for p in self.pids()}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` ends the head's processes
            try:
                self.proc.wait(timeout=20)
            except Exception:
                pass
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            doomed.update({p: _started(p) for p in self.pids() if p not in doomed})
            pids = {p for p, t in doomed.items() if t is not None and _started(p) == t}
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            end = time.time() + wait
            while pids and time.time() < end:
                pids = {p for p in pids if _started(p) == doomed[p]}
                time.sleep(0.1)
        self.proc = None
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
