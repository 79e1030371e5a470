"""Hidden states of a dense model and compressed models on the same text, layer by layer.

The models run in lockstep, one decoder block at a time (as the compression engine does):
block l of every model reads its own block l-1 outputs, and the per-layer statistics are
accumulated from the outputs and then dropped. Memory is one layer's states per model,
whatever the depth; no layer's states are kept once its statistics are taken.

The windows can be split into *segments* (one per language): a batch never spans two
segments, so hooks that count per language (LAPE) can be told the language of each batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from polyprune.analysis.snr import ErrorSums, LayerErrorStats
from polyprune.compress.engine import BlockInputs, block_output, capture_block_inputs
from polyprune.models import find_blocks

__all__ = ["compare_hidden_states", "lockstep_block_outputs"]

logger = logging.getLogger(__name__)


def _batch_plan(segments: list[slice], batch_size: int) -> list[tuple[int, slice]]:
    """(segment index, rows) for every batch; batches stay inside their segment."""
    plan = []
    for i, seg in enumerate(segments):
        for start in range(seg.start, seg.stop, batch_size):
            plan.append((i, slice(start, min(start + batch_size, seg.stop))))
    return plan


def _capture(
    model: nn.Module, blocks, input_ids: torch.Tensor, segments: list[slice], device, batch_size
) -> BlockInputs:
    """Block-0 inputs of every window, captured segment by segment so that every block's
    other arguments exist for every batch size the plan uses."""
    parts = [
        capture_block_inputs(model, blocks, input_ids[seg], device, batch_size, progress=False)
        for seg in segments
    ]
    extra = [{} for _ in blocks]
    for p in parts:
        for mine, theirs in zip(extra, p.extra, strict=True):
            mine.update(theirs)
    return BlockInputs(torch.cat([p.hidden for p in parts]), extra)


@torch.inference_mode()
def lockstep_block_outputs(
    models: dict[str, nn.Module],
    input_ids: torch.Tensor,
    segments: list[slice] | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    on_batch: Callable[[str, int, slice], None] | None = None,
    progress: bool = True,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(layer, {model name: block output (N, T, d)})`` for every decoder block.

    ``on_batch(model name, segment index, rows)`` is called before each batch runs through a
    block (``rows``: the batch's rows of ``input_ids``);
    the yielded tensors are overwritten on the next step (copy what must be kept).
    """
    segments = segments or [slice(0, input_ids.shape[0])]
    if segments[0].start != 0 or segments[-1].stop != input_ids.shape[0]:
        raise ValueError("the segments must cover the windows in order")
    plan = _batch_plan(segments, batch_size)
    was_training = {k: m.training for k, m in models.items()}
    blocks, inputs = {}, {}
    for name, model in models.items():
        model.eval()
        blocks[name] = find_blocks(model)[1]
        inputs[name] = _capture(model, blocks[name], input_ids, segments, device, batch_size)
    depths = {len(b) for b in blocks.values()}
    if len(depths) != 1:
        raise ValueError("the models have different numbers of decoder blocks")
    outs = {name: torch.empty_like(inp.hidden) for name, inp in inputs.items()}
    try:
        for layer in tqdm(range(depths.pop()), desc="layers", disable=not progress):
            for name in models:
                block = blocks[name][layer]
                home = next(block.parameters()).device
                block.to(device)
                inp = inputs[name]
                for seg, rows in plan:
                    if on_batch is not None:
                        on_batch(name, seg, rows)
                    args, kwargs = inp.extra[layer][rows.stop - rows.start]
                    y = block_output(block(inp.hidden[rows].to(device), *args, **kwargs))
                    outs[name][rows] = y.to(outs[name].device)
                block.to(home)
            yield layer, outs
            for name in models:  # the outputs become the next layer's inputs
                inputs[name].hidden, outs[name] = outs[name], inputs[name].hidden
    finally:
        for name, model in models.items():
            model.train(was_training[name])


def compare_hidden_states(
    dense: nn.Module,
    compressed: dict[str, nn.Module],
    input_ids: torch.Tensor,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = True,
    keep: torch.Tensor | None = None,
) -> dict[str, list[LayerErrorStats]]:
    """Per compressed model, per layer: sums of ||h||^2, ||h - h'||^2 and ||h|| over all tokens
    of ``input_ids`` (N, T), or those where the bool ``keep`` (N, T) is set, h the dense block
    output and h' the compressed one."""
    if "dense" in compressed:
        raise ValueError("'dense' is reserved for the dense model")
    sums = ErrorSums(list(compressed), [slice(None)], keep)  # the accumulator of analyze's SNR
    models = {"dense": dense, **compressed}
    for _, outs in lockstep_block_outputs(
        models, input_ids, batch_size=batch_size, device=device, progress=progress
    ):
        sums.on_layer(outs)
    return {name: per_seg[0] for name, per_seg in sums.state().items()}
