"""Similarity of pruning masks across calibration languages (intersection over union).

For one calibration language, the weights it prunes are those pruned in **every** seed (the
seed intersection, applied first), so that seed noise does not count as a language effect.
Between languages a and b: IoU = |P_a ∩ P_b| / |P_a ∪ P_b|, with the counts summed over the
Linears of a group (all of them, one sub-layer type such as ``q`` or ``down``, or one layer)
before dividing. The same-language IoU across seeds (mean over seed pairs) measures how certain
the pruning decision is.
"""

from __future__ import annotations

import itertools
import os
import re

import torch

from polyprune.compress.masks import unpack_mask

__all__ = [
    "MaskFile",
    "group_of",
    "intersect_seeds",
    "mask_iou",
    "pair_counts",
    "seed_iou",
    "sublayer_type",
]

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
