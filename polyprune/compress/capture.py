"""Capture of what each decoder block is called with, and where those activations live.

The model's own forward runs over every batch of calibration windows with each decoder block
replaced by the identity: a forward pre-hook on each block keeps its arguments other than the
hidden states (attention mask, positions, rotary embeddings) and block 0 also its hidden
states, and the forward stops at the last block. The windows are unpadded and all ``seqlen``
long, so those other arguments depend only on the batch size and are kept once per batch size.

Used by the compression engine (:mod:`polyprune.compress.engine`) and by the hidden-state
analyses (:mod:`polyprune.analysis.hidden`), so both see the blocks' inputs the same way.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "Allocator",
    "BlockInputs",
    "StopForward",
    "batch_slices",
    "block_output",
    "capture_block_inputs",
    "memmap_tensor",
    "move_outside",
    "outside_tensors",
]


class StopForward(Exception):
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
    segments: tuple[int, ...] | None = None  # consecutive parts no batch straddles

    def batches(self, batch_size: int):
        extra = self.extra[self.block]
        for sl in batch_slices(self.hidden.shape[0], batch_size, self.segments):
            args, kwargs = extra[sl.stop - sl.start]
            yield sl, args, kwargs


def batch_slices(n: int, batch_size: int, segments: tuple[int, ...] | None = None) -> list[slice]:
    """Batches of ``batch_size`` rows of ``n``, each segment (consecutive parts of the given
    sizes; default one) cut from its own first row, so no batch straddles two segments: a
    segment then gets exactly the batches a run over it alone would (sweeps over language
    pools rely on it for bit-identical statistics)."""
    segments = (n,) if segments is None else segments
    if sum(segments) != n or any(s < 1 for s in segments):
        raise ValueError(f"segments {segments} do not partition {n} rows")
    out, start = [], 0
    for size in segments:
        end = start + size
        out.extend(slice(a, min(a + batch_size, end)) for a in range(start, end, batch_size))
        start = end
    return out


# Allocates a buffer of the given shape and dtype (the engine's activation buffers)
Allocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def memmap_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, directory: str | None
) -> torch.Tensor:
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


def outside_tensors(model: nn.Module, blocks: nn.Module) -> Iterator[tuple[dict, str]]:
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


def move_outside(model: nn.Module, blocks: nn.Module, device: torch.device | str) -> None:
    """Move every parameter and buffer of ``model`` except those of ``blocks`` to ``device``."""
    for table, key in list(outside_tensors(model, blocks)):
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
    segments: tuple[int, ...] | None = None,
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
            raise StopForward

    def identity(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    home = next((model_t[k].device for model_t, k in outside_tensors(model, blocks)), "cpu")
    handles = [
        block.register_forward_pre_hook(
            lambda m, args, kwargs, b=b: record(b, args, kwargs), with_kwargs=True
        )
        for b, block in enumerate(blocks)
    ]
    own_forward = [block.__dict__.get("forward") for block in blocks]  # e.g. accelerate's
    for block in blocks:
        block.forward = identity  # an instance attribute shadows the class's forward
    move_outside(model, blocks, device)
    try:
        slices = batch_slices(N, batch_size, segments)
        for sl in tqdm(slices, desc="capture", disable=not progress, leave=False):
            state["slice"] = sl
            with contextlib.suppress(StopForward):
                model(input_ids[state["slice"]].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for block, forward in zip(blocks, own_forward, strict=True):
            del block.forward
            if forward is not None:
                block.forward = forward
        move_outside(model, blocks, home)
    return BlockInputs(state["hidden"], extra, segments=segments)


def block_output(out) -> torch.Tensor:
    """A block's hidden states, whether it returns them alone or first in a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out
