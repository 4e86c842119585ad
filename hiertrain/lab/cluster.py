"""The local harness: a whole job on one machine (or in a testbed's namespaces) - its broker (and a
standby), the processes of every account, their configs, CPU quotas, and a watcher of its topics.

One harness runs any job: what differs between a three-tier job and a fleet is the job
(:mod:`hiertrain.lab.jobs`: which accounts it enrolls, which configs it writes, who drives its clock).
Used by ``hiertrain demo``, the benchmarks and the integration tests. Everything started here is
stopped by :meth:`Cluster.close` (processes by pid, the brokers, the cgroups).
"""

from __future__ import annotations

import functools
import json
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

from hiertrain.errors import ConfigError, HiertrainError
from hiertrain.net import topics
from hiertrain.net.transport import Endpoint, Transport
from hiertrain.train import checkpoint, models


def toml(path: Path, job: str, creds: Path, sections: dict[str, dict[str, Any]], *, host: Optional[str] = None,
         standby: tuple[str, ...] = ()) -> Path:
    """Write one account's config: the job, its broker, and ``sections`` (a TOML table each)."""
    lines = [f'job = "{job}"', "[broker]", f'credentials = "{creds}"'] + ([f'host = "{host}"'] if host else []) + \
        ([f"standby = {json.dumps(list(standby))}"] if standby else [])
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _value(v: Any) -> str:
    """A TOML value: a mapping as an inline table, anything else as JSON writes it (TOML's too)."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


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
    """For the harness's ``__init__``: if it fails half way (a broker that did not start, a watcher
    that cannot connect), stop what it already started before the error goes up."""
    @functools.wraps(init)
    def wrapper(self: "Cluster", *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except BaseException:
            if hasattr(self, "stack"):
                self.close()
            raise
    return wrapper


class Cluster:
    @unwinding
    def __init__(self, work: Path, job: Any, *, broker_dir: Any = None, network: Any = None,
                 launch: Optional[dict[str, list[str]]] = None, standby: bool = False,
                 quotas: Optional[dict[str, float]] = None, bridge: Optional[tuple[str, Path]] = None) -> None:
        """``job``: a :class:`~hiertrain.lab.jobs.ThreeTier` or a :class:`~hiertrain.lab.jobs.Fleet`.
        ``broker_dir``: a broker already running (default: one started here, the job's accounts
        enrolled). ``network``: a testbed whose namespaces hold the processes (its ``prefix(where)``,
        ``broker_for``). ``launch``: per process, the command that runs Python there (default this
        interpreter; another virtualenv's, an emulated arm64 machine's), with a cache of its own.
        ``standby``: a standby broker (a copy of the broker directory, on loopback) that every account
        and this watcher move to when theirs is gone (:attr:`standby_dir`). ``quotas``: per process,
        its CPU in cores (cgroup v1, as root), on top of the job's own. ``bridge``: (site, the bridge
        credentials ``broker add-site`` wrote on the cloud's broker): this broker is that edge site's of a
        hierarchical job, bridged to the cloud's."""
        from hiertrain.broker.layout import BrokerDir, Settings
        from hiertrain.broker.process import BrokerProcess, available_kind, free_port
        from hiertrain.lab.cgroup import CpuQuota

        self.work, self.job, self.network, self.launch = work, job, network, launch or {}
        self.stack = ExitStack()
        self.procs: dict[str, subprocess.Popen] = {}
        self.quotas: dict[str, Any] = {}  # process name -> its CpuQuota
        self.watch: Optional[Transport] = None
        self.host: dict[str, str] = dict(network.broker_for) if network is not None else {}
        work.mkdir(parents=True, exist_ok=True)
        self.broker = None
        if broker_dir is None:
            broker_dir = BrokerDir(work / "broker")
            site, creds = bridge or (None, None)
            broker_dir.init(Settings(port=free_port(), bind="0.0.0.0" if network else "127.0.0.1", job=job.name,
                                     site=site, bridge=str(creds) if creds else None))
            for account in job.accounts():
                broker_dir.add_device(account)  # before the broker starts: an embedded broker reads accounts once
            self.broker = self.stack.enter_context(BrokerProcess(broker_dir, kind=available_kind(),
                                                                 prefix=self._prefix("edge")))
        elif job.accounts():
            raise ConfigError("a job with accounts of its own to enroll starts its own broker")
        self.bdir = broker_dir
        self.standby_dir: Any = None
        if standby:
            if network is not None:
                raise ConfigError("a standby broker runs on loopback only, not in the testbed")
            self.standby_dir = standby_broker(self.stack, broker_dir, work / "standby-broker")
        self.addresses = (f"127.0.0.1:{self.standby_dir.settings().port}",) if standby else ()
        for name, cores in {**job.quotas(), **(quotas or {})}.items():
            self.quotas[name] = self.stack.enter_context(CpuQuota(cores))
        self.configs: dict[str, Path] = job.write(self)
        self.telemetry: list[tuple[str, dict[str, Any]]] = []
        self.status: list[tuple[str, dict[str, Any]]] = []
        self.states: dict[str, Any] = {}          # account -> its newest status's state
        self.schedules: list[dict[str, Any]] = []  # as they came on the schedule topic
        self.steps: dict[int, dict[str, Any]] = {}  # iteration -> the telemetry that reported its loss
        creds = replace(Endpoint.load(broker_dir.credentials_file("planner")), standby=self.addresses)
        self.open_watch(replace(creds, host=self.host["root"]) if "root" in self.host else creds)

    def config(self, name: str, tier: str, sections: dict[str, Any], *, broker: Any = None) -> Path:
        """Write process ``name``'s config (a ``tier``'s, the device's with its own account) for this
        cluster's broker (or ``broker``: the standby), in the work directory."""
        broker = broker or self.bdir
        return toml(self.work / f"{name}.toml", self.job.name, broker.credentials_file(name if tier == "device" else tier),
                    sections, host=self.host.get(name, self.host.get(tier)),
                    standby=self.addresses if broker is self.bdir else ())

    def cache(self, name: str) -> str:
        """Process ``name``'s segment cache: shared, unless it runs a Python of its own."""
        return str(self.work / (f"cache-{name}" if name in self.launch else "cache"))

    # ------------------------------------------------------------------ processes

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

    def start(self, *names: str, resume: bool = False) -> None:
        """Start the processes named (default: every one the job starts with), each as its systemd
        unit does (``resume``: with ``--resume``)."""
        for name in names or self.job.processes():
            tier = self.job.tier_of(name)
            self.spawn(name, [tier, "run", "--config", str(self.configs[name]), *(["--resume"] if resume else [])],
                       where=name)

    def start_planner(self, profile: Path, *, bw_device_edge: float, bw_edge_cloud: float,
                      cost_model: str = "paper", on_standby: bool = False) -> None:
        """The planner service next to the broker (``on_standby``: a second one, next to the
        standby broker, as process ``planner-standby``)."""
        name, bdir = ("planner-standby", self.standby_dir) if on_standby else ("planner", self.bdir)
        cfg = toml(self.work / f"{name}.toml", self.job.name, bdir.credentials_file("planner"), {
            "planner": {"batch": self.job.batch, "profile": str(profile), "bw_device_edge": bw_device_edge,
                        "bw_edge_cloud": bw_edge_cloud, "cost_model": cost_model}},
            host="127.0.0.1" if on_standby else self.host.get("edge"))
        self.spawn(name, ["planner", "run", "--config", str(cfg)], where="edge")

    def start_dashboard(self, port: int, timeout: float = 60) -> str:
        """``hiertrain dashboard`` on the observer's account, as process ``dashboard``: its address."""
        observer = toml(self.work / "observer.toml", self.job.name, self.bdir.credentials_file("observer"), {},
                        host=self.host.get("root"))
        self.spawn("dashboard", ["dashboard", "--config", str(observer), "--port", str(port)], where="edge")
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + timeout
        while f"dashboard: {url}" not in self.log("dashboard"):
            if time.monotonic() > deadline or self.procs["dashboard"].poll() is not None:
                raise HiertrainError(f"the dashboard did not start: {self.log('dashboard')[-1000:]}")
            time.sleep(0.1)
        return url

    def publish(self, schedule: dict[str, Any]) -> None:
        """Publish a schedule as the planner would (retained), with the planner's credentials: the
        watcher holds no lease and sends no status, so it is no planner."""
        assert self.watch is not None
        self.watch.publish_json(topics.schedule(self.job.name), schedule, retain=True)
        self.watch.flush()

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

    def lose_edge_machine(self) -> None:
        """The edge machine gone for good: its broker and the processes on it (SIGKILL) at once."""
        for name in self.job.on_edge_machine():
            if name in self.procs:
                self.kill(name)
        assert self.broker is not None
        self.broker.proc.kill()
        self.broker.proc.wait()

    def wait(self, names: Optional[tuple[str, ...]] = None, timeout: float = 120) -> dict[str, Optional[int]]:
        """Exit codes of the processes named (default: the job's) (``None``: still running after ``timeout``)."""
        codes: dict[str, Optional[int]] = {}
        deadline = time.monotonic() + timeout
        for name in names or self.job.processes():
            try:
                codes[name] = self.procs[name].wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = None
        self.pump(0.5)
        return codes

    def log(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        stop(list(self.procs.values()))
        self.stack.close()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------- watching

    def open_watch(self, creds: Endpoint) -> Transport:
        """The watcher: the planner's credentials, as an observer, on every telemetry, status and schedule."""
        self.watch = Transport(creds, account="planner", job=self.job.name, observer=True)
        for kind in ("telemetry", "status"):
            self.watch.subscribe(topics.all_of_kind(self.job.name, kind))
        self.watch.subscribe(topics.schedule(self.job.name))
        return self.stack.enter_context(self.watch)

    def pump(self, timeout: float = 0.2) -> list[Any]:
        """Record what the watcher received (waiting up to ``timeout`` for the first)."""
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
            self._record(ev)

    def _record(self, ev: Any) -> None:
        if isinstance(ev.topic, topics.ScheduleTopic):
            self.schedules.append(ev.payload)
        elif ev.topic.kind == "telemetry":
            self.telemetry.append((ev.topic.account, ev.payload))
            if "loss" in ev.payload:
                self.steps[ev.payload["iteration"]] = {**ev.payload, "account": ev.topic.account}
        else:
            self.status.append((ev.topic.account, ev.payload))
            if isinstance(ev.payload, dict):
                self.states[ev.topic.account] = ev.payload.get("state")

    def _until(self, done: Callable[[], Any], timeout: float, what: str) -> Any:
        """Pump until ``done()`` is true (returned); a ``TimeoutError`` after ``timeout``, or as soon as
        the process driving the job's clock has ended, naming ``what`` was awaited."""
        deadline = time.monotonic() + timeout
        driver = self.job.driver
        while not (got := done()):
            ended = driver in self.procs and self.procs[driver].poll() is not None
            if ended or time.monotonic() > deadline:
                why = f"{driver} ended (exit code {self.procs[driver].returncode})" if ended else f"not within {timeout} s"
                raise TimeoutError(f"{what}: {why}; {driver}'s log:\n{self.log(driver)[-3000:]}")
            self.pump()
        return got

    def wait_iteration(self, iteration: int, timeout: float = 60) -> None:
        """Wait until the job has finished ``iteration`` (a loss reported for it or a later one)."""
        self._until(lambda: max(self.steps, default=-1) >= iteration, timeout, f"waiting for iteration {iteration}")

    def wait_until(self, test: Callable[[dict[str, Any]], bool], timeout: float = 120) -> int:
        """The first iteration whose telemetry (the one that reported its loss) passes ``test``."""
        found = self._until(lambda: next(([i] for i in sorted(self.steps) if test(self.steps[i])), None), timeout,
                            "waiting for an iteration as awaited")  # ([i]: iteration 0 is found too)
        return found[0]

    def wait_online(self, name: str, timeout: float = 60) -> None:
        self._until(lambda: self.states.get(name) == "online", timeout, f"waiting for {name} to come online")

    def wait_version(self, version: int, count: int, timeout: float = 600) -> int:
        """Wait until the job has finished ``count`` iterations stamped with schedule ``version``;
        returns the newest iteration finished."""
        def done() -> Optional[int]:
            failed = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if failed:
                raise HiertrainError(f"processes ended during the run (exit codes {failed}); "
                                     f"{self.job.driver}'s log: {self.log(self.job.driver)[-300:]}")
            ran = [i for i, v in self.versions().items() if v == version and i in self.steps]
            return max(self.steps) if len(ran) >= count else None

        return self._until(done, timeout, f"schedule version {version}: {count} iterations")

    # --------------------------------------------------------------------- results

    def losses(self) -> dict[int, float]:
        return {i: row["loss"] for i, row in self.steps.items()}

    def versions(self) -> dict[int, int]:
        """The schedule version each iteration ran, as the account driving the clock stamped it."""
        return {p["iteration"]: p["schedule_version"] for a, p in self.telemetry if a == self.job.driver
                and "schedule_version" in p}

    def redone(self) -> list[int]:
        """Iterations whose loss more than one run reported (an abandoned attempt, then again); a
        report sent again after a reconnection is the same run's, and not counted twice."""
        runs = Counter(i for i, _ in {(p["iteration"], p.get("run")) for _, p in self.telemetry if "loss" in p})
        return sorted(i for i, n in runs.items() if n > 1)

    def seconds_per_iteration(self, version: int, *, skip: int = 2) -> Optional[float]:
        """Median interval between the job finishing consecutive iterations that ran schedule
        ``version``, after ``skip`` iterations of settling."""
        ends = {i: row["t"] for i, row in self.steps.items() if "t" in row}
        its = sorted(i for i, v in self.versions().items() if v == version and i - 1 in ends and i in ends)[skip:]
        return statistics.median(ends[i] - ends[i - 1] for i in its) if its else None

    def link_rates(self, version: int, *, skip: int = 0) -> dict[str, float]:
        """Median measured rate of each link (Mbit/s, payload) over the iterations of ``version``
        (after its first ``skip``)."""
        its = sorted(i for i, v in self.versions().items() if v == version)[skip:]
        seen: dict[str, list[float]] = {}
        for _, p in self.telemetry:
            if p.get("schedule_version") == version and p.get("iteration") in its:
                for link, mbps in p.get("links", {}).items():
                    seen.setdefault(link, []).append(mbps)
        return {link: statistics.median(v) for link, v in seen.items()}

    def final_checkpoint(self) -> Optional[checkpoint.Checkpoint]:
        """The newest checkpoint any process of the job wrote (``ck-*`` in the work directory)."""
        names = list(models.get(self.job.model).param_shapes())
        found = [c for c in (checkpoint.load(d, names) for d in sorted(self.work.glob("ck-*"))) if c is not None]
        return max(found, key=lambda c: c.iteration) if found else None
