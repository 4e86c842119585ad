"""The README's map of the code ("How it fits together") names every module, so that a newcomer
finds the device's code in device/, the edge's in edge/, and nothing is left off the map."""

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("hiertrain", "hiertrain/net", "hiertrain/train", "hiertrain/lab", "broker", "planner", "device", "edge",
           "cloud")  # bench/: its benchmarks are listed by the CLI (`hiertrain bench --help`)


def test_every_module_is_on_the_readme_map():
    block = (ROOT / "README.md").read_text().split("## How it fits together", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"[a-z0-9_]+", block))
    modules = [f"{d}/{p.name}" for d in FOLDERS for p in sorted((ROOT / d).glob("*.py"))
               if not p.stem.startswith("_") and p.stem not in named]
    assert modules == [], f"add them to README's map: {modules}"


def test_the_readmes_benchmark_figures_are_the_committed_jsons():
    """Every figure of the README's benchmark table is generated from bench/results/*.json: a result
    re-run and committed without `hiertrain bench report`, or a figure typed by hand, fails here."""
    from hiertrain.bench import readme

    text = (ROOT / "README.md").read_text()
    assert readme.section(text, ROOT / "bench" / "results") == text, \
        "README.md's benchmark table differs from bench/results/*.json: run `hiertrain bench report`"
    rows = text[text.index(readme.BEGIN):text.index(readme.END)].count("\n| `hiertrain bench")
    assert rows == sum((ROOT / "bench" / "results" / name).exists() for _, name, _ in readme.ROWS) >= 10
