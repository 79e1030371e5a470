"""Write a compression run: HF model + tokenizer, ``polyprune.json``, optional masks.

Everything is written to a temporary directory beside ``out`` and renamed into place, so an
interrupted run leaves either the old output or the new one, never half of one. An existing
non-empty ``out`` is refused unless ``overwrite``. The staging, the lock and the checks live in
:mod:`polyprune.compress.outputs`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from polyprune.compress.manifest import MANIFEST, MASKS, RunManifest
from polyprune.compress.masks import unpack_mask
from polyprune.compress.outputs import (
    check_not_source,
    check_output_dir,
    check_output_file,
    check_writable,
    output_lock,
    staged_output,
    write_file_atomic,
)
from polyprune.errors import InputError

__all__ = [
    "FORMATS",
    "MANIFEST",
    "MASKS",
    "check_not_source",
    "check_output_dir",
    "check_output_file",
    "check_writable",
    "gptq_config_files",
    "load_masks",
    "masks_metadata",
    "output_lock",
    "read_mask_shapes",
    "save_compressed",
    "save_masks",
    "staged_output",
    "write_file_atomic",
]

logger = logging.getLogger(__name__)
FORMATS = ("dense", "gptq")


def masks_metadata(shapes: dict[str, list[int]]) -> dict[str, str]:
    return {"format": "polyprune-masks-v1", "bitorder": "little", "shapes": json.dumps(shapes)}


def save_masks(path: Path, masks: dict[str, tuple[torch.Tensor, tuple[int, int]]]) -> None:
    """One bit-packed uint8 tensor per Linear (row-major, little bit order); shapes in the
    safetensors metadata."""
    tensors = {name: packed.contiguous() for name, (packed, _) in masks.items()}
    shapes = {name: list(shape) for name, (_, shape) in masks.items()}
    save_file(tensors, str(path), metadata=masks_metadata(shapes))


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


def save_gptq(model, path: Path, quant: dict, quant_cfg, version: str, dtype) -> str:
    """The packed GPTQ checkpoint of ``model`` in ``path``: Linears with grids in ``quant`` as
    qweight/qzeros/scales/g_idx, everything else in ``dtype`` (the source checkpoint's, fp16
    if unknown). Returns the checkpoint format."""
    dtype = dtype or torch.float16
    from polyprune.compress.gptq_format import pack_linear
    from polyprune.models import get_weight

    v2 = any((qt.zeros == 0).any() for qt in quant.values())
    if v2:
        logger.warning(
            "some asymmetric zero points are 0, which checkpoint format 'gptq' (v1) cannot "
            "hold; writing 'gptq_v2' (read by GPTQModel, vLLM and transformers)"
        )
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    packed_prefixes = set(quant)
    for name, t in model.state_dict().items():
        prefix = name.rsplit(".", 1)[0]
        if prefix in packed_prefixes or t.data_ptr() in seen:
            continue  # packed below; or a tied duplicate (lm_head of tied embeddings)
        seen.add(t.data_ptr())
        tensors[name] = t.detach().to(dtype if t.is_floating_point() else t.dtype)
    for name, qt in quant.items():
        mod = model.get_submodule(name)
        packed = pack_linear(get_weight(mod).cpu(), qt, getattr(mod, "bias", None), v2)
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in packed.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    return gptq_config_files(model.config.to_dict(), path, quant_cfg, v2, version, dtype)


def gptq_config_files(config: dict, path: Path, quant_cfg, v2: bool, version: str, dtype) -> str:
    """config.json with its ``quantization_config``, and quantize_config.json; returns the
    checkpoint format."""
    from polyprune.compress.gptq_format import gptq_quantization_config

    qc = gptq_quantization_config(quant_cfg, v2, version)
    config = dict(config, quantization_config=qc, dtype=str(dtype).removeprefix("torch."))
    config.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    (path / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n")
    return qc["checkpoint_format"]


def save_compressed(
    model,
    tokenizer,
    out: str | os.PathLike,
    manifest: RunManifest,
    masks: dict | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    format: str = "dense",
    quant: dict | None = None,
    quant_cfg=None,
) -> Path:
    run_dtype = next(model.parameters()).dtype
    # Buffers (e.g. rotary inv_freq) are not saved but are cast with the model: a round trip
    # through bf16 would change the model's outputs (perplexity by 1e-4 on the demo model).
    buffers = {name: b.clone() for name, b in model.named_buffers() if b.is_floating_point()}
    try:
        with staged_output(out, overwrite) as tmp:
            # Saved in the checkpoint's own dtype; the model object is cast back afterwards,
            # so what the caller holds equals what is on disk.
            if format == "gptq":
                fmt = save_gptq(model, tmp, quant, quant_cfg, manifest.version, dtype)
                manifest.quantization.checkpoint_format = fmt
            else:
                if quant:  # dequantised weights are exact in fp32 only (fp16 scale x integer)
                    dtype = torch.float32
                if dtype is not None and run_dtype != dtype:
                    model.to(dtype)
                model.save_pretrained(tmp, safe_serialization=True)
                model.to(run_dtype)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if masks:
                save_masks(tmp / MASKS, masks)
            manifest.write(tmp)
    finally:
        model.to(run_dtype)
        _restore_buffers(model, buffers)
    return Path(out).resolve()


def _restore_buffers(model, buffers: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
