"""Predicted per-language damage of a compressed model, from per-language input statistics.

For a Linear with dense weight ``W`` (out, in), compressed ``W'`` and ``D = W - W'``, the
layer-wise reconstruction error of its outputs on language ``l`` (SparseGPT/OBS's objective,
Frantar & Alistarh 2023, eq. 1, on that language's tokens) is

    err_l = ||D X_l||_F^2 / ||W X_l||_F^2 = tr(D H_l D^T) / tr(W H_l W^T),

``X_l`` the Linear's inputs on language ``l``'s windows and ``H_l`` their Hessian. Any positive
multiple of ``H_l`` gives the same ratio, so the running-mean form of ``compress/stats.py``
(``H = (2/n) X X^T``) is used as it is; the numerator and denominator on their own
(:class:`DamageTerm`) are in those units: twice the mean squared output error (energy) per token.
The trace is ``sum((D @ H) * D)``: one (out, in) product, never the (out, out) ``D H D^T``.

Wanda keeps only column norms (``s = diag(H) / 2``), so its damage uses the diagonal of ``H``:
``tr(D diag(h) D^T) = sum_j h_j ||D_{:,j}||^2``. That drops the cross terms
``2 sum_{j<k} H_jk <D_j, D_k>``: exact for uncorrelated input features, otherwise an estimate
whose error grows with the correlation of the pruned columns (the cross terms of removed weights
of one row can cancel or add). SparseGPT and GPTQ accumulate the full ``H`` and get the exact
value; a Wanda sweep that wants it must accumulate Hessians too (``column_sq_norms`` of a
Hessian is Wanda's statistic, so the masks are unchanged).

Combining Linears into one number per language (:func:`combine`, ``how="block"``, the default):
per block, the errors of its Linears summed over their energies summed (the relative error of
the block's Linear outputs taken together, each Linear counting by how much signal it carries),
then the mean over blocks. Why not one ratio over the whole model: the energies of different
blocks are not comparable (the residual stream's scale grows with depth; Gemma's norms put
orders of magnitude between blocks), so the largest blocks would decide alone. Why not the mean
over Linears of each ratio (``how="linear"``, also offered): a Linear whose outputs are small
(a v_proj reading a near-constant input) counts as much as the MLP that carries the block.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from polyprune.compress.stats import InputStats

__all__ = [
    "COMBINES",
    "DamageTerm",
    "combine",
    "damage_terms",
    "output_energy",
    "reconstruction_error",
    "relative_damage",
    "statistic_matrix",
]

Combine = Literal["block", "linear"]
COMBINES: tuple[str, ...] = ("block", "linear")


def statistic_matrix(stats: InputStats) -> torch.Tensor:
    """What the damage is measured with: the full ``H`` (d, d) from a Hessian, or the diagonal
    ``h = 2 s`` (d,) from column norms (the diagonal approximation, module docstring)."""
    return stats.H if stats.kind == "hessian" else 2 * stats.colsq


def _quadratic(A: torch.Tensor, H: torch.Tensor) -> float:
    """tr(A H A^T) for A (out, in) and H (in, in) or its diagonal (in,); fp32 products, fp64 sum."""
    A = A.to(torch.float32)
    H = H.to(device=A.device, dtype=torch.float32)
    if H.dim() == 1:
        return float((A.square() * H).sum(dtype=torch.float64))
    return float(((A @ H) * A).sum(dtype=torch.float64))  # (out, in)


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - W') H (W - W')^T): the output error energy of the compressed Linear."""
    return _quadratic(W.to(torch.float32) - W_hat.to(device=W.device, dtype=torch.float32), H)


def output_energy(W: torch.Tensor, H: torch.Tensor) -> float:
    """tr(W H W^T): the energy of the dense Linear's outputs."""
    return _quadratic(W, H)


def _ratio(error: float, energy: float) -> float:
    # A Linear with no output energy (W = 0, or inputs all zero) has nothing to lose: 0 / 0 = 0;
    # an error there all the same (a quantised zero row moved off zero) is infinite damage.
    if energy > 0:
        return error / energy
    return 0.0 if error == 0 else math.inf


def relative_damage(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """err = tr(D H D^T) / tr(W H W^T) for one Linear on one language."""
    return _ratio(reconstruction_error(W, W_hat, H), output_energy(W, H))


@dataclass(frozen=True)
class DamageTerm:
    """One Linear's error and energy on one language (units of :func:`reconstruction_error`)."""

    block: int
    linear: str
    lang: str
    error: float
    energy: float

    @property
    def ratio(self) -> float:
        return _ratio(self.error, self.energy)


def damage_terms(
    block: int,
    linear: str,
    W: torch.Tensor,
    W_hat: torch.Tensor,
    H: Mapping[str, torch.Tensor],
    energy: Mapping[str, float] | None = None,
) -> list[DamageTerm]:
    """The terms of one Linear for every language of ``H`` (lang -> H_l or its diagonal).
    ``energy`` (lang -> tr(W H_l W^T)) may be passed in: it does not depend on the mix, so a
    sweep computes it once per Linear."""
    D = W.to(torch.float32) - W_hat.to(device=W.device, dtype=torch.float32)  # (out, in)
    return [
        DamageTerm(
            block,
            linear,
            lang,
            _quadratic(D, H_l),
            energy[lang] if energy is not None else output_energy(W, H_l),
        )
        for lang, H_l in H.items()
    ]


def combine(terms: Iterable[DamageTerm], how: Combine = "block") -> dict[str, float]:
    """One predicted damage per language (module docstring): ``block`` = mean over blocks of
    (sum of errors / sum of energies in the block); ``linear`` = mean over Linears of ratios."""
    if how not in COMBINES:
        raise ValueError(f"unknown combination {how!r}; allowed: block, linear")
    if how == "linear":
        ratios: dict[str, list[float]] = defaultdict(list)
        for t in terms:
            ratios[t.lang].append(t.ratio)
        return {lang: math.fsum(r) / len(r) for lang, r in ratios.items()}
    sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for t in terms:
        acc = sums[t.lang][t.block]
        acc[0] += t.error
        acc[1] += t.energy
    return {
        lang: math.fsum(_ratio(e, s) for e, s in blocks.values()) / len(blocks)
        for lang, blocks in sums.items()
    }
