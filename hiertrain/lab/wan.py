"""A WAN link that can be cut: a TCP relay on loopback between an edge site's broker bridge and the
cloud's broker (tests of hierarchical jobs). Cut, every connection through it is closed and new ones
are refused, as when a site loses its uplink; restored, it carries them again."""

from __future__ import annotations

import socket
import threading
from typing import Optional


class Wan:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.up = True
        self._closed = False
        threading.Thread(target=self._accept, name="wan-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            if not self.up:
                conn.close()
                continue
            try:
                remote = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._open += [conn, remote]
            for a, b in ((conn, remote), (remote, conn)):
                threading.Thread(target=self._pump, args=(a, b), name="wan-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """The link goes down: every connection through it closes, new ones are refused."""
        self.up = False
        with self._lock:
            conns, self._open = self._open, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._server.close()

    def __enter__(self) -> "Wan":
        return self

    def __exit__(self, *exc: Optional[object]) -> None:
        self.close()
