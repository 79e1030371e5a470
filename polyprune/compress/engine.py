"""The one layer-by-layer engine for every Hugging Face decoder.

1. Capture the inputs of block 0 once: a forward pre-hook on block 0 stores its hidden states
   and the other arguments the model passes it (attention mask, positions, rotary embeddings)
   and stops the forward. The windows are unpadded and all ``seqlen`` long, so those other
   arguments depend only on the batch size and are kept once per batch size.
2. For each block: move it to the device, find which Linears read the same tensor (a probe
   forward on one batch; they then share one statistics accumulator), accumulate statistics
   with forward pre-hooks, solve each Linear, re-run the compressed block to produce the inputs
   of the next block, and move it back.

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
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from polyprune.checks import check_device
from polyprune.compress.masks import pack_mask
from polyprune.compress.methods import allowed, get_method, methods
from polyprune.compress.quant import QuantConfig, QuantTensors
from polyprune.compress.solver import PruneConfig, SolverResult
from polyprune.compress.stats import InputStats, StatKind
from polyprune.errors import InputError
from polyprune.models import find_blocks, get_weight, linear_layers, set_weight

__all__ = [
    "OFFLOADS",
    "BlockIO",
    "check_widths",
    "EngineConfig",
    "EngineReport",
    "LayerRecord",
    "Method",
    "block_output",
    "capture_block_inputs",
    "compress_blocks",
    "compress_model",
    "engine_method",
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

    def __post_init__(self) -> None:
        spec = get_method(self.method)
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

    def overall_sparsity(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0


class _StopForward(Exception):
    """Raised from a hook once a forward pass has given all that is needed of it."""


@dataclass
class BlockInputs:
    """Calibration activations and the other arguments each decoder block is called with.

    Blocks of one model need not share their arguments: Gemma 2/3, Qwen2 and Mistral pass each
    layer type its own attention mask (sliding or full), and Gemma 3 its own rotary table
    (theta 10k local, 1M global). So the arguments are kept per block; ``block`` selects whose
    ``batches`` yields.
    """

    hidden: torch.Tensor  # (N, T, H)
    extra: list[dict[int, tuple[tuple, dict]]]  # per block: batch size -> (args after x, kwargs)
    block: int = 0

    def batches(self, batch_size: int):
        extra = self.extra[self.block]
        for start in range(0, self.hidden.shape[0], batch_size):
            end = min(start + batch_size, self.hidden.shape[0])
            args, kwargs = extra[end - start]
            yield slice(start, end), args, kwargs


Allocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


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
            return _memmap(shape, dtype, cfg.offload_dir)
        return torch.empty(shape, dtype=dtype, device=cfg.device if where == "none" else "cpu")

    return alloc


def _memmap(shape: tuple[int, ...], dtype: torch.dtype, directory: str | None) -> torch.Tensor:
    """A tensor backed by a file mapped into memory: the kernel pages it in and out, so host
    memory holds only what a batch touches. The file is unlinked at once; the mapping keeps its
    space until the tensor is freed, and nothing is left behind if the run dies."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    fd, path = tempfile.mkstemp(prefix="polyprune-activations-", suffix=".bin", dir=directory)
    os.close(fd)
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(nbytes,))
    finally:
        os.unlink(path)
    return torch.from_numpy(mm).view(dtype).view(shape)


def _outside_tensors(model: nn.Module, blocks: nn.Module) -> Iterator[tuple[dict, str]]:
    """(owner dict, key) of every materialised parameter and buffer outside ``blocks``; tensors
    still on the meta device (a streamed skeleton) are skipped."""
    inside = {id(m) for m in blocks.modules()}
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for table in (mod._parameters, mod._buffers):
            for key, t in table.items():
                if t is not None and not t.is_meta:
                    yield table, key


def _move_outside(model: nn.Module, blocks: nn.Module, device: torch.device | str) -> None:
    """Move every parameter and buffer of ``model`` except those of ``blocks`` to ``device``."""
    for table, key in list(_outside_tensors(model, blocks)):
        t = table[key]
        if isinstance(t, nn.Parameter):
            t.data = t.data.to(device)
        else:
            table[key] = t.to(device)


@torch.inference_mode()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    device: torch.device | str,
    batch_size: int,
    progress: bool = True,
    storage: torch.device | str | None = None,
    alloc: Allocator | None = None,
) -> BlockInputs:
    """Run the model's own forward over every batch of windows with each decoder block
    replaced by the identity, keeping block 0's inputs on ``storage`` (default: the device
    the model runs on), or in a buffer from ``alloc``, and every block's other arguments.

    The blocks are not computed (their weights may still be on the meta device); the model's
    forward only builds what it hands each block (masks, rotary tables), and stops at the
    last block, before the final norm and lm_head.
    """
    N = input_ids.shape[0]
    state: dict = {"hidden": None, "slice": None}
    extra: list[dict[int, tuple[tuple, dict]]] = [{} for _ in blocks]

    def record(b: int, args, kwargs):
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        if b == 0:
            if state["hidden"] is None:
                shape = (N, *x.shape[1:])
                if alloc is not None:
                    state["hidden"] = alloc(shape, x.dtype)
                else:
                    where = x.device if storage is None else storage
                    state["hidden"] = torch.empty(shape, dtype=x.dtype, device=where)
            state["hidden"][state["slice"]] = x.to(state["hidden"].device)
        rows = state["slice"].stop - state["slice"].start
        if x.shape[0] != rows:  # a forward that indexes a block's output ([0]) breaks here
            raise RuntimeError(
                f"{type(model).__name__} does not hand block {b} the previous block's output "
                f"(batch {x.shape[0]}, expected {rows}); polyprune needs transformers >= 4.56"
            )
        extra[b].setdefault(rows, (tuple(args[1:]), kwargs))
        if b == len(blocks) - 1:
            raise _StopForward

    def identity(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    home = next((model_t[k].device for model_t, k in _outside_tensors(model, blocks)), "cpu")
    handles = [
        block.register_forward_pre_hook(
            lambda m, args, kwargs, b=b: record(b, args, kwargs), with_kwargs=True
        )
        for b, block in enumerate(blocks)
    ]
    own_forward = [block.__dict__.get("forward") for block in blocks]  # e.g. accelerate's
    for block in blocks:
        block.forward = identity  # an instance attribute shadows the class's forward
    _move_outside(model, blocks, device)
    try:
        starts = range(0, N, batch_size)
        for start in tqdm(starts, desc="capture", disable=not progress, leave=False):
            state["slice"] = slice(start, min(start + batch_size, N))
            with contextlib.suppress(_StopForward):
                model(input_ids[state["slice"]].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for block, forward in zip(blocks, own_forward, strict=True):
            del block.forward
            if forward is not None:
                block.forward = forward
        _move_outside(model, blocks, home)
    return BlockInputs(state["hidden"], extra)


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def _probe_groups(
    block: nn.Module, inputs: BlockInputs, batch_size: int, device
) -> list[list[tuple[str, nn.Module]]]:
    """Linears grouped by the tensor they read, groups in the order the block calls them.

    Each input tensor is held until the probe ends, so two live tensors with the same data
    pointer, shape and strides are the same tensor.
    """
    layers = linear_layers(block)
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [
        mod.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, args[0])))
        for name, mod in layers.items()
    ]
    try:
        sl, args, kwargs = next(inputs.batches(batch_size))
        block(inputs.hidden[sl].to(device), *args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: dict[tuple, list[tuple[str, nn.Module]]] = {}
    done: set[str] = set()
    for name, x in seen:
        if name in done:
            continue
        done.add(name)
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
        groups.setdefault(key, []).append((name, layers[name]))
    missing = set(layers) - done
    if missing:
        logger.warning("Linears never called by the block are left as they are: %s", missing)
    return list(groups.values())


@torch.inference_mode()
def _collect_stats(
    block: nn.Module,
    inputs: BlockInputs,
    groups: list[list[tuple[str, nn.Module]]],
    kind: StatKind,
    cfg: EngineConfig,
    forwards: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    out: torch.Tensor | None = None,
) -> list[InputStats]:
    """One pass over all windows, accumulating the statistics of ``groups``. The pass stops
    at the last group's input, unless the block's outputs are wanted in ``out`` (dense
    propagation: the statistics and the next block's inputs from one forward)."""
    stats = []
    handles = []
    for gi, group in enumerate(groups):
        first = group[0][1]
        st = InputStats(kind, get_weight(first).shape[1], device=cfg.device)
        stats.append(st)
        last = gi == len(groups) - 1

        def hook(module, args, st=st, last=last):
            st.update(args[0])
            if last and out is None:
                raise _StopForward

        handles.append(first.register_forward_pre_hook(hook))
    try:
        with forwards():
            for sl, args, kwargs in inputs.batches(cfg.batch_size):
                with contextlib.suppress(_StopForward):
                    y = block(inputs.hidden[sl].to(cfg.device), *args, **kwargs)
                    if out is not None:
                        out[sl] = block_output(y).to(out.device)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.inference_mode()
def _run_block(
    block: nn.Module, inputs: BlockInputs, out: torch.Tensor, cfg: EngineConfig,
    forwards: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> None:  # fmt: skip
    with forwards():
        for sl, args, kwargs in inputs.batches(cfg.batch_size):
            y = block_output(block(inputs.hidden[sl].to(cfg.device), *args, **kwargs))
            out[sl] = y.to(out.device)


def _solve_group(
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
    model: nn.Module, input_ids: torch.Tensor | None, cfg: EngineConfig
) -> EngineReport:
    """Compress every Linear of every decoder block in place. ``input_ids`` (N, T) are the
    calibration windows (unused by data-free methods). Embeddings and lm_head are untouched.
    The model runs in eval mode (no dropout) and gets its train/eval mode back afterwards."""
    was_training = model.training
    model.eval()
    try:
        return compress_blocks(model, input_ids, cfg, in_memory_io(cfg.device))
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
) -> EngineReport:
    """The block loop shared by the in-memory and the streamed paths; ``io`` says where each
    block comes from and goes to. Records go to ``report`` (a new one by default), which
    ``io.release`` may read and drain (masks, quantisation grids of the block it releases)."""
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
                _solve_group([(name, mod)], None, method, cfg, f"{prefix}.{b}", report)
            io.release(b, block)
            report.block_seconds.append(time.perf_counter() - t0)
        report.seconds["solve"] = time.perf_counter() - t_start
        return report

    if input_ids is None:
        raise InputError(f"method {cfg.method} needs calibration data (--calib)")
    alloc = activation_allocator(cfg)
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
            block, f"{prefix}.{b}", inputs, out, method, cfg, report, structure, timers, io.forwards
        )
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
        probed = _probe_groups(block, inputs, cfg.batch_size, cfg.device)
        structure[type(block)] = [[name for name, _ in g] for g in probed]
    groups = [[(name, block.get_submodule(name)) for name in g] for g in structure[type(block)]]
    if cfg.propagate == "dense":  # one forward: statistics and the dense outputs
        t0 = time.perf_counter()
        stats = _collect_stats(block, inputs, groups, method.stat, cfg, forwards, out=out)
        t1 = time.perf_counter()
        for group, st in zip(groups, stats, strict=True):
            _solve_group(group, st, method, cfg, prefix, report)
        timers.statistics += t1 - t0
        timers.solve += time.perf_counter() - t1
        return
    phases = [[g] for g in groups] if cfg.true_sequential else [groups]
    for phase in phases:
        t0 = time.perf_counter()
        stats = _collect_stats(block, inputs, phase, method.stat, cfg, forwards)
        t1 = time.perf_counter()
        for group, st in zip(phase, stats, strict=True):
            _solve_group(group, st, method, cfg, prefix, report)
        del stats
        timers.statistics += t1 - t0
        timers.solve += time.perf_counter() - t1
    t0 = time.perf_counter()
    _run_block(block, inputs, out, cfg, forwards)
    timers.forward += time.perf_counter() - t0
