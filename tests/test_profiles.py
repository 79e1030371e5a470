"""Layer-wise sparsity profiles (OWL) against a literal re-implementation of the reference code
(github.com/luuyin/OWL, lib/prune_all.py: ``check_outlier_mean`` and the adjustment in
``prune_wanda_outlier``), on small random inputs."""

import math

import numpy as np
import pytest
import torch

from polyprune.compress.profiles import (
    OwlParams,
    check_profile,
    exact_sparsities,
    outlier_ratio,
    owl_sparsities,
    pruned_count,
)
from polyprune.compress.solver import PruneConfig
from polyprune.compress.sparsegpt import sparsegpt_prune
from polyprune.compress.wanda import wanda_prune
from polyprune.errors import InputError

# Linears of one block (rows, cols): q, k, v, o, gate, up, down with awkward widths
SHAPES = [(24, 20), (12, 20), (12, 20), (20, 24), (36, 20), (36, 20), (20, 36)]


def reference_scaler_row(X):
    """WrappedGPT.add_batch of the Wanda/OWL repositories, one sample (1, T, cols) at a time:
    a running mean over samples of the per-sample sum of squares."""
    scaler_row = torch.zeros(X.shape[-1])
    for nsamples, x in enumerate(X):
        inp = x.reshape(-1, x.shape[-1]).t().float()
        scaler_row *= nsamples / (nsamples + 1)
        scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / (nsamples + 1)
    return scaler_row


def reference_check_outlier_mean(mask, threshold):
    return float((mask > torch.mean(mask) * threshold).sum().item()) / mask.numel() * 100


def reference_owl(blocks, Hyper_m, Lamda, sparsity_ratio):
    """The reference's outlier ratios and its layer_sparsity_ratio = 1 - all_layer_ratio[i]."""
    all_layer_ratio = []
    for Ws, Xs in blocks:
        layer_wmetric = [W.abs() * torch.sqrt(reference_scaler_row(X).reshape((1, -1)))
                         for W, X in zip(Ws, Xs, strict=True)]  # fmt: skip
        layer_wmetric = torch.cat([torch.flatten(x.cpu()) for x in layer_wmetric])
        all_layer_ratio.append(reference_check_outlier_mean(layer_wmetric, Hyper_m))
    ratios = list(all_layer_ratio)
    all_layer_ratio = np.array(all_layer_ratio)
    all_layer_ratio = (all_layer_ratio - all_layer_ratio.min()) * (
        1 / (all_layer_ratio.max() - all_layer_ratio.min()) * Lamda * 2
    )
    all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity_ratio)
    return ratios, [1 - r for r in all_layer_ratio]


def random_blocks(n_blocks=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for b in range(n_blocks):
        Ws = [torch.randn(r, c, generator=g) for r, c in SHAPES]
        # heavy-tailed inputs, a different tail per block, so the outlier ratios differ
        Xs = [torch.randn(5, 7, c, generator=g) * (1 + 3 * torch.rand(c, generator=g) ** (b + 2))
              for _, c in SHAPES]  # fmt: skip
        blocks.append((Ws, Xs))
    return blocks


def our_ratios(blocks, m):
    return [
        outlier_ratio(Ws, [(X.reshape(-1, X.shape[-1]) ** 2).mean(0) for X in Xs], m)
        for Ws, Xs in blocks
    ]


@pytest.mark.parametrize("m", [1.5, 3, 5])
def test_outlier_ratio_is_the_references_pooled_ratio(m):
    blocks = random_blocks()
    ref, _ = reference_owl(blocks, m, 0.08, 0.7)
    ours = our_ratios(blocks, m)
    assert len(set(ref)) > 1  # the blocks differ, or the test proves little
    total = sum(r * c for r, c in SHAPES)
    for r, o in zip(ref, ours, strict=True):  # a count: equal up to float rounding of the mean
        assert abs(r / 100 - o) * total < 1.5


@pytest.mark.parametrize(("target", "lmbda"), [(0.7, 0.08), (0.6, 0.1), (0.5, 0.02)])
def test_owl_sparsities_are_the_references(target, lmbda):
    blocks = random_blocks()
    ref_ratios, ref_sparsity = reference_owl(blocks, 5, lmbda, target)
    ours = owl_sparsities([r / 100 for r in ref_ratios], target, lmbda)
    np.testing.assert_allclose(ours, ref_sparsity, rtol=0, atol=1e-12)
    assert math.fsum(ours) / len(ours) == pytest.approx(target, abs=1e-12)


def test_more_outliers_less_sparsity_within_two_lambda():
    ratios = [0.01, 0.05, 0.02, 0.03]
    s = owl_sparsities(ratios, 0.7, 0.08)
    assert np.argsort(s).tolist() == np.argsort(ratios)[::-1].tolist()
    assert max(s) - min(s) == pytest.approx(0.16)
    assert all(0.7 - 0.16 <= x <= 0.7 + 0.16 for x in s)


def test_unequal_blocks_keep_the_parameter_weighted_global_sparsity():
    sizes = [100, 300, 50, 550]
    s = owl_sparsities([0.01, 0.05, 0.02, 0.03], 0.6, 0.1, sizes)
    assert math.fsum(x * n for x, n in zip(s, sizes, strict=True)) / sum(sizes) == pytest.approx(
        0.6, abs=1e-12
    )


def test_equal_ratios_give_the_uniform_profile():
    assert owl_sparsities([0.02] * 5, 0.7, 0.08) == [0.7] * 5


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.613])
def test_pruned_count_is_what_the_solvers_prune(sparsity):
    g = torch.Generator().manual_seed(1)
    for rows, cols in [(24, 20), (20, 36), (7, 300)]:
        W = torch.randn(rows, cols, generator=g)
        cfg = PruneConfig(sparsity, blocksize=16)
        wanda = wanda_prune(W, torch.rand(cols, generator=g) + 0.1, cfg)
        assert int(wanda.mask.sum()) == pruned_count(rows, cols, sparsity)
        X = torch.randn(64, cols, generator=g)
        sgpt = sparsegpt_prune(W, 2 * X.t() @ X / 64, cfg)
        assert int(sgpt.mask.sum()) == pruned_count(rows, cols, sparsity, blocksize=16)


@pytest.mark.parametrize("blocksize", [None, 16])
def test_exact_sparsities_hit_the_target_count(blocksize):
    nominal = owl_sparsities([0.011, 0.052, 0.02, 0.033, 0.04, 0.018], 0.7, 0.08)
    size = sum(r * c for r, c in SHAPES)

    def count(s):
        return sum(pruned_count(r, c, s, blocksize) for r, c in SHAPES)

    exact = exact_sparsities(nominal, [count] * 6, [size] * 6)
    # the largest jump of a block's count: every Linear's at once (rows each), or one weight
    # per column block for SparseGPT's count
    half_step = sum(r if blocksize is None else -(-c // blocksize) for r, c in SHAPES) / 2
    target = round(0.7 * size * 6)
    assert abs(sum(count(s) for s in exact) - target) <= half_step
    assert abs(sum(count(s) for s in nominal) - target) > half_step  # flooring alone misses
    done, wanted = 0, 0.0
    for s, e in zip(nominal, exact, strict=True):  # every running total stays on course
        done, wanted = done + count(e), wanted + s * size
        assert abs(done - wanted) <= half_step + 0.5


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(m=0), "--owl-m must be a finite number > 0, got 0"),
        (dict(m=float("nan")), "--owl-m must be a finite number > 0"),
        (dict(lmbda=-0.1), "--owl-lambda -0.1 is negative; allowed: >= 0"),
    ],
)
def test_bad_owl_hyperparameters_are_refused_in_one_line(kw, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")) as e:
        OwlParams(**kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("owl", "wanda", 0.7, False, OwlParams(5, 0.2)),
         "--owl-lambda 0.2 is too large for sparsity 0.7: .* below 0.15"),
        (("owl", "wanda", 0.1, False, OwlParams(5, 0.08)), "below 0.05"),
        (("owl", "magnitude", 0.7, False, OwlParams()),
         "--sparsity-profile owl works with wanda and sparsegpt, not magnitude"),
        (("owl", "wanda", 0.5, True, OwlParams()), "needs unstructured sparsity"),
        (("steep", "wanda", 0.5, False, OwlParams()),
         "unknown sparsity profile 'steep'; allowed: uniform, owl"),
    ],
)  # fmt: skip
def test_profiles_that_cannot_apply_are_refused_in_one_line(args, message):
    with pytest.raises(InputError, match=message) as e:
        check_profile(*args)
    assert "\n" not in str(e.value)


def test_uniform_applies_to_every_method_and_pattern():
    for method in ("magnitude", "wanda", "sparsegpt"):
        check_profile("uniform", method, 0.5, True, OwlParams())
