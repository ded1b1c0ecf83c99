"""One small HTTP server per node: Prometheus text at /metrics, the dashboard at /, its data at /api/swarm.

stdlib `ThreadingHTTPServer` on its own daemon thread; GET only. The page and its script and style are
package data (ddm_node/observe/static/), served as they are: no build step, nothing fetched from a CDN.
Binds 127.0.0.1 unless told otherwise: the data names peers and addresses of a private swarm.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ddm_node.core.errors import DDMError
from ddm_node.observe.view import SwarmView

log = logging.getLogger(__name__)
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/style.css": ("style.css", "text/css; charset=utf-8")}


def static_file(name: str) -> bytes:
    return resources.files("ddm_node.observe").joinpath("static", name).read_bytes()


class MonitorServer:
    """`start()` binds (port 0 picks a free port) and returns the URL; `close()` stops it. Either part may be
    absent: a node without a view serves only /metrics, a dashboard client without a registry no /metrics."""

    def __init__(self, registry: CollectorRegistry | None, view: SwarmView | None, host: str = "127.0.0.1",
                 port: int = 0):
        self.registry, self.view, self.host, self.port = registry, view, host, port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> str:
        handler = type("Handler", (_Handler,), {"monitor": self})
        try:
            self._httpd = ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as exc:
            raise DDMError(f"--metrics-port: cannot listen on {self.host}:{self.port} ({exc.strerror or exc})") from None
        self._httpd.daemon_threads = True
        host, port = self._httpd.server_address[:2]
        self.port = port
        shown = f"[{host}]" if ":" in str(host) else host
        self.url = f"http://{shown}:{port}/"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="monitor-http", daemon=True)
        self._thread.start()
        return self.url

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> MonitorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    monitor: MonitorServer
    server_version = "ddm-node"

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        path = urlsplit(self.path).path
        try:
            if path in STATIC and self.monitor.view is not None:
                name, ctype = STATIC[path]
                self._send(HTTPStatus.OK, static_file(name), ctype)
            elif path == "/metrics" and self.monitor.registry is not None:
                self._send(HTTPStatus.OK, generate_latest(self.monitor.registry), CONTENT_TYPE_LATEST)
            elif path == "/api/swarm" and self.monitor.view is not None:
                body = json.dumps(self.monitor.view.snapshot(), allow_nan=False, default=str).encode()
                self._send(HTTPStatus.OK, body, "application/json")
            elif path == "/api/sample.png" and self.monitor.view is not None:
                png = self.monitor.view.sample_bytes()
                if png is None:
                    self._send(HTTPStatus.NOT_FOUND, b"no sample grid\n", "text/plain")
                else:
                    self._send(HTTPStatus.OK, png, "image/png")
            elif path == "/healthz":
                self._send(HTTPStatus.OK, b"ok\n", "text/plain")
            elif path == "/" and self.monitor.view is None:
                self._send(HTTPStatus.OK, b"ddm-node: metrics at /metrics\n", "text/plain")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # one request's boundary: the node goes on
            log.warning("monitor: %s failed: %r", path, exc)
            try:
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", "text/plain")
            except OSError:
                pass

    def _send(self, status: HTTPStatus, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's signature)
        log.debug("monitor: " + format, *args)
