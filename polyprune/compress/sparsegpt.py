"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"), following the reference ``sparsegpt.py`` (IST-DASLab).

Columns are processed left to right in blocks of ``blocksize``. Inside a block the mask is
chosen adaptively from w^2 / [H^-1]_jj^2 (Eq. 5 with the Cholesky factor's diagonal), each
column is pruned and its error (w - q) / [H^-1]_jj is spread over the not yet processed columns
through the upper Cholesky factor of H^-1 (the OBS update, Algorithm 1); the block's
accumulated error is applied to the later blocks in one matrix product (lazy batch update).

Rows are independent given H, so Linears that read the same input (q/k/v; gate/up) are solved
in one call with their weights stacked: one factorisation and one column loop instead of
three. ``segments`` keeps the unstructured mask selection per Linear, so the result equals
separate calls.

One deliberate deviation: the reference selects ``tmp <= sorted(tmp)[k]``, which prunes k + 1
weights per block (more with ties); we prune exactly k = floor(numel * sparsity) per block and
Linear, so the achieved sparsity is the one asked for.
"""

from __future__ import annotations

import torch

from polyprune.compress.obs import dead_columns, inverse_hessian_cholesky, obs_solve
from polyprune.compress.quant import QuantConfig
from polyprune.compress.solver import PruneConfig, SolverResult

__all__ = ["dead_columns", "inverse_hessian_cholesky", "sparsegpt_prune"]


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    cfg: PruneConfig,
    name: str = "",
    segments: list[int] | None = None,
    quant: QuantConfig | None = None,
) -> SolverResult:
    """Prune W (rows, cols) given H (cols, cols) = 2/n sum x x^T. Returns W' in W's dtype.

    ``segments``: row counts of stacked Linears (default: one); unstructured masks are chosen
    per segment and block, exactly as for separate calls. ``quant``: also round every kept
    weight to its grid in the same pass (joint sparse + quantised compression, SparseGPT
    paper Section 3.5); pruned weights stay exactly 0, which every grid holds.
    """
    res = obs_solve(
        W, H, blocksize=cfg.blocksize, percdamp=cfg.percdamp, sparsity=cfg.sparsity,
        n=cfg.pattern.n, m=cfg.pattern.m, segments=segments, quant=quant, name=name,
    )  # fmt: skip
    return SolverResult(
        res.weight.to(W.dtype), res.mask, float(res.row_loss.sum()), res.damp,
        row_loss=res.row_loss, quant=res.quant,
    )  # fmt: skip
