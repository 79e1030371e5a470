"""The one layer-by-layer engine for every Hugging Face decoder.

1. Capture the inputs of block 0 once, and the other arguments the model passes each block
   (attention mask, positions, rotary embeddings): :mod:`polyprune.compress.capture`.
2. For each block: move it to the device, find which Linears read the same tensor (a probe
   forward on one batch; they then share one statistics accumulator), accumulate statistics
   with forward pre-hooks, solve each Linear, re-run the compressed block to produce the inputs
   of the next block, and move it back. The passes through a block are in
   :mod:`polyprune.compress.passes`; the plumbing around them is here.

By default all groups of a block are calibrated from one pass over the dense block, as the
Wanda repository does. With ``true_sequential`` the groups (q/k/v -> o -> gate/up -> down for
Llama; in general, the order in which the block calls them) are solved one after the other,
each seeing the outputs of the groups already compressed, as in the SparseGPT / GPTQ
repositories. A pass stops as soon as the last group it needs has seen its input, so no pass
runs more of the block than it needs.

Where a block's weights come from and where they go is a :class:`BlockIO`: for a model in
memory, ``block.to(device)`` and back; for a checkpoint streamed from disk
(``polyprune.compress.stream``), its tensors read from the safetensors shards and, once
compressed, written to the output shards and freed. Everything between is the same code, so the
two paths give the same weights bit for bit.

The calibration activations (two buffers of N x T x H: a block's inputs and its outputs) live
on the compute device, in host memory, or in a memory-mapped file (``offload``), and move to the
device one batch at a time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from polyprune.checks import check_device
from polyprune.compress.allocation import allocate
from polyprune.compress.capture import (
    Allocator,
    BlockInputs,
    block_output,
    capture_block_inputs,
    memmap_tensor,
)
from polyprune.compress.masks import pack_mask
from polyprune.compress.methods import allowed, get_method, methods
from polyprune.compress.passes import collect_stats, probe_groups, run_block
from polyprune.compress.profiles import OwlParams, check_profile, get_profile
from polyprune.compress.quant import QuantConfig, QuantTensors
from polyprune.compress.solver import PruneConfig, SolverResult
from polyprune.compress.stats import InputStats, StatKind
from polyprune.errors import InputError
from polyprune.models import find_blocks, get_weight, linear_layers, set_weight

# BlockInputs, block_output and capture_block_inputs live in polyprune.compress.capture; they
# stay importable from here for the modules that import them from the engine
__all__ = [
    "OFFLOADS",
    "BlockIO",
    "BlockInputs",
    "check_widths",
    "EngineConfig",
    "EngineReport",
    "LayerRecord",
    "Method",
    "activation_allocator",
    "block_output",
    "capture_block_inputs",
    "compress_blocks",
    "compress_model",
    "engine_method",
    "in_memory_io",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """A registered method (:mod:`polyprune.compress.methods`) with its solver imported:
    ``solve(W, stats, cfg, name, segments)``.

    Linears that share an input are passed stacked (rows concatenated, ``segments`` = their row
    counts) when ``stacked``: one solve instead of several (one Cholesky factorisation for
    q/k/v); the solver keeps its per-Linear choices per segment.
    """

    name: str
    stat: StatKind | None  # statistics the solver needs; None = data-free
    solve: Callable[..., SolverResult]
    stacked: bool = False


@functools.cache
def engine_method(name: str) -> Method:
    """The method ``name`` as the engine calls it; InputError if no such method."""
    spec = get_method(name)
    module, _, function = spec.solver.partition(":")
    solve = getattr(importlib.import_module(module), function)
    return Method(spec.name, spec.statistic, solve, spec.stacked)


# What block b + 1 is calibrated on: compressed (the outputs of block b once compressed: the
# reference algorithms' sequential scheme) or dense (the dense block b's outputs, the same for
# every calibration choice, so one forward per block both collects statistics and propagates).
PROPAGATIONS = ("compressed", "dense")

# Where the calibration activations live: auto (the device when both buffers fit in half its
# free memory, host memory otherwise), none (the device), cpu (host), disk (a memory map).
OFFLOADS = ("auto", "none", "cpu", "disk")


@dataclass(frozen=True)
class EngineConfig:
    method: str
    prune: PruneConfig = PruneConfig()
    device: str = "cpu"
    batch_size: int = 8
    true_sequential: bool = False
    keep_masks: bool = False
    progress: bool = True
    offload: str = "auto"  # one of OFFLOADS; activations move to the device per batch
    offload_dir: str | None = None  # directory of the --offload disk memory maps (default: TMP)
    quant: QuantConfig | None = None  # gptq / rtn, or joint sparsegpt + quantisation
    propagate: str = "compressed"  # one of PROPAGATIONS
    profile: str = "uniform"  # layer-wise sparsity (polyprune.compress.profiles)
    owl: OwlParams = OwlParams()  # hyperparameters of profile "owl"

    def __post_init__(self) -> None:
        spec = get_method(self.method)
        if spec.kind == "prune":
            check_profile(self.profile, self.method, self.prune.sparsity,
                          self.prune.pattern.structured, self.owl)  # fmt: skip
        elif self.profile != "uniform":
            raise InputError(f"--sparsity-profile {self.profile} is for pruning methods")
        if spec.kind == "quantize" and self.quant is None:
            raise InputError(f"method {self.method} needs a quantisation config (bits)")
        if self.quant is not None and not spec.takes_quant:
            takers = [f"{s.name} (joint)" for s in methods("prune") if s.joint_quant]
            takers += [s.name for s in methods("quantize")]
            raise InputError(f"--bits works with {allowed(takers, ' or ')}, not with {self.method}")
        if self.propagate not in PROPAGATIONS:
            raise InputError(
                f"unknown propagation {self.propagate!r}; allowed: {', '.join(PROPAGATIONS)}"
            )
        if self.propagate == "dense" and self.true_sequential:
            raise InputError(
                "--true-sequential calibrates each group on the compressed groups before it; "
                "it cannot be combined with --propagate dense"
            )
        if self.offload not in OFFLOADS:
            raise InputError(f"unknown offload {self.offload!r}; allowed: {', '.join(OFFLOADS)}")
        if self.offload_dir is not None and not os.path.isdir(self.offload_dir):
            raise InputError(f"offload directory {self.offload_dir!r} is not a directory")
        if self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size}")
        check_device(self.device)


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    sparsity: float
    loss: float
    seconds: float
    damp: float | None = None
    tokens: int = 0


@dataclass
class EngineReport:
    layers: list[LayerRecord] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    masks: dict[str, tuple[torch.Tensor, tuple[int, int]]] = field(default_factory=dict)
    quant: dict[str, QuantTensors] = field(default_factory=dict)  # grids of quantised Linears
    block_seconds: list[float] = field(default_factory=list)  # load + compress + release
    profile: dict | None = None  # a calibrated profile's record (Allocation.record)

    def overall_sparsity(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0


def activation_allocator(cfg: EngineConfig) -> Allocator:
    """Allocates the calibration activation buffers where ``cfg.offload`` says."""

    def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        where = cfg.offload
        if where == "auto":
            where = "cpu"
            if torch.device(cfg.device).type == "cuda":
                free, _ = torch.cuda.mem_get_info(torch.device(cfg.device))
                # both buffers in half the free memory: the rest is for the block, its
                # statistics and the solver's workspace
                where = "none" if 2 * nbytes <= free // 2 else "cpu"
        logger.debug("calibration activations %s (%.1f MiB) on %s", shape, nbytes / 2**20, where)
        if where == "disk":
            return memmap_tensor(shape, dtype, cfg.offload_dir)
        return torch.empty(shape, dtype=dtype, device=cfg.device if where == "none" else "cpu")

    return alloc


def solve_group(
    group: list[tuple[str, nn.Module]],
    st: InputStats | None,
    method: Method,
    cfg: EngineConfig,
    prefix: str,
    report: EngineReport,
) -> None:
    if method.stacked and len(group) > 1:
        t0 = time.perf_counter()
        Ws = [get_weight(mod) for _, mod in group]
        rows = [W.shape[0] for W in Ws]
        names = "+".join(f"{prefix}.{name}" for name, _ in group)
        W = torch.cat([W.to(cfg.device) for W in Ws])
        res = method.solve(W, st, cfg, names, rows)
        seconds = (time.perf_counter() - t0) / len(group)
        starts = [sum(rows[:i]) for i in range(len(rows))]
        for (name, mod), a, r in zip(group, starts, rows, strict=True):
            qt = res.quant
            if qt is not None:  # grids are per output row: each Linear takes its rows
                qt = QuantTensors(
                    qt.scales[:, a : a + r], qt.zeros[:, a : a + r], qt.g_idx, qt.bits
                )
            part = SolverResult(
                res.weight[a : a + r],
                res.mask[a : a + r],
                float(res.row_loss[a : a + r].sum()) if res.row_loss is not None else res.loss,
                res.damp,
                quant=qt,
            )
            _apply(name, mod, part, st, cfg, prefix, report, seconds)
        return
    for name, mod in group:
        t0 = time.perf_counter()
        res = method.solve(get_weight(mod).to(cfg.device), st, cfg, f"{prefix}.{name}", None)
        _apply(name, mod, res, st, cfg, prefix, report, time.perf_counter() - t0)


def _apply(name, mod, res: SolverResult, st, cfg: EngineConfig, prefix, report, seconds) -> None:
    """Write a solver's weight into the Linear and record what it achieved."""
    full = f"{prefix}.{name}"
    set_weight(mod, res.weight)
    W_new = get_weight(mod)
    report.layers.append(
        LayerRecord(
            name=full,
            shape=tuple(W_new.shape),
            sparsity=float((W_new == 0).float().mean()),
            loss=res.loss,
            seconds=seconds,
            damp=res.damp,
            tokens=st.n if st is not None else 0,
        )
    )
    if cfg.keep_masks:
        report.masks[full] = (pack_mask(res.mask), tuple(res.mask.shape))
    if res.quant is not None:
        q = res.quant
        report.quant[full] = QuantTensors(q.scales.cpu(), q.zeros.cpu(), q.g_idx.cpu(), q.bits)


def check_widths(model: nn.Module, cfg: EngineConfig) -> None:
    """Fail before any work if an N:M pattern or a quantisation group cannot apply to some
    Linear."""
    prefix, blocks = find_blocks(model)
    for b, block in enumerate(blocks):
        for name, mod in linear_layers(block).items():
            cols = get_weight(mod).shape[1]
            if get_method(cfg.method).kind == "prune":
                cfg.prune.pattern.check_width(cols, f"{prefix}.{b}.{name}")
            if cfg.quant is not None:
                cfg.quant.check_width(cols, f"{prefix}.{b}.{name}")


@dataclass
class BlockIO:
    """Where the engine gets a block's weights and where they go once it is compressed.

    ``load(b, block)`` puts block ``b``'s weights on the compute device; ``release(b, block)``
    takes them away again (back to host memory, or to the output shards and then freed).
    ``capture()`` is entered while block 0's inputs are captured, for the modules before it.
    """

    load: Callable[[int, nn.Module], None]
    release: Callable[[int, nn.Module], None]
    capture: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # entered around each pass of calibration windows through a block (statistics and
    # propagation): the streamed path serves their temporaries from the heap (stream.lean_malloc)
    forwards: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # takes a block away unchanged after a profile's first pass (default: ``release``)
    unload: Callable[[int, nn.Module], None] | None = None


def in_memory_io(device: torch.device | str) -> BlockIO:
    """Blocks of a model held in memory: to the device and back to where they were."""
    homes: dict[int, torch.device] = {}

    def load(b: int, block: nn.Module) -> None:
        homes[b] = next(block.parameters()).device
        block.to(device)

    def release(b: int, block: nn.Module) -> None:
        block.to(homes.pop(b))

    return BlockIO(load, release)


def compress_model(
    model: nn.Module, input_ids: torch.Tensor | None, cfg: EngineConfig, langs=None
) -> EngineReport:
    """Compress every Linear of every decoder block in place. ``input_ids`` (N, T) are the
    calibration windows (unused by data-free methods), ``langs`` their languages (per-language
    statistics of a profile). Embeddings and lm_head are untouched. The model runs in eval
    mode (no dropout) and gets its train/eval mode back afterwards."""
    was_training = model.training
    model.eval()
    try:
        return compress_blocks(model, input_ids, cfg, in_memory_io(cfg.device), langs=langs)
    finally:
        model.train(was_training)


@dataclass
class _Timers:
    statistics: float = 0.0
    solve: float = 0.0
    forward: float = 0.0


def compress_blocks(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    cfg: EngineConfig,
    io: BlockIO,
    report: EngineReport | None = None,
    langs=None,
) -> EngineReport:
    """The block loop shared by the in-memory and the streamed paths; ``io`` says where each
    block comes from and goes to. Records go to ``report`` (a new one by default), which
    ``io.release`` may read and drain (masks, quantisation grids of the block it releases).
    A calibrated profile (OWL) first passes the windows (languages ``langs``) through the dense
    blocks for every block's sparsity (:mod:`polyprune.compress.allocation`)."""
    method = engine_method(cfg.method)
    prefix, blocks = find_blocks(model)
    check_widths(model, cfg)
    report = EngineReport() if report is None else report
    t_start = time.perf_counter()

    if method.stat is None:
        for b, block in enumerate(tqdm(blocks, desc=cfg.method, disable=not cfg.progress)):
            t0 = time.perf_counter()
            io.load(b, block)
            for name, mod in linear_layers(block).items():
                solve_group([(name, mod)], None, method, cfg, f"{prefix}.{b}", report)
            io.release(b, block)
            report.block_seconds.append(time.perf_counter() - t0)
        report.seconds["solve"] = time.perf_counter() - t_start
        return report

    if input_ids is None:
        raise InputError(f"method {cfg.method} needs calibration data (--calib)")
    alloc = activation_allocator(cfg)
    plan = None
    if get_profile(cfg.profile).calibrated:
        plan = allocate(model, prefix, blocks, input_ids, langs, cfg, io, alloc)
        report.profile = plan.record(cfg)
    with io.capture():
        inputs = capture_block_inputs(
            model, blocks, input_ids, cfg.device, cfg.batch_size, cfg.progress, alloc=alloc
        )
    report.seconds["capture"] = time.perf_counter() - t_start
    out = alloc(tuple(inputs.hidden.shape), inputs.hidden.dtype)
    timers = _Timers()
    structure: dict[type, list[list[str]]] = {}  # blocks of one class share their grouping
    for b, block in enumerate(tqdm(blocks, desc=cfg.method, disable=not cfg.progress)):
        t0 = time.perf_counter()
        io.load(b, block)
        inputs.block = b
        _compress_block(
            block, f"{prefix}.{b}", inputs, out, method, plan.config(b, cfg) if plan else cfg,
            report, structure, timers, io.forwards,
        )  # fmt: skip
        io.release(b, block)
        report.block_seconds.append(time.perf_counter() - t0)
        inputs.hidden, out = out, inputs.hidden
    report.seconds.update(statistics=timers.statistics, solve=timers.solve, forward=timers.forward)
    report.seconds["total"] = time.perf_counter() - t_start
    return report


def _compress_block(
    block: nn.Module,
    prefix: str,
    inputs: BlockInputs,
    out: torch.Tensor,
    method: Method,
    cfg: EngineConfig,
    report: EngineReport,
    structure: dict[type, list[list[str]]],
    timers: _Timers,
    forwards: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> None:
    """Calibrate and compress one block (on the device), then write its outputs to ``out``."""
    if type(block) not in structure:
        probed = probe_groups(block, inputs, cfg.batch_size, cfg.device)
        structure[type(block)] = [[name for name, _ in g] for g in probed]
    groups = [[(name, block.get_submodule(name)) for name in g] for g in structure[type(block)]]
    if cfg.propagate == "dense":  # one forward: statistics and the dense outputs
        t0 = time.perf_counter()
        stats = collect_stats(
            block, inputs, groups, method.stat, cfg.batch_size, cfg.device, forwards, out=out
        )
        t1 = time.perf_counter()
        for group, st in zip(groups, stats, strict=True):
            solve_group(group, st, method, cfg, prefix, report)
        timers.statistics += t1 - t0
        timers.solve += time.perf_counter() - t1
        return
    phases = [[g] for g in groups] if cfg.true_sequential else [groups]
    for phase in phases:
        t0 = time.perf_counter()
        stats = collect_stats(
            block, inputs, phase, method.stat, cfg.batch_size, cfg.device, forwards
        )
        t1 = time.perf_counter()
        for group, st in zip(phase, stats, strict=True):
            solve_group(group, st, method, cfg, prefix, report)
        del stats
        timers.statistics += t1 - t0
        timers.solve += time.perf_counter() - t1
    t0 = time.perf_counter()
    run_block(block, inputs, out, cfg.batch_size, cfg.device, forwards)
    timers.forward += time.perf_counter() - t0
