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


from polyprune.kernels.errors import error_sums_torch, error_sums_triton  # noqa: E402
from polyprune.kernels.lape_count import lape_count_torch, lape_count_triton  # noqa: E402
from polyprune.kernels.wanda_mask import wanda_mask_torch, wanda_mask_triton  # noqa: E402

MASK_SHAPES = [(1, 1, 1), (1, 33, 16), (3, 7, 3), (5, 130, 64), (17, 300, 150)]


@needs_triton
@pytest.mark.parametrize("rows,cols,k", MASK_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_wanda_mask_is_identical_to_the_sort_reference(rows, cols, k, dtype):
    torch.manual_seed(rows * cols)
    W = torch.randn(rows, cols, device=DEVICE).to(dtype)
    colsq = torch.rand(cols, device=DEVICE)
    got = wanda_mask_triton(W, colsq, k=k, block=32)  # several chunks per row
    score = W.float().abs() * torch.sqrt(colsq).reshape(1, -1)
    idx = torch.sort(score, dim=1, stable=True)[1][:, :k]
    expected = torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(got, expected)
    assert torch.equal(got, wanda_mask_torch(W, colsq, k=k))


@needs_triton
def test_triton_wanda_mask_breaks_ties_like_a_stable_sort():
    W = torch.randint(-2, 3, (6, 70), device=DEVICE).float()  # mostly ties, across chunks
    colsq = torch.ones(70, device=DEVICE)
    assert torch.equal(
        wanda_mask_triton(W, colsq, k=31, block=16), wanda_mask_torch(W, colsq, k=31)
    )


@needs_triton
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
@pytest.mark.parametrize("ties", [False, True])
def test_triton_nm_mask_is_identical(n, m, ties):
    torch.manual_seed(n * m)
    W = torch.randint(-1, 2, (5, 72), device=DEVICE).float() if ties else torch.randn(5, 72)
    colsq = torch.rand(72, device=DEVICE) if not ties else torch.ones(72, device=DEVICE)
    W = W.to(DEVICE)
    got = wanda_mask_triton(W, colsq, n=n, m=m)
    assert torch.equal(got, wanda_mask_torch(W, colsq, n=n, m=m))
    assert (got.reshape(5, -1, m).sum(-1) == n).all()


@needs_triton
@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (37, 1), (70, 129)])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_triton_lape_count_equals_torch(shape, dtype, atol, rtol):
    torch.manual_seed(3)
    T, N = shape
    A = torch.randn(T, N, device=DEVICE).to(dtype)
    A[0, 0] = 0  # exactly zero is not active
    c1, c2 = torch.zeros(3, N, dtype=torch.int64), torch.zeros(3, N, dtype=torch.int64)
    s1, s2 = torch.zeros(3, N), torch.zeros(3, N)
    c1, c2, s1, s2 = (t.to(DEVICE) for t in (c1, c2, s1, s2))
    for _ in range(2):  # accumulates
        lape_count_triton(A, c1, s1, 1, block_n=32, block_t=16)
        lape_count_torch(A, c2, s2, 1)
    assert torch.equal(c1, c2)
    assert c1[0].sum() == 0 and c1[2].sum() == 0  # other languages untouched
    torch.testing.assert_close(s1, s2, atol=atol * T, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("shape", [(1, 1), (1, 513), (33, 1), (100, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_error_sums_equal_torch(shape, dtype):
    torch.manual_seed(4)
    h = torch.randn(shape, device=DEVICE).to(dtype)
    h2 = (h.float() + 0.1 * torch.randn(shape, device=DEVICE)).to(dtype)
    sig, err = error_sums_triton(h, h2, block_t=8, block_d=64)
    sig_ref, err_ref = error_sums_torch(h, h2)
    assert sig == pytest.approx(sig_ref, rel=1e-5) and err == pytest.approx(err_ref, rel=1e-4)


@needs_triton
def test_wanda_solver_gives_the_same_mask_through_either_path(monkeypatch):
    from polyprune.compress.solver import PruneConfig
    from polyprune.compress.wanda import wanda_prune

    W, colsq = torch.randn(9, 40, device=DEVICE), torch.rand(40, device=DEVICE)
    for cfg in (PruneConfig(0.3), PruneConfig(0.0, "2:4")):
        monkeypatch.setenv("POLYPRUNE_KERNELS", "torch")
        a = wanda_prune(W, colsq, cfg)
        monkeypatch.setenv("POLYPRUNE_KERNELS", "triton")
        b = wanda_prune(W, colsq, cfg)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
