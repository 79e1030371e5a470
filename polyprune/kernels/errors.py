"""Per-layer sums for SNR and pruning error: sum_t ||h_t||^2 and sum_t ||h_t - h'_t||^2 over
dense hidden states h and compressed ones h' [tokens, d], without materialising h - h'.

* Torch path: fp32 reductions (it does form h - h' in chunks; the reference).
* Triton path: one program per block of tokens reduces both sums in fp32 and writes its
  partials; torch adds the partials in fp64 (deterministic, no atomics).
"""

from __future__ import annotations

import torch

from polyprune.kernels.dispatch import triton_available, use_triton
from polyprune.kernels.launch import check_shapes, ensure_contiguous, require_triton

__all__ = ["error_sums", "error_sums_torch", "error_sums_triton"]


def _check(h, h2):
    check_shapes(h.shape == h2.shape and h.dim() == 2, "h and h' of one shape (T, d)", h, h2)


def error_sums_torch(h: torch.Tensor, h2: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """(sum ||h||^2, sum ||h - h'||^2) over all tokens, in float64."""
    _check(h, h2)
    sig = err = 0.0
    for a, b in zip(h.split(chunk), h2.split(chunk), strict=True):
        a, b = a.float(), b.float()
        sig += a.pow(2).sum(dtype=torch.float64).item()
        err += (a - b).pow(2).sum(dtype=torch.float64).item()
    return sig, err


def error_sums(h: torch.Tensor, h2: torch.Tensor) -> tuple[float, float]:
    if use_triton(h):
        return error_sums_triton(h, h2)
    return error_sums_torch(h, h2)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _error_kernel(H, H2, OUT, T, D, stride_h, stride_h2,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        rt = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        mt = rt < T
        sig = tl.zeros((BLOCK_T,), dtype=tl.float32)
        err = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            m = mt[:, None] & (rd[None, :] < D)
            a = tl.load(H + rt[:, None] * stride_h + rd[None, :], mask=m, other=0.0).to(tl.float32)
            b = tl.load(H2 + rt[:, None] * stride_h2 + rd[None, :], mask=m, other=0.0)
            e = a - b.to(tl.float32)
            sig += tl.sum(a * a, axis=1)
            err += tl.sum(e * e, axis=1)
        tl.store(OUT + pid * 2, tl.sum(sig, axis=0))
        tl.store(OUT + pid * 2 + 1, tl.sum(err, axis=0))


def error_sums_triton(
    h: torch.Tensor, h2: torch.Tensor, block_t: int = 16, block_d: int = 256
) -> tuple[float, float]:
    _check(h, h2)
    require_triton()
    h, h2 = ensure_contiguous(h, h2)
    T, D = h.shape
    grid = triton.cdiv(T, block_t)
    out = torch.empty((grid, 2), dtype=torch.float32, device=h.device)
    _error_kernel[(grid,)](h, h2, out, T, D, h.stride(0), h2.stride(0),
                           BLOCK_T=block_t, BLOCK_D=block_d)  # fmt: skip
    sums = out.double().sum(0)
    return sums[0].item(), sums[1].item()
