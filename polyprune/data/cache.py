"""Tokenised calibration windows cached on disk, keyed by a hash of everything they depend on.

The cache lives in ``$POLYPRUNE_CACHE`` (default ``~/.cache/polyprune``). Files are written to
a temporary name and renamed, so an interrupted run never leaves a truncated entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from polyprune.outputs import write_file_atomic

__all__ = ["cache_dir", "cache_path", "load_cached", "save_cached", "tokenizer_fingerprint"]

logger = logging.getLogger(__name__)
_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("POLYPRUNE_CACHE", Path.home() / ".cache" / "polyprune"))


def cache_path(kind: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps({"v": _VERSION, **key}, sort_keys=True).encode())
    return cache_dir() / kind / f"{digest.hexdigest()[:24]}.pt"


def load_cached(path: Path) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a corrupt entry is recomputed, not fatal
        logger.warning("ignoring unreadable cache entry %s (%s)", path, e)
        return None


def save_cached(path: Path, tensor: torch.Tensor) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, lambda tmp: torch.save(tensor, tmp))
    except OSError as e:  # a read-only home must not stop a run
        logger.warning("could not cache calibration windows at %s (%s)", path, e)


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes when the tokenizer's vocabulary or rules change."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = json.dumps(
            [getattr(tokenizer, "name_or_path", ""), len(tokenizer), type(tokenizer).__name__]
        )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
