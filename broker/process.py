"""A broker child process (Mosquitto, or the embedded fallback), waited on until it is ready."""

from __future__ import annotations

import collections
import socket
import subprocess
import threading
from typing import Optional, Sequence

from hiertrain.broker import embedded, mosquitto
from hiertrain.broker.layout import BrokerDir
from hiertrain.errors import BrokerError


class BrokerProcess:
    """Starts ``kind`` ("mosquitto" or "embedded") for ``bdir`` and returns once it listens.

    ``prefix`` runs it under another command (``ip netns exec NS`` in the testbed).

    Readiness is the broker's own log line saying it runs (after its listeners opened), not a
    sleep. If the process exits first, :class:`BrokerError` carries its last log lines.
    """

    def __init__(self, bdir: BrokerDir, *, kind: str = "mosquitto", port: Optional[int] = None,
                 timeout: float = 15.0, prefix: Sequence[str] = ()) -> None:
        if kind == "mosquitto":
            self.settings = mosquitto.write_config(bdir, port)
            argv, ready = mosquitto.command(bdir), mosquitto.READY
        elif kind == "embedded":
            argv, ready = embedded.command(bdir, port), embedded.READY
            self.settings = bdir.settings()
        else:
            raise BrokerError(f"unknown broker kind {kind!r}: expected mosquitto or embedded")
        self.kind = kind
        self.port = self.settings.port
        self.log: collections.deque[str] = collections.deque(maxlen=500)
        self._ready_marker = ready
        self._ready = threading.Event()
        self.proc = subprocess.Popen([*prefix, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            tail = " | ".join(list(self.log)[-3:]) or "no output"
            raise BrokerError(f"{kind} broker did not start on port {self.port}: {tail}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line.rstrip())
            if self._ready_marker in line:
                self._ready.set()
        self._ready.set()  # it exited: wake the waiter, which checks poll()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout)

    def __enter__(self) -> "BrokerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def available_kind() -> str:
    """Mosquitto when installed, else the embedded fallback."""
    return "mosquitto" if mosquitto.executable() else "embedded"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
