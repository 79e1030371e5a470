"""Layer-wise sparsity profiles: how a global sparsity is shared out over the decoder blocks.

``uniform`` gives every block the requested sparsity (the Wanda and SparseGPT papers' setting).
``owl`` is OWL (Yin et al., ICML 2024, "Outlier Weighed Layerwise Sparsity", arXiv 2310.05175;
code: github.com/luuyin/OWL, ``prune_wanda_outlier`` in ``lib/prune_all.py``):

1. Outlier ratio of block b: the Wanda scores ``|W_ij| ||X_j||`` of all its Linears pooled into
   one set ``A_b``; ``D_b = |{a in A_b : a > M mean(A_b)}| / |A_b|`` (the reference code keeps it
   in percent; the scale cancels in step 2).
2. ``d_b = 2 lambda (D_b - min D) / (max D - min D)`` in ``[0, 2 lambda]``;
   sparsity ``s_b = S - d_b + mean(d)``: more outliers, less pruning; the mean of ``s`` is S.

Where this module departs from the reference code (docs/sparsity_profiles.md has the list):
the mean in step 2 is weighted by the blocks' parameter counts, so the parameter-weighted
global sparsity is S for blocks of unequal size too (for equal blocks, every decoder this
project runs, it is the reference's plain mean); all ratios equal (``max D = min D``, a division
by zero in the reference) gives the uniform profile; lambda is bounded so that every ``s_b``
lies in ``[0, 1)`` (the reference clamps ``s_b <= 0`` to 0.01, which breaks the mean).

No torch import here (the CLI reads the registry for ``--help``); :func:`outlier_ratio` works
on the tensors it is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from polyprune.checks import check_finite
from polyprune.errors import InputError

__all__ = [
    "OwlParams",
    "ProfileSpec",
    "check_profile",
    "exact_sparsities",
    "get_profile",
    "outlier_ratio",
    "owl_sparsities",
    "profile_names",
    "profile_settings",
    "profiles",
    "pruned_count",
]


@dataclass(frozen=True)
class OwlParams:
    """OWL's hyperparameters. Defaults: the paper's LLaMA-7B setting at 70% (README and
    ``llama7b_wanda_owll.sh`` of the reference repository: ``--Hyper_m 5 --Lamda 0.08``)."""

    m: float = 5.0  # outlier threshold: M x the block's mean Wanda score
    lmbda: float = 0.08  # block sparsities lie within target +- 2 lambda

    def __post_init__(self) -> None:
        check_finite("--owl-m", self.m, positive=True)
        check_finite("--owl-lambda", self.lmbda)
        if self.lmbda < 0:
            raise InputError(f"--owl-lambda {self.lmbda} is negative; allowed: >= 0")


@dataclass(frozen=True)
class ProfileSpec:
    """A layer-wise sparsity profile. ``methods``: the pruning methods it applies to;
    ``calibrated``: it needs a first pass over the dense model before block 0 is pruned."""

    name: str
    help: str
    methods: tuple[str, ...] | None  # None: every method
    calibrated: bool = False
    structured: bool = True  # works with N:M patterns


_REGISTRY: dict[str, ProfileSpec] = {}


def _register(spec: ProfileSpec) -> None:
    _REGISTRY[spec.name] = spec


def profiles() -> tuple[ProfileSpec, ...]:
    return tuple(_REGISTRY.values())


def profile_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_profile(name: str) -> ProfileSpec:
    spec = _REGISTRY.get(name)
    if spec is None:
        raise InputError(f"unknown sparsity profile {name!r}; allowed: {', '.join(_REGISTRY)}")
    return spec


_register(ProfileSpec("uniform", "every block at the requested sparsity", None))
# N:M: the ratio N/M is the sparsity of every group of M, so a per-block sparsity would need a
# per-block pattern (OWL's wanda_owl_structure varies N per block); not offered here.
_register(ProfileSpec(
    "owl", "block sparsity from its share of outlier Wanda scores (Yin et al. 2024)",
    ("wanda", "sparsegpt"), calibrated=True, structured=False,
))  # fmt: skip


def check_profile(name: str, method: str, sparsity: float, structured: bool, owl: OwlParams):
    """Refuse, in one line, a profile that cannot apply: unknown, a method or an N:M pattern it
    does not work with, or a lambda that would put some block outside [0, 1)."""
    spec = get_profile(name)
    if spec.methods is not None and method not in spec.methods:
        raise InputError(
            f"--sparsity-profile {name} works with {' and '.join(spec.methods)}, not {method}"
        )
    if structured and not spec.structured:
        raise InputError(
            f"--sparsity-profile {name} needs unstructured sparsity: an N:M pattern fixes "
            "every block's sparsity at N/M"
        )
    if name == "owl":
        bound = min(sparsity, 1.0 - sparsity) / 2
        if owl.lmbda > bound or sparsity + 2 * owl.lmbda >= 1.0:
            raise InputError(
                f"--owl-lambda {owl.lmbda:g} is too large for sparsity {sparsity:g}: block "
                f"sparsities lie within {sparsity:g} +- 2 lambda, so lambda must be below "
                f"{bound:g}"
            )


def profile_settings(name: str, owl: OwlParams) -> dict:
    """The manifest settings of a profile: none for ``uniform``, so the manifests of runs
    before profiles existed still compare equal."""
    if name == "uniform":
        return {}
    return {"sparsity_profile": name, "owl_m": owl.m, "owl_lambda": owl.lmbda}


def outlier_ratio(weights: Sequence, colsqs: Sequence, m: float) -> float:
    """OWL's outlier ratio of one block: the fraction of the Wanda scores ``|W| sqrt(colsq)``
    of all its Linears (``weights[i]`` (rows, cols) with ``colsqs[i]`` (cols,)), pooled, that
    exceed ``m`` times their mean. A fraction in [0, 1] (the reference code: percent).

    The mean's sum is taken in float64 so that it does not depend on the Linears' order."""
    scores = [W.float().abs() * colsq.float().sqrt().reshape(1, -1) for W, colsq in
              zip(weights, colsqs, strict=True)]  # fmt: skip
    total = sum(s.numel() for s in scores)
    if total == 0:
        return 0.0
    mean = sum(float(s.double().sum()) for s in scores) / total
    above = sum(int((s > m * mean).sum()) for s in scores)
    return above / total


def owl_sparsities(
    ratios: Sequence[float], target: float, lmbda: float, sizes: Sequence[int] | None = None
) -> list[float]:
    """OWL's per-block sparsities from the blocks' outlier ratios (step 2 of the module
    docstring); ``sizes`` the blocks' parameter counts (default: equal), whose weighted mean
    of the result is ``target`` (exactly, up to float rounding)."""
    n = len(ratios)
    sizes = [1] * n if sizes is None else list(sizes)
    if len(sizes) != n or n == 0:
        raise ValueError(f"{n} ratios for {len(sizes)} block sizes")
    lo, hi = min(ratios), max(ratios)
    if hi == lo:  # the reference divides by zero here; no outliers to follow: uniform
        return [float(target)] * n
    d = [(r - lo) / (hi - lo) * lmbda * 2 for r in ratios]
    mean = math.fsum(di * w for di, w in zip(d, sizes, strict=True)) / math.fsum(sizes)
    return [float(target) + (mean - di) for di in d]


def pruned_count(rows: int, cols: int, sparsity: float, blocksize: int | None = None) -> int:
    """Weights a solver prunes of a (rows, cols) Linear at ``sparsity`` (unstructured): Wanda
    and magnitude floor(cols s) per row; with ``blocksize`` SparseGPT's floor(width rows s)
    per column block (``polyprune.compress.obs``). The same 1e-9 guard as
    :func:`polyprune.compress.masks.row_prune_count`."""
    if blocksize is None:
        return rows * math.floor(cols * sparsity + 1e-9)
    starts = range(0, cols, blocksize)
    return sum(math.floor((min(a + blocksize, cols) - a) * rows * sparsity + 1e-9) for a in starts)


def exact_sparsities(
    nominal: Sequence[float], counts: Sequence, sizes: Sequence[int]
) -> list[float]:
    """Per-block sparsities for the solvers such that the weights they prune in all add up to
    round(sum_b nominal_b x sizes_b) (= round(target x parameters) for OWL's sparsities) to
    within half a step of the last block's count (a step: the rows of the Linears whose
    floor(cols s) moves at once, or one weight per column block for SparseGPT).

    The solvers prune whole counts (floor(cols s) per row, or per column block), so the
    nominal sparsities alone fall short by up to one row per Linear (0.1% at 70% on Gemma 3
    270M). ``counts[b](s)`` is the weights block b's solver prunes at sparsity s (from
    :func:`pruned_count`), ``sizes[b]`` its parameters. Block by block, the running total is
    steered to the rounded running total of the nominal sparsities (error diffusion), taking
    the achievable count of block b nearest its share, so every running total stays within
    half a step of the nominal one.
    """
    done = 0  # weights pruned by the blocks already set
    wanted = 0.0  # nominal running total
    out = []
    for s, count, size in zip(nominal, counts, sizes, strict=True):
        wanted += s * size
        z = round(wanted) - done  # what this block should prune
        lo, hi = 0.0, 1.0 - 1e-12  # largest s with count(s) <= z, smallest with count(s) > z
        if count(hi) <= z:
            lo = hi
        else:
            for _ in range(64):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if count(mid) <= z else (lo, mid)
        pick = lo if lo == hi or z - count(lo) <= count(hi) - z else hi
        out.append(pick)
        done += count(pick)
    return out
