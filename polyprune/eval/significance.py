"""Confidence intervals and paired tests for matrix tables: is a mix really better?

A held-out language gives a few thousand tokens, so two calibration mixes a few percent apart
in perplexity may differ by chance. Everything here works on *units*: the pieces of the
evaluation a model is scored on one by one (for perplexity: a held-out document's summed NLL
and its predicted tokens; for an lm-eval task: one example's 0/1 correctness, weight 1). A
mix's measurement is a ``Sample``: ``values`` of shape (seeds, units) and ``weights`` (units,)
shared by every seed, because every seed (and every mix) is scored on the same units.

The statistic is what the tables show: the mean over seeds of a per-seed value
``transform(sum(values) / sum(weights))``; ``exp`` of the token-weighted mean NLL is the
perplexity, the identity of the mean correctness is the accuracy.

Methods (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13 and 16):

* **Confidence interval**: expanded percentile bootstrap (Hesterberg, "What teachers should
  know about the bootstrap", 2015). Each replicate draws the units with replacement (the same
  draw for every seed) and, when there are several seeds, the seeds with replacement; each
  seed's replicated mean NLL (or accuracy) is moved away from its observed one by the factor
  sqrt(n / (n - 1)) t(0.975, n - 1) / z(0.975) for n units, which undoes the plain
  bootstrap's too narrow spread with few units (25 documents: 1.06); the interval is the
  (2.5%, 97.5%) quantiles of the replicated statistic. The same expanded replicates serve
  the tests.
* **Seeds as a second level**: with S seeds a plain resample of seeds has a variance
  (S - 1) / S times too small; the resampled seed mean is therefore pushed away from the
  replicate's all-seed mean by sqrt(S / (S - 1)), which makes the seed level's variance
  unbiased (the usual small-sample fix for bootstrapping means). Two or three seeds still
  carry little information about calibration variance: where the seeds vary more than the
  units do, a test between two mixes of 3 seeds each rejects about 10% of the time at a
  nominal 5% (measured on synthetic losses); where the units dominate, it holds 5%.
* **Paired test** between two mixes scored on the same units: the same unit resample is used
  for both (that is the pairing: a hard document is hard for both mixes), seeds are resampled
  independently per mix. The two-sided p-value is that of the shifted bootstrap distribution,
  ``(1 + #{|d* - d| >= |d|}) / (B + 1)``, where d is the observed difference.
* **McNemar's exact test** for paired 0/1 correctness of one seed each: the discordant pairs
  are Binomial(b + c, 1/2) under no difference.
* **Multiple comparisons**: the mixes not significantly worse than the best of a language
  come from the single-step max-T paired bootstrap over *all* pairs of mixes (see
  :func:`compare_with_best`: the best is chosen from the data, so a correction over the
  comparisons with it alone would not hold its level). Fixed families (every mix against the
  dense model in one table) use Holm's step-down correction (Holm, 1979). Both hold the
  family-wise error rate at alpha.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import binom, norm
from scipy.stats import t as student_t

__all__ = [
    "ALPHA",
    "MAX_T",
    "N_BOOT",
    "BestSet",
    "PairedTest",
    "Sample",
    "bootstrap_ci",
    "compare_with_best",
    "holm",
    "mcnemar_exact",
    "paired_bootstrap",
    "paired_test",
    "perplexity_from_windows",
]

ALPHA = 0.05  # family-wise error rate of the marks in the tables
MAX_T = "max-T paired bootstrap"
N_BOOT = 2000  # bootstrap replicates: the p-value's Monte Carlo error is below 0.005 at 0.05
_CHUNK = 256  # replicates per matrix product, to bound memory for many units
_Z975 = float(norm.ppf(0.975))
TRANSFORMS = {"exp": np.exp, "identity": lambda x: x}


@dataclass(frozen=True)
class Sample:
    """One mix's scores on shared units: ``values`` (seeds, units), ``weights`` (units,).

    Perplexity: values = summed NLL per unit, weights = predicted tokens, transform "exp".
    Accuracy: values = 0/1 correctness per example, weights = 1, transform "identity".
    """

    values: np.ndarray
    weights: np.ndarray
    transform: str = "exp"

    def __post_init__(self):
        v = np.atleast_2d(np.asarray(self.values, dtype=np.float64))
        w = np.asarray(self.weights, dtype=np.float64)
        if w.ndim != 1 or v.shape[1] != w.shape[0] or v.shape[0] < 1 or w.shape[0] < 1:
            raise ValueError(f"values {v.shape} and weights {w.shape} do not match")
        if (w <= 0).any():
            raise ValueError("unit weights must be positive")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}")
        object.__setattr__(self, "values", v)
        object.__setattr__(self, "weights", w)

    @property
    def seeds(self) -> int:
        return self.values.shape[0]

    @property
    def units(self) -> int:
        return self.values.shape[1]

    def per_seed(self) -> np.ndarray:
        """The statistic of each seed, e.g. its perplexity."""
        return TRANSFORMS[self.transform](self.values.sum(1) / self.weights.sum())

    def estimate(self) -> float:
        """Mean over seeds of the per-seed statistic: the number a table shows."""
        return float(self.per_seed().mean())

    def is_binary(self) -> bool:
        return bool(np.all((self.values == 0) | (self.values == 1)) and np.all(self.weights == 1))


def perplexity_from_windows(nll, tokens) -> float:
    """exp(sum of window NLL sums / sum of predicted tokens): the perplexity of the stream."""
    return Sample(nll, tokens, "exp").estimate()


def _unit_counts(rng: np.random.Generator, n_units: int, n: int) -> np.ndarray:
    """(n, n_units) resample counts: each row draws n_units units with replacement."""
    # integer draws and one bincount: numpy's multinomial is ~40x slower for 1000 units
    draws = rng.integers(0, n_units, (n, n_units)) + (np.arange(n) * n_units)[:, None]
    return np.bincount(draws.ravel(), minlength=n * n_units).reshape(n, n_units).astype(float)


def expansion(n_units: int) -> float:
    """Hesterberg's small-sample expansion of bootstrap deviations: sqrt(n / (n - 1)) for the
    plug-in variance, times t(0.975, n - 1) / z(0.975) for Student's tails."""
    if n_units < 2:
        return 1.0
    return math.sqrt(n_units / (n_units - 1)) * student_t.ppf(0.975, n_units - 1) / _Z975


def _replicates(s: Sample, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The statistic of ``s`` under each row of unit ``counts``, seeds resampled too."""
    ratio = (s.values @ counts.T) / (counts @ s.weights)  # (seeds, n)
    # expanded on the scale of the mean NLL, so that a perplexity stays positive
    observed = (s.values.sum(1) / s.weights.sum())[:, None]
    per_seed = TRANSFORMS[s.transform](observed + expansion(s.units) * (ratio - observed))
    mean = per_seed.mean(0)
    if s.seeds == 1:
        return mean
    pick = _unit_counts(rng, s.seeds, counts.shape[0])  # seeds drawn with replacement
    resampled = (pick * per_seed.T).sum(1) / s.seeds
    return mean + math.sqrt(s.seeds / (s.seeds - 1)) * (resampled - mean)


def bootstrap_ci(
    s: Sample, rng: np.random.Generator, level: float = 0.95, n_boot: int = N_BOOT
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``s.estimate()`` over units (and seeds)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    reps = []
    for start in range(0, n_boot, _CHUNK):
        counts = _unit_counts(rng, s.units, min(_CHUNK, n_boot - start))
        reps.append(_replicates(s, counts, rng))
    lo, hi = np.quantile(np.concatenate(reps), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class PairedTest:
    """``diff`` = estimate(a) - estimate(b); ``p_value`` two-sided; ``method`` used."""

    diff: float
    p_value: float
    method: str


def _check_paired(a: Sample, b: Sample) -> None:
    if a.units != b.units or not np.array_equal(a.weights, b.weights):
        raise ValueError("the two samples are not scored on the same units")
    if a.transform != b.transform:
        raise ValueError("the two samples have different transforms")


def paired_bootstrap(
    a: Sample, b: Sample, rng: np.random.Generator, n_boot: int = N_BOOT
) -> PairedTest:
    """Two-sided paired bootstrap test of estimate(a) == estimate(b) on shared units."""
    _check_paired(a, b)
    d = a.estimate() - b.estimate()
    reps = []
    for start in range(0, n_boot, _CHUNK):
        counts = _unit_counts(rng, a.units, min(_CHUNK, n_boot - start))
        reps.append(_replicates(a, counts, rng) - _replicates(b, counts, rng))
    extreme = int(np.sum(np.abs(np.concatenate(reps) - d) >= abs(d)))
    return PairedTest(d, (1 + extreme) / (n_boot + 1), "paired bootstrap")


def mcnemar_exact(a, b) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes ``a`` and ``b``."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError("McNemar needs outcomes on the same examples")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(min(only_a, only_b), n, 0.5)))


def paired_test(a: Sample, b: Sample, rng: np.random.Generator, n_boot: int = N_BOOT) -> PairedTest:
    """McNemar for one seed each of 0/1 correctness; the paired bootstrap otherwise."""
    _check_paired(a, b)
    if a.seeds == 1 and b.seeds == 1 and a.is_binary() and b.is_binary():
        p = mcnemar_exact(a.values[0], b.values[0])
        return PairedTest(a.estimate() - b.estimate(), p, "McNemar exact")
    return paired_bootstrap(a, b, rng, n_boot)


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values (same order); reject where adjusted <= alpha."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return out


@dataclass(frozen=True)
class BestSet:
    """The best mix of one evaluation language and the mixes not significantly worse.

    ``tied`` includes ``best``. ``p_adjusted``: each other mix's p-value against the best,
    adjusted for all pairwise comparisons of the mixes (max-T); ``diff``: its estimate minus
    the best's.
    """

    best: str
    tied: frozenset[str]
    p_adjusted: dict[str, float] = field(default_factory=dict)
    diff: dict[str, float] = field(default_factory=dict)
    method: str = MAX_T


def _joint_replicates(samples: list[Sample], rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """(mixes, n_boot) replicated estimates, every mix under the same unit draws."""
    out = np.empty((len(samples), n_boot))
    for start in range(0, n_boot, _CHUNK):
        n = min(_CHUNK, n_boot - start)
        counts = _unit_counts(rng, samples[0].units, n)
        for k, s in enumerate(samples):
            out[k, start : start + n] = _replicates(s, counts, rng)
    return out


def compare_with_best(
    samples: Mapping[str, Sample],
    higher_is_better: bool,
    rng: np.random.Generator,
    alpha: float = ALPHA,
    n_boot: int = N_BOOT,
    best: str | None = None,
) -> BestSet:
    """The best mix by estimate (or ``best`` where the caller has chosen it, e.g. a table's
    mark), and every mix not significantly worse than it.

    The best is picked from the same data, so comparisons with it alone would be selected
    hypotheses (Holm over them lets 5 equal mixes show a "significantly worse" one about 11%
    of the time instead of 5%). Instead all pairwise differences are tested at once, by the
    single-step max-T paired bootstrap (Westfall & Young, 1993): T* = max over pairs of
    |d*_ij - d_ij| / se_ij under shared unit draws, and a pair's adjusted p-value is
    (1 + #{T* >= |d_ij| / se_ij}) / (B + 1). This holds the family-wise error rate over all
    pairs, hence over the comparisons with whichever mix is best.
    """
    if not samples:
        raise ValueError("no samples to compare")
    names = sorted(samples)  # a fixed order: the random stream, so the result, is reproducible
    for n in names[1:]:
        _check_paired(samples[names[0]], samples[n])
    est = np.array([samples[n].estimate() for n in names])
    if best is None:
        best = names[int(np.argmax(est) if higher_is_better else np.argmin(est))]
    elif best not in samples:
        raise ValueError(f"best {best!r} is not among the samples")
    if len(names) == 1:
        return BestSet(best, frozenset([best]))
    reps = _joint_replicates([samples[n] for n in names], rng, n_boot)
    i, j = np.triu_indices(len(names), 1)
    d = est[i] - est[j]
    d_star = reps[i] - reps[j]  # (pairs, n_boot)
    se = d_star.std(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # a pair that never differs (identical scores) has t = 0 and no say in the maximum
        t_obs = np.where(se > 0, np.abs(d) / se, 0.0)
        t_star = np.where(se[:, None] > 0, np.abs(d_star - d[:, None]) / se[:, None], 0.0)
    t_max = t_star.max(axis=0)
    b = names.index(best)
    p_adj, diff = {}, {}
    for k, (a, c) in enumerate(zip(i, j, strict=True)):
        if b in (a, c):
            other = names[c if a == b else a]
            p_adj[other] = float((1 + np.sum(t_max >= t_obs[k])) / (n_boot + 1))
            diff[other] = float(est[names.index(other)] - est[b])
    tied = frozenset([best] + [n for n, p in p_adj.items() if p > alpha])
    return BestSet(best, tied, p_adj, diff)
