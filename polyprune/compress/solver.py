"""What every solver takes and returns: a frozen config in, a result out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polyprune.checks import check_finite
from polyprune.compress.masks import Pattern
from polyprune.compress.quant import QuantTensors
from polyprune.errors import InputError

__all__ = ["PruneConfig", "SolverResult"]


@dataclass(frozen=True)
class PruneConfig:
    """Settings of a pruning solver, validated when built.

    ``sparsity`` is the fraction pruned per comparison group for unstructured patterns; for N:M
    patterns it is implied (N / M): leave it at 0 or give N / M.
    """

    sparsity: float = 0.5
    pattern: Pattern = Pattern()
    blocksize: int = 128  # SparseGPT column block
    percdamp: float = 0.01  # SparseGPT damping, a fraction of mean(diag H)

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, Pattern):
            object.__setattr__(self, "pattern", Pattern.parse(self.pattern))
        if self.pattern.structured:
            if self.sparsity not in (0.0, self.pattern.sparsity):
                raise InputError(
                    f"sparsity {self.sparsity} contradicts pattern {self.pattern} "
                    f"(= {self.pattern.sparsity:g}); leave --sparsity at {self.pattern.sparsity:g}"
                )
            object.__setattr__(self, "sparsity", self.pattern.sparsity)
        elif not 0.0 <= self.sparsity < 1.0:
            raise InputError(f"sparsity {self.sparsity} is outside [0, 1)")
        if self.blocksize < 1:
            raise InputError(f"blocksize must be >= 1, got {self.blocksize}")
        if self.pattern.structured and self.blocksize % self.pattern.m:
            raise InputError(
                f"blocksize {self.blocksize} must be a multiple of M in {self.pattern}"
            )
        # inf passes "> 0" but makes every Hessian "not invertible" after calibration.
        check_finite("percdamp", self.percdamp, positive=True)


@dataclass
class SolverResult:
    """The compressed weight (same shape and dtype as the input), its mask and the solver loss.

    ``loss`` is the objective the solver minimises, summed over rows: for SparseGPT the OBS
    error sum (w - q)^2 / [H^-1]_jj^2 / 2 as in the reference code; for Wanda the sum of pruned
    (|W_ij| ||X_j||)^2 (the diagonal-Hessian estimate of the output error per token); for
    magnitude the sum of pruned W_ij^2.
    """

    weight: torch.Tensor
    mask: torch.Tensor  # bool, True = pruned
    loss: float
    damp: float | None = None  # the damping that made H invertible (SparseGPT, GPTQ)
    row_loss: torch.Tensor | None = None  # (rows,) loss per output row, where the solver has it
    quant: QuantTensors | None = None  # grids and g_idx of a quantised weight
