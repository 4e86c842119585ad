"""``hiertrain bench dashboard``: does the dashboard hold up for an hour-long job of a 16-device fleet?

The messages such a job sends the observer (each step the coordinator's telemetry and every device's,
a device leaving and coming back every ten minutes, a re-plan every five, refusals now and then) are
fed to the dashboard's :class:`~hiertrain.dashboard.state.Board` as they would arrive: its memory
(tracemalloc), the size of the state the page polls and the time to make it, the time per message.
Then the page itself (``page.html``) is opened on that state in headless Chromium, once, timed, and its
DOM checked for every device. Goals: under 5 MB of state in the server and under 300 KB per poll,
whatever the job's length (the state is bounded), and the page drawn in under 5 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
import tracemalloc
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from hiertrain.bench import sized

GOAL_STATE_MB, GOAL_POLL_KB, GOAL_PAGE_S = 5.0, 300.0, 5.0
DEVICES = 16


def _plan(devices: list[str], version: int) -> dict[str, Any]:
    from hiertrain.plan import Group, Plan, Stage

    cut = 1 + version % 5
    groups = tuple(Group(d, d, 8, (Stage(d, 1, cut), Stage("edge", cut + 1, 7)), "edge") for d in devices)
    return {"policy": "hiertrain", "iteration_s": 0.1, "groups": Plan(7, groups, ("edge",) * 7, driver="edge").to_json(),
            "version": version, "effective_iteration": 0}


def feed(board: Any, *, devices: int, hours: float, steps_per_s: float) -> int:
    """An hour-long fleet's messages to ``board``, in order; returns how many."""
    names = [f"pi-{i + 1}" for i in range(devices)]
    sent = 0
    for name in ["edge", "cloud", *names]:
        board.offer(name, "status", {"state": "online"}, 0.0)
        sent += 1
    version = 1
    board.offer("", "schedule", _plan(names, version), 0.0)
    steps = int(hours * 3600 * steps_per_s)
    for step in range(steps):
        t = step / steps_per_s
        if step and step % int(300 * steps_per_s) == 0:  # a re-plan every five minutes
            version += 1
            board.offer("", "schedule", _plan(names, version), t)
            sent += 1
        if step and step % int(600 * steps_per_s) == 0:  # a device leaves and comes back every ten
            who = names[(step // int(600 * steps_per_s)) % devices]
            board.offer(who, "status", {"state": "offline"}, t)
            board.offer(who, "status", {"state": "online"}, t + 1)
            sent += 2
        board.offer("edge", "telemetry", {"iteration": step, "loss": 2.3 / (1 + step / 1000), "iteration_s": 0.1,
                                          "predicted_s": 0.1, "schedule_version": version, "role": "coordinator",
                                          "fleet": [[n, step * 8, 8, 2, 7] for n in names]}, t)
        for i, name in enumerate(names):
            board.offer(name, "telemetry", {"iteration": step, "schedule_version": version, "role": "device worker",
                                            "links": {"device_edge": 5.0 + i}, "dropped": {"malformed": step // 5000}}, t)
        sent += 1 + devices
    return sent


def _page(state: bytes) -> tuple[float, str]:
    """The page drawn on ``state`` in headless Chromium: (seconds, its DOM)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("no chromium (scripts/setup.sh installs Debian's chromium package)")
    with tempfile.TemporaryDirectory(prefix="hiertrain-bench-dashboard-") as d:
        Path(d, "index.html").write_bytes(resources.files("hiertrain.dashboard").joinpath("page.html").read_bytes())
        Path(d, "state.json").write_bytes(state)
        server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=d))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            t0 = time.perf_counter()
            out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                  "--virtual-time-budget=2000", "--dump-dom",
                                  f"http://127.0.0.1:{server.server_address[1]}/"],
                                 capture_output=True, text=True, timeout=120)
            seconds = time.perf_counter() - t0
        finally:
            server.shutdown()
            server.server_close()
    if out.returncode != 0:
        raise RuntimeError(f"chromium failed: {out.stderr[-500:]}")
    return seconds, out.stdout


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from hiertrain.dashboard.state import Board

    devices = DEVICES
    rows = []
    for hours in sized(args, (0.1, 1.0), (0.01, 0.02)):
        board = Board("bench")
        tracemalloc.start()
        t0 = time.perf_counter()
        messages = feed(board, devices=devices, hours=hours, steps_per_s=10.0)
        fed_s = time.perf_counter() - t0
        state_mb = tracemalloc.get_traced_memory()[0] / 2**20
        tracemalloc.stop()
        t0 = time.perf_counter()
        snapshot = json.dumps(board.snapshot(), allow_nan=False).encode()
        snapshot_ms = 1e3 * (time.perf_counter() - t0)
        rows.append({"hours": hours, "messages": messages, "us_per_message": 1e6 * fed_s / messages,
                     "state_mb": state_mb, "poll_kb": len(snapshot) / 1024, "snapshot_ms": snapshot_ms,
                     "curve_points": len(board.steps.points), "events": len(board.events)})
        print(f"{hours:g} h, {devices} devices: {messages} messages, {rows[-1]['us_per_message']:.1f} us each; "
              f"state {state_mb:.2f} MB, a poll {len(snapshot) / 1024:.0f} KB in {snapshot_ms:.1f} ms", flush=True)
    page_s, dom = _page(snapshot)
    drawn = sum(f'data-name="pi-{i + 1}" data-state=' in dom for i in range(devices))
    longest = rows[-1]
    return {"bench": "dashboard", "devices": devices, "steps_per_s": 10.0, "rows": rows,
            "page_s": page_s, "devices_drawn": drawn,
            "goals": {"state_mb": GOAL_STATE_MB, "poll_kb": GOAL_POLL_KB, "page_s": GOAL_PAGE_S},
            "meets_goal": longest["state_mb"] < GOAL_STATE_MB and longest["poll_kb"] < GOAL_POLL_KB
            and page_s < GOAL_PAGE_S and drawn == devices}
