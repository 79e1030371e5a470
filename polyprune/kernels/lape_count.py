"""LAPE statistics (Tang et al., ACL 2024): for activations A [tokens, neurons] of one
language, add per neuron the number of tokens with A > 0 and the sum of |A| into that
language's row of ``counts`` (int64) and ``sums`` (fp32), in one read of A.

* Torch path: ``(A > 0).sum(0)`` and ``A.abs().sum(0)``.
* Triton path: one program per block of neurons loops over the tokens with int32 / fp32
  accumulators and adds into the language's row (no atomics: each neuron has one program).
"""

from __future__ import annotations

import torch

from polyprune.kernels.dispatch import triton_available, use_triton
from polyprune.kernels.launch import (
    check_contiguous,
    check_dtype,
    check_shapes,
    ensure_contiguous,
    require_triton,
)

__all__ = ["lape_count", "lape_count_torch", "lape_count_triton"]


def _check(A, counts, sums, lang):
    ok = A.dim() == 2 and counts.shape == sums.shape and counts.shape[1] == A.shape[1]
    check_shapes(ok, "A (T, N), counts and sums (L, N)", A, counts, sums)
    check_dtype("counts", counts, torch.int64)
    check_dtype("sums", sums, torch.float32)
    if not 0 <= lang < counts.shape[0]:
        raise ValueError(f"language id {lang} outside [0, {counts.shape[0]})")


def lape_count_torch(A: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, lang: int) -> None:
    _check(A, counts, sums, lang)
    counts[lang] += (A > 0).sum(0)
    sums[lang] += A.float().abs().sum(0)


def lape_count(A: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, lang: int) -> None:
    if use_triton(A):
        lape_count_triton(A, counts, sums, lang)
    else:
        lape_count_torch(A, counts, sums, lang)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _lape_kernel(A, COUNTS, SUMS, T, N, stride_a, row_off,
                     BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = rn < N
        cnt = tl.zeros((BLOCK_N,), dtype=tl.int32)
        tot = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rt = t0 + tl.arange(0, BLOCK_T)
            a = tl.load(A + rt[:, None].to(tl.int64) * stride_a + rn[None, :],
                        mask=(rt[:, None] < T) & mn[None, :], other=0.0).to(tl.float32)  # fmt: skip
            cnt += tl.sum((a > 0).to(tl.int32), axis=0)
            tot += tl.sum(tl.abs(a), axis=0)
        c = tl.load(COUNTS + row_off + rn, mask=mn, other=0)
        tl.store(COUNTS + row_off + rn, c + cnt.to(tl.int64), mask=mn)
        s = tl.load(SUMS + row_off + rn, mask=mn, other=0.0)
        tl.store(SUMS + row_off + rn, s + tot, mask=mn)


def lape_count_triton(
    A: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, lang: int,
    block_n: int = 128, block_t: int = 32,
) -> None:  # fmt: skip
    _check(A, counts, sums, lang)
    require_triton()
    check_contiguous("counts and sums", counts, sums)
    (A,) = ensure_contiguous(A)
    T, N = A.shape
    _lape_kernel[(triton.cdiv(N, block_n),)](
        A, counts, sums, T, N, A.stride(0), lang * N, BLOCK_N=block_n, BLOCK_T=block_t
    )
