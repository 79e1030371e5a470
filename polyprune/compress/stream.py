"""Compress a checkpoint block by block from its safetensors shards: memory flat in depth.

The model is built as a skeleton whose parameters live on the meta device (shapes, no memory).
The modules before block 0 (embeddings; rotary tables are buffers computed at construction)
are read from the checkpoint when the capture forward first calls them and freed afterwards;
``lm_head`` and the final norm are never materialised. Each decoder block is then read from
the shards that hold it, compressed by the engine (:func:`polyprune.compress.engine.
compress_blocks`, the same code as for a model in memory), written to the output shards and
set back to meta. Peak host memory is one block, the calibration activations (unless
offloaded to disk) and the statistics of one block's Linear groups, whatever the depth.

Each block is written as it is released, by the same writer as a model in memory
(:class:`polyprune.compress.export.CheckpointWriter`): safetensors shards written one tensor at
a time, so no shard is held in memory either.

Freeing a block is not enough by itself on glibc: its tensors (and SparseGPT's d x d factors)
are mostly below glibc's mmap threshold, so they come from the heap, and the freed heap is
kept by the process, fragmented, growing with every block (62 MiB per block for SparseGPT at
hidden 2048). :func:`lean_malloc` therefore sends allocations of 4 MiB and more to their own
mappings (returned to the system when freed) and trims the heap after each block. Not during
the forward passes, though: there every large temporary (a batch's activations, its MLP
intermediate) would be a fresh mapping, zeroed page by page on first touch, and on Gemma 3 270M
that made the forwards 1.45x slower (21 s -> 30 s a pass over 32 x 512 tokens, bf16, CPU). The
forward passes free all their temporaries before they end, so there they come from the heap
(glibc's largest dynamic threshold, 32 MiB) and the trim after the block returns them.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from polyprune.compress.engine import BlockIO, EngineConfig, EngineReport, compress_blocks
from polyprune.compress.export import CheckpointWriter
from polyprune.compress.shards import INDEX, ST_DTYPES
from polyprune.errors import InputError, shorten
from polyprune.models import find_blocks
from polyprune.weights import drop_ignorable, fit_error, open_safetensors, unfit_keys, weight_files

__all__ = [
    "Checkpoint",
    "StreamResult",
    "StreamedModel",
    "compress_checkpoint",
    "empty_model",
    "has_safetensors",
    "LeanMalloc",
    "lean_malloc",
    "local_checkpoint",
    "parse_size",
]

logger = logging.getLogger(__name__)

_MAX_SIZE = 2**63  # sizes are written to the index as JSON integers: int64 for most readers


_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
_MMAP_THRESHOLD = 4 << 20
_FORWARD_MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


@dataclass
class LeanMalloc:
    """What :func:`lean_malloc` sets up: ``trim()`` gives the freed heap back to the system;
    ``forwards()`` is a context in which large temporaries come from the heap again."""

    trim: Callable[[], None]
    forwards: Callable[[], contextlib.AbstractContextManager]


def lean_malloc() -> LeanMalloc:
    """On glibc: serve allocations of 4 MiB and more from their own mappings from now on
    (unless the user set ``MALLOC_MMAP_THRESHOLD_``), except inside ``forwards()``; ``trim``
    gives the freed heap back to the system (``malloc_trim``). Elsewhere both do nothing."""
    idle = LeanMalloc(lambda: None, contextlib.nullcontext)
    if not sys.platform.startswith("linux"):
        return idle
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim, mallopt = libc.malloc_trim, libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return idle
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return LeanMalloc(lambda: trim(0), contextlib.nullcontext)
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)

    @contextlib.contextmanager
    def forwards() -> Iterator[None]:
        mallopt(_M_MMAP_THRESHOLD, _FORWARD_MMAP_THRESHOLD)
        try:
            yield
        finally:
            mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)

    return LeanMalloc(lambda: trim(0), forwards)


def parse_size(size: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes -> bytes, at least one byte and
    below 2**63 (what a safetensors index and JSON readers hold)."""
    if isinstance(size, bool) or not isinstance(size, (str, int)):
        raise InputError(f"bad size {shorten(size)}; expected e.g. 5GB, 500MB or a number of bytes")
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
        if not m:
            raise InputError(
                f"bad size {shorten(size)}; expected e.g. 5GB, 500MB or a number of bytes"
            )
        unit = (m.group(2) or "B").upper()
        power = "BKMGT".index(unit[0])
        base = 1024 if "I" in unit else 1000
        # Exact for whole numbers (float() of 400 digits is inf, and int(inf) raises).
        whole, _, frac = m.group(1).partition(".")
        scale = base**power
        value = int(whole) * scale + (int(float("0." + frac) * scale) if frac else 0)
    if not 1 <= value < _MAX_SIZE:
        raise InputError(
            f"max shard size {shorten(size)} is out of range; allowed: 1 byte up to 8 EiB, "
            "e.g. 5GB or 500MB"
        )
    return value


def has_safetensors(path: str | Path) -> bool:
    path = Path(path)
    return (path / INDEX).is_file() or (path / "model.safetensors").is_file()


def local_checkpoint(path: str) -> str:
    """A local directory of safetensors for ``path``: itself, or the hub snapshot of its
    safetensors and JSON files (downloaded once into the hub cache)."""
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])
        except Exception as e:  # noqa: BLE001 (offline, gated, missing: one line for the user)
            raise InputError(f"could not fetch {path!r} to stream it: {e}") from e
    if not has_safetensors(path):
        raise InputError(f"{path!r} holds no safetensors checkpoint to stream; use --no-stream")
    return path


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file, or shards listed by an index), by the
    model's parameter names, read a few at a time."""

    def __init__(self, path: str | Path, model: nn.Module):
        self.path = Path(path)
        weight_map = self._weight_map()
        # Hub checkpoints of some models omit the base model's prefix (GPT-2's "h.0..."); the
        # model's own state_dict names are used throughout, as save_pretrained writes them.
        state = model.state_dict(keep_vars=True)
        names = set(state)
        base = getattr(model, "base_model_prefix", "")
        self.where: dict[str, tuple[str, str]] = {}  # model name -> (file, checkpoint key)
        unknown = []
        for key, file in weight_map.items():
            name = key if key in names else f"{base}.{key}" if f"{base}.{key}" in names else None
            if name is None:
                unknown.append(key)
            else:
                self.where[name] = (file, key)
        # Every weight is accounted for before any block is compressed: a weight that is
        # missing would otherwise stop the run midway, or be left random.
        missing = unfit_keys(model, names, self.where)[0]
        unexpected = drop_ignorable(model, (), unknown)[1]
        mismatched = sorted(
            name for name, (_, key) in self.where.items()
            if list(state[name].shape) != self._shapes[key]
        )  # fmt: skip
        error = fit_error(f"checkpoint {str(self.path)!r}", model, missing, unexpected, mismatched)
        if error is not None:
            raise error

    def _weight_map(self) -> dict[str, str]:
        """Checkpoint key -> file, from the shards' own headers (each checked), and checked
        against the index if there is one."""
        files = [f for f in weight_files(self.path) if f.suffix == ".safetensors"]
        if not files:
            raise InputError(f"{str(self.path)!r} holds no safetensors checkpoint to stream")
        weight_map, self._shapes = {}, {}
        for file in files:
            with open_safetensors(file) as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle is no dict)
                    weight_map[key] = file.name
                    self._shapes[key] = list(f.get_slice(key).get_shape())
        if (self.path / INDEX).is_file():
            listed = json.loads((self.path / INDEX).read_text())["weight_map"]
            for key, file in listed.items():
                if weight_map.get(key) != file:
                    raise InputError(
                        f"{self.path / INDEX} places {key} in {file}, which does not hold it"
                    )
            weight_map = {k: v for k, v in weight_map.items() if k in listed}
        return weight_map

    def names(self) -> list[str]:
        return list(self.where)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each shard opened once and closed again (so no mapping of a
        whole shard stays resident)."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.where[name][0], []).append(name)
        out = {}
        for file, group in by_file.items():
            with open_safetensors(self.path / file) as f:
                for name in group:
                    out[name] = f.get_tensor(self.where[name][1])
        return out

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's first floating-point tensor."""
        for file, key in self.where.values():
            with open_safetensors(self.path / file) as f:
                t = f.get_slice(key)
                dtype = {v: k for k, v in ST_DTYPES.items()}.get(t.get_dtype())
                if dtype is not None and dtype.is_floating_point:
                    return dtype
        return torch.float32


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters are created on the meta device, buffers as usual: non-persistent buffers (the
    rotary ``inv_freq``) are computed at construction and are not in any checkpoint."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` in eval mode with every parameter on the meta device."""
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _set_tensor(module: nn.Module, name: str, t: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = module.get_submodule(owner)
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[leaf] = t


def _is_param(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in module.get_submodule(owner)._parameters


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


@dataclass
class StreamResult:
    report: EngineReport
    model: nn.Module  # the skeleton (meta parameters), for its config and class
    run_dtype: torch.dtype
    checkpoint_format: str | None = None  # gptq / gptq_v2 with format="gptq"


class StreamedModel:
    """A checkpoint opened for block-by-block work: the skeleton (meta parameters) of its
    model in ``run_dtype``, and the engine's hooks to materialise a block on ``device``
    (:meth:`load`), to set it back to meta (:meth:`free`) and to read the modules outside the
    blocks while block 0's inputs are captured (:meth:`capture`)."""

    def __init__(self, path: str | Path, device: torch.device | str, run_dtype: torch.dtype):
        from transformers import AutoConfig

        self.path, self.device, self.run_dtype = path, device, run_dtype
        self.config = AutoConfig.from_pretrained(path)
        self.model = empty_model(self.config, run_dtype)
        self.ckpt = Checkpoint(path, self.model)
        self.prefix, self.blocks = find_blocks(self.model)
        self.lean = lean_malloc()

    def read_into(self, module: nn.Module, module_prefix: str) -> None:
        """Materialise the meta tensors of ``module`` (named ``module_prefix``) on the device."""
        local = {
            name: t for name, t in module.state_dict(keep_vars=True).items() if t.is_meta
        }  # fmt: skip
        names = {f"{module_prefix}{name}": name for name in local}
        missing = [n for n in names if n not in self.ckpt.where]
        if missing:
            raise InputError(f"checkpoint {str(self.path)!r} lacks {', '.join(missing[:3])}")
        for full, t in self.ckpt.read(list(names)).items():
            _set_tensor(module, names[full], _cast(t, self.run_dtype).to(self.device))
        module.to(self.device)

    def load(self, b: int, block: nn.Module) -> None:
        self.read_into(block, f"{self.prefix}.{b}.")

    def free(self, block: nn.Module) -> None:
        """Back to meta, and the freed heap back to the system."""
        block.to("meta")
        self.lean.trim()

    def outside(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors outside the blocks, one at a time (a tied lm_head is absent
        from the checkpoint and stays absent, so an output written from these stays tied)."""
        for name in self.ckpt.names():
            if not name.startswith(f"{self.prefix}."):
                yield name, self.ckpt.read([name])[name]

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Modules outside the blocks are read from the checkpoint when the forward first calls
        them (embeddings, positional tables) and set back to meta afterwards; lm_head and the
        final norm, after block 0, are never read. Only what was read goes back to meta: a
        non-persistent buffer computed at construction (Gemma 3's ``embed_scale``) is in no
        checkpoint, and a second capture (a sparsity profile's first pass) needs it."""
        inside = {id(m) for m in self.blocks.modules()}
        hooks, loaded = [], []

        def on_call(mod, args, name):
            read = [k for k, t in mod.state_dict(keep_vars=True).items() if t.is_meta]
            if read:
                self.read_into(mod, f"{name}." if name else "")
                loaded.append((mod, read))

        for name, mod in self.model.named_modules():
            if id(mod) in inside:
                continue
            own = [*mod._parameters.values(), *mod._buffers.values()]
            if any(t is not None and t.is_meta for t in own):
                hooks.append(mod.register_forward_pre_hook(
                    lambda m, a, name=name: on_call(m, a, name)))  # fmt: skip
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            for mod, read in loaded:
                for key in read:
                    t = mod.get_parameter(key) if _is_param(mod, key) else mod.get_buffer(key)
                    _set_tensor(mod, key, t.detach().to("meta"))

    def io(self, release: Callable[[int, nn.Module], None]) -> BlockIO:
        """The engine's :class:`BlockIO` with this ``release`` (which should end in
        :meth:`free`); a block is unloaded unchanged (after a profile's first pass, to be read
        again to prune) by :meth:`unload`."""
        return BlockIO(self.load, release, self.capture, self.lean.forwards, self.unload)

    def unload(self, b: int, block: nn.Module) -> None:
        self.free(block)

    def finish_config(self):
        """The config an output of this model is written with."""
        self.config.architectures = [type(self.model).__name__]
        return self.config

    def generation_config(self) -> Path | None:
        generation = Path(self.path) / "generation_config.json"
        return generation if generation.is_file() else None


def compress_checkpoint(
    path: str | Path,
    input_ids: torch.Tensor | None,
    cfg: EngineConfig,
    writer: CheckpointWriter,
    run_dtype: torch.dtype,
    version: str = "",
    langs=None,
) -> StreamResult:
    """Compress the checkpoint in ``path`` into ``writer`` (weights, config, masks; no
    tokenizer or manifest), one decoder block in memory at a time. Blocks run in ``run_dtype``
    on ``cfg.device`` and are written as they are released. ``langs``: the language of each
    calibration window (per-language statistics of a sparsity profile)."""
    sm = StreamedModel(path, cfg.device, run_dtype)
    report = EngineReport()

    def release(b: int, block: nn.Module) -> None:
        """Write block ``b`` (its grids and masks drained from the report) and free it."""
        where = f"{sm.prefix}.{b}."
        grids = {k: report.quant.pop(k) for k in [k for k in report.quant if k.startswith(where)]}
        masks = {k: report.masks.pop(k) for k in [k for k in report.masks if k.startswith(where)]}
        writer.add_module(where[:-1], block, grids, masks)
        sm.free(block)

    try:
        for name, t in sm.outside():  # first, in the output dtype
            writer.add(name, t)
        compress_blocks(sm.model, input_ids, cfg, sm.io(release), report, langs)
        fmt = writer.finish(sm.finish_config(), sm.generation_config(), version)
    except BaseException:
        writer.abort()
        raise
    return StreamResult(report, sm.model, run_dtype, fmt)
