"""Magnitude pruning: the smallest |W_ij| of each output row (or of each N:M group)."""

from __future__ import annotations

import torch

from polyprune.compress.masks import row_prune_count
from polyprune.compress.solver import PruneConfig, SolverResult
from polyprune.kernels.topk_mask import nm_mask, row_topk_mask

__all__ = ["magnitude_prune", "select_mask"]


def select_mask(score: torch.Tensor, cfg: PruneConfig) -> torch.Tensor:
    """Lowest scores per row: floor(cols * sparsity) of them, or N in every M."""
    if cfg.pattern.structured:
        return nm_mask(score, cfg.pattern.n, cfg.pattern.m)
    return row_topk_mask(score, row_prune_count(score.shape[1], cfg.sparsity))


def magnitude_prune(W: torch.Tensor, cfg: PruneConfig) -> SolverResult:
    """W (rows, cols) -> W with its smallest-magnitude weights zeroed."""
    score = W.float().abs()
    mask = select_mask(score, cfg)
    loss = float(score.pow(2)[mask].sum())
    return SolverResult(W.masked_fill(mask, 0), mask, loss)
