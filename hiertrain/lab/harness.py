"""What every local harness shares: a job's processes on one machine (or in a testbed's namespaces),
its configs, a standby broker, and a watcher of its topics.

:class:`hiertrain.lab.local.LocalCluster` (the three-tier job) and
:class:`hiertrain.lab.fleetlocal.FleetCluster` (a fleet) differ in the job they write and in what
they read from the topics (:meth:`Harness.on_event`); starting, watching, freezing, killing and
cleaning up (processes by pid, the broker, cgroups) are written here once.
"""

from __future__ import annotations

import functools
import json
import queue
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

from hiertrain.net import topics
from hiertrain.net.transport import Endpoint, Transport


def toml(path: Path, job: str, creds: Path, sections: dict[str, dict[str, Any]], *, host: Optional[str] = None,
         standby: tuple[str, ...] = ()) -> Path:
    lines = [f'job = "{job}"', "[broker]", f'credentials = "{creds}"'] + ([f'host = "{host}"'] if host else []) + \
        ([f"standby = {json.dumps(list(standby))}"] if standby else [])
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def standby_broker(stack: Any, bdir: Any, where: Path) -> Any:
    """A standby broker on loopback, started in ``stack``: a copy of ``bdir`` (the same accounts and
    ACL, none of its data) on a port of its own, as an operator sets one up on a second machine."""
    from hiertrain.broker.layout import BrokerDir
    from hiertrain.broker.process import BrokerProcess, available_kind, free_port

    standby = BrokerDir(where)
    shutil.copytree(bdir.root, standby.root, ignore=shutil.ignore_patterns("data"))
    standby.data.mkdir(exist_ok=True)
    standby.with_port(free_port())
    stack.enter_context(BrokerProcess(standby, kind=available_kind()))
    return standby


def stop(procs: Any, timeout: float = 10.0) -> None:
    """Terminate the processes still running (SIGTERM, then SIGKILL after ``timeout``), in order."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def unwinding(init: Any) -> Any:
    """For a harness's ``__init__``: if it fails half way (a broker that did not start, a watcher
    that cannot connect), stop what it already started before the error goes up."""
    @functools.wraps(init)
    def wrapper(self: "Harness", *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except BaseException:
            if hasattr(self, "stack"):
                self.close()
            raise
    return wrapper


class Harness:
    def __init__(self, work: Path, job: str, *, network: Any = None, launch: Optional[dict[str, list[str]]] = None) -> None:
        """``network``: a testbed whose namespaces hold the processes (``prefix(where)``);
        ``launch``: per process, the command that runs Python there (default this interpreter)."""
        self.work, self.job, self.network, self.launch = work, job, network, launch or {}
        self.stack = ExitStack()
        self.procs: dict[str, subprocess.Popen] = {}
        self.quotas: dict[str, Any] = {}  # process name -> its CpuQuota
        self.watch: Optional[Transport] = None

    def _prefix(self, where: str) -> list[str]:
        return self.network.prefix(where) if self.network is not None else []

    def spawn(self, name: str, args: list[str], *, where: str) -> subprocess.Popen:
        """``python -m hiertrain ARGS`` as process ``name`` (in ``where``'s namespace), logging to ``name.log``."""
        with open(self.work / f"{name}.log", "a") as log:
            python = self.launch.get(name, [sys.executable])
            # in the job's own directory: a source checkout in the caller's directory must not
            # shadow the hiertrain a tier's Python has installed
            proc = subprocess.Popen([*self._prefix(where), *python, "-m", "hiertrain", *args], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.work)
        self.procs[name] = proc
        if name in self.quotas:
            self.quotas[name].add(proc.pid)
        return proc

    def open_watch(self, creds: Endpoint) -> Transport:
        """The watcher: the planner's credentials, read only, on every telemetry, status and schedule."""
        self.watch = Transport(creds, account="planner", job=self.job, observer=True)
        for kind in ("telemetry", "status"):
            self.watch.subscribe(topics.all_of_kind(self.job, kind))
        self.watch.subscribe(topics.schedule(self.job))
        return self.stack.enter_context(self.watch)

    def pump(self, timeout: float = 0.2) -> list[Any]:
        """Hand what the watcher received to :meth:`on_event` (waiting up to ``timeout`` for the first)."""
        assert self.watch is not None
        got: list[Any] = []
        wait: Optional[float] = timeout
        while True:
            try:
                ev = self.watch.events.get(timeout=wait) if wait else self.watch.events.get_nowait()
            except queue.Empty:
                return got
            wait = None
            got.append(ev)
            self.on_event(ev)

    def on_event(self, ev: Any) -> None:
        raise NotImplementedError

    def wait(self, names: tuple[str, ...], timeout: float = 120) -> dict[str, Optional[int]]:
        """Exit codes of the processes named (``None``: still running after ``timeout``)."""
        codes: dict[str, Optional[int]] = {}
        deadline = time.monotonic() + timeout
        for name in names:
            try:
                codes[name] = self.procs[name].wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = None
        self.pump(0.5)
        return codes

    def log(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def pause(self, name: str) -> None:
        """Freeze a process (SIGSTOP): online, but silent, as a hung process is."""
        self.procs[name].send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGCONT)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        stop(list(self.procs.values()))
        self.stack.close()

    def __enter__(self) -> "Harness":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
