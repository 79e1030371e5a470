"""Kernels against their torch references. The Triton kernels run under TRITON_INTERPRET=1
on CPU (as `make test` sets it), or on CUDA when a GPU is present; skipped otherwise."""

import os

import pytest
import torch

from polyprune.kernels.colnorm import colsq_update_torch, colsq_update_triton
from polyprune.kernels.dispatch import triton_available, use_triton
from polyprune.kernels.hessian import (
    hessian_update_reference,
    hessian_update_triton,
    hessian_update_upper,
    symmetrize,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not triton_available() or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1",
)
# Awkward shapes: not multiples of the blocks, a single token, d = 1.
SHAPES = [(1, 1), (7, 1), (1, 33), (130, 67), (65, 129)]
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-3, 1e-3), (torch.bfloat16, 1e-3, 1e-3)]


@pytest.mark.parametrize("d", [1, 7, 255, 256, 257, 600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_upper_triangle_hessian_equals_the_full_update(d, dtype):
    torch.manual_seed(0)
    H, H_ref = torch.zeros(d, d), torch.zeros(d, d)
    n = 0
    for b in (5, 64, 1):  # uneven batches, running mean
        X = torch.randn(b, d).to(dtype)
        hessian_update_upper(H, n, X)
        hessian_update_reference(H_ref, n, X)
        n += b
    torch.testing.assert_close(symmetrize(H), H_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(symmetrize(H), symmetrize(H).t())


def test_hessian_update_checks_shapes_and_dtypes():
    with pytest.raises(ValueError, match="expected X"):
        hessian_update_upper(torch.zeros(4, 4), 0, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="H must be float32"):
        hessian_update_upper(torch.zeros(4, 4, dtype=torch.float64), 0, torch.zeros(3, 4))


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_triton_hessian_equals_torch(shape, dtype, atol, rtol):
    torch.manual_seed(1)
    T, d = shape
    H = torch.randn(d, d, device=DEVICE)
    H = (H @ H.t() + (H @ H.t()).t()) / 2  # an exactly symmetric running state
    H_ref = H.clone()
    X = torch.randn(T, d, device=DEVICE).to(dtype)
    hessian_update_triton(H, 9, X, block_d=16, block_t=16)
    hessian_update_reference(H_ref, 9, X)
    torch.testing.assert_close(H, H_ref, atol=atol * max(1.0, H_ref.abs().max().item()), rtol=rtol)
    # Lower tiles are the mirrors of upper ones; inside diagonal tiles symmetry is up to
    # rounding, and readers take the upper triangle (symmetrize) anyway.
    torch.testing.assert_close(H, H.t(), rtol=0, atol=1e-5 * max(1.0, H.abs().max().item()))
    torch.testing.assert_close(
        symmetrize(H), H_ref, atol=atol * H_ref.abs().max().item(), rtol=rtol
    )


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_triton_colsq_equals_torch(shape, dtype, atol, rtol):
    torch.manual_seed(2)
    T, d = shape
    s = torch.rand(d, device=DEVICE)
    s_ref = s.clone()
    X = torch.randn(T, d, device=DEVICE).to(dtype)
    colsq_update_triton(s, 3, X, block_d=16, block_t=8)
    colsq_update_torch(s_ref, 3, X)
    torch.testing.assert_close(s, s_ref, atol=atol, rtol=rtol)


def test_dispatch_follows_device_and_override(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("POLYPRUNE_KERNELS", "torch")
    assert not use_triton(x)
    monkeypatch.setenv("POLYPRUNE_KERNELS", "auto")
    assert use_triton(x) == (x.is_cuda and triton_available())
    monkeypatch.setenv("POLYPRUNE_KERNELS", "fast")
    with pytest.raises(ValueError, match="allowed: torch, triton"):
        use_triton(x)


@needs_triton
def test_statistics_are_the_same_through_either_path(monkeypatch):
    from polyprune.compress.stats import InputStats

    X = torch.randn(50, 40, device=DEVICE)
    out = {}
    for path in ("torch", "triton"):
        monkeypatch.setenv("POLYPRUNE_KERNELS", path)
        st_h, st_c = InputStats("hessian", 40, DEVICE), InputStats("colsq", 40, DEVICE)
        for chunk in X.split(17):
            st_h.update(chunk)
            st_c.update(chunk)
        out[path] = (st_h.H, st_c.colsq)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=1e-5, atol=1e-6)
