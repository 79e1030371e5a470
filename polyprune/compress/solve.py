"""The engine's entry point of each built-in solver: ``solve(W, stats, cfg, name, segments)``.

``W`` (rows, K) is the Linear's weight (or, for a ``stacked`` method, the weights of the Linears
that share one input, rows concatenated, ``segments`` their row counts); ``stats`` the input
statistics the method's registry record asks for (None for data-free methods); ``cfg`` the
:class:`~polyprune.compress.engine.EngineConfig`; ``name`` the Linear(s), for messages. The
registry (:mod:`polyprune.compress.methods`) names these by ``"module:function"``.
"""

from __future__ import annotations

import torch

from polyprune.compress.gptq import gptq_quantize
from polyprune.compress.gptq import rtn as rtn_quantize
from polyprune.compress.magnitude import magnitude_prune
from polyprune.compress.solver import SolverResult
from polyprune.compress.sparsegpt import sparsegpt_prune
from polyprune.compress.stats import InputStats
from polyprune.compress.wanda import wanda_prune

__all__ = ["gptq", "magnitude", "rtn", "sparsegpt", "wanda"]


def magnitude(W: torch.Tensor, stats: None, cfg, name: str, segments) -> SolverResult:
    return magnitude_prune(W, cfg.prune)


def wanda(W: torch.Tensor, stats: InputStats, cfg, name: str, segments) -> SolverResult:
    return wanda_prune(W, stats.column_sq_norms(), cfg.prune)


def sparsegpt(W: torch.Tensor, stats: InputStats, cfg, name: str, segments) -> SolverResult:
    return sparsegpt_prune(W, stats.H, cfg.prune, name, segments, cfg.quant)


def gptq(W: torch.Tensor, stats: InputStats, cfg, name: str, segments) -> SolverResult:
    return gptq_quantize(W, stats.H, cfg.quant, name)


def rtn(W: torch.Tensor, stats: None, cfg, name: str, segments) -> SolverResult:
    return rtn_quantize(W, cfg.quant)
