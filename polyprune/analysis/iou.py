"""Similarity of pruning masks across calibration languages (intersection over union).

For one calibration language, the weights it prunes are those pruned in **every** seed (the
seed intersection, applied first), so that seed noise does not count as a language effect.
Between languages a and b: IoU = |P_a ∩ P_b| / |P_a ∪ P_b|, with the counts summed over the
Linears of a group (all of them, one sub-layer type such as ``q`` or ``down``, or one layer)
before dividing. The same-language IoU across seeds (mean over seed pairs) measures how certain
the pruning decision is.

:data:`IOU` is the ``iou`` metric of ``polyprune analyze``: computed from the runs' saved
masks (``--save-masks``), one Linear at a time, without the lockstep pass.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from pathlib import Path

import torch

from polyprune.analysis.markdown import fmt, slug, table
from polyprune.analysis.metric import Metric, PassContext, ReportContext
from polyprune.compress.manifest import MASKS
from polyprune.compress.masks import unpack_mask
from polyprune.errors import InputError

__all__ = [
    "IOU",
    "MaskFile",
    "group_of",
    "intersect_seeds",
    "iou_metrics",
    "mask_iou",
    "pair_counts",
    "seed_iou",
    "sublayer_type",
]

logger = logging.getLogger(__name__)

_SUBLAYER = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
}  # fmt: skip
_LAYER = re.compile(r"\.(\d+)\.")

Masks = dict[str, torch.Tensor]  # Linear name -> bool mask (True = pruned)


def sublayer_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q``; unknown names keep their last part."""
    last = name.rsplit(".", 1)[-1]
    return _SUBLAYER.get(last, last)


def layer_index(name: str) -> int:
    match = _LAYER.search(name)
    if match is None:
        raise ValueError(f"no layer index in {name!r}")
    return int(match[1])


def group_of(name: str, by: str) -> str:
    if by == "all":
        return "all"
    if by == "sublayer":
        return sublayer_type(name)
    if by == "layer":
        return str(layer_index(name))
    raise ValueError(f"unknown grouping {by!r}; allowed: all, sublayer, layer")


def intersect_seeds(runs: list[Masks]) -> Masks:
    """Weights pruned in every seed's mask."""
    if not runs:
        raise ValueError("no masks to intersect")
    names = set(runs[0])
    for r in runs[1:]:
        if set(r) != names:
            raise ValueError("the seeds' masks cover different Linears")
    return {n: torch.stack([r[n] for r in runs]).all(0) for n in runs[0]}


def pair_counts(
    a: Masks, b: Masks, by: str = "all", into: dict[str, list[int]] | None = None
) -> dict[str, list[int]]:
    """[|a ∩ b|, |a ∪ b|] per group, added to ``into`` if given (to stream over Linears)."""
    if set(a) != set(b):
        raise ValueError("the two runs' masks cover different Linears")
    counts = {} if into is None else into
    for name in a:
        c = counts.setdefault(group_of(name, by), [0, 0])
        c[0] += int((a[name] & b[name]).sum())
        c[1] += int((a[name] | b[name]).sum())
    return counts


def ratio(counts: dict[str, list[int]]) -> dict[str, float]:
    """IoU per group from [intersection, union] counts (two empty sets agree fully)."""
    return {g: i / u if u else 1.0 for g, (i, u) in counts.items()}


def mask_iou(a: Masks, b: Masks, by: str = "all") -> dict[str, float]:
    """IoU of two mask sets per group (counts summed over the group's Linears)."""
    return ratio(pair_counts(a, b, by))


def seed_iou(runs: list[Masks], by: str = "all") -> dict[str, float]:
    """Mean IoU over all pairs of seeds of one language (pruning certainty)."""
    if len(runs) < 2:
        raise ValueError("seed IoU needs at least two seeds")
    pairs = [mask_iou(x, y, by) for x, y in itertools.combinations(runs, 2)]
    return {g: sum(p[g] for p in pairs) / len(pairs) for g in pairs[0]}


class MaskFile:
    """A ``masks.safetensors`` read one Linear at a time, so that comparing many runs of a big
    model holds one Linear's masks, not the whole model's."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        from polyprune.compress.export import read_mask_shapes

        self.shapes = read_mask_shapes(path)  # checked, naming the file, before any is read
        self._file = safe_open(str(path), "pt")

    def names(self) -> list[str]:
        return list(self.shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack_mask(self._file.get_tensor(name), self.shapes[name])


def iou_metrics(runs: list) -> dict:
    """Per setting: the seed-intersected masks of each calibration mix compared pairwise
    (all Linears, per sub-layer type, per layer), and each mix's seed IoU; streamed one
    Linear at a time."""
    out = {}
    for setting in dict.fromkeys(r.setting for r in runs):
        by_mix: dict[str, list] = {}
        for r in runs:
            if r.setting == setting:
                by_mix.setdefault(r.mix, []).append(r)
        mixes = list(by_mix)
        if len(mixes) < 2:
            logger.warning("IoU: setting %r has one calibration mix only; skipped", setting)
            continue
        files = {m: [MaskFile(r.path / MASKS) for r in rs] for m, rs in by_mix.items()}
        names = files[mixes[0]][0].names()
        for m, fs in files.items():
            for f in fs:
                if set(f.names()) != set(names):
                    raise InputError(f"the masks of mix {m} cover other Linears than {mixes[0]}")
        pairs = list(itertools.combinations(mixes, 2))
        counts = {p: {by: {} for by in ("all", "sublayer", "layer")} for p in pairs}
        seed_counts = {m: {p: {by: {} for by in ("all", "sublayer", "layer")}
                           for p in itertools.combinations(range(len(fs)), 2)}
                       for m, fs in files.items()}  # fmt: skip
        for name in names:
            per_seed = {m: [f[name] for f in fs] for m, fs in files.items()}
            inter = {m: torch.stack(v).all(0) for m, v in per_seed.items()}  # seed intersection
            for by in ("all", "sublayer", "layer"):
                for a, b in pairs:
                    pair_counts({name: inter[a]}, {name: inter[b]}, by, counts[(a, b)][by])
                for m, v in per_seed.items():
                    for i, j in seed_counts[m]:
                        pair_counts({name: v[i]}, {name: v[j]}, by, seed_counts[m][(i, j)][by])
        groups = {by: list(dict.fromkeys(group_of(n, by) for n in names))
                  for by in ("all", "sublayer", "layer")}  # fmt: skip
        matrices: dict = {by: {} for by in groups}
        for by, gs in groups.items():
            for g in gs:
                mat = [[1.0] * len(mixes) for _ in mixes]
                for (a, b), c in counts.items():
                    v = ratio(c[by])[g]
                    mat[mixes.index(a)][mixes.index(b)] = mat[mixes.index(b)][mixes.index(a)] = v
                matrices[by][g] = mat
        seed = {}
        for m, per_pair in seed_counts.items():
            if not per_pair:
                continue
            seed[m] = {by: {g: sum(ratio(c[by])[g] for c in per_pair.values()) / len(per_pair)
                            for g in gs} for by, gs in groups.items()}  # fmt: skip
        out[setting] = {
            "mixes": mixes,
            "seeds": {m: [r.seed for r in rs] for m, rs in by_mix.items()},
            "matrices": matrices,
            "seed_iou": seed,
        }
    return out


def iou_heatmaps(mixes: list[str], matrices: dict[str, list[list[float]]], title: str,
                 path: Path) -> Path:  # fmt: skip
    """Calibration mix x calibration mix IoU, one panel per group (all Linears, then each
    sub-layer type), on one shared colour scale."""
    import matplotlib.pyplot as plt
    import numpy as np

    from polyprune.analysis.plots import DPI, grid

    values = [v for m in matrices.values() for i, row in enumerate(m) for j, v in enumerate(row)
              if i != j]  # fmt: skip
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    size = max(3.2, 0.55 * len(mixes) + 1.6)
    fig, axes = grid(len(matrices), width=size, height=size * 0.9)
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
    import matplotlib.pyplot as plt
    import numpy as np

    from polyprune.analysis.plots import save

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
    return save(fig, path)


class _IoU(Metric):
    name = "iou"

    def unavailable(self, ctx: PassContext) -> str | None:
        runs = ctx.runs
        missing = [str(r.path) for r in runs if not r.has_masks]
        if missing:
            return f"no {MASKS} in {', '.join(missing)} (prune with --save-masks)"
        settings = {r.setting for r in runs}
        if all(len({r.mix for r in runs if r.setting == s}) < 2 for s in settings):
            return "needs runs of at least two calibration mixes with the same setting"
        return None

    def finish(self, state: dict, ctx: PassContext) -> dict:
        return iou_metrics(ctx.runs)

    def report(self, section: dict, ctx: ReportContext) -> list[str]:
        md = []
        for setting, iou in section.items():
            sl = slug(setting)
            mats = {"all": iou["matrices"]["all"]["all"], **iou["matrices"]["sublayer"]}
            heat = iou_heatmaps(
                iou["mixes"],
                mats,
                f"Mask IoU across calibration mixes ({setting}; seeds intersected)",
                ctx.out / f"iou-{sl}.png",
            )
            seed_layers = {mix: s["layer"] for mix, s in iou["seed_iou"].items()}
            lines = iou_layer_lines(iou["mixes"], dict(iou["matrices"]["layer"]), seed_layers,
                                    f"Mask IoU per layer ({setting})",
                                    ctx.out / f"iou-layers-{sl}.png")  # fmt: skip
            md += [f"## Pruning-mask IoU: {setting}", "",
                   "Weights pruned in every seed of a mix, compared between mixes "
                   "(IoU = |P_a ∩ P_b| / |P_a ∪ P_b|, all Linears):", ""]  # fmt: skip
            mat = iou["matrices"]["all"]["all"]
            md += table(["", *iou["mixes"]],
                        [[a, *[fmt(v, 3) for v in row]]
                         for a, row in zip(iou["mixes"], mat, strict=True)])  # fmt: skip
            if iou["seed_iou"]:
                md += ["Same-mix IoU across seeds (pruning certainty): "
                       + ", ".join(f"{k} {v['all']['all']:.3f} ({len(iou['seeds'][k])} seeds)"
                                   for k, v in iou["seed_iou"].items()), ""]  # fmt: skip
            md += [f"![IoU heatmaps]({heat.name})", "", f"![IoU per layer]({lines.name})", ""]
        return md


IOU = _IoU()
