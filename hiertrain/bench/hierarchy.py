"""``hiertrain bench hierarchy --data D.npz``: one edge server for every device, or three bridged sites, to accuracy.

Six devices (Pi 3-, Pi 4- and Jetson-class CPU quotas in turn, their radios shaped) train LeNet-5 on
their shards of a real data set (``--data``, as :mod:`hiertrain.bench.sync`), ``--count`` steps per mode:

- **exact flat**: every device on one edge server, one medium (``--medium``), the fleet planner's plan;
- **periodic K flat** (the largest K of ``--every``): the same, the devices' copies averaged every K steps;
- **fedavg K flat**: the same, every device training the whole model (all-local), averaged every K steps;
- **hierarchical K2** (each K2 of ``--every``): three edge sites of two devices, each on a testbed of its
  own (its medium, its edge, its cloud worker), each site's Mosquitto bridged by Mosquitto's own bridge
  to the cloud's broker over a WAN shaped to ``--wan`` Mbit/s both ways; the cloud's averager averages
  the sites' models every K2 steps.

A hierarchical row's wall time is a site's (lab1's): its steps' seconds and its waits for the averages;
its accuracy is scored on the average. Every process shares this machine's two cores (the edges and
cloud workers have no quota), which the three-site runs feel more than the flat ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from hiertrain.bench.sync import CLOUD_MBPS, EVAL_EVERY, HOLDOUT, arguments, plot, row_of, run
from hiertrain.errors import ConfigError

SITES = ("lab1", "lab2", "lab3")
DEVICES = 6
WAIT_S = 120.0


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from hiertrain.broker.process import available_kind
    from hiertrain.demo import fleet_specs
    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import Fleet
    from hiertrain.lab.testbed import FleetTestbed

    every, medium, data = arguments(args, "hierarchy")
    if available_kind() != "mosquitto":
        raise ConfigError("bench hierarchy bridges Mosquitto brokers: install mosquitto")
    wan, count, lr = args.wan, args.count, args.lr or 0.05
    specs = [replace(s, data={**data, "shard": [i, DEVICES]}) for i, s in enumerate(fleet_specs(DEVICES, quotas=True))]

    def job(devices: list[Any], **kw: Any) -> Fleet:
        return Fleet(devices, name="farm", model="lenet5", iterations=count, timeout_s=120, medium_mbps=medium,
                     cloud_mbps=CLOUD_MBPS, lr=lr, data=data, holdout=HOLDOUT, eval_every=EVAL_EVERY,
                     eval_samples=HOLDOUT, **kw)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hiertrain-bench-hierarchy-") as tmp:
        flat = job(specs)
        with FleetTestbed({s.name: s.rate_mbps for s in specs}, medium_mbps=medium, bw_edge_cloud=CLOUD_MBPS) as net, \
                Cluster(Path(tmp) / "flat", flat, network=net) as c:
            k = every[-1]
            for name, policy, sync in (("exact flat", "hiertrain", "exact"), (f"periodic {k} flat", "hiertrain",
                                                                               {"every": k}),
                                       (f"fedavg {k} flat", "all-local", {"every": k})):
                flat.sync = sync
                flat.rerun(c, policy)
                rows.append(row_of(name, c, run(c, name), topology="flat"))
        for k2 in every:
            rows.append(_hierarchical(Path(tmp) / f"k2-{k2}", specs, lambda d, **kw: job(d, profiles=flat.profiles, **kw),
                                      k2, medium, wan))
    result = {"bench": "hierarchy", "model": "lenet5", "data": Path(args.data).name, "holdout": HOLDOUT,
              "devices": [{"name": s.name, "samples": s.samples, "radio_mbps": s.rate_mbps, "cores": s.quota,
                           "private": s.private} for s in specs],
              "sites": {site: [s.name for s in specs[2 * i:2 * i + 2]] for i, site in enumerate(SITES)},
              "medium_mbps": medium, "wan_mbps": wan, "cloud_mbps": CLOUD_MBPS, "steps": count, "lr": lr,
              "eval_every": EVAL_EVERY, "rows": rows}
    if args.out:
        _plot(Path(args.out).with_suffix(".png"), result)
    return result


def _plot(path: Path, r: dict[str, Any]) -> None:
    plot(path, r, f"{len(r['devices'])} devices: one edge, or three sites ({r['medium_mbps']:g} Mbit/s media, "
                  f"WAN {r['wan_mbps']:g} Mbit/s)")


def _hierarchical(work: Path, specs: list[Any], job: Any, k2: int, medium: float, wan: float) -> dict[str, Any]:
    """Three sites of two devices, each on its own testbed, bridged to the cloud's broker over a shaped WAN."""
    from hiertrain.broker.layout import BrokerDir, Settings
    from hiertrain.broker.process import BrokerProcess, free_port
    from hiertrain.lab.cluster import Cluster, toml
    from hiertrain.lab.testbed import FleetTestbed

    cloud = BrokerDir(work / "cloud")
    cloud.init(Settings(port=free_port(), bind="0.0.0.0", job="farm"))
    for site in SITES:
        cloud.add_site(site)
    name = f"hierarchical {k2}"
    with ExitStack() as stack:
        stack.enter_context(BrokerProcess(cloud, kind="mosquitto"))
        sites = {}
        for i, site in enumerate(SITES):
            devices = specs[2 * i:2 * i + 2]
            net = stack.enter_context(FleetTestbed({s.name: s.rate_mbps for s in devices}, medium_mbps=medium,
                                                   bw_edge_cloud=CLOUD_MBPS))
            net.shape_wan(wan)
            creds = json.loads(cloud.credentials_file(f"bridge-{site}").read_text())
            link = work / f"bridge-{site}.json"
            link.write_text(json.dumps({**creds, "host": net.address["root"]}))  # the cloud, across this site's WAN
            os.chmod(link, 0o600)
            sites[site] = stack.enter_context(Cluster(work / site, job(devices, hierarchy={
                "site": site, "every": k2, "wait_s": WAIT_S}), network=net, bridge=(site, link)))
        cfg = toml(work / "averager.toml", "farm", cloud.credentials_file("cloud"), {
            "train": {"model": "lenet5", "iterations": sites["lab1"].job.iterations, "batch": 16},
            "hierarchy": {"sites": list(SITES), "every": k2, "wait_s": WAIT_S / 2}})
        with open(work / "averager.log", "w") as out:
            averager = subprocess.Popen([sys.executable, "-m", "hiertrain", "cloud", "run", "--config", str(cfg)],
                                        stdout=out, stderr=subprocess.STDOUT)
        try:
            for c in sites.values():
                c.start("cloud", "edge", *c.job.specs)
            logs = {site: run(c, f"{name} {site}", started=True) for site, c in sites.items()}
            if averager.wait(120) != 0:
                raise RuntimeError(f"{name}: the averager failed:\n" + (work / "averager.log").read_text()[-2000:])
        finally:
            if averager.poll() is None:
                averager.kill()
        missed = {site: sum(1 for r in log if r.get("average", {}).get("missed")) for site, log in logs.items()}
        return row_of(name, sites["lab1"], logs["lab1"], topology="hierarchical", k2=k2,
                      sites_mean_s={site: sum(r["seconds"] for r in log) / len(log) for site, log in logs.items()},
                      missed_rounds=missed)
