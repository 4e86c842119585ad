"""An emulated mobile-edge-cloud testbed on one machine: network namespaces and real traffic shaping.

::

    [device ns] 10.223.1.1 ==veth (tbf, device-edge rate)== 10.223.1.2 [edge ns] 10.223.2.1 ==veth (tbf, edge-cloud rate)== 10.223.2.2 [cloud ns]
                                                                        10.223.9.2 (the first free 10.223.x.0/24)
                                                                           || veth (unshaped management link)
                                                                        10.223.9.1 [this namespace]

Mosquitto and the planner run in the edge namespace; each tier's service runs in its own, and
the orchestrator (this process) reaches the broker over the management link. Both ends of each
shaped link get a ``tc ... tbf`` qdisc (links are full duplex), changed live with
:meth:`Testbed.shape`. Root is required; everything created is removed by :meth:`Testbed.down`,
which the context manager calls also on Ctrl-C or failure.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from typing import Any, Optional

from hiertrain import TIERS
from hiertrain.errors import ConfigError

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


def _free_tag(letters: str) -> str:
    """``letters`` and this process's id, made unique among the namespaces and links here (a
    testbed killed before its cleanup, or one in another pid namespace, may hold the same)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names += subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    base = f"{letters}{os.getpid() % 100000}"
    return next(tag for tag in (base, *(f"{base}{c}" for c in "abcdefghijklmnopqrstuvwxyz"))
                if f"{tag}-" not in names and f"{tag}m0" not in names)


class _Namespaces:
    """What both testbeds share: the network namespaces they make, a management veth from this
    namespace into the edge's, token-bucket shaping, and removing all of it (also on failure)."""

    def __init__(self, tag: str, names: dict[str, str]) -> None:
        why = available()
        if why:
            raise ConfigError(why)
        self.tag, self.ns = tag, names
        self.address: dict[str, str] = {}  # where each side is reached; "root": this namespace's end
        self.broker_for: dict[str, str] = {}  # where each side reaches the broker; "root": this namespace
        self._made: list[str] = []
        self._root_if = f"{tag}m0"

    def _namespaces(self) -> None:
        for name in self.ns.values():
            _run("ip", "netns", "add", name)
            self._made.append(name)
            _run("ip", "-n", name, "link", "set", "lo", "up")

    def _management(self, prefix: str, taken: tuple[int, ...]) -> tuple[str, str]:
        """The unshaped link from this namespace to the edge's, on the first /24 of ``prefix`` (from
        ``prefix.9``, never one in ``taken``, the testbed's own) no interface here holds an address in:
        a testbed killed before its cleanup, or another run's, leaves its own in use. Returns the
        addresses (this namespace's, the edge's)."""
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
        held = [ipaddress.ip_interface(line.split()[3]).ip for line in out.splitlines()]  # "7: ht1m0 inet 10.223.9.1/24 .."
        free = [n for n in range(9, 255) if n not in taken
                and not any(ip in ipaddress.ip_network(f"{prefix}.{n}.0/24") for ip in held)]
        if not free:
            raise ConfigError(f"every {prefix}.x.0/24 is held by an interface here: testbeds earlier runs "
                              f"left behind? See ip -br addr, and remove them with ip link del")
        third = free[0]
        root_addr, edge_addr = f"{prefix}.{third}.1", f"{prefix}.{third}.2"
        peer = f"{self.tag}m1"
        _run("ip", "link", "add", self._root_if, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", self.ns["edge"])
        _run("ip", "addr", "add", f"{root_addr}/24", "dev", self._root_if)
        _run("ip", "link", "set", self._root_if, "up")
        _run("ip", "-n", self.ns["edge"], "addr", "add", f"{edge_addr}/24", "dev", peer)
        _run("ip", "-n", self.ns["edge"], "link", "set", peer, "up")
        return root_addr, edge_addr

    def _tbf(self, where: Optional[str], ifname: str, mbps: float, replace: bool) -> None:
        """Cap ``ifname``'s egress in namespace ``where`` (None: this one) at ``mbps`` (effective at once)."""
        if not mbps > 0:
            raise ConfigError(f"link rate must be > 0 Mbit/s, got {mbps}")
        burst = max(4096, int(mbps * 125_000 / 100))  # ~10 ms of traffic
        _run(*(self.prefix(where) if where else []), "tc", "qdisc", "replace" if replace else "add", "dev", ifname,
             "root", "tbf", "rate", f"{mbps}mbit", "burst", str(burst), "latency", "500ms")

    def shape_wan(self, mbps: float, *, replace: bool = False) -> None:
        """The link from this namespace to the edge's as a site's WAN to a cloud here (a hierarchical job's
        brokers bridged over it), capped at ``mbps`` both ways."""
        self._tbf(None, self._root_if, mbps, replace)
        self._tbf("edge", f"{self.tag}m1", mbps, replace)

    def up(self) -> "_Namespaces":
        raise NotImplementedError

    def prefix(self, where: str) -> list[str]:
        """The command prefix that runs a program in ``where``'s namespace."""
        return ["ip", "netns", "exec", self.ns[where]]

    def down(self) -> None:
        subprocess.run(["ip", "link", "del", self._root_if], capture_output=True)
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._made.clear()

    def __enter__(self) -> Any:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


class Testbed(_Namespaces):
    def __init__(self, *, bw_device_edge: float, bw_edge_cloud: float, tag: Optional[str] = None) -> None:
        tag = tag or _free_tag("ht")
        super().__init__(tag, {t: f"{tag}-{t}" for t in TIERS})
        self.address = {"device": "10.223.1.1", "cloud": "10.223.2.2"}
        self.broker_for = {"device": "10.223.1.2", "edge": "127.0.0.1", "cloud": "10.223.2.1"}
        self.rates = {"device_edge": bw_device_edge, "edge_cloud": bw_edge_cloud}

    def _if(self, link: str, side: int) -> str:
        return f"{self.tag}{LINKS[link][2]}{side}"

    def up(self) -> "Testbed":
        try:
            self._namespaces()
            for link, (a, b, net) in LINKS.items():
                ia, ib = self._if(link, 0), self._if(link, 1)
                _run("ip", "link", "add", ia, "type", "veth", "peer", "name", ib)
                for ifname, tier, host in ((ia, a, 1), (ib, b, 2)):
                    _run("ip", "link", "set", ifname, "netns", self.ns[tier])
                    _run("ip", "-n", self.ns[tier], "addr", "add", f"10.223.{net}.{host}/24", "dev", ifname)
                    _run("ip", "-n", self.ns[tier], "link", "set", ifname, "up")
            self.address["root"], self.broker_for["root"] = self._management("10.223", (1, 2))
            for link, mbps in self.rates.items():
                self.shape(link, mbps, replace=False)
        except BaseException:
            self.down()
            raise
        return self

    def shape(self, link: str, mbps: float, *, replace: bool = True) -> None:
        """Set ``link``'s rate (both directions) with a token bucket; effective at once."""
        a, b, _ = LINKS[link]
        for ifname, tier in ((self._if(link, 0), a), (self._if(link, 1), b)):
            self._tbf(tier, ifname, mbps, replace)
        self.rates[link] = mbps


FLEET_NET = "10.224"  # the fleet's medium: the edge 10.224.0.1, device i 10.224.1.i


class FleetTestbed(_Namespaces):
    """Many devices on one shared wireless medium to the edge, and the cloud behind it::

        [dev1 ns] ==veth (tbf r_1)==+                                 +== [edge ns] ==veth (tbf)== [cloud ns]
        [dev2 ns] ==veth (tbf r_2)==+== bridge [air ns] ==(tbf R)==+   10.224.0.1      10.225.2.x
        ...                                                             || management veth (unshaped)
                                                                        [this namespace]

    Each device's link is capped at its own rate in both directions (its radio) and every device's
    traffic crosses one veth between the medium and the edge, capped at the medium's aggregate rate
    R: devices that send at once share R, and, as on a real wireless medium (half duplex), so do
    the two directions: traffic to and from the edge is redirected through one ifb device whose
    token bucket is R. Root is required; :meth:`down` removes all.
    """

    def __init__(self, devices: dict[str, float], *, medium_mbps: float, bw_edge_cloud: float,
                 tag: Optional[str] = None) -> None:
        if not 1 <= len(devices) <= 200:
            raise ConfigError(f"a fleet testbed holds 1..200 devices, not {len(devices)}")
        for name, mbps in {**devices, "medium": medium_mbps, "edge-cloud": bw_edge_cloud}.items():
            if not mbps > 0:
                raise ConfigError(f"{name}: link rate must be > 0 Mbit/s, got {mbps}")
        tag = tag or _free_tag("hf")
        super().__init__(tag, {"air": f"{tag}-air", "edge": f"{tag}-edge", "cloud": f"{tag}-cloud",
                               **{d: f"{tag}-d{i}" for i, d in enumerate(devices, 1)}})
        self.devices = dict(devices)
        self.address = {"edge": f"{FLEET_NET}.0.1", **{d: f"{FLEET_NET}.1.{i}" for i, d in enumerate(devices, 1)},
                        "cloud": "10.225.2.2"}
        self.broker_for = {**{d: f"{FLEET_NET}.0.1" for d in devices}, "edge": "127.0.0.1", "cloud": "10.225.2.1"}
        self.medium_mbps, self.bw_edge_cloud = medium_mbps, bw_edge_cloud

    def up(self) -> "FleetTestbed":
        try:
            self._namespaces()
            _run("ip", "-n", self.ns["air"], "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.ns["air"], "link", "set", "br0", "up")
            for i, d in enumerate(self.devices, 1):
                self._veth(f"{self.tag}d{i}a", d, f"{self.address[d]}/16", f"{self.tag}d{i}b", "air", None)
            self._veth(f"{self.tag}e0", "edge", f"{self.address['edge']}/16", f"{self.tag}e1", "air", None)
            self._veth(f"{self.tag}c0", "edge", "10.225.2.1/24", f"{self.tag}c1", "cloud", "10.225.2.2/24")
            self.address["root"], self.broker_for["root"] = self._management("10.225", (2,))
            for d, mbps in self.devices.items():
                self.shape_device(d, mbps, replace=False)
            self._half_duplex(f"{self.tag}e1", f"{self.tag}hd")
            self.shape_medium(self.medium_mbps, replace=False)
            self._tbf("edge", f"{self.tag}c0", self.bw_edge_cloud, False)
            self._tbf("cloud", f"{self.tag}c1", self.bw_edge_cloud, False)
        except BaseException:
            self.down()
            raise
        return self

    def _veth(self, a: str, ns_a: str, addr_a: str, b: str, ns_b: str, addr_b: Optional[str]) -> None:
        """A veth pair from namespace ``ns_a`` to ``ns_b``; a side without an address joins the bridge."""
        _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        for ifname, where, addr in ((a, ns_a, addr_a), (b, ns_b, addr_b)):
            _run("ip", "link", "set", ifname, "netns", self.ns[where])
            if addr is not None:
                _run("ip", "-n", self.ns[where], "addr", "add", addr, "dev", ifname)
            else:
                _run("ip", "-n", self.ns[where], "link", "set", ifname, "master", "br0")
            _run("ip", "-n", self.ns[where], "link", "set", ifname, "up")

    def shape_device(self, device: str, mbps: float, *, replace: bool = True) -> None:
        """A device's own radio rate, both directions."""
        i = list(self.devices).index(device) + 1
        self._tbf(device, f"{self.tag}d{i}a", mbps, replace)
        self._tbf("air", f"{self.tag}d{i}b", mbps, replace)
        self.devices[device] = mbps

    def _half_duplex(self, port: str, ifb: str) -> None:
        """Both directions of ``port`` (in the air namespace) through the ifb device ``ifb``."""
        air = ["ip", "netns", "exec", self.ns["air"]]
        _run("ip", "-n", self.ns["air"], "link", "add", ifb, "type", "ifb")
        _run("ip", "-n", self.ns["air"], "link", "set", ifb, "up")
        _run(*air, "tc", "qdisc", "add", "dev", port, "clsact")
        for way in ("ingress", "egress"):  # (u32 matching everything: matchall is not in every kernel)
            _run(*air, "tc", "filter", "add", "dev", port, way, "protocol", "all", "u32", "match", "u32", "0", "0",
                 "action", "mirred", "egress", "redirect", "dev", ifb)

    def shape_medium(self, mbps: float, *, replace: bool = True) -> None:
        """The medium's aggregate rate, shared by every device and both directions at once."""
        self._tbf("air", f"{self.tag}hd", mbps, replace)
        self.medium_mbps = mbps
