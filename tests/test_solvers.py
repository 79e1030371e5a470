"""Solvers against independent references written here, on small inputs."""

import logging
import math

import pytest
import torch

from polyprune.compress.magnitude import magnitude_prune
from polyprune.compress.solver import PruneConfig
from polyprune.compress.sparsegpt import inverse_hessian_cholesky, sparsegpt_prune
from polyprune.compress.stats import InputStats
from polyprune.compress.wanda import wanda_prune
from polyprune.errors import InputError


def correlated_inputs(tokens=4096, d=64, seed=0):
    """Inputs with correlated features and a few large 'outlier' columns, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, d, generator=g)
    A = torch.randn(d, d, generator=g) / math.sqrt(d) + torch.eye(d)
    X = Z @ A
    scale = torch.ones(d)
    scale[torch.randperm(d, generator=g)[: d // 8]] = 8.0
    return X * scale


def hessian(X):
    return 2.0 / X.shape[0] * X.T @ X


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 64), (13, 129)])
@pytest.mark.parametrize("sparsity", [0.0, 0.29, 0.5, 0.9])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_every_row_has_exactly_floor_cols_times_s_zeros(shape, sparsity, method):
    W = torch.randn(shape)
    cfg = PruneConfig(sparsity)
    if method == "magnitude":
        res = magnitude_prune(W, cfg)
    else:
        res = wanda_prune(W, torch.rand(shape[1]) + 0.1, cfg)
    expected = math.floor(round(shape[1] * sparsity, 9))
    assert ((res.weight == 0).sum(1) == expected).all()
    assert torch.equal(res.mask, res.weight == 0)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_gives_exactly_n_zeros_in_every_group_of_m(n, m, method):
    rows, cols = 12, 64
    W = torch.randn(rows, cols)
    cfg = PruneConfig(0.0, f"{n}:{m}", blocksize=32)
    X = correlated_inputs(512, cols)
    if method == "magnitude":
        res = magnitude_prune(W, cfg)
    elif method == "wanda":
        res = wanda_prune(W, (X**2).mean(0), cfg)
    else:
        res = sparsegpt_prune(W, hessian(X), cfg)
    zeros = (res.weight == 0).reshape(rows, cols // m, m).sum(-1)
    assert (zeros == n).all()


def reference_wanda_mask(W, X, sparsity):
    """Per row: score |W_ij| * ||X_j||_2, prune the k lowest (ties: lower column first)."""
    norms = X.norm(dim=0)
    k = math.floor(round(W.shape[1] * sparsity, 9))
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i in range(W.shape[0]):
        scores = [(abs(W[i, j].item()) * norms[j].item(), j) for j in range(W.shape[1])]
        for _, j in sorted(scores)[:k]:
            mask[i, j] = True
    return mask


def test_wanda_mask_equals_independent_per_row_computation():
    W = torch.randn(24, 40)
    X = correlated_inputs(300, 40)
    stats = InputStats("colsq", 40)
    for chunk in X.split(77):  # running mean over uneven batches
        stats.update(chunk)
    res = wanda_prune(W, stats.column_sq_norms(), PruneConfig(0.5))
    assert torch.equal(res.mask, reference_wanda_mask(W, X, 0.5))


def reference_sparsegpt(W, H, sparsity, blocksize, percdamp=0.01, n=0, m=0):
    """SparseGPT without lazy batching: every column's error is applied to all later columns
    at once; H^-1 via an explicit inverse; mask chosen at each block start as in the paper."""
    W = W.clone().double()
    H = H.clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H)).T  # upper: U^T U = H^-1
    rows, cols = W.shape
    mask = torch.zeros_like(W, dtype=torch.bool)
    for b in range(0, cols, blocksize):
        e = min(b + blocksize, cols)
        if m == 0:
            score = W[:, b:e] ** 2 / torch.diag(U)[b:e] ** 2
            k = math.floor(round(score.numel() * sparsity, 9))
            order = torch.sort(score.flatten(), stable=True)[1][:k]
            block_mask = torch.zeros(score.numel(), dtype=torch.bool)
            block_mask[order] = True
            mask[:, b:e] = block_mask.reshape(rows, e - b)
        for j in range(b, e):
            if m and (j - b) % m == 0:
                score = W[:, j : j + m] ** 2 / torch.diag(U)[j : j + m] ** 2
                idx = torch.sort(score, dim=1, stable=True)[1][:, :n]
                mask[:, j : j + m].scatter_(1, idx, True)
            q = W[:, j].clone()
            q[mask[:, j]] = 0
            err = (W[:, j] - q) / U[j, j]
            W[:, j:] -= err.unsqueeze(1) * U[j, j:].unsqueeze(0)
            W[:, j] = q
    return W.float(), mask


@pytest.mark.parametrize(
    "pattern,sparsity,blocksize",
    [
        ("unstructured", 0.5, 16),
        ("unstructured", 0.7, 128),
        ("2:4", 0.0, 16),
        ("unstructured", 0.5, 5),
    ],
)
def test_sparsegpt_equals_straightforward_reference(pattern, sparsity, blocksize):
    torch.manual_seed(0)
    W = torch.randn(20, 48)
    H = hessian(correlated_inputs(1024, 48))
    n, m = (2, 4) if pattern == "2:4" else (0, 0)
    res = sparsegpt_prune(W, H, PruneConfig(sparsity, pattern, blocksize=blocksize))
    W_ref, mask_ref = reference_sparsegpt(W, H, sparsity or 0.5, blocksize, n=n, m=m)
    assert torch.equal(res.mask, mask_ref)
    rel = (res.weight - W_ref).norm() / W_ref.norm()
    assert rel < 1e-5


def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude():
    torch.manual_seed(1)
    X = correlated_inputs(4096, 128)
    W = torch.randn(64, 128)
    cfg = PruneConfig(0.5)
    stats = InputStats("hessian", 128)
    stats.update(X)

    def err(Wp):
        return ((X @ W.T - X @ Wp.T) ** 2).sum().item()

    e_sgpt = err(sparsegpt_prune(W, stats.H, cfg).weight)
    e_wanda = err(wanda_prune(W, stats.column_sq_norms(), cfg).weight)
    e_mag = err(magnitude_prune(W, cfg).weight)
    assert e_sgpt < e_wanda < e_mag


def test_running_hessian_equals_batch_hessian():
    X = torch.randn(1000, 16)
    stats = InputStats("hessian", 16)
    for chunk in X.split(333):
        stats.update(chunk)
    torch.testing.assert_close(stats.H, hessian(X), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.column_sq_norms(), (X**2).mean(0), rtol=1e-5, atol=1e-6)


def test_dead_input_columns_are_zeroed():
    X = correlated_inputs(512, 32)
    X[:, 5] = 0
    W = torch.randn(8, 32)
    res = sparsegpt_prune(W, hessian(X), PruneConfig(0.25))
    assert (res.weight[:, 5] == 0).all()


@pytest.mark.parametrize("inplace", [False, True])
def test_failed_cholesky_retries_with_more_damping(caplog, inplace):
    X = correlated_inputs(512, 16)
    H = hessian(X)
    # Shift H so its lowest eigenvalue is -0.05 x its own mean diagonal: damping of 0.01 x mean
    # cannot make it positive definite, 0.1 x mean can.
    shift = (torch.linalg.eigvalsh(H).min() + 0.05 * torch.diag(H).mean()) / 1.05
    H_bad = H - shift * torch.eye(16)
    mean = torch.diag(H_bad).mean()
    given = H_bad.clone()
    with caplog.at_level(logging.WARNING):
        U, damp = inverse_hessian_cholesky(given, 0.01, "layer.x", inplace=inplace)
    assert "layer.x" in caplog.text and "retrying" in caplog.text
    assert damp == pytest.approx(0.1 * mean.item(), rel=1e-5)
    # The damping of the failed try is not left behind: exactly H + damp I was factorised.
    torch.testing.assert_close(
        U.T @ U, torch.linalg.inv(H_bad + damp * torch.eye(16)), rtol=1e-3, atol=1e-4
    )
    # The caller's H is untouched unless it handed it over (then it holds H + damp I).
    expected = H_bad + damp * torch.eye(16) if inplace else H_bad
    torch.testing.assert_close(given, expected)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"sparsity": 1.0}, "outside"), ({"sparsity": -0.1}, "outside"),
     ({"sparsity": 0.3, "pattern": "2:4"}, "contradicts"), ({"percdamp": 0}, "percdamp")],
)  # fmt: skip
def test_bad_prune_config_is_input_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        PruneConfig(**kwargs)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", 0.0)])
def test_sparsegpt_on_stacked_linears_equals_separate_calls(pattern, sparsity):
    torch.manual_seed(3)
    H = hessian(correlated_inputs(1024, 64))
    Ws = [torch.randn(r, 64) for r in (16, 8, 8)]  # q, k, v of a GQA attention
    cfg = PruneConfig(sparsity, pattern, blocksize=32)
    stacked = sparsegpt_prune(torch.cat(Ws), H, cfg, segments=[16, 8, 8])
    separate = [sparsegpt_prune(W, H, cfg) for W in Ws]
    assert torch.equal(stacked.mask, torch.cat([r.mask for r in separate]))
    torch.testing.assert_close(stacked.weight, torch.cat([r.weight for r in separate]))
    assert stacked.loss == pytest.approx(sum(r.loss for r in separate), rel=1e-5)
