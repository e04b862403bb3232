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
}
os.environ.update(_LOOPBACK_ENV)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def loopback_env() -> dict[str, str]:
    """Environment a subprocess (or Ray worker) needs to stay on loopback."""
    env = dict(_LOOPBACK_ENV)
    env["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
    env["JAX_PLATFORMS"] = "cpu"
    return env


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
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        except Exception:  # not found etc.: the plain handler answers
            pass
        return plain_download(request, response, storage, *args, **kwargs)

    download._sends_generation = True
    objects.download = download
    from gcp_storage_emulator import server  # its routing table may hold the plain handler

    for _, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            if handler is plain_download:
                methods[method] = download


class GcsEmulator:
    """A real GCS-protocol server (gcp-storage-emulator) on loopback."""

    def __init__(self, port: int):
        _emulator_sends_generation_headers()
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
