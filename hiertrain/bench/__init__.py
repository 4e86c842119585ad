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
    result = importlib.import_module(BENCHES[which]).bench(args)
    return {**result, "quick": True} if quick(args) else result


def quick(args: argparse.Namespace) -> bool:
    """``--quick``: the smallest run that takes every path of a benchmark (its smoke test's); the
    figures are not for quoting, and :func:`load` refuses them."""
    return bool(getattr(args, "quick", False))


def sized(args: argparse.Namespace, full: Any, small: Any) -> Any:
    """A benchmark's size: ``full``, or ``small`` in a ``--quick`` run."""
    return small if quick(args) else full


def load(path: Any) -> dict[str, Any]:
    """A benchmark's JSON result, to quote: a ``--quick`` run's is refused."""
    import json
    from pathlib import Path

    from hiertrain.errors import ConfigError

    result = json.loads(Path(path).read_text())
    if result.get("quick"):
        raise ConfigError(f"{path} is a --quick run (a smoke test's): its figures are not for quoting; run the bench in full")
    return result
