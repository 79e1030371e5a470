"""Weight files checked before they are trusted: every corrupt file, and every weight that does
not fit the model's config, is one clear :class:`InputError` naming it.

transformers, left to itself, gives a model whose checkpoint lacks weights (another
architecture's checkpoint under this config, a missing shard) freshly *random* weights with a
warning, and polyprune would then compress noise and exit 0. A damaged safetensors file or a
pickle that is no plain state dict ends in an exception that names no file. Here:

* :func:`check_weight_files` reads the header of every safetensors file of a local checkpoint
  (cheap: no tensor data) and opens every pickle with ``weights_only=True`` on the meta device;
* :func:`open_safetensors` opens one safetensors file, naming it when it is damaged;
* :func:`unfit_keys` and :func:`fit_error` tell which weights a model lacks or does not know,
  leaving out those it may lack (a tied ``lm_head``, the keys its class lists as ignorable).
"""

from __future__ import annotations

import contextlib
import json
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from polyprune.errors import InputError

__all__ = [
    "check_weight_files",
    "drop_ignorable",
    "fit_error",
    "open_safetensors",
    "tied_names",
    "unfit_keys",
    "weight_files",
]

ST_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_PREFER = "safetensors is the preferred format (no pickle)"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    text = text.splitlines()[0] if text else type(e).__name__
    return text.removeprefix("Error while deserializing header: ")


@contextlib.contextmanager
def open_safetensors(file: str | Path) -> Iterator:
    """``safe_open(file)``; a missing, truncated or garbled file (bad header length, JSON or
    offsets: safetensors checks them all when it opens the file) is an InputError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(file), "pt")
    except FileNotFoundError as e:
        raise InputError(f"{file} is missing") from e
    except (SafetensorError, OSError) as e:
        raise InputError(
            f"{file} is not a readable safetensors file ({_first_line(e)}); it is truncated or "
            "damaged: copy or download it again"
        ) from e
    with handle as f:
        yield f


def _index_files(index: Path) -> list[Path]:
    """The shard files an index's weight map names, each checked to exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise InputError(f"{index} is not a valid checkpoint index (JSON with a weight_map)") from e
    for name in files:
        if not (index.parent / name).is_file():
            raise InputError(f"{index} names shard {name}, which is missing")
    return [index.parent / name for name in files]


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of the local checkpoint ``path`` that transformers would load:
    safetensors first, then pickles; empty if it holds neither (GGUF, remote code, ...)."""
    path = Path(path)
    if (path / ST_INDEX).is_file():
        return _index_files(path / ST_INDEX)
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if (path / BIN_INDEX).is_file():
        return _index_files(path / BIN_INDEX)
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    return []


def _unreadable(file: Path, e: BaseException) -> InputError:
    return InputError(
        f"{file} is not a readable PyTorch file ({type(e).__name__}: {_first_line(e)}); it is "
        f"truncated or damaged: copy or download it again; {_PREFER}"
    )


def _check_pickle(file: Path) -> None:
    """``file`` must be a plain state dict (names -> tensors) that loads with
    ``weights_only=True``; read on the meta device (memory-mapped when it can be)."""
    import pickle

    try:
        state = torch.load(
            file, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(file)
        )
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # no class refused: garbage, truncated
            raise _unreadable(file, e) from e
        raise InputError(  # weights_only refused a class: not a plain state dict
            f"{file} is not a plain state dict: it pickles objects other than tensors, which "
            f"polyprune does not unpickle (weights_only); save the model's state_dict; {_PREFER}"
        ) from e
    except Exception as e:  # noqa: BLE001 (zip, pickle-protocol and torch errors alike)
        raise _unreadable(file, e) from e
    if not isinstance(state, Mapping):
        raise InputError(
            f"{file} holds a {type(state).__name__}, not a state dict of tensors; {_PREFER}"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InputError(
                f"{file} is not a plain state dict: {key!r} holds a {type(value).__name__}, not a "
                f"tensor (a training checkpoint?); save the model's state_dict; {_PREFER}"
            )


def check_weight_files(path: str | Path) -> list[Path]:
    """Check every weight file of the local checkpoint ``path`` before it is loaded; returns
    them."""
    files = weight_files(path)
    for file in files:
        if file.suffix == ".safetensors":
            with open_safetensors(file):
                pass
        else:
            _check_pickle(file)
    return files


def _patterns(model: nn.Module, which: str) -> re.Pattern | None:
    found = set(getattr(model, f"_keys_to_ignore_on_load_{which}", None) or ())
    if which == "unexpected":
        # Buffers older checkpoints stored and current models compute (as transformers does).
        buffers = [name for name, _ in model.named_buffers()]
        if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
            found.add(r"rotary_emb\.inv_freq")
        if any(b.endswith("position_ids") for b in buffers):
            found.add(r"(^|\.)position_ids$")
    return re.compile("|".join(f"({p})" for p in sorted(found))) if found else None


def tied_names(model: nn.Module) -> set[str]:
    """Parameters that are tied to another one (``lm_head.weight`` of tied embeddings): a
    checkpoint may leave them out."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:  # older transformers
        tied = getattr(model, "_tied_weights_keys", None) or {}
        config = getattr(model, "config", None)
        if not getattr(config, "tie_word_embeddings", True):
            tied = {}
    return set(tied)


def drop_ignorable(
    model: nn.Module, missing: Iterable[str], unexpected: Iterable[str]
) -> tuple[list[str], list[str]]:
    """``missing`` and ``unexpected`` weight names less those ``model`` may lack (tied ones,
    its class's ignore patterns) or may find and drop (buffers older checkpoints stored)."""
    missing, unexpected = set(missing) - tied_names(model), set(unexpected)
    for which, keys in (("missing", missing), ("unexpected", unexpected)):
        pattern = _patterns(model, which)
        if pattern is not None:
            keys -= {k for k in keys if pattern.search(k)}
    return sorted(missing), sorted(unexpected)


def unfit_keys(
    model: nn.Module, expected: Iterable[str], found: Iterable[str]
) -> tuple[list[str], list[str]]:
    """(missing, unexpected): the names in ``expected`` (the model's state dict) absent from
    ``found`` (the checkpoint's) and the reverse, less the ignorable ones."""
    expected, found = set(expected), set(found)
    return drop_ignorable(model, expected - found, found - expected)


def _some(keys: list[str]) -> str:
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ", ".join(keys[:3]) + more


def fit_error(
    what: str, model: nn.Module, missing: list[str], unexpected: list[str],
    mismatched: list[str] = (),  # type: ignore[assignment]
) -> InputError | None:  # fmt: skip
    """The error for a checkpoint whose weights do not fit ``model``, or None if they do."""
    if not (missing or unexpected or mismatched):
        return None
    parts = []
    if missing:
        parts.append(f"missing {_some(missing)}")
    if unexpected:
        parts.append(f"unexpected {_some(unexpected)}")
    if mismatched:
        parts.append(f"other shapes for {_some(mismatched)}")
    arch = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    return InputError(
        f"{what} does not fit its config ({arch}): {'; '.join(parts)}; the weights are of "
        "another model, or incomplete"
    )
