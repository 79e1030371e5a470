"""Shared figure helpers of the diagnostics: run colours, panel grids, saving, and the per-layer
line plot of SNR and pruning error. Each metric draws its own figures (in its module) from its
part of the metrics dict, so every number a figure shows is in ``metrics.json``.

Every run keeps one colour across all figures (the order of ``--compressed``); the dense
model is black.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["DPI", "grid", "layer_lines", "nan_array", "run_colors", "save"]

DPI = 110


def run_colors(labels: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)} | {"dense": (0, 0, 0, 1)}


def grid(n: int, width: float = 4.2, height: float = 3.2, cols: int | None = None):
    cols = cols or min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def nan_array(values: list) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=float)


def layer_lines(
    panels: dict[str, dict[str, list]], colors: dict, ylabel: str, title: str, path: Path,
    logy: bool = False,
) -> Path:  # fmt: skip
    """One panel per evaluation language, one line per run over the layers."""
    fig, axes = grid(len(panels))
    for ax, (panel, lines) in zip(axes, panels.items(), strict=True):
        for label, ys in lines.items():
            ys = nan_array(ys)
            ax.plot(np.arange(len(ys)), ys, marker="o", ms=3, label=label, color=colors[label])
        ax.set_title("all languages" if panel == "all" else f"evaluated on {panel}")
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(title="calibration", fontsize=8)
    fig.suptitle(title)
    return save(fig, path)
