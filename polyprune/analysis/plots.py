"""Figures of the diagnostics, drawn from the metrics dict of ``analyze.py`` (so every number a
figure shows is in ``metrics.json``). Each function writes one PNG and returns its path.

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

__all__ = [
    "DPI",
    "iou_heatmaps",
    "iou_layer_lines",
    "lape_boxes",
    "lape_groups",
    "language_neurons",
    "layer_lines",
    "lsar_lines",
    "run_colors",
]

DPI = 110


def run_colors(labels: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)} | {"dense": (0, 0, 0, 1)}


def _grid(n: int, width: float = 4.2, height: float = 3.2, cols: int | None = None):
    cols = cols or min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _nan(values: list) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=float)


def layer_lines(
    panels: dict[str, dict[str, list]], colors: dict, ylabel: str, title: str, path: Path,
    logy: bool = False,
) -> Path:  # fmt: skip
    """One panel per evaluation language, one line per run over the layers."""
    fig, axes = _grid(len(panels))
    for ax, (panel, lines) in zip(axes, panels.items(), strict=True):
        for label, ys in lines.items():
            ys = _nan(ys)
            ax.plot(np.arange(len(ys)), ys, marker="o", ms=3, label=label, color=colors[label])
        ax.set_title("all languages" if panel == "all" else f"evaluated on {panel}")
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(title="calibration", fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def iou_heatmaps(mixes: list[str], matrices: dict[str, list[list[float]]], title: str,
                 path: Path) -> Path:  # fmt: skip
    """Calibration mix x calibration mix IoU, one panel per group (all Linears, then each
    sub-layer type), on one shared colour scale."""
    values = [v for m in matrices.values() for i, row in enumerate(m) for j, v in enumerate(row)
              if i != j]  # fmt: skip
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    size = max(3.2, 0.55 * len(mixes) + 1.6)
    fig, axes = _grid(len(matrices), width=size, height=size * 0.9)
    im = None
    for ax, (group, mat) in zip(axes, matrices.items(), strict=True):
        a = np.array(mat, dtype=float)
        off = a.copy()
        np.fill_diagonal(off, np.nan)  # the diagonal (1.0) would flatten the colour scale
        im = ax.imshow(off, cmap="viridis", vmin=lo, vmax=hi)
        ax.set_xticks(range(len(mixes)), mixes, rotation=45, ha="right")
        ax.set_yticks(range(len(mixes)), mixes)
        ax.set_title("all Linears" if group == "all" else group)
        if len(mixes) <= 10:
            for i in range(len(mixes)):
                for j in range(len(mixes)):
                    if i != j:
                        ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="w" if a[i, j] < (lo + hi) / 2 else "k")  # fmt: skip
    fig.colorbar(im, ax=axes, shrink=0.8, label="IoU of pruned weights")
    fig.suptitle(title)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def iou_layer_lines(
    mixes: list[str],
    by_layer: dict[str, list[list[float]]],
    seed_iou: dict[str, dict[str, float]],
    title: str,
    path: Path,
) -> Path:
    """IoU per layer for each pair of mixes (or their mean and range beyond 10 pairs), and the
    same-language seed IoU per layer where a mix has several seeds."""  # fmt: skip
    layers = sorted(by_layer, key=int)
    x = np.array([int(k) for k in layers])
    pairs = [(i, j) for i in range(len(mixes)) for j in range(i + 1, len(mixes))]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    if len(pairs) <= 10:
        for i, j in pairs:
            ax.plot(x, [by_layer[k][i][j] for k in layers], marker="o", ms=3,
                    label=f"{mixes[i]} vs {mixes[j]}")  # fmt: skip
    else:
        vals = np.array([[by_layer[k][i][j] for i, j in pairs] for k in layers])
        ax.plot(x, vals.mean(1), marker="o", ms=3, color="C0", label="mean over mix pairs")
        ax.fill_between(x, vals.min(1), vals.max(1), alpha=0.25, color="C0", label="min-max")
    for m, per_layer in seed_iou.items():
        ax.plot(x, [per_layer[k] for k in layers], ls="--", marker="s", ms=3,
                label=f"{m}: across seeds")  # fmt: skip
    ax.set_xlabel("layer")
    ax.set_ylabel("IoU of pruned weights")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    return _save(fig, path)


def lsar_lines(lsar: dict, colors: dict, path: Path) -> Path:
    """Change of the language-agnostic and language-specific parts per layer, one panel each."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, part in zip(axes, ("agnostic", "specific"), strict=True):
        for label, rec in lsar["runs"].items():
            ys = rec[part]
            ax.plot(range(len(ys)), ys, marker="o", ms=3, label=label, color=colors[label])
        ax.set_title(f"language-{part} part")
        ax.set_xlabel("layer")
        ax.set_ylabel("mean ||change|| of prompt embedding")
        ax.grid(alpha=0.3)
    axes[0].legend(title="calibration", fontsize=8)
    fig.suptitle(f"LSAR (rank {lsar['rank']}): how far compression moves each part")
    return _save(fig, path)


def lape_boxes(lape: dict, colors: dict, path: Path) -> Path:
    """LAPE per neuron group (sorted by dense LAPE), dense vs each compressed model."""
    runs = [k for k in lape["models"] if k != "dense"]
    n = len(lape["groups"])
    fig, axes = plt.subplots(len(runs), 1, figsize=(max(8, 0.32 * n + 2), 2.8 * len(runs)),
                             squeeze=False)  # fmt: skip
    x = np.arange(n)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        for model, offset in (("dense", -0.2), (run, 0.2)):
            stats = [dict(b, label=str(i)) for i, b in enumerate(lape["models"][model]["boxes"])]
            keep = [i for i, b in enumerate(stats) if b["n"]]
            ax.bxp([stats[i] for i in keep], positions=x[keep] + offset, widths=0.35,
                   showfliers=False, patch_artist=True,
                   boxprops={"facecolor": colors[model], "alpha": 0.55},
                   medianprops={"color": "k"})  # fmt: skip
        ax.set_xticks(x[:: max(1, n // 25)], [str(i + 1) for i in x[:: max(1, n // 25)]])
        ax.set_xlim(-1, n)
        ax.set_ylabel("LAPE")
        ax.set_title(f"dense (black) vs {run}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[-1, 0].set_xlabel(
        f"neuron group ({lape['group_percent']:g}% of neurons each, by ascending dense LAPE)"
    )
    fig.suptitle("LAPE per neuron group")
    return _save(fig, path)


def lape_groups(lape: dict, colors: dict, path: Path) -> Path:
    """Per neuron group: mean LAPE change after compression, and mean output magnitude."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    n = len(lape["groups"])
    x = np.arange(1, n + 1)
    for label, rec in lape["models"].items():
        if label != "dense":
            axes[0].plot(x, _nan(rec["change"]), marker="o", ms=2, label=label,
                         color=colors[label])  # fmt: skip
        axes[1].plot(x, rec["magnitude"], marker="o", ms=2, label=label, color=colors[label],
                     lw=2 if label == "dense" else 1)  # fmt: skip
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set_ylabel("mean LAPE change (compressed - dense)")
    axes[1].set_ylabel("mean |act(gate) * up| per token")
    for ax in axes:
        ax.set_xlabel("neuron group (most language-specific first)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("LAPE change and neuron output magnitude per neuron group")
    return _save(fig, path)


def language_neurons(lape: dict, langs: list[str], colors: dict, path: Path) -> Path:
    """Language-specific neurons per language (Tang et al.'s selection): dense and each run."""
    models = list(lape["models"])
    counts = {"dense": [lape["selection"]["dense"][lang] for lang in langs]}
    for m in models[1:]:
        counts[m] = [lape["models"][m]["selection"][lang]["count"] for lang in langs]
    width = 0.8 / len(models)
    # Bars get narrower past 14 inches: 7 languages x 8 models made a 34-inch strip of
    # unreadable 8-point text, shrunk to nothing in any viewer.
    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.22 * len(langs) * len(models) + 2)), 4.5))
    x = np.arange(len(langs))
    for i, m in enumerate(models):
        ax.bar(x + (i - (len(models) - 1) / 2) * width, counts[m], width, label=m,
               color=colors[m])  # fmt: skip
    ax.set_xticks(x, langs)
    ax.set_ylabel("language-specific neurons")
    sel = lape["selection"]
    title = (f"Language-specific neurons (lowest {sel['top_rate']:.0%} LAPE, activation bar "
             f"at the {sel['activation_bar_ratio']:.0%} quantile)")  # fmt: skip
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=min(len(models), 8), loc="upper center",
              bbox_to_anchor=(0.5, -0.08))  # fmt: skip
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
