"""Hidden states of a dense model and compressed models on the same text, layer by layer.

The models run in lockstep, one decoder block at a time (as the compression engine does):
block l of every model reads its own block l-1 outputs, and the per-layer statistics are
accumulated from the outputs and then dropped. Memory is one layer's states per model,
whatever the depth; no layer's states are kept once its statistics are taken.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from polyprune.analysis.snr import LayerErrorStats
from polyprune.compress.engine import block_output, capture_block_inputs
from polyprune.models import find_blocks

__all__ = ["compare_hidden_states"]

logger = logging.getLogger(__name__)


@torch.inference_mode()
def compare_hidden_states(
    dense: nn.Module,
    compressed: dict[str, nn.Module],
    input_ids: torch.Tensor,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, list[LayerErrorStats]]:
    """Per compressed model, per layer: sums of ||h||^2, ||h - h'||^2 and ||h|| over all tokens
    of ``input_ids`` (N, T), h the dense block output and h' the compressed one."""
    models = {"dense": dense, **compressed}
    was_training = {k: m.training for k, m in models.items()}
    blocks = {}
    inputs = {}
    for name, model in models.items():
        model.eval()
        blocks[name] = find_blocks(model)[1]
        inputs[name] = capture_block_inputs(
            model, blocks[name], input_ids, device, batch_size, progress=False
        )
    depth = len(blocks["dense"])
    if any(len(b) != depth for b in blocks.values()):
        raise ValueError("the models have different numbers of decoder blocks")
    stats = {name: [LayerErrorStats() for _ in range(depth)] for name in compressed}
    outs = {name: torch.empty_like(inp.hidden) for name, inp in inputs.items()}
    for layer in tqdm(range(depth), desc="layers", disable=not progress):
        for name in models:
            block = blocks[name][layer]
            home = next(block.parameters()).device
            block.to(device)
            for sl, args, kwargs in inputs[name].batches(batch_size):
                y = block_output(block(inputs[name].hidden[sl].to(device), *args, **kwargs))
                outs[name][sl] = y.to(outs[name].device)
            block.to(home)
        for name in compressed:
            stats[name][layer].update(outs["dense"], outs[name])
        for name in models:  # the outputs become the next layer's inputs
            inputs[name].hidden, outs[name] = outs[name], inputs[name].hidden
    for name, model in models.items():
        model.train(was_training[name])
    return stats
