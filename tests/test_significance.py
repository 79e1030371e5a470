"""Statistical behaviour of polyprune.eval.significance on synthetic losses with known truth.

Each rate is measured over seeded repetitions and held to a band a few binomial standard
errors wide around the stated rate, so a wrong method (a too-narrow interval, an unpaired
test, a missing correction) fails.
"""

import math

import numpy as np
import pytest

from polyprune.eval.significance import (
    Sample,
    bootstrap_ci,
    compare_with_best,
    holm,
    mcnemar_exact,
    paired_bootstrap,
    paired_test,
    perplexity_from_windows,
)

MU = 2.5  # true mean token NLL: true perplexity exp(2.5)
REPS = 300
N_BOOT = 400


def windows(rng, n=40):
    """Predicted tokens per window and what every mix shares on it: the window's difficulty
    and its tokens' noise (a hard token is hard for every pruned model)."""
    tokens = rng.integers(30, 150, n).astype(float)
    difficulty = rng.normal(0.0, 0.4, n) * tokens  # documents differ much more than mixes do
    return tokens, difficulty + rng.normal(0.0, 1.0, n) * np.sqrt(tokens)


def losses(rng, tokens, shared, shift=0.0, seeds=1, seed_sd=0.0):
    """(seeds, windows) summed NLL: per-token mean MU + shift + a seed offset, the windows'
    shared part, and the mix's own token noise (sd 0.3 per token)."""
    offset = rng.normal(0.0, seed_sd, (seeds, 1))
    own = rng.normal(0.0, 0.3, (seeds, len(tokens))) * np.sqrt(tokens)
    return (MU + shift + offset) * tokens + shared + own


def rate(flags) -> float:
    return float(np.mean(flags))


def band(p: float, reps: int = REPS, k: float = 3.0) -> tuple[float, float]:
    se = math.sqrt(p * (1 - p) / reps)
    return p - k * se, p + k * se


def test_perplexity_from_windows_is_exp_of_token_weighted_mean_nll():
    assert perplexity_from_windows([10.0, 30.0], [10, 10]) == pytest.approx(math.exp(2.0))
    # token-weighted, not the mean of per-window perplexities
    assert perplexity_from_windows([1.0, 30.0], [1, 10]) == pytest.approx(math.exp(31 / 11))


def test_bootstrap_interval_covers_the_true_perplexity_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    covered = []
    for _ in range(REPS):
        tokens, shared = windows(rng, 60)
        lo, hi = bootstrap_ci(Sample(losses(rng, tokens, shared), tokens), rng, 0.95, N_BOOT)
        covered.append(lo <= math.exp(MU) <= hi)
    lo, hi = band(0.95)
    assert lo <= rate(covered) <= hi, rate(covered)


def test_bootstrap_interval_with_seeds_covers_the_true_perplexity_at_the_nominal_rate():
    # Eight seeds whose calibration offset varies more than the windows do: the interval must
    # include the seed-level spread, or it covers far too rarely.
    rng = np.random.default_rng(1)
    truth = float(np.mean(np.exp(MU + rng.normal(0, 0.25, 1_000_000))))  # E over seeds
    covered = []
    for _ in range(REPS):
        tokens, shared = windows(rng, 60)
        nll = losses(rng, tokens, shared, seeds=8, seed_sd=0.25)
        lo, hi = bootstrap_ci(Sample(nll, tokens), rng, 0.95, N_BOOT)
        covered.append(lo <= truth <= hi)
    # A mean of 8 values is t- rather than normally distributed: a little undercoverage is
    # expected from any bootstrap, so the lower bound is 0.03 below the band.
    lo, hi = band(0.95)
    assert lo - 0.03 <= rate(covered) <= hi, rate(covered)


def test_paired_test_keeps_its_false_positive_rate_when_no_difference_is_planted():
    rng = np.random.default_rng(2)
    hits = []
    for _ in range(REPS):
        tokens, shared = windows(rng)
        a = Sample(losses(rng, tokens, shared), tokens)
        b = Sample(losses(rng, tokens, shared), tokens)
        hits.append(paired_bootstrap(a, b, rng, N_BOOT).p_value <= 0.05)
    assert rate(hits) <= band(0.05)[1], rate(hits)


def test_paired_test_finds_a_planted_difference():
    # 0.03 nats per token (a 3% perplexity difference) against document-level noise that an
    # unpaired comparison could not see through.
    rng = np.random.default_rng(3)
    hits = []
    for _ in range(REPS):
        tokens, shared = windows(rng)
        a = Sample(losses(rng, tokens, shared), tokens)
        b = Sample(losses(rng, tokens, shared, shift=0.03), tokens)
        test = paired_bootstrap(a, b, rng, N_BOOT)
        hits.append(test.p_value <= 0.05 and test.diff < 0)
    assert rate(hits) >= 0.9, rate(hits)


def test_paired_test_with_seeds_keeps_its_false_positive_rate():
    # Seed offsets (sd 0.01 nats) as large as the paired window noise: a test that ignored the
    # seeds would reject about 38% of the time.
    rng = np.random.default_rng(4)
    hits = []
    for _ in range(REPS):
        tokens, shared = windows(rng)
        a = Sample(losses(rng, tokens, shared, seeds=3, seed_sd=0.01), tokens)
        b = Sample(losses(rng, tokens, shared, seeds=3, seed_sd=0.01), tokens)
        hits.append(paired_bootstrap(a, b, rng, N_BOOT).p_value <= 0.05)
    assert rate(hits) <= band(0.05)[1], rate(hits)


def test_paired_test_rejects_samples_on_different_windows():
    a = Sample([[1.0, 2.0]], [1, 1])
    with pytest.raises(ValueError, match="same units"):
        paired_bootstrap(a, Sample([[1.0, 2.0]], [1, 2]), np.random.default_rng(0))


def test_mcnemar_exact_matches_the_binomial_tail():
    a = np.array([1] * 10 + [0] * 2 + [1] * 50, dtype=bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 50, dtype=bool)
    # 12 discordant pairs, 2 against: p = 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * 79 / 4096
    assert mcnemar_exact(a, b) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(a, a) == 1.0


def test_mcnemar_keeps_its_false_positive_rate_and_finds_a_planted_difference():
    rng = np.random.default_rng(5)
    null, planted = [], []
    for _ in range(REPS):
        easy = rng.random(400)  # per-example shared, shared by both mixes
        a = easy < 0.6
        b0 = np.where(rng.random(400) < 0.9, a, rng.random(400) < 0.6)
        b1 = np.where(rng.random(400) < 0.9, a, rng.random(400) < 0.6) & (rng.random(400) > 0.1)
        null.append(paired_test(Sample([a], np.ones(400)), Sample([b0], np.ones(400)), rng))
        planted.append(paired_test(Sample([a], np.ones(400)), Sample([b1], np.ones(400)), rng))
    assert {t.method for t in null} == {"McNemar exact"}
    assert rate([t.p_value <= 0.05 for t in null]) <= band(0.05)[1]
    assert rate([t.p_value <= 0.05 and t.diff > 0 for t in planted]) >= 0.9


def test_holm_adjusts_step_down_and_keeps_the_order():
    got = holm([0.01, 0.04, 0.03, 0.5])
    assert got.tolist() == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([]).tolist() == []


def test_compare_with_best_ties_the_noise_and_separates_the_planted_difference():
    rng = np.random.default_rng(6)
    tokens, shared = windows(rng, 60)
    samples = {
        "de": Sample(losses(rng, tokens, shared), tokens),
        "en": Sample(losses(rng, tokens, shared), tokens),
        "sw": Sample(losses(rng, tokens, shared, shift=0.3), tokens),
    }
    got = compare_with_best(samples, higher_is_better=False, rng=rng, n_boot=N_BOOT)
    assert got.best in {"de", "en"}
    assert got.tied == {"de", "en"}
    assert got.p_adjusted["sw"] <= 0.05


def test_ties_with_the_best_hold_the_family_wise_rate_when_no_mix_differs():
    # Eight equal mixes: the best is picked from the data, so testing only the comparisons with
    # it (even Holm-corrected) finds a "significantly worse" mix about 10% of the time.
    rng = np.random.default_rng(7)
    any_rejected = []
    for _ in range(400):
        tokens, shared = windows(rng, 30)
        samples = {m: Sample(losses(rng, tokens, shared), tokens) for m in "abcdefgh"}
        got = compare_with_best(samples, False, rng, n_boot=300)
        any_rejected.append(len(got.tied) < 8)
    assert rate(any_rejected) <= band(0.05, 400)[1], rate(any_rejected)


def test_interval_of_a_perplexity_from_few_documents_stays_positive():
    # Three documents of very different difficulty: the small-sample expansion is wide (2.7x),
    # and is applied to the mean NLL, so the perplexity interval cannot go below zero.
    s = Sample([[1.0, 50.0, 80.0]], [10, 10, 10])
    lo, hi = bootstrap_ci(s, np.random.default_rng(0), 0.95, N_BOOT)
    assert 0 < lo < s.estimate() < hi
