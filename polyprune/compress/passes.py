"""The passes of calibration windows through one decoder block: the probe that groups its
Linears by the tensor they read, the pass that accumulates their input statistics, and the pass
that produces the next block's inputs.

Every pass but the probe takes ``forwards``, a context entered around its loop over the
windows (:class:`polyprune.compress.engine.BlockIO`: the streamed path switches the allocator
there).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from torch import nn

from polyprune.compress.capture import BlockInputs, StopForward, block_output
from polyprune.compress.stats import InputStats, StatKind
from polyprune.models import get_weight, linear_layers

__all__ = ["collect_stats", "probe_groups", "run_block"]

logger = logging.getLogger(__name__)


@torch.inference_mode()
def probe_groups(
    block: nn.Module, inputs: BlockInputs, batch_size: int, device: torch.device | str
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
def collect_stats(
    block: nn.Module,
    inputs: BlockInputs,
    groups: list[list[tuple[str, nn.Module]]],
    kind: StatKind,
    batch_size: int,
    device: torch.device | str,
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
        st = InputStats(kind, get_weight(first).shape[1], device=device)
        stats.append(st)
        last = gi == len(groups) - 1

        def hook(module, args, st=st, last=last):
            st.update(args[0])
            if last and out is None:
                raise StopForward

        handles.append(first.register_forward_pre_hook(hook))
    try:
        with forwards():
            for sl, args, kwargs in inputs.batches(batch_size):
                with contextlib.suppress(StopForward):
                    y = block(inputs.hidden[sl].to(device), *args, **kwargs)
                    if out is not None:
                        out[sl] = block_output(y).to(out.device)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.inference_mode()
def run_block(
    block: nn.Module,
    inputs: BlockInputs,
    out: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    forwards: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> None:
    """Run ``block`` over every window and write its hidden states to ``out``: the next
    block's inputs."""
    with forwards():
        for sl, args, kwargs in inputs.batches(batch_size):
            y = block_output(block(inputs.hidden[sl].to(device), *args, **kwargs))
            out[sl] = y.to(out.device)
