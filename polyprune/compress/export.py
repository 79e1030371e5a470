"""Write a compression run: HF model + tokenizer, ``polyprune.json``, optional masks.

Everything is written to a temporary directory beside ``out`` and renamed into place, so an
interrupted run leaves either the old output or the new one, never half of one. An existing
non-empty ``out`` is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from polyprune.compress.masks import unpack_mask
from polyprune.errors import InputError

__all__ = ["check_output_dir", "load_masks", "save_compressed", "save_masks"]

logger = logging.getLogger(__name__)
MANIFEST = "polyprune.json"
MASKS = "masks.safetensors"


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty output unless ``overwrite``; call before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"output directory {str(out)!r} exists and is not empty; use --overwrite")
    return out


def save_masks(path: Path, masks: dict[str, tuple[torch.Tensor, tuple[int, int]]]) -> None:
    """One bit-packed uint8 tensor per Linear (row-major, little bit order); shapes in the
    safetensors metadata."""
    tensors = {name: packed.contiguous() for name, (packed, _) in masks.items()}
    shapes = {name: list(shape) for name, (_, shape) in masks.items()}
    meta = {"format": "polyprune-masks-v1", "bitorder": "little", "shapes": json.dumps(shapes)}
    save_file(tensors, str(path), metadata=meta)


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Boolean masks (True = pruned) by Linear name from a ``masks.safetensors``."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
    packed = load_file(str(path))
    return {name: unpack_mask(packed[name], tuple(shape)) for name, shape in shapes.items()}


def save_compressed(
    model,
    tokenizer,
    out: str | os.PathLike,
    manifest: dict,
    masks: dict | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    out = check_output_dir(out, overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    run_dtype = next(model.parameters()).dtype
    try:
        # Saved in the checkpoint's own dtype; the model object is cast back afterwards, so
        # what the caller holds equals what is on disk.
        if dtype is not None and run_dtype != dtype:
            model.to(dtype)
        model.save_pretrained(tmp, safe_serialization=True)
        model.to(run_dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if masks:
            save_masks(tmp / MASKS, masks)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        model.to(run_dtype)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s", out)
    return out
