"""The optimal-brain-surgeon column loop shared by SparseGPT and GPTQ.

Both process the columns of W left to right in blocks (Frantar & Alistarh, 2023; Frantar et
al., 2023): each column is pruned and/or rounded to its quantisation grid, and its error
(w - q) / [H^-1]_jj is spread over the columns not yet processed through the upper Cholesky
factor of H^-1; a block's accumulated error reaches the later blocks in one product (lazy
batch update). Inside a block the same lazy scheme runs again over sub-blocks of 32 columns
(exact in arithmetic), and the work is done transposed so that each column is a contiguous
row: on 2 CPU cores this took SparseGPT's solve on 8 Llama blocks from 4.8 s to 1.7 s.

Pruning masks (SparseGPT): unstructured masks are chosen per block from w^2 / [H^-1]_jj^2 on
the weights as updated so far, per stacked Linear (``segments``); N:M masks per group of M
columns as the loop reaches them. Quantisation grids (GPTQ): one per row (group size -1) or
one per group of columns, found from the block-start weights when the loop reaches the group's
first column (as the reference implementations do), or fixed in advance (static groups). With
act-order the columns are processed in order of descending diag(H) and un-permuted after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from polyprune.compress.masks import row_prune_count
from polyprune.compress.quant import QuantConfig, QuantTensors, find_params, quantize
from polyprune.kernels.topk_mask import smallest_k_mask

__all__ = ["ObsResult", "dead_columns", "inverse_hessian_cholesky", "obs_solve"]

logger = logging.getLogger(__name__)

# Growing damping when the factorisation fails: 0.01 -> 0.1 -> 1 -> 10 (x mean diag H).
_DAMP_RETRIES = 4
_SUB = 32


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
    H: torch.Tensor, percdamp: float, name: str = "", inplace: bool = False
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp I)^-1 (U^T U = H^-1) and the damping used.

    damp = percdamp * mean(diag H). If either factorisation fails (H not positive definite in
    floating point: too few tokens, duplicated inputs), retry with 10x the damping, up to
    ``_DAMP_RETRIES`` times, logging each retry, instead of failing the run.

    Memory: the damping is added to the diagonal of H itself (``inplace=True``: the caller's
    copy, left damped) or of one copy, and each intermediate factor is freed as soon as the
    next exists: at most three d x d matrices are alive at once besides the caller's H, where
    the textbook ``cholesky(H + damp * eye)`` holds five (d = 14336 in fp32: 2.3 GiB, not 3.8).
    """
    diag0 = torch.diagonal(H).clone()
    mean_diag = torch.mean(diag0).item()
    A = H if inplace else H.clone()
    damp_frac = percdamp
    for _ in range(_DAMP_RETRIES):
        damp = damp_frac * mean_diag
        torch.diagonal(A).copy_(diag0).add_(damp)
        L, info = torch.linalg.cholesky_ex(A)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info == 0 and torch.isfinite(U).all():
                return U, damp
            del U
        else:
            del L
        logger.warning(
            "Cholesky factorisation failed for %s with damping %.3g x mean(diag H); retrying "
            "with %.3g",
            name or "a layer",
            damp_frac,
            damp_frac * 10,
        )
        damp_frac *= 10
    raise RuntimeError(
        f"H of {name or 'a layer'} is not invertible even with damping {damp_frac / 10:g} x mean "
        "diag; calibrate on more tokens"
    )


@dataclass
class ObsResult:
    weight: torch.Tensor  # (rows, cols), float32, original column order
    mask: torch.Tensor  # bool, True = pruned
    row_loss: torch.Tensor  # (rows,) sum of (w - q)^2 / [H^-1]_jj^2 / 2
    damp: float
    quant: QuantTensors | None = None


def obs_solve(
    W: torch.Tensor,
    H: torch.Tensor,
    blocksize: int = 128,
    percdamp: float = 0.01,
    sparsity: float = 0.0,
    n: int = 0,
    m: int = 0,
    segments: list[int] | None = None,
    quant: QuantConfig | None = None,
    name: str = "",
) -> ObsResult:
    """Prune (``sparsity`` or N:M) and/or quantise (``quant``) W (rows, cols) given H.

    Over 80 lines on purpose: one loop, as SparseGPT's ``fasterprune`` and GPTQ's
    ``fasterquant``, whose running tensors (W1T, ErrT, Hinv1, mask1, the grids) every step
    updates; split, each piece would take them all as arguments and the loop no longer reads
    like the paper's Algorithm 1."""
    rows, cols = W.shape
    W = W.float().clone()
    segments = segments or [rows]
    bounds = [sum(segments[:i]) for i in range(len(segments) + 1)]
    g = cols if quant is None or quant.group_size == -1 else quant.group_size
    grid = find_params(W, quant) if quant is not None and quant.group_size == -1 else None
    H, W = dead_columns(H.float(), W)
    static = None
    if quant is not None and quant.static_groups and quant.group_size != -1:
        static = [find_params(W[:, c : c + g], quant) for c in range(0, cols, g)]
    perm = None
    if quant is not None and quant.act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    # H is obs_solve's own copy (dead_columns): damp it in place, then let it go.
    Hinv, damp = inverse_hessian_cholesky(H, percdamp, name, inplace=True)
    del H

    mask = torch.zeros_like(W, dtype=torch.bool)
    losses = torch.zeros(rows, device=W.device)
    grids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    sub = m * max(1, _SUB // m) if m else _SUB

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1T = W[:, i1:i2].t().contiguous()  # (count, rows)
        ErrT = torch.zeros_like(W1T)
        QT = torch.empty_like(W1T) if quant is not None else None
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(Hinv1)

        mask1 = torch.zeros((rows, count), dtype=torch.bool, device=W.device)
        if m == 0 and sparsity > 0:
            score = (W1T**2 / d1.reshape(-1, 1) ** 2).t()  # (rows, count)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                k = row_prune_count((b - a) * count, sparsity)
                seg = smallest_k_mask(score[a:b].reshape(1, -1), k)
                mask1[a:b] = seg.reshape(b - a, count)
        # Pruning alone: err = (w - q) / d = w * coef with coef = mask / d.
        coefT = mask1.t().to(W.dtype) / d1.reshape(-1, 1) if quant is None else None

        for j1 in range(0, count, sub):
            j2 = min(j1 + sub, count)
            for i in range(j1, j2):
                if m and i % m == 0:
                    score = (W1T[i : i + m] ** 2 / d1[i : i + m].reshape(-1, 1) ** 2).t()
                    mask1[:, i : i + m] = smallest_k_mask(score, n)
                    if coefT is not None:
                        coefT[i : i + m] = mask1[:, i : i + m].t() / d1[i : i + m].reshape(-1, 1)
                if quant is None:
                    torch.mul(W1T[i], coefT[i], out=ErrT[i])
                else:
                    col = i1 + i
                    if static is not None:
                        grid = static[(int(perm[col]) if perm is not None else col) // g]
                    elif quant.group_size != -1 and col % g == 0:
                        # The group's grid from the block-start weights, as the reference does.
                        grid = find_params(W[:, col : col + g], quant)
                        grids[col // g] = grid
                    q = quantize(W1T[i].masked_fill(mask1[:, i], 0), *grid, quant.maxq)
                    QT[i] = q
                    torch.sub(W1T[i], q, out=ErrT[i]).div_(d1[i])
                W1T[i:j2].addr_(Hinv1[i, i:j2], ErrT[i], alpha=-1)
            if j2 < count:
                W1T[j2:].addmm_(Hinv1[j1:j2, j2:].t(), ErrT[j1:j2], alpha=-1)

        if QT is not None:
            W[:, i1:i2] = QT.t()
        else:  # column i holds w - err * d = q; exact zeros are set explicitly
            W[:, i1:i2] = W1T.t().masked_fill(mask1, 0)
        mask[:, i1:i2] = mask1
        losses += (ErrT**2).sum(0) / 2
        W[:, i2:] -= ErrT.t().matmul(Hinv[i1:i2, i2:])

    qt = None
    if quant is not None:
        qt = _quant_tensors(quant, cols, g, grid, grids, static, perm, W.device)
    if perm is not None:
        invperm = torch.argsort(perm)
        W, mask = W[:, invperm], mask[:, invperm]
    return ObsResult(W, mask, losses, damp, qt)


def _quant_tensors(quant, cols, g, grid, grids, static, perm, device) -> QuantTensors:
    """Grids per group and g_idx in the original column order (GPTQ's convention)."""
    pos = torch.arange(cols, device=device, dtype=torch.int32)
    if quant.group_size == -1:
        scales, zeros = grid[0].unsqueeze(0), grid[1].unsqueeze(0)
        return QuantTensors(scales, zeros, torch.zeros_like(pos), quant.bits)
    if static is not None:
        scales = torch.stack([s for s, _ in static])
        zeros = torch.stack([z for _, z in static])
        g_idx = pos // g  # groups of original columns, whatever the processing order
    else:
        scales = torch.stack([grids[k][0] for k in sorted(grids)])
        zeros = torch.stack([grids[k][1] for k in sorted(grids)])
        g_idx = pos // g
        if perm is not None:  # column perm[j] was processed j-th, in group j // g
            g_idx = torch.empty_like(pos)
            g_idx[perm] = pos // g
    return QuantTensors(scales, zeros, g_idx, quant.bits)
