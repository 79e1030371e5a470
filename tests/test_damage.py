"""Predicted per-language damage (compress/damage.py) against the definition computed naively."""

from __future__ import annotations

import math

import pytest
import torch

from polyprune.compress.damage import (
    DamageTerm,
    combine,
    damage_terms,
    relative_damage,
    statistic_matrix,
)
from polyprune.compress.stats import InputStats

OUT, IN, TOKENS = 37, 53, 400


def correlated_inputs(seed: int = 0) -> torch.Tensor:
    """(TOKENS, IN) activations with correlated features and uneven scales, as real ones."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(IN, IN, generator=g) / math.sqrt(IN) + torch.eye(IN)
    scales = torch.logspace(-1, 1, IN)
    return (torch.randn(TOKENS, IN, generator=g) @ mixing) * scales


def weight(seed: int = 1) -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed))


def magnitude_pruned(W: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The k smallest |W| of each row set to zero."""
    k = int(W.shape[1] * sparsity)
    idx = W.abs().argsort(dim=1)[:, :k]
    return W.scatter(1, idx, 0.0)


def stats_of(X: torch.Tensor, kind: str) -> InputStats:
    st = InputStats(kind, IN)
    for a in range(0, X.shape[0], 64):
        st.update(X[a : a + 64])
    return st


def naive_damage(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """The definition: ||(W - W') X^T||_F^2 / ||W X^T||_F^2 over the tokens, in fp64."""
    W, W_hat, X = W.double(), W_hat.double(), X.double()
    return float(((W - W_hat) @ X.T).square().sum() / (W @ X.T).square().sum())


@pytest.mark.parametrize("kind", ["hessian", "colsq"])
def test_uncompressed_weight_has_zero_damage(kind):
    W = weight()
    assert relative_damage(W, W.clone(), statistic_matrix(stats_of(correlated_inputs(), kind))) == 0


@pytest.mark.parametrize("kind", ["hessian", "colsq"])
def test_damage_grows_with_sparsity(kind):
    W, H = weight(), statistic_matrix(stats_of(correlated_inputs(), kind))
    damage = [relative_damage(W, magnitude_pruned(W, s), H) for s in (0.2, 0.5, 0.8)]
    assert 0 < damage[0] < damage[1] < damage[2] < 1


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.8])
def test_damage_from_the_hessian_equals_the_output_error_on_the_tokens(sparsity):
    X, W = correlated_inputs(), weight()
    W_hat = magnitude_pruned(W, sparsity)
    got = relative_damage(W, W_hat, statistic_matrix(stats_of(X, "hessian")))
    assert got == pytest.approx(naive_damage(W, W_hat, X), rel=1e-5)


def test_column_norm_damage_is_the_diagonal_approximation():
    X, W = correlated_inputs(), weight()
    W_hat = magnitude_pruned(W, 0.5)
    H = (2 / TOKENS) * X.double().T @ X.double()
    D = (W - W_hat).double()
    naive = float(torch.trace(D @ torch.diag(torch.diag(H)) @ D.T))
    naive /= float(torch.trace(W.double() @ torch.diag(torch.diag(H)) @ W.double().T))
    got = relative_damage(W, W_hat, statistic_matrix(stats_of(X, "colsq")))
    assert got == pytest.approx(naive, rel=1e-5)
    # the inputs are correlated, so the cross terms it drops are not nothing
    assert got != pytest.approx(naive_damage(W, W_hat, X), rel=1e-2)


def test_diagonal_approximation_is_exact_for_uncorrelated_features():
    W = weight()
    W_hat = magnitude_pruned(W, 0.5)
    h = torch.logspace(-1, 1, IN)
    assert relative_damage(W, W_hat, h) == pytest.approx(
        relative_damage(W, W_hat, torch.diag(h)), rel=1e-6
    )


def test_damage_does_not_depend_on_the_scale_of_h():
    W, H = weight(), statistic_matrix(stats_of(correlated_inputs(), "hessian"))
    W_hat = magnitude_pruned(W, 0.5)
    assert relative_damage(W, W_hat, 1000 * H) == pytest.approx(relative_damage(W, W_hat, H))


def test_terms_per_language_use_each_language_s_statistic():
    W = weight()
    W_hat = magnitude_pruned(W, 0.5)
    Xs = {"de": correlated_inputs(2), "sw": correlated_inputs(3) * 5}
    H = {lang: statistic_matrix(stats_of(X, "hessian")) for lang, X in Xs.items()}
    terms = damage_terms(4, "mlp.down_proj", W, W_hat, H)
    assert [(t.block, t.linear, t.lang) for t in terms] == [
        (4, "mlp.down_proj", "de"),
        (4, "mlp.down_proj", "sw"),
    ]
    for t in terms:
        assert t.ratio == pytest.approx(naive_damage(W, W_hat, Xs[t.lang]), rel=1e-5)
    energies = {t.lang: t.energy for t in terms}
    assert damage_terms(4, "x", W, W_hat, H, energy=energies) == [
        DamageTerm(4, "x", t.lang, t.error, t.energy) for t in terms
    ]


def test_block_combination_is_the_mean_over_blocks_of_energy_weighted_errors():
    terms = [
        DamageTerm(0, "q", "de", error=1.0, energy=10.0),
        DamageTerm(0, "down", "de", error=3.0, energy=90.0),  # block 0: 4 / 100
        DamageTerm(1, "q", "de", error=2.0, energy=4.0),  # block 1: 2 / 4
        DamageTerm(0, "q", "sw", error=0.0, energy=0.0),  # nothing to lose: 0
    ]
    assert combine(terms) == {"de": pytest.approx((0.04 + 0.5) / 2), "sw": 0.0}
    assert combine(terms, "linear") == {"de": pytest.approx((0.1 + 3 / 90 + 0.5) / 3), "sw": 0.0}
    with pytest.raises(ValueError, match="unknown combination"):
        combine(terms, "model")
