"""A fault-injecting HTTP proxy on loopback, for storage clients in tests.

Put it in front of the GCS emulator: clients talk to the proxy (point
``TENSORSTORE_GCS_HTTP_URL`` / ``STORAGE_EMULATOR_HOST`` at ``proxy.url``), and it
forwards each request unchanged, except that a share of them, drawn from a seeded RNG,
fail instead:

- ``"503"``: answered with HTTP 503 and never forwarded;
- ``"drop"``: the connection is closed without an answer, request not forwarded;
- ``"drop_after"``: forwarded (so the server acts on it), then the connection is closed
  without an answer - the client cannot know the request took effect.

Example:
    >>> with FaultProxy("http://127.0.0.1:9023", rates={"503": 0.1, "drop": 0.05}) as p:
    ...     os.environ["STORAGE_EMULATOR_HOST"] = p.url          # doctest: +SKIP
    ...     ...; p.counts                                         # doctest: +SKIP
    {'forwarded': 120, '503': 13, 'drop': 6, 'drop_after': 0}
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
                "trailer", "upgrade", "content-length"}


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients hang up; that is the point
        pass


class FaultProxy:
    """Threaded loopback proxy that fails a seeded share of requests (see module doc)."""

    def __init__(self, upstream: str, *, rates: dict[str, float] | None = None, seed: int = 0,
                 host: str = "127.0.0.1", port: int = 0):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.rates = dict(rates or {})
        unknown = set(self.rates) - {"503", "drop", "drop_after"}
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts = {"forwarded": 0, "503": 0, "drop": 0, "drop_after": 0}
        self.enabled = True
        self._server = _QuietServer((host, port), self._handler_class())
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # ---- decisions -----------------------------------------------------------------
    def _decide(self) -> str:
        with self._lock:
            r = self._rng.random()
            fault = "ok"
            if self.enabled:
                acc = 0.0
                for kind in ("503", "drop", "drop_after"):
                    acc += self.rates.get(kind, 0.0)
                    if r < acc:
                        fault = kind
                        break
            self.counts["forwarded" if fault == "ok" else fault] += 1
            return fault

    @property
    def faults(self) -> int:
        return self.counts["503"] + self.counts["drop"] + self.counts["drop_after"]

    def _forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                if k.lower() not in _HOP_HEADERS:
                    conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _handle(self) -> None:
                body = self._read_body()
                fault = proxy._decide()
                if fault == "503":
                    msg = b'{"error": {"code": 503, "message": "injected fault"}}'
                    self.send_response(503, "Service Unavailable")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if fault == "drop":
                    return self._drop()
                try:
                    status, reason, headers, data = proxy._forward(
                        self.command, self.path, list(self.headers.items()), body)
                except OSError:
                    return self._drop()
                if fault == "drop_after":
                    return self._drop()
                self.send_response(status, reason)
                length = str(len(data))
                for k, v in headers:
                    if k.lower() == "content-length" and self.command == "HEAD":
                        length = v
                    elif k.lower() not in _HOP_HEADERS:
                        self.send_header(k, v)
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        return Handler

    # ---- lifecycle -----------------------------------------------------------------
    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
