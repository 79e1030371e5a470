"""Running mean of squared input-column norms, Wanda's statistic:
s <- s * n/(n+b) + (1/(n+b)) sum_t X_t^2.

When a Hessian is accumulated too, this is diag(H) / 2 and costs nothing more
(``InputStats.column_sq_norms``): the activations are then read once for both statistics.

* Torch path: ``X.float().pow(2).sum(0)``.
* Triton path: one program per block of columns, looping over the tokens with fp32
  accumulation, so no fp32 copy of X is made.
"""

from __future__ import annotations

import torch

from polyprune.kernels.dispatch import triton_available, use_triton
from polyprune.kernels.launch import (
    FLOAT_INPUTS,
    check_dtype,
    check_shapes,
    ensure_contiguous,
    require_triton,
)

__all__ = ["colsq_update", "colsq_update_torch", "colsq_update_triton"]


def _check(s: torch.Tensor, X: torch.Tensor) -> None:
    check_shapes(X.dim() == 2 and s.shape == (X.shape[1],), "X (b, d) and s (d,)", X, s)
    check_dtype("s", s, torch.float32)
    check_dtype("X", X, *FLOAT_INPUTS)


def colsq_update_torch(s: torch.Tensor, n: int, X: torch.Tensor) -> None:
    _check(s, X)
    b = X.shape[0]
    s.mul_(n / (n + b))
    s.add_(X.to(torch.float32).pow(2).sum(0), alpha=1.0 / (n + b))


def colsq_update(s: torch.Tensor, n: int, X: torch.Tensor) -> None:
    if use_triton(X):
        colsq_update_triton(s, n, X)
    else:
        colsq_update_torch(s, n, X)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _colsq_kernel(X, S, T, D, stride_xt, decay, alpha,
                      BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        rd = pid * BLOCK_D + tl.arange(0, BLOCK_D)
        md = rd < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rt = t0 + tl.arange(0, BLOCK_T)
            x = tl.load(X + rt[:, None] * stride_xt + rd[None, :],
                        mask=(rt[:, None] < T) & md[None, :], other=0.0).to(tl.float32)  # fmt: skip
            acc += tl.sum(x * x, axis=0)
        s = tl.load(S + rd, mask=md, other=0.0)
        tl.store(S + rd, s * decay + acc * alpha, mask=md)


def colsq_update_triton(
    s: torch.Tensor, n: int, X: torch.Tensor, block_d: int = 128, block_t: int = 32
) -> None:
    _check(s, X)
    require_triton()
    (X,) = ensure_contiguous(X)
    b, d = X.shape
    _colsq_kernel[(triton.cdiv(d, block_d),)](
        X, s, b, d, X.stride(0), n / (n + b), 1.0 / (n + b), BLOCK_D=block_d, BLOCK_T=block_t
    )
