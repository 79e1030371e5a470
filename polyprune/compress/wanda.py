"""Wanda (Sun et al., 2024, "A Simple and Effective Pruning Approach for LLMs").

Score S_ij = |W_ij| * ||X_j||_2 (Eq. 1), compared within each output row (the per-output
comparison group of Section 3), or within each group of M inputs for N:M sparsity. No weight
update.
"""

from __future__ import annotations

import torch

from polyprune.compress.magnitude import select_mask
from polyprune.compress.masks import row_prune_count
from polyprune.compress.solver import PruneConfig, SolverResult
from polyprune.kernels.dispatch import use_triton
from polyprune.kernels.wanda_mask import wanda_mask

__all__ = ["wanda_prune", "wanda_score"]


def wanda_score(W: torch.Tensor, colsq: torch.Tensor) -> torch.Tensor:
    """|W| * sqrt(colsq) for W (rows, cols), colsq (cols,) the mean squared input columns."""
    return W.float().abs() * torch.sqrt(colsq.float()).reshape(1, -1)


def wanda_prune(W: torch.Tensor, colsq: torch.Tensor, cfg: PruneConfig) -> SolverResult:
    score = wanda_score(W, colsq)
    m = cfg.pattern.m
    if use_triton(W) and not m & (m - 1):  # same mask by the Triton kernel (M a power of 2)
        k = row_prune_count(W.shape[1], cfg.sparsity)
        mask = wanda_mask(W, colsq, k=k, n=cfg.pattern.n, m=cfg.pattern.m)
    else:
        mask = select_mask(score, cfg)
    loss = float(torch.where(mask, score, 0).square().sum())  # no gather of the pruned
    return SolverResult(W.masked_fill(mask, 0), mask, loss)
