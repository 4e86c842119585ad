"""``hiertrain dashboard``: one read-only page of a job, live, served from the observer's subscription.

The observer account (never a tier's or the planner's) reads every status, telemetry and schedule of
the job; :class:`~hiertrain.dashboard.state.Board` folds them into a bounded state; a small HTTP
server gives the page (``page.html``, no build step, nothing fetched from the internet) and the state
as JSON, which the page polls each second. Bound to localhost by default; exposed on another address
only over TLS and with the observer's password (HTTP basic auth, user ``observer``).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import queue
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

from hiertrain.config import ServiceConfig
from hiertrain.dashboard.state import Board
from hiertrain.errors import ConfigError
from hiertrain.net import topics
from hiertrain.net.transport import Transport

log = logging.getLogger("hiertrain.dashboard")


def _loopback(bind: str) -> bool:
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return bind == "localhost"


class Dashboard:
    """The observer's subscription folded into a :class:`Board`, and the HTTP server of the page."""

    def __init__(self, cfg: ServiceConfig, *, port: int = 0, bind: str = "127.0.0.1", cert: Optional[Path] = None,
                 key: Optional[Path] = None) -> None:
        if cfg.endpoint.username != "observer":
            raise ConfigError(f"{cfg.path}: the dashboard reads with the observer account, not "
                              f"{cfg.endpoint.username!r} (use the broker's credentials/observer file)")
        exposed = not _loopback(bind)
        if exposed and not (cert and key):
            raise ConfigError(f"--bind {bind} exposes the dashboard: give --cert and --key (TLS); it then asks for "
                              f"the observer's password")
        if bool(cert) != bool(key):
            raise ConfigError("--cert and --key go together")
        self.board = Board(cfg.job)
        self.lock = threading.Lock()
        self.transport = Transport(cfg.endpoint, account="observer", job=cfg.job, observer=True)
        for kind in ("telemetry", "status"):
            self.transport.subscribe(topics.all_of_kind(cfg.job, kind))
        self.transport.subscribe(topics.schedule(cfg.job))
        self.password = cfg.endpoint.password if exposed else None
        self.server = ThreadingHTTPServer((bind, port), self._handler())
        self.server.daemon_threads = True
        if cert and key:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            # the handshake in the request's own thread: a client that never completes one holds up no other
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self.scheme = "https" if cert else "http"
        self.page = resources.files("hiertrain.dashboard").joinpath("page.html").read_bytes()
        self._stop = threading.Event()

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{self.scheme}://{host}:{port}/"

    def _fold(self) -> None:
        while not self._stop.is_set():
            try:
                ev = self.transport.events.get(timeout=0.5)
            except queue.Empty:
                continue
            kind = "schedule" if isinstance(ev.topic, topics.ScheduleTopic) else ev.topic.kind
            with self.lock:
                self.board.offer(getattr(ev.topic, "account", ""), kind, ev.payload, time.time())

    def snapshot(self) -> bytes:
        with self.lock:
            return json.dumps(self.board.snapshot(), allow_nan=False, default=str).encode()

    def _handler(self) -> Callable[..., BaseHTTPRequestHandler]:
        board = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("%s " + fmt, self.client_address[0], *args)

            def _allowed(self) -> bool:
                if board.password is None:
                    return True
                got = self.headers.get("Authorization", "")
                want = "Basic " + base64.b64encode(f"observer:{board.password}".encode()).decode()
                if hmac.compare_digest(got.encode(), want.encode()):
                    return True
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="hiertrain"')
                self.end_headers()
                return False

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if not self._allowed():
                    return
                path = self.path.split("?", 1)[0]
                if path == "/":
                    body, kind = board.page, "text/html; charset=utf-8"
                elif path == "/state.json":
                    body, kind = board.snapshot(), "application/json"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def __enter__(self) -> "Dashboard":
        self.transport.start()
        threading.Thread(target=self._fold, name="dashboard-fold", daemon=True).start()
        threading.Thread(target=self.server.serve_forever, name="dashboard-http", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.transport.stop()


def serve(cfg: ServiceConfig, *, port: int = 8080, bind: str = "127.0.0.1", cert: Optional[Path] = None,
          key: Optional[Path] = None) -> int:
    """Serve until interrupted (SIGINT or SIGTERM): 0."""
    with Dashboard(cfg, port=port, bind=bind, cert=cert, key=key) as d:
        print(f"dashboard: {d.address} (job {cfg.job}, read-only as observer)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0
