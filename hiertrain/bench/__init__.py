"""Benchmarks behind ``hiertrain bench <which>``: each returns a JSON-able dict with its figures."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

BENCHES = {
    "wire": "hiertrain.bench.wire",
    "transport": "hiertrain.bench.transport",
    "segments": "hiertrain.bench.segments",
    "runtime": "hiertrain.bench.runtime",
    "deviceloop": "hiertrain.bench.deviceloop",
    "samplecodec": "hiertrain.bench.samplecodec",
    "profile": "hiertrain.bench.profile",
    "testbed": "hiertrain.bench.testbed",
    "replan": "hiertrain.bench.replan",
    "edgecores": "hiertrain.bench.edgecores",
    "report": "hiertrain.bench.report",
    "hostile": "hiertrain.bench.hostile",
    "failover": "hiertrain.bench.failover",
    "planner": "hiertrain.planner.bench",
    "fleet-planner": "hiertrain.planner.fleetbench",
    "fleet": "hiertrain.bench.fleet",
    "sync": "hiertrain.bench.sync",
    "hierarchy": "hiertrain.bench.hierarchy",
    "families": "hiertrain.bench.families",
    "energy": "hiertrain.bench.energy",
    "dashboard": "hiertrain.bench.dashboard",
    "broker": "hiertrain.bench.broker",
}


def run(which: str, args: argparse.Namespace) -> dict[str, Any]:
    return importlib.import_module(BENCHES[which]).bench(args)
