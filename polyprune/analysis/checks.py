"""Checks that ``analyze``'s inputs belong together, made before any weights load.

A compressed run compared against another dense model than its own gives numbers (SNR near
0 dB, say) that look like results; so every run must be of the dense model's architecture and
sizes, and its manifest must not name another source model. Saved masks must cover exactly
the model's Linears, with their shapes.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from torch import nn

from polyprune.errors import InputError

__all__ = ["check_masks", "check_runs_match", "same_source"]

logger = logging.getLogger(__name__)

_SIZES = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_CLASS_NAME = re.compile(r"^[A-Z]\w*For\w+$")  # what the API records for an unnamed model


def _same_files(a: Path, b: Path) -> bool:
    """Whether two checkpoint directories hold the same weights (a copy): the same weight
    files with the same sizes and the same bytes at 16 places in each (cheap)."""
    from polyprune.weights import weight_files

    fa, fb = weight_files(a), weight_files(b)
    if not fa or [f.name for f in fa] != [f.name for f in fb]:
        return False
    for x, y in zip(fa, fb, strict=True):
        size = x.stat().st_size
        if size != y.stat().st_size:
            return False
        with open(x, "rb") as hx, open(y, "rb") as hy:
            for i in range(16):
                hx.seek(size * i // 16)
                hy.seek(size * i // 16)
                if hx.read(4096) != hy.read(4096):
                    return False
    return True


def same_source(recorded: str, dense: str, dense_path: str, config) -> bool | None:
    """Whether the model a run's manifest names (``recorded``) is the dense model (given as
    ``dense``, resolved to ``dense_path``): True, False, or None where it cannot be told
    (a hub id against a local copy of another name, a directory that is gone)."""
    if not recorded or recorded in (dense, dense_path):
        return True
    here, there = os.path.isdir(recorded), os.path.isdir(dense_path)
    if here and there:
        same = os.path.realpath(recorded) == os.path.realpath(dense_path)
        return same or _same_files(Path(recorded), Path(dense_path))
    if _CLASS_NAME.match(recorded) and not here:  # the API with an unnamed model object
        archs = getattr(config, "architectures", None) or []
        return recorded in archs if archs else None
    if not here and not there and _HUB_ID.match(recorded) and _HUB_ID.match(dense_path):
        return recorded.lower() == dense_path.lower()
    # A hub id and a directory: the directory may be that model's snapshot or a download.
    hub, local = (recorded, dense_path) if there else (dense_path, recorded)
    if _HUB_ID.match(hub):
        org, name = hub.split("/")
        parts = [p.lower() for p in Path(os.path.realpath(local)).parts]
        if f"models--{org}--{name}".lower() in parts or name.lower() in parts:
            return True
    return None


def check_runs_match(dense: str, config, runs) -> None:
    """Every run (``Run`` of ``describe_runs``) is of the dense model's architecture and
    sizes and made from it, as far as its manifest tells, and every local weight file is
    readable (headers only); otherwise an InputError."""
    from polyprune.models import load_config, resolve_model_path
    from polyprune.weights import check_weight_files

    dense_path = resolve_model_path(dense)
    if os.path.isdir(dense_path):
        check_weight_files(dense_path)
    for r in runs:
        rc = load_config(str(r.path))
        where = f"run {str(r.path)!r}"
        for key in ("model_type", "architectures"):
            a, b = getattr(config, key, None), getattr(rc, key, None)
            if a and b and a != b:
                a, b = (", ".join(v) if isinstance(v, list) else v for v in (a, b))
                raise InputError(f"{where} is a {b} model ({key}), the dense model {a}")
        for key in _SIZES:
            a, b = getattr(config, key, None), getattr(rc, key, None)
            if a != b:
                raise InputError(f"{where} has {key} {b}, the dense model {a}")
        recorded = str(r.manifest.model or "")
        same = same_source(recorded, dense, dense_path, config)
        if same is False:
            raise InputError(
                f"{where} was made from {recorded}, not from the dense model {dense_path}"
            )
        if same is None:
            logger.warning("%s was made from %s; cannot tell whether that is %s",
                           where, recorded, dense_path)  # fmt: skip
        check_weight_files(r.path)


def check_masks(runs, skeleton: nn.Module, masks_name: str) -> None:
    """Every run's saved masks name exactly the model's block Linears, with their shapes
    (``skeleton``: the model on the meta device); otherwise an InputError naming the file and
    its first bad entry."""
    from polyprune.compress.export import read_mask_shapes
    from polyprune.models import find_blocks, get_weight, linear_layers

    prefix, blocks = find_blocks(skeleton)
    want = {
        f"{prefix}.{b}.{name}": tuple(get_weight(mod).shape)
        for b, block in enumerate(blocks)
        for name, mod in linear_layers(block).items()
    }
    for r in runs:
        if not r.has_masks:
            continue
        path = r.path / masks_name
        shapes = read_mask_shapes(path)
        for name in sorted(set(shapes) | set(want)):
            if name not in want:
                raise InputError(f"{path}: {name} is not a Linear of the dense model")
            if name not in shapes:
                raise InputError(f"{path}: no mask for {name}")
            if shapes[name] != want[name]:
                raise InputError(
                    f"{path}: the mask of {name} is {shapes[name][0]} x {shapes[name][1]}, the "
                    f"Linear {want[name][0]} x {want[name][1]}"
                )
