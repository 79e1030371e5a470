"""GPTQ (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), following the reference ``gptq.py`` (IST-DASLab) and the options
GPTQModel exposes: bits 2/3/4/8, group size (-1 = per output channel), symmetric or
asymmetric grids, act-order (columns by descending diag H, un-permuted after), static groups.

The column loop, damping, Cholesky retry and dead-column handling are SparseGPT's
(``polyprune.compress.obs``), with sparsity 0 and a quantiser.
"""

from __future__ import annotations

import torch

from polyprune.compress.obs import obs_solve
from polyprune.compress.quant import QuantConfig, rtn_quantize
from polyprune.compress.solver import SolverResult

__all__ = ["gptq_quantize", "rtn"]


def gptq_quantize(
    W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, name: str = "", segments=None
) -> SolverResult:
    """Quantise W (rows, cols) given H = 2/n sum x x^T; W' is dequantised, in W's dtype.

    Rows are independent, so stacked Linears (``segments``) give the same result as separate
    calls; ``segments`` is accepted for that reason and otherwise unused.
    """
    res = obs_solve(W, H, blocksize=cfg.blocksize, percdamp=cfg.percdamp, quant=cfg, name=name)
    return SolverResult(
        res.weight.to(W.dtype), res.mask, float(res.row_loss.sum()), res.damp,
        row_loss=res.row_loss, quant=res.quant,
    )  # fmt: skip


def rtn(W: torch.Tensor, cfg: QuantConfig) -> SolverResult:
    """Round-to-nearest on GPTQ's grid; loss = sum of squared rounding errors."""
    Wq, qt = rtn_quantize(W, cfg)
    err = (W.float() - Wq.float()) ** 2
    mask = torch.zeros_like(W, dtype=torch.bool)
    return SolverResult(Wq, mask, float(err.sum()), None, row_loss=err.sum(1), quant=qt)
