"""Per-Linear input statistics, as running means over calibration tokens.

* Hessian (SparseGPT, GPTQ): ``H = (2 / n) sum_t x_t x_t^T`` over the n tokens seen so far
  (upper triangle accumulated, see ``polyprune.kernels.hessian``).
* Squared column norms (Wanda): ``s_j = (1 / n) sum_t x_{t,j}^2``. Wanda's ``||X_j||_2`` is
  ``sqrt(n s_j)``; the constant factor ``sqrt(n)`` does not change a per-row ranking.

Both are running means so a batch of ``b`` tokens updates them with the weights ``n / (n + b)``
and ``1 / (n + b)``: the values stay O(1) however many tokens pass, as in the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from polyprune.kernels.colnorm import colsq_update
from polyprune.kernels.hessian import hessian_update, symmetrize

__all__ = ["InputStats", "StatKind"]

StatKind = Literal["hessian", "colsq"]


@dataclass
class InputStats:
    """Running statistics of one input shared by the Linears that read it."""

    kind: StatKind
    dim: int
    device: torch.device | str = "cpu"
    n: int = 0
    H_upper: torch.Tensor | None = field(default=None, repr=False)  # valid upper triangle
    colsq: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind == "hessian":
            self.H_upper = torch.zeros(self.dim, self.dim, dtype=torch.float32, device=self.device)
        else:
            self.colsq = torch.zeros(self.dim, dtype=torch.float32, device=self.device)

    def update(self, x: torch.Tensor) -> None:
        X = x.reshape(-1, x.shape[-1])  # (tokens, d)
        if X.device != torch.device(self.device):
            X = X.to(self.device)
        if self.kind == "hessian":
            hessian_update(self.H_upper, self.n, X)
        else:
            colsq_update(self.colsq, self.n, X)
        self.n += X.shape[0]

    @property
    def H(self) -> torch.Tensor:
        """The Hessian (d, d), symmetric."""
        return symmetrize(self.H_upper)

    def column_sq_norms(self) -> torch.Tensor:
        """Wanda's statistic, also derivable from a Hessian: diag(H) / 2."""
        return self.colsq if self.colsq is not None else torch.diagonal(self.H_upper) / 2
