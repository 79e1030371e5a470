"""The min-max quantisation grid of GPTQ (Frantar et al., 2023) and round-to-nearest (RTN).

Per output row and group of input columns: scale = (xmax - xmin) / maxq with the range widened
to include 0 (rounded to fp16, the dtype the GPTQ format stores); asymmetric zero =
round(-xmin / scale), symmetric zero = (maxq + 1) / 2 with
xmin = -xmax. A weight w maps to q = clamp(round(w / scale) + zero, 0, maxq) and dequantises
to scale * (q - zero). Zero always lies on the grid, so a pruned weight stays exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polyprune.checks import check_finite
from polyprune.errors import InputError

__all__ = ["QuantConfig", "QuantTensors", "find_params", "quantize", "rtn_quantize", "to_int"]

BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel (the whole row)
    sym: bool = True
    act_order: bool = False  # columns in order of descending diag(H), un-permuted after
    static_groups: bool = False  # group grids fixed from the weights before any update
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise InputError(f"bits {self.bits} not supported; allowed: 2, 3, 4, 8")
        if self.group_size != -1 and self.group_size < 1:
            raise InputError(f"group size {self.group_size} must be -1 (per channel) or >= 1")
        if self.blocksize < 1:
            raise InputError(f"blocksize must be >= 1, got {self.blocksize}")
        # inf passes "> 0" but makes every Hessian "not invertible" after calibration.
        check_finite("percdamp", self.percdamp, positive=True)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def check_width(self, cols: int, where: str) -> None:
        if self.group_size != -1 and cols % self.group_size:
            raise InputError(
                f"group size {self.group_size} does not divide the input width {cols} of {where}"
            )


@dataclass
class QuantTensors:
    """What a GPTQ checkpoint stores besides the integers: per group grids and g_idx.

    ``scales`` and ``zeros`` are (groups, rows) in the order groups were formed; ``g_idx``
    (cols,) gives each input column's group (not monotone with act-order).
    """

    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int


def find_params(x: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each (rows,), of the grid for the rows of x (rows, k)."""
    zero_t = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(1).values, zero_t)
    xmax = torch.maximum(x.max(1).values, zero_t)
    if cfg.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -1.0, xmin)
    xmax = torch.where(both_zero, 1.0, xmax)
    # Scales are stored in fp16 by the GPTQ format: quantise on exactly the stored grid, so a
    # packed checkpoint dequantises to the very weights the solver produced. (Scales below
    # fp16's smallest normal number are kept at it.)
    scale = ((xmax - xmin) / cfg.maxq).clamp(min=2.0**-14).half().float()
    if cfg.sym:
        zero = torch.full_like(scale, (cfg.maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Dequantised x: scale * (clamp(round(x / scale) + zero, 0, maxq) - zero), broadcasting
    scale and zero (rows,) over the last dimension of x when it is 2-D."""
    if x.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def to_int(W: torch.Tensor, qt: QuantTensors) -> torch.Tensor:
    """Integers q (rows, cols) of a dequantised W on the grids of ``qt``."""
    scale = qt.scales[qt.g_idx.long()].t()  # (rows, cols)
    zero = qt.zeros[qt.g_idx.long()].t()
    maxq = 2**qt.bits - 1
    return torch.clamp(torch.round(W.float() / scale) + zero, 0, maxq).to(torch.int32)


def rtn_quantize(W: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, QuantTensors]:
    """Round-to-nearest on the same grid: every group quantised on its own, no error feedback."""
    rows, cols = W.shape
    g = cols if cfg.group_size == -1 else cfg.group_size
    Wf = W.float()
    out = torch.empty_like(Wf)
    scales, zeros = [], []
    for c in range(0, cols, g):
        scale, zero = find_params(Wf[:, c : c + g], cfg)
        out[:, c : c + g] = quantize(Wf[:, c : c + g], scale, zero, cfg.maxq)
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.arange(cols, device=W.device, dtype=torch.int32) // g
    return out.to(W.dtype), QuantTensors(torch.stack(scales), torch.stack(zeros), g_idx, cfg.bits)
