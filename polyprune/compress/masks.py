"""Selection of the weights to prune (unstructured per row, or N:M) and mask bit-packing.

Masks are boolean with ``True`` = pruned. Ties in a score are broken by column index (a stable
sort), so the same scores always give the same mask on every device.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from polyprune.errors import InputError

__all__ = [
    "Pattern",
    "nm_mask",
    "pack_mask",
    "row_prune_count",
    "row_topk_mask",
    "smallest_k_mask",
    "unpack_mask",
]

_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` (n = m = 0) or N:M: N pruned weights in every M consecutive inputs."""

    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, spec: str) -> Pattern:
        if spec in ("unstructured", "", None):
            return cls()
        match = _NM.match(str(spec).strip())
        if not match:
            raise InputError(f"bad pattern {spec!r}; allowed: unstructured or N:M such as 2:4, 4:8")
        n, m = int(match[1]), int(match[2])
        if m < 2 or not 0 < n < m:
            raise InputError(f"impossible pattern {spec!r}: N:M needs 0 < N < M and M >= 2")
        return cls(n, m)

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        return self.n / self.m if self.m else 0.0

    def check_width(self, cols: int, where: str) -> None:
        if self.m and cols % self.m:
            raise InputError(
                f"pattern {self} needs input widths divisible by {self.m}; {where} has {cols}"
            )

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else "unstructured"


def row_prune_count(cols: int, sparsity: float) -> int:
    """Weights pruned per row: floor(cols * sparsity), exact for decimal sparsities.

    The 1e-9 keeps 100 * 0.29 (= 28.999999999999996 in floating point) at 29.
    """
    return math.floor(cols * sparsity + 1e-9)


def smallest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest scores along the last dimension, ties going to the lower index:
    exactly the first k of a stable sort, found with a k-th value selection (no full sort)."""
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= score.shape[-1]:
        return torch.ones_like(score, dtype=torch.bool)
    kth = torch.kthvalue(score, k, dim=-1, keepdim=True).values
    below = score < kth
    tied = score == kth
    # Of the entries equal to the k-th value, keep the lowest-index ones still needed.
    need = k - below.sum(-1, keepdim=True)
    return below | (tied & (tied.cumsum(-1) <= need))


def row_topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest scores in each row (ties: lower column first). (R, C) -> bool."""
    return smallest_k_mask(score, k)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the ``n`` lowest scores in every group of ``m`` consecutive columns."""
    rows, cols = score.shape
    return smallest_k_mask(score.reshape(rows, cols // m, m), n).reshape(rows, cols)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a boolean mask (row-major, little bit order) into uint8: 8x smaller."""
    bits = np.packbits(mask.detach().cpu().numpy().reshape(-1), bitorder="little")
    return torch.from_numpy(bits)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = math.prod(shape)
    bits = np.unpackbits(packed.numpy(), count=numel, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(shape)
