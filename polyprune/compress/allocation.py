"""The first pass of a calibrated sparsity profile (OWL): every block's sparsity from the dense
model's statistics, before block 0 is pruned.

As the reference code (github.com/luuyin/OWL, ``prune_wanda_outlier``), the calibration
windows go through every *dense* block in turn (each block fed the dense outputs of the one
before), accumulating Wanda's statistic (mean squared input columns) of its Linear groups;
then each block's outlier ratio (:func:`polyprune.compress.profiles.outlier_ratio`) and OWL's
per-block sparsities. The statistic of all windows decides the allocation; one statistic per
calibration language (the windows' languages, ``CalibrationSet.langs``) gives the per-language
outlier ratios recorded in the manifest. Nothing is pruned here; the blocks are loaded and
unloaded through the engine's :class:`~polyprune.compress.engine.BlockIO`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from polyprune.compress.capture import Allocator, BlockInputs, block_output, capture_block_inputs
from polyprune.compress.langstats import LanguageStats
from polyprune.compress.methods import get_method
from polyprune.compress.passes import probe_groups
from polyprune.compress.profiles import (
    exact_sparsities,
    outlier_ratio,
    owl_sparsities,
    pruned_count,
)
from polyprune.compress.stats import InputStats
from polyprune.models import get_weight

__all__ = ["Allocation", "allocate", "block_statistics"]

logger = logging.getLogger(__name__)


@dataclass
class Allocation:
    """Per-block sparsities of a profile and the statistics they came from."""

    blocks: list[str]
    ratio: list[float]  # outlier ratio of each block, all windows
    by_language: dict[str, list[float]] = field(default_factory=dict)
    sparsity: list[float] = field(default_factory=list)  # the profile's (OWL's formula)
    solver_sparsity: list[float] = field(default_factory=list)  # after the count correction

    def config(self, b: int, cfg):
        """The engine config of block ``b``: pruned uniformly at its own sparsity."""
        prune = dataclasses.replace(cfg.prune, sparsity=self.solver_sparsity[b])
        return dataclasses.replace(cfg, prune=prune, profile="uniform")

    def record(self, cfg) -> dict:
        """The manifest's ``profile`` record."""
        return {
            "name": cfg.profile,
            "m": cfg.owl.m,
            "lambda": cfg.owl.lmbda,
            "target": cfg.prune.sparsity,
            "blocks": self.blocks,
            "outlier_ratio": self.ratio,
            "outlier_ratio_by_language": self.by_language,
            "sparsity": self.sparsity,
            "solver_sparsity": self.solver_sparsity,
        }


@torch.inference_mode()
def block_statistics(
    block: nn.Module,
    inputs: BlockInputs,
    groups: list[list[tuple[str, nn.Module]]],
    langs: Sequence[str] | None,
    cfg,
    out: torch.Tensor,
    forwards=contextlib.nullcontext,
) -> tuple[list[InputStats], list[LanguageStats | None]]:
    """One pass of every window through the dense ``block``: the column statistic of each
    group over all windows (batched as the engine batches them, so it equals the engine's)
    and per language, and the block's outputs in ``out``."""
    where: dict[str, slice] = {}
    pooled = [InputStats("colsq", get_weight(g[0][1]).shape[1], cfg.device) for g in groups]
    names = tuple(dict.fromkeys(langs)) if langs is not None else ()
    per_lang = [
        LanguageStats("colsq", st.dim, names, cfg.device) if names else None for st in pooled
    ]

    def hook(module, args, gi):
        pooled[gi].update(args[0])
        if per_lang[gi] is not None:
            per_lang[gi].update_rows(args[0], list(langs[where["rows"]]))

    handles = [
        g[0][1].register_forward_pre_hook(lambda m, a, gi=gi: hook(m, a, gi))
        for gi, g in enumerate(groups)
    ]
    try:
        with forwards():
            for sl, args, kwargs in inputs.batches(cfg.batch_size):
                where["rows"] = sl
                y = block(inputs.hidden[sl].to(cfg.device), *args, **kwargs)
                out[sl] = block_output(y).to(out.device)
    finally:
        for h in handles:
            h.remove()
    return pooled, per_lang


def _ratio(groups, stats, m: float) -> float:
    weights = [get_weight(mod) for g in groups for _, mod in g]
    colsqs = [st.column_sq_norms() for g, st in zip(groups, stats, strict=True) for _ in g]
    return outlier_ratio(weights, colsqs, m)


def allocate(
    model: nn.Module,
    prefix: str,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    langs: Sequence[str] | None,
    cfg,
    io,
    alloc: Allocator,
) -> Allocation:
    """OWL's per-block sparsities for ``cfg`` (an EngineConfig with ``profile="owl"``) from a
    pass of ``input_ids`` through the dense blocks; ``io`` loads and unloads each block."""
    if langs is not None and len(langs) != input_ids.shape[0]:
        raise ValueError(f"{len(langs)} window languages for {input_ids.shape[0]} windows")
    with io.capture():
        inputs = capture_block_inputs(
            model, blocks, input_ids, cfg.device, cfg.batch_size, cfg.progress, alloc=alloc
        )
    out = alloc(tuple(inputs.hidden.shape), inputs.hidden.dtype)
    plan = Allocation([f"{prefix}.{b}" for b in range(len(blocks))], [])
    names = tuple(dict.fromkeys(langs)) if langs is not None else ()
    plan.by_language = {lang: [] for lang in names}
    shapes: list[list[tuple[int, int]]] = []
    structure: dict[type, list[list[str]]] = {}
    unload = io.unload or io.release
    for b, block in enumerate(tqdm(blocks, desc="owl statistics", disable=not cfg.progress)):
        io.load(b, block)
        inputs.block = b
        if type(block) not in structure:
            probed = probe_groups(block, inputs, cfg.batch_size, cfg.device)
            structure[type(block)] = [[name for name, _ in g] for g in probed]
        groups = [[(n, block.get_submodule(n)) for n in g] for g in structure[type(block)]]
        pooled, per_lang = block_statistics(block, inputs, groups, langs, cfg, out, io.forwards)
        plan.ratio.append(_ratio(groups, pooled, cfg.owl.m))
        for lang in names:
            plan.by_language[lang].append(
                _ratio(groups, [s.get(lang) for s in per_lang], cfg.owl.m)
            )
        shapes.append([tuple(get_weight(mod).shape) for g in groups for _, mod in g])
        unload(b, block)
        inputs.hidden, out = out, inputs.hidden
    del inputs, out
    sizes = [sum(r * c for r, c in s) for s in shapes]
    plan.sparsity = owl_sparsities(plan.ratio, cfg.prune.sparsity, cfg.owl.lmbda, sizes)
    # OBS solvers (SparseGPT) count per column block, the others per row
    blocksize = cfg.prune.blocksize if get_method(cfg.method).statistic == "hessian" else None

    def counter(block_shapes):
        return lambda s: sum(pruned_count(r, c, s, blocksize) for r, c in block_shapes)

    plan.solver_sparsity = exact_sparsities(plan.sparsity, [counter(s) for s in shapes], sizes)
    logger.info(
        "owl: outlier ratios %s -> sparsities %s",
        " ".join(f"{r:.4f}" for r in plan.ratio), " ".join(f"{s:.3f}" for s in plan.sparsity),
    )  # fmt: skip
    return plan
