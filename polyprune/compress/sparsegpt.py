"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"), following the reference ``sparsegpt.py`` (IST-DASLab).

Columns are processed left to right in blocks of ``blocksize``. Inside a block the mask is
chosen adaptively from w^2 / [H^-1]_jj^2 (Eq. 5 with the Cholesky factor's diagonal), each
column is pruned and its error (w - q) / [H^-1]_jj is spread over the not yet processed columns
through the upper Cholesky factor of H^-1 (the OBS update, Algorithm 1); the block's
accumulated error is applied to the later blocks in one matrix product (lazy batch update).

One deliberate deviation: the reference selects ``tmp <= sorted(tmp)[k]``, which prunes k + 1
weights per block (more with ties); we prune exactly k = floor(numel * sparsity) per block, so
the achieved sparsity is the one asked for.
"""

from __future__ import annotations

import logging

import torch

from polyprune.compress.masks import row_prune_count
from polyprune.compress.solver import PruneConfig, SolverResult

__all__ = ["dead_columns", "inverse_hessian_cholesky", "sparsegpt_prune"]

logger = logging.getLogger(__name__)

# Growing damping when the factorisation fails: 0.01 -> 0.1 -> 1 -> 10 (x mean diag H).
_DAMP_RETRIES = 4


def dead_columns(H: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs that were never non-zero (diag H = 0): their weights cannot matter, so they are
    zeroed and H gets a 1 on the diagonal to stay invertible. Returns copies (H, W)."""
    H = H.clone()
    W = W.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return H, W


def inverse_hessian_cholesky(
    H: torch.Tensor, percdamp: float, name: str = ""
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp I)^-1 (U^T U = H^-1) and the damping used.

    damp = percdamp * mean(diag H). If either factorisation fails (H not positive definite in
    floating point: too few tokens, duplicated inputs), retry with 10x the damping, up to
    ``_DAMP_RETRIES`` times, logging each retry, instead of failing the run.
    """
    mean_diag = torch.mean(torch.diagonal(H)).item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp_frac = percdamp
    for attempt in range(_DAMP_RETRIES):
        damp = damp_frac * mean_diag
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp
        logger.warning(
            "Cholesky factorisation failed for %s with damping %.3g x mean(diag H); retrying "
            "with %.3g",
            name or "a layer",
            damp_frac,
            damp_frac * 10,
        )
        damp_frac *= 10
        del attempt
    raise RuntimeError(
        f"H of {name or 'a layer'} is not invertible even with damping {damp_frac / 10:g} x mean "
        "diag; calibrate on more tokens"
    )


def sparsegpt_prune(
    W: torch.Tensor, H: torch.Tensor, cfg: PruneConfig, name: str = ""
) -> SolverResult:
    """Prune W (rows, cols) given H (cols, cols) = 2/n sum x x^T. Returns W' in W's dtype."""
    dtype = W.dtype
    rows, cols = W.shape
    H, W = dead_columns(H.float(), W.float())
    Hinv, damp = inverse_hessian_cholesky(H, cfg.percdamp, name)
    n, m = cfg.pattern.n, cfg.pattern.m
    mask = torch.zeros_like(W, dtype=torch.bool)
    losses = torch.zeros(rows, device=W.device)

    for i1 in range(0, cols, cfg.blocksize):
        i2 = min(i1 + cfg.blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(Hinv1)

        if m == 0:
            # Adaptive mask for the whole block from the weights as updated so far.
            score = (W1**2 / d1.reshape(1, -1) ** 2).flatten()
            k = row_prune_count(score.numel(), cfg.sparsity)
            mask1 = torch.zeros(score.numel(), dtype=torch.bool, device=W.device)
            if k:
                mask1[torch.sort(score, stable=True)[1][:k]] = True
            mask1 = mask1.reshape(rows, count)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if m and i % m == 0:
                score = W1[:, i : i + m] ** 2 / d1[i : i + m].reshape(1, -1) ** 2
                idx = torch.sort(score, dim=1, stable=True)[1][:, :n]
                mask1.scatter_(1, i + idx, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d  # (rows,)
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    return SolverResult(W.to(dtype), mask, float(losses.sum()), damp)
