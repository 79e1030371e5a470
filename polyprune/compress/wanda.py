"""Wanda (Sun et al., 2024, "A Simple and Effective Pruning Approach for LLMs").

Score S_ij = |W_ij| * ||X_j||_2 (Eq. 1), compared within each output row (the per-output
comparison group of Section 3), or within each group of M inputs for N:M sparsity. No weight
update.
"""

from __future__ import annotations

import torch

from polyprune.compress.magnitude import select_mask
from polyprune.compress.solver import PruneConfig, SolverResult

__all__ = ["wanda_prune", "wanda_score"]


def wanda_score(W: torch.Tensor, colsq: torch.Tensor) -> torch.Tensor:
    """|W| * sqrt(colsq) for W (rows, cols), colsq (cols,) the mean squared input columns."""
    return W.float().abs() * torch.sqrt(colsq.float()).reshape(1, -1)


def wanda_prune(W: torch.Tensor, colsq: torch.Tensor, cfg: PruneConfig) -> SolverResult:
    score = wanda_score(W, colsq)
    mask = select_mask(score, cfg)
    loss = float(score.pow(2)[mask].sum())
    return SolverResult(W.masked_fill(mask, 0), mask, loss)
