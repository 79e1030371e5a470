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
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from polyprune.compress.gptq import gptq_quantize, rtn
from polyprune.compress.magnitude import magnitude_prune
from polyprune.compress.masks import pack_mask
from polyprune.compress.quant import QuantConfig, QuantTensors
from polyprune.compress.solver import PruneConfig, SolverResult
from polyprune.compress.sparsegpt import sparsegpt_prune
from polyprune.compress.stats import InputStats, StatKind
from polyprune.compress.wanda import wanda_prune
from polyprune.errors import InputError
from polyprune.models import find_blocks, get_weight, linear_layers, set_weight

__all__ = [
    "METHODS",
    "QUANT_METHODS",
    "check_widths",
    "EngineConfig",
    "EngineReport",
    "LayerRecord",
    "Method",
    "block_output",
    "capture_block_inputs",
    "compress_model",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """A solver as the engine calls it: ``solve(W, stats, cfg, name, segments)``.

    Linears that share an input are passed stacked (rows concatenated, ``segments`` = their row
    counts) when ``stacked``: one solve instead of several (one Cholesky factorisation for
    q/k/v); the solver keeps its per-Linear choices per segment.
    """

    name: str
    stat: StatKind | None  # statistics the solver needs; None = data-free
    solve: Callable[..., SolverResult]
    stacked: bool = False


METHODS: dict[str, Method] = {
    "magnitude": Method(
        "magnitude", None, lambda W, s, cfg, name, seg: magnitude_prune(W, cfg.prune)
    ),
    "wanda": Method(
        "wanda",
        "colsq",
        lambda W, s, cfg, name, seg: wanda_prune(W, s.column_sq_norms(), cfg.prune),
    ),
    "sparsegpt": Method(
        "sparsegpt",
        "hessian",
        lambda W, s, cfg, name, seg: sparsegpt_prune(W, s.H, cfg.prune, name, seg, cfg.quant),
        stacked=True,
    ),
    "gptq": Method(
        "gptq",
        "hessian",
        lambda W, s, cfg, name, seg: gptq_quantize(W, s.H, cfg.quant, name),
        stacked=True,
    ),  # fmt: skip
    "rtn": Method("rtn", None, lambda W, s, cfg, name, seg: rtn(W, cfg.quant)),
}
QUANT_METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class EngineConfig:
    method: str
    prune: PruneConfig = PruneConfig()
    device: str = "cpu"
    batch_size: int = 8
    true_sequential: bool = False
    keep_masks: bool = False
    progress: bool = True
    offload: str = "none"  # "cpu": calibration activations in host memory, moved per batch
    quant: QuantConfig | None = None  # gptq / rtn, or joint sparsegpt + quantisation

    def __post_init__(self) -> None:
        if self.method in QUANT_METHODS and self.quant is None:
            raise InputError(f"method {self.method} needs a quantisation config (bits)")
        if self.quant is not None and self.method not in (*QUANT_METHODS, "sparsegpt"):
            raise InputError(
                f"--bits works with sparsegpt (joint), gptq or rtn, not with {self.method}"
            )
        if self.offload not in ("none", "cpu"):
            raise InputError(f"unknown offload {self.offload!r}; allowed: none, cpu")
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; allowed: {', '.join(METHODS)}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size}")


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

    def overall_sparsity(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0


class _StopForward(Exception):
    """Raised from a hook once a forward pass has given all that is needed of it."""


@dataclass
class BlockInputs:
    hidden: torch.Tensor  # (N, T, H)
    extra: dict[int, tuple[tuple, dict]]  # batch size -> (positional args after x, kwargs)

    def batches(self, batch_size: int):
        for start in range(0, self.hidden.shape[0], batch_size):
            end = min(start + batch_size, self.hidden.shape[0])
            args, kwargs = self.extra[end - start]
            yield slice(start, end), args, kwargs


def _contains(module: nn.Module, target: nn.Module) -> bool:
    return any(m is target for m in module.modules())


def _move_outside(model: nn.Module, blocks: nn.Module, device: torch.device | str) -> None:
    """Move every parameter and buffer of ``model`` except those of ``blocks`` to ``device``."""

    def visit(mod: nn.Module) -> None:
        for child in mod.children():
            if child is blocks:
                continue
            if _contains(child, blocks):
                visit(child)
            else:
                child.to(device)
        for p in mod.parameters(recurse=False):
            p.data = p.data.to(device)
        for name, b in mod.named_buffers(recurse=False):
            mod._buffers[name] = b.to(device)

    visit(model)


@torch.inference_mode()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    device: torch.device | str,
    batch_size: int,
    progress: bool = True,
    storage: torch.device | str | None = None,
) -> BlockInputs:
    """Run the model up to block 0 on every batch of windows and keep block 0's inputs on
    ``storage`` (default: the device the model runs on)."""
    N = input_ids.shape[0]
    state: dict = {"hidden": None, "extra": {}, "slice": None}

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        if state["hidden"] is None:
            where = x.device if storage is None else storage
            state["hidden"] = torch.empty((N, *x.shape[1:]), dtype=x.dtype, device=where)
        state["hidden"][state["slice"]] = x
        bs = x.shape[0]
        if bs not in state["extra"]:
            state["extra"][bs] = (tuple(args[1:]), kwargs)
        raise _StopForward

    in_blocks = {id(p) for p in blocks.parameters()}
    home = next((p.device for p in model.parameters() if id(p) not in in_blocks), "cpu")
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    _move_outside(model, blocks, device)
    try:
        starts = range(0, N, batch_size)
        for start in tqdm(starts, desc="capture", disable=not progress, leave=False):
            state["slice"] = slice(start, min(start + batch_size, N))
            with contextlib.suppress(_StopForward):
                model(input_ids[state["slice"]].to(device), use_cache=False)
    finally:
        handle.remove()
        _move_outside(model, blocks, home)
    return BlockInputs(state["hidden"], state["extra"])


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
) -> list[InputStats]:
    """One pass over all windows, accumulating the statistics of ``groups``; the pass stops
    at the last group's input."""
    stats = []
    handles = []
    for gi, group in enumerate(groups):
        first = group[0][1]
        st = InputStats(kind, get_weight(first).shape[1], device=cfg.device)
        stats.append(st)
        last = gi == len(groups) - 1

        def hook(module, args, st=st, last=last):
            st.update(args[0])
            if last:
                raise _StopForward

        handles.append(first.register_forward_pre_hook(hook))
    try:
        for sl, args, kwargs in inputs.batches(cfg.batch_size):
            with contextlib.suppress(_StopForward):
                block(inputs.hidden[sl].to(cfg.device), *args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.inference_mode()
def _run_block(block: nn.Module, inputs: BlockInputs, out: torch.Tensor, cfg: EngineConfig):
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
            if cfg.method not in QUANT_METHODS:
                cfg.prune.pattern.check_width(cols, f"{prefix}.{b}.{name}")
            if cfg.quant is not None:
                cfg.quant.check_width(cols, f"{prefix}.{b}.{name}")


def compress_model(
    model: nn.Module, input_ids: torch.Tensor | None, cfg: EngineConfig
) -> EngineReport:
    """Compress every Linear of every decoder block in place. ``input_ids`` (N, T) are the
    calibration windows (unused by data-free methods). Embeddings and lm_head are untouched.
    The model runs in eval mode (no dropout) and gets its train/eval mode back afterwards."""
    was_training = model.training
    model.eval()
    try:
        return _compress(model, input_ids, cfg)
    finally:
        model.train(was_training)


def _compress(model: nn.Module, input_ids: torch.Tensor | None, cfg: EngineConfig) -> EngineReport:
    method = METHODS[cfg.method]
    prefix, blocks = find_blocks(model)
    check_widths(model, cfg)
    report = EngineReport()
    t_start = time.perf_counter()

    if method.stat is None:
        for b, block in enumerate(tqdm(blocks, desc=cfg.method, disable=not cfg.progress)):
            for name, mod in linear_layers(block).items():
                _solve_group([(name, mod)], None, method, cfg, f"{prefix}.{b}", report)
        report.seconds["solve"] = time.perf_counter() - t_start
        return report

    if input_ids is None:
        raise InputError(f"method {cfg.method} needs calibration data (--calib)")
    inputs = capture_block_inputs(
        model, blocks, input_ids, cfg.device, cfg.batch_size, cfg.progress
    )
    report.seconds["capture"] = time.perf_counter() - t_start
    out = torch.empty_like(inputs.hidden)
    t_stats = t_solve = t_forward = 0.0
    structure: dict[type, list[list[str]]] = {}  # blocks of one class share their grouping
    for b, block in enumerate(tqdm(blocks, desc=cfg.method, disable=not cfg.progress)):
        home = next(block.parameters()).device
        block.to(cfg.device)
        if type(block) not in structure:
            probed = _probe_groups(block, inputs, cfg.batch_size, cfg.device)
            structure[type(block)] = [[name for name, _ in g] for g in probed]
        groups = [[(name, block.get_submodule(name)) for name in g] for g in structure[type(block)]]
        phases = [[g] for g in groups] if cfg.true_sequential else [groups]
        for phase in phases:
            t0 = time.perf_counter()
            stats = _collect_stats(block, inputs, phase, method.stat, cfg)
            t1 = time.perf_counter()
            for group, st in zip(phase, stats, strict=True):
                _solve_group(group, st, method, cfg, f"{prefix}.{b}", report)
            del stats
            t_stats += t1 - t0
            t_solve += time.perf_counter() - t1
        t0 = time.perf_counter()
        _run_block(block, inputs, out, cfg)
        t_forward += time.perf_counter() - t0
        block.to(home)
        inputs.hidden, out = out, inputs.hidden
    report.seconds.update(statistics=t_stats, solve=t_solve, forward=t_forward)
    report.seconds["total"] = time.perf_counter() - t_start
    return report
