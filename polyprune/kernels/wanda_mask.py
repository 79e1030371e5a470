"""Wanda's mask: score = |W| * sqrt(colsq), and per row the k lowest scores (unstructured) or
the N lowest of every M consecutive columns, without sorting whole rows.

The mask equals the first k (or N) of a stable sort: ties go to the lower column index.

* Torch path: a k-th value search (``polyprune.kernels.topk_mask``).
* Triton path, unstructured: one program per row finds the k-th smallest score by bisection on
  its float bits (non-negative floats order as their int32 patterns), 31 counting passes over
  the row, then writes the mask in column order, carrying the count of tied entries so ties
  break exactly as a stable sort breaks them.
* Triton path, N:M: each entry's rank inside its group (entries below it, plus equal ones at
  lower columns) from M comparisons; rank < N is pruned.

The scores are multiplied exactly as the torch path does (|w| * sqrt(colsq) in fp32, the sqrt
taken once by torch), so both paths see bit-identical scores.
"""

from __future__ import annotations

import torch

from polyprune.kernels.dispatch import triton_available, use_triton
from polyprune.kernels.launch import check_shapes, ensure_contiguous, require_triton
from polyprune.kernels.topk_mask import nm_mask, smallest_k_mask

__all__ = ["wanda_mask", "wanda_mask_torch", "wanda_mask_triton"]


def _scores(W: torch.Tensor, colsq: torch.Tensor) -> torch.Tensor:
    return W.float().abs() * torch.sqrt(colsq.float()).reshape(1, -1)


def wanda_mask_torch(W: torch.Tensor, colsq: torch.Tensor, k: int = 0, n: int = 0, m: int = 0):
    score = _scores(W, colsq)
    return nm_mask(score, n, m) if m else smallest_k_mask(score, k)


def wanda_mask(W: torch.Tensor, colsq: torch.Tensor, k: int = 0, n: int = 0, m: int = 0):
    """Boolean mask (True = pruned) of W (rows, cols): k per row, or n in every m columns."""
    if use_triton(W):
        return wanda_mask_triton(W, colsq, k, n, m)
    return wanda_mask_torch(W, colsq, k, n, m)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _score_bits(w_row, NORM, cols, mc):
        """int32 bit patterns of |w| * norm: for non-negative floats they order as the values."""
        s = tl.abs(tl.load(w_row + cols, mask=mc, other=0.0).to(tl.float32))
        s = s * tl.load(NORM + cols, mask=mc, other=0.0)
        return s.to(tl.int32, bitcast=True)

    @triton.jit
    def _row_topk_kernel(W, NORM, OUT, C, stride_w, stride_o, k, BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        w_row = W + row * stride_w
        lo = tl.zeros((), dtype=tl.int32)
        hi = tl.full((), 0x7F800000, dtype=tl.int32)  # +inf: every finite score is below
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            cnt = tl.zeros((), dtype=tl.int32)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                mc = cols < C
                bits = _score_bits(w_row, NORM, cols, mc)
                cnt += tl.sum(((bits <= mid) & mc).to(tl.int32), axis=0)
            take = cnt >= k
            hi = tl.where(take, mid, hi)
            lo = tl.where(take, lo, mid + 1)
        thr = lo  # bits of the k-th smallest score
        below_total = tl.zeros((), dtype=tl.int32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mc = cols < C
            bits = _score_bits(w_row, NORM, cols, mc)
            below_total += tl.sum(((bits < thr) & mc).to(tl.int32), axis=0)
        need = k - below_total  # tied entries to take, lowest columns first
        carry = tl.zeros((), dtype=tl.int32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mc = cols < C
            bits = _score_bits(w_row, NORM, cols, mc)
            tied = ((bits == thr) & mc).to(tl.int32)
            rank = tl.cumsum(tied, axis=0) + carry
            pruned = (bits < thr) | ((tied == 1) & (rank <= need))
            tl.store(OUT + row * stride_o + cols, pruned.to(tl.int8), mask=mc)
            carry += tl.sum(tied, axis=0)

    @triton.jit
    def _nm_kernel(W, NORM, OUT, R, C, stride_w, stride_o, n,
                   M: tl.constexpr, BLOCK_G: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        groups_per_row = C // M
        g = pid * BLOCK_G + tl.arange(0, BLOCK_G)  # global group ids
        mg = g < R * groups_per_row
        row = g // groups_per_row
        col0 = (g % groups_per_row) * M
        j = tl.arange(0, M)
        cols = col0[:, None] + j[None, :]
        mask2 = mg[:, None]
        w = tl.load(W + row[:, None] * stride_w + cols, mask=mask2, other=0.0).to(tl.float32)
        s = tl.abs(w) * tl.load(NORM + cols, mask=mask2, other=0.0)  # (G, M)
        rank = tl.zeros((BLOCK_G, M), dtype=tl.int32)
        for q in tl.static_range(M):
            sq = tl.sum(tl.where(j[None, :] == q, s, 0.0), axis=1)  # column q of the group
            before = (sq[:, None] < s) | ((sq[:, None] == s) & (q < j[None, :]))
            rank += before.to(tl.int32)
        tl.store(OUT + row[:, None] * stride_o + cols, (rank < n).to(tl.int8), mask=mask2)


def wanda_mask_triton(
    W: torch.Tensor, colsq: torch.Tensor, k: int = 0, n: int = 0, m: int = 0, block: int = 1024
) -> torch.Tensor:
    ok = W.dim() == 2 and colsq.shape == (W.shape[1],)
    check_shapes(ok, "W (R, C) and colsq (C,)", W, colsq)
    require_triton()
    (W,) = ensure_contiguous(W)
    rows, cols = W.shape
    norm = torch.sqrt(colsq.float()).contiguous()
    out = torch.empty((rows, cols), dtype=torch.int8, device=W.device)
    if m:
        if cols % m or m & (m - 1):
            raise ValueError(f"N:M needs cols % M == 0 and M a power of two, got {cols}, {m}")
        groups = rows * cols // m
        block_g = 64
        _nm_kernel[(triton.cdiv(groups, block_g),)](
            W, norm, out, rows, cols, W.stride(0), out.stride(0), n, M=m, BLOCK_G=block_g
        )
    else:
        if k <= 0:
            return torch.zeros((rows, cols), dtype=torch.bool, device=W.device)
        if k >= cols:
            return torch.ones((rows, cols), dtype=torch.bool, device=W.device)
        block_c = min(block, triton.next_power_of_2(cols))
        _row_topk_kernel[(rows,)](W, norm, out, cols, W.stride(0), out.stride(0), k,
                                  BLOCK_C=block_c)  # fmt: skip
    return out.bool()
