"""Sparsity patterns (unstructured per row, or N:M), the weights pruned per row, and mask
bit-packing.

Masks are boolean with ``True`` = pruned. Choosing them (the k lowest scores, ties to the lower
column) is :mod:`polyprune.kernels.topk_mask`, shared with the Wanda kernel's torch twin.
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
    "pack_mask",
    "row_prune_count",
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


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a boolean mask (row-major, little bit order) into uint8: 8x smaller."""
    bits = np.packbits(mask.detach().cpu().numpy().reshape(-1), bitorder="little")
    return torch.from_numpy(bits)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = math.prod(shape)
    bits = np.unpackbits(packed.numpy(), count=numel, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(shape)
