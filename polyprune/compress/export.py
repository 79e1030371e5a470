"""The one writer of a compression run, for the in-memory and the streamed paths alike.

:class:`CheckpointWriter` writes an output directory: the weights (dense, or GPTQ-packed) in
safetensors shards one tensor at a time (:class:`~polyprune.compress.shards.ShardWriter`), the
masks, ``config.json`` (and GPTQ's ``quantize_config.json``), the generation config, the
tokenizer and ``polyprune.json``. A model in memory is written Linear by Linear
(:func:`write_model`); a streamed checkpoint block by block as the engine releases each block
(``polyprune.compress.stream``). Both go through :meth:`CheckpointWriter.add_module`, so the
two paths write the same tensors bit for bit.

One GPTQ format rule (:func:`gptq_checkpoint_format`): symmetric grids as ``gptq`` (v1),
asymmetric grids always as ``gptq_v2``. v1 stores zero - 1 and cannot hold a zero point of 0;
and GPTQModel reads asymmetric v1 only from checkpoints it made itself.

The caller writes into a staged directory (:func:`polyprune.outputs.staged_output`)
renamed into place when complete, so an interrupted run leaves the old output or the new one,
never half of one.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from polyprune.compress.manifest import MANIFEST, MASKS
from polyprune.compress.masks import unpack_mask
from polyprune.compress.quant import QuantConfig, QuantTensors, to_int
from polyprune.compress.shards import ShardWriter
from polyprune.errors import InputError
from polyprune.gptq_format import gptq_quantization_config, pack_cols, pack_rows

__all__ = [
    "FORMATS",
    "MANIFEST",
    "MASKS",
    "CheckpointWriter",
    "gptq_checkpoint_format",
    "load_masks",
    "masks_metadata",
    "output_dtype",
    "pack_linear",
    "read_mask_shapes",
    "write_model",
]

logger = logging.getLogger(__name__)
FORMATS = ("dense", "gptq")


def masks_metadata(shapes: dict[str, list[int]]) -> dict[str, str]:
    return {"format": "polyprune-masks-v1", "bitorder": "little", "shapes": json.dumps(shapes)}


def read_mask_shapes(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """The shape of each Linear's mask in a ``masks.safetensors``, every entry checked against
    its packed tensor (headers only, no mask is read); a damaged or foreign file is an
    InputError naming the file and its first bad entry."""
    from polyprune.weights import open_safetensors

    with open_safetensors(path) as f:
        meta = f.metadata() or {}
        if meta.get("format") != "polyprune-masks-v1":
            raise InputError(f"{path} is not a polyprune masks file (no polyprune-masks-v1 tag)")
        try:
            shapes = json.loads(meta.get("shapes", ""))
            if not isinstance(shapes, dict):
                raise TypeError
        except (json.JSONDecodeError, TypeError) as e:
            raise InputError(f"{path}: the masks' shapes are not a JSON object") from e
        keys = set(f.keys())
        out = {}
        for name in sorted(keys | set(shapes)):
            shape = shapes.get(name)
            if name not in keys:
                raise InputError(f"{path}: no mask tensor for {name}")
            if not (isinstance(shape, list) and len(shape) == 2
                    and all(isinstance(n, int) and n > 0 for n in shape)):  # fmt: skip
                raise InputError(f"{path}: mask {name} has no valid shape ({shape!r})")
            packed = f.get_slice(name)
            if packed.get_dtype() != "U8" or packed.get_shape() != [-(-shape[0] * shape[1] // 8)]:
                raise InputError(
                    f"{path}: mask {name} holds {packed.get_dtype()} {packed.get_shape()}, not "
                    f"the packed bits of a {shape[0]} x {shape[1]} mask"
                )
            out[name] = (shape[0], shape[1])
    return out


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Boolean masks (True = pruned) by Linear name from a ``masks.safetensors``."""
    from polyprune.weights import open_safetensors

    shapes = read_mask_shapes(path)
    with open_safetensors(path) as f:
        return {name: unpack_mask(f.get_tensor(name), shape) for name, shape in shapes.items()}


def gptq_checkpoint_format(quant: QuantConfig) -> str:
    """The checkpoint format of packed grids: ``gptq`` (v1) for symmetric grids, ``gptq_v2``
    for asymmetric ones, whatever their zero points (the same for every run, streamed or not,
    and the format every reader takes asymmetric grids in)."""
    return "gptq" if quant.sym else "gptq_v2"


def pack_linear(
    weight: torch.Tensor, qt: QuantTensors, bias: torch.Tensor | None, v2: bool
) -> dict[str, torch.Tensor]:
    """GPTQ tensors of one Linear from its dequantised weight (N, K) and grids."""
    q = to_int(weight, qt)  # (N, K)
    zeros = torch.round(qt.zeros).to(torch.int32)  # (G, N)
    out = {
        "qweight": pack_rows(q.t().contiguous(), qt.bits),
        "qzeros": pack_cols(zeros if v2 else zeros - 1, qt.bits),
        "scales": qt.scales.to(torch.float16).clone(),
        "g_idx": qt.g_idx.to(torch.int32).clone(),  # stacked Linears share one g_idx
    }
    if bias is not None:
        out["bias"] = bias.detach().to(torch.float16)
    return out


def output_dtype(
    format: str, quant: QuantConfig | None, source: torch.dtype | None, run: torch.dtype
) -> torch.dtype:
    """The dtype of the written weights (outside packed Linears): dequantised weights are
    exact in fp32 only (fp16 scale x integer); otherwise the source checkpoint's dtype, or,
    unknown, fp16 beside GPTQ-packed Linears and the run's dtype for dense weights."""
    if quant is not None and format == "dense":
        return torch.float32
    return source or (torch.float16 if format == "gptq" else run)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


class CheckpointWriter:
    """An output directory being written: weights (``format`` dense or gptq) in ``dtype``,
    shards of at most ``max_shard_bytes``, and with ``save_masks`` the masks.

    Use :meth:`add` for tensors outside the compressed Linears' modules, :meth:`add_module`
    for a module whose Linears may carry grids and masks, then :meth:`finish` (or
    :meth:`abort` on failure)."""

    def __init__(
        self,
        directory: Path,
        format: str,
        dtype: torch.dtype,
        quant: QuantConfig | None = None,
        max_shard_bytes: int | None = None,
        save_masks: bool = False,
    ):
        if format not in FORMATS:
            raise InputError(f"unknown format {format!r}; allowed: {', '.join(FORMATS)}")
        self.directory, self.format, self.dtype, self.quant = Path(directory), format, dtype, quant
        self.gptq = format == "gptq"
        self.v2 = self.gptq and gptq_checkpoint_format(quant) == "gptq_v2"
        self.weights = ShardWriter(self.directory, "model", max_shard_bytes)
        self.masks = None
        if save_masks:  # one file: readers open masks.safetensors by name
            self.masks = ShardWriter(self.directory, Path(MASKS).stem, None, header_bytes=1 << 23)
        self.mask_shapes: dict[str, list[int]] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        self.weights.add(name, _cast(t, self.dtype))

    def add_module(
        self,
        prefix: str,
        module: nn.Module,
        grids: dict[str, QuantTensors],
        masks: dict[str, tuple[torch.Tensor, tuple[int, int]]],
    ) -> None:
        """The tensors of ``module`` (named ``prefix``): the Linears in ``grids`` (full names)
        packed as qweight / qzeros / scales / g_idx / bias when the format is gptq, everything
        else in the output dtype; then the ``masks`` (full names) of its Linears."""
        from polyprune.models import get_weight

        packed = sorted(grids) if self.gptq else []
        for name, t in module.state_dict().items():
            full = f"{prefix}.{name}" if prefix else name
            if full.rsplit(".", 1)[0] not in grids or not self.gptq:
                self.add(full, t)
        for full in packed:
            mod = module.get_submodule(full.removeprefix(f"{prefix}.") if prefix else full)
            bias = getattr(mod, "bias", None)
            tensors = pack_linear(get_weight(mod).cpu(), grids[full], bias, self.v2)
            for k, v in tensors.items():
                self.weights.add(f"{full}.{k}", v)
        if self.masks is not None:
            for full, (bits, shape) in masks.items():
                self.masks.add(full, bits)
                self.mask_shapes[full] = list(shape)

    def finish(self, config, generation=None, version: str = "") -> str | None:
        """Close the shards and write the config (with ``quantization_config`` for gptq) and
        ``generation`` (a generation_config.json to copy, or a GenerationConfig). Returns the
        GPTQ checkpoint format (None for dense weights)."""
        self.weights.finish()
        if self.masks is not None:
            self.masks.metadata = masks_metadata(self.mask_shapes)
            self.masks.finish()
        if isinstance(generation, (str, os.PathLike)):
            shutil.copy(generation, self.directory / Path(generation).name)
        elif generation is not None:
            generation.save_pretrained(self.directory)
        if self.gptq:
            qc = gptq_quantization_config(self.quant, self.v2, version)
            config = dict(config.to_dict(), quantization_config=qc,
                          dtype=str(self.dtype).removeprefix("torch."))  # fmt: skip
            config.pop("torch_dtype", None)
            (self.directory / "config.json").write_text(json.dumps(config, indent=2, default=str)
                                                        + "\n")  # fmt: skip
            (self.directory / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n")
            return qc["checkpoint_format"]
        config.dtype = self.dtype
        config.save_pretrained(self.directory)
        return None

    def abort(self) -> None:
        self.weights.abort()
        if self.masks is not None:
            self.masks.abort()


def write_model(
    model: nn.Module, writer: CheckpointWriter, grids: dict, masks: dict, version: str = ""
) -> str | None:
    """Write a model held in memory (the model is not changed). A tied weight (lm_head of
    tied embeddings) is written once, under its first name, as ``save_pretrained`` does."""
    from polyprune.models import find_blocks

    prefix, blocks = find_blocks(model)
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    seen: set[int] = set()
    try:
        for name, t in model.state_dict(keep_vars=True).items():
            if id(t) in inside or id(t) in seen:
                continue  # in a block (below); or a tied duplicate
            seen.add(id(t))
            writer.add(name, t.detach())
        for b, block in enumerate(blocks):
            where = f"{prefix}.{b}."
            mine = lambda d, where=where: {k: v for k, v in d.items() if k.startswith(where)}
            writer.add_module(where[:-1], block, mine(grids), mine(masks))
        config = copy.deepcopy(model.config)  # the caller's model keeps its own
        config.architectures = [type(model).__name__]
        generation = getattr(model, "generation_config", None) if model.can_generate() else None
        return writer.finish(config, generation, version)
    except BaseException:
        writer.abort()
        raise
