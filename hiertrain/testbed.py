"""An emulated mobile-edge-cloud testbed on one machine: network namespaces and real traffic shaping.

::

    [device ns] 10.223.1.1 ==veth (tbf, device-edge rate)== 10.223.1.2 [edge ns] 10.223.2.1 ==veth (tbf, edge-cloud rate)== 10.223.2.2 [cloud ns]
                                                                        10.223.9.2
                                                                           || veth (unshaped management link)
                                                                        10.223.9.1 [this namespace]

Mosquitto and the planner run in the edge namespace; each tier's service runs in its own, and
the orchestrator (this process) reaches the broker over the management link. Both ends of each
shaped link get a ``tc ... tbf`` qdisc (links are full duplex), changed live with
:meth:`Testbed.shape`. Root is required; everything created is removed by :meth:`Testbed.down`,
which the context manager calls also on Ctrl-C or failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional

from hiertrain import TIERS
from hiertrain.errors import ConfigError

ADDRESS = {"device": "10.223.1.1", "cloud": "10.223.2.2", "root": "10.223.9.1"}
BROKER_FOR = {"device": "10.223.1.2", "edge": "127.0.0.1", "cloud": "10.223.2.1", "root": "10.223.9.2"}
LINKS = {"device_edge": ("device", "edge", "1"), "edge_cloud": ("edge", "cloud", "2")}


def available() -> Optional[str]:
    """``None`` if a testbed can be built here, else why not (one line)."""
    if os.geteuid() != 0:
        return "the testbed needs root (network namespaces, tc and cgroups)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the testbed needs {tool} (apt-get install -y iproute2)"
    return None


def _run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode:
        raise ConfigError(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")


class Testbed:
    def __init__(self, *, bw_device_edge: float, bw_edge_cloud: float, tag: Optional[str] = None) -> None:
        why = available()
        if why:
            raise ConfigError(why)
        self.tag = tag or f"ht{os.getpid() % 100000}"
        self.ns = {t: f"{self.tag}-{t}" for t in TIERS}
        self.rates = {"device_edge": bw_device_edge, "edge_cloud": bw_edge_cloud}
        self._made: list[str] = []
        self._root_if = f"{self.tag}m0"

    def _if(self, link: str, side: int) -> str:
        return f"{self.tag}{LINKS[link][2]}{side}"

    def up(self) -> "Testbed":
        try:
            for ns in self.ns.values():
                _run("ip", "netns", "add", ns)
                self._made.append(ns)
                _run("ip", "-n", ns, "link", "set", "lo", "up")
            for link, (a, b, net) in LINKS.items():
                ia, ib = self._if(link, 0), self._if(link, 1)
                _run("ip", "link", "add", ia, "type", "veth", "peer", "name", ib)
                for ifname, tier, host in ((ia, a, 1), (ib, b, 2)):
                    _run("ip", "link", "set", ifname, "netns", self.ns[tier])
                    _run("ip", "-n", self.ns[tier], "addr", "add", f"10.223.{net}.{host}/24", "dev", ifname)
                    _run("ip", "-n", self.ns[tier], "link", "set", ifname, "up")
            peer = f"{self.tag}m1"
            _run("ip", "link", "add", self._root_if, "type", "veth", "peer", "name", peer)
            _run("ip", "link", "set", peer, "netns", self.ns["edge"])
            _run("ip", "addr", "add", f"{ADDRESS['root']}/24", "dev", self._root_if)
            _run("ip", "link", "set", self._root_if, "up")
            _run("ip", "-n", self.ns["edge"], "addr", "add", f"{BROKER_FOR['root']}/24", "dev", peer)
            _run("ip", "-n", self.ns["edge"], "link", "set", peer, "up")
            for link, mbps in self.rates.items():
                self.shape(link, mbps, replace=False)
        except BaseException:
            self.down()
            raise
        return self

    def shape(self, link: str, mbps: float, *, replace: bool = True) -> None:
        """Set ``link``'s rate (both directions) with a token bucket; effective at once."""
        if not mbps > 0:
            raise ConfigError(f"link rate must be > 0 Mbit/s, got {mbps}")
        a, b, _ = LINKS[link]
        burst = max(4096, int(mbps * 125_000 / 100))  # ~10 ms of traffic
        for ifname, tier in ((self._if(link, 0), a), (self._if(link, 1), b)):
            _run("ip", "netns", "exec", self.ns[tier], "tc", "qdisc", "replace" if replace else "add", "dev", ifname,
                 "root", "tbf", "rate", f"{mbps}mbit", "burst", str(burst), "latency", "500ms")
        self.rates[link] = mbps

    def prefix(self, tier: str) -> list[str]:
        """The command prefix that runs a program in ``tier``'s namespace."""
        return ["ip", "netns", "exec", self.ns[tier]]

    def down(self) -> None:
        subprocess.run(["ip", "link", "del", self._root_if], capture_output=True)
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

    def __enter__(self) -> "Testbed":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()
