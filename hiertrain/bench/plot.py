"""Figures for the benchmarks (PNG beside the JSON); a no-op without matplotlib."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np


@contextmanager
def axes(path: Path, size: tuple[float, float]) -> Iterator[Any]:
    """Axes to draw on, saved to ``path`` when the block ends; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        yield None
        return
    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def bars(path: Path, labels: Sequence[str], series: dict[str, Sequence[float]], *, ylabel: str, title: str,
         log: bool = False) -> None:
    with axes(path, (max(6, 1.1 * len(labels)), 3.6)) as ax:
        if ax is not None:
            _bars(ax, labels, series, ylabel=ylabel, title=title, log=log)


def _bars(ax: Any, labels: Sequence[str], series: dict[str, Sequence[float]], *, ylabel: str, title: str,
          log: bool) -> None:
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=name)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
