"""Compress a checkpoint block by block from its safetensors shards: memory flat in depth.

The model is built as a skeleton whose parameters live on the meta device (shapes, no memory).
The modules before block 0 (embeddings; rotary tables are buffers computed at construction)
are read from the checkpoint when the capture forward first calls them and freed afterwards;
``lm_head`` and the final norm are never materialised. Each decoder block is then read from
the shards that hold it, compressed by the engine (:func:`polyprune.compress.engine.
compress_blocks`, the same code as for a model in memory), written to the output shards and
set back to meta. Peak host memory is one block, the calibration activations (unless
offloaded to disk) and the statistics of one block's Linear groups, whatever the depth.

Output shards are written one tensor at a time (:class:`ShardWriter`): each shard reserves its
safetensors header at the front and fills it in when it closes, so a shard is never held in
memory either. The result is an ordinary HF checkpoint: ``model.safetensors``, or
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.

Freeing a block is not enough by itself on glibc: its tensors (and SparseGPT's d x d factors)
are mostly below glibc's mmap threshold, so they come from the heap, and the freed heap is
kept by the process, fragmented, growing with every block (62 MiB per block for SparseGPT at
hidden 2048). :func:`lean_malloc` therefore sends allocations of 4 MiB and more to their own
mappings (returned to the system when freed) and trims the heap after each block.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from polyprune.compress.engine import BlockIO, EngineConfig, EngineReport, compress_blocks
from polyprune.compress.export import MASKS, gptq_config_files, masks_metadata
from polyprune.compress.gptq_format import pack_linear
from polyprune.errors import InputError, shorten
from polyprune.models import find_blocks, get_weight
from polyprune.weights import drop_ignorable, fit_error, open_safetensors, unfit_keys, weight_files

__all__ = [
    "Checkpoint",
    "ShardWriter",
    "StreamResult",
    "compress_checkpoint",
    "empty_model",
    "has_safetensors",
    "lean_malloc",
    "local_checkpoint",
    "parse_size",
]

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
_MAX_SIZE = 2**63  # sizes are written to the index as JSON integers: int64 for most readers
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
_MMAP_THRESHOLD = 4 << 20


def lean_malloc() -> Callable[[], None]:
    """On glibc: serve allocations of 4 MiB and more from their own mappings from now on
    (unless the user set ``MALLOC_MMAP_THRESHOLD_``), and return a function that gives the
    freed heap back to the system (``malloc_trim``). Elsewhere both do nothing."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim, mallopt = libc.malloc_trim, libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return lambda: None
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    return lambda: trim(0)


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
                dtype = {v: k for k, v in _ST_DTYPES.items()}.get(t.get_dtype())
                if dtype is not None and dtype.is_floating_point:
                    return dtype
        return torch.float32


class ShardWriter:
    """Safetensors shards written one tensor at a time.

    The safetensors header (8-byte length, then JSON) comes before the data and holds every
    tensor's offsets, which are known only when the shard is complete. Each shard therefore
    reserves ``header_bytes`` at its start and fills them in when it closes, padding the JSON
    with spaces, which the format allows. A shard closes when the next tensor would take it past
    ``max_shard_bytes`` or its header space.
    """

    def __init__(
        self,
        directory: Path,
        stem: str = "model",
        max_shard_bytes: int | None = None,
        header_bytes: int = 1 << 18,
    ):
        self.directory = Path(directory)
        self.stem = stem
        self.max_shard_bytes = max_shard_bytes
        self.header_bytes = header_bytes
        self.metadata: dict[str, str] = {"format": "pt"}
        self.shards: list[tuple[Path, dict]] = []  # (temporary path, header) of closed shards
        self._file = None
        self._header: dict = {}
        self._header_len = 0
        self._offset = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        entry_len = len(json.dumps({name: {"dtype": "BF16", "shape": list(t.shape),
                                           "data_offsets": [10**15, 10**15]}}))  # fmt: skip
        full = (
            self._file is not None
            and self._offset > 0
            and (
                (self.max_shard_bytes is not None and self._offset + nbytes > self.max_shard_bytes)
                or self._header_len + entry_len > self.header_bytes - 4096  # 4 KiB for metadata
            )
        )
        if full and self.max_shard_bytes is None:
            raise InputError(f"more tensors than one file's reserved header holds ({name})")
        if full:
            self._close()
        if self._file is None:
            self._open()
        self._header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self._offset, self._offset + nbytes],
        }
        self._header_len += entry_len
        if nbytes:
            self._file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._offset += nbytes

    def _open(self) -> None:
        path = self.directory / f".{self.stem}-{len(self.shards):05d}.tmp"
        self._file = open(path, "wb")  # noqa: SIM115 (closed in _close)
        self._file.write(b"\0" * (8 + self.header_bytes))
        self._path, self._header, self._header_len, self._offset = path, {}, 0, 0

    def _close(self) -> None:
        if self._file is None:
            return
        header = json.dumps({"__metadata__": self.metadata, **self._header}, separators=(",", ":"))
        raw = header.encode()
        if len(raw) > self.header_bytes:
            raise InputError(f"safetensors header of {len(raw)} bytes exceeds the space reserved")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self.header_bytes) + raw.ljust(self.header_bytes))
        self._file.close()
        self.shards.append((self._path, self._header))
        self._file = None

    def finish(self) -> list[Path]:
        """Close the last shard and give the shards their final names: ``{stem}.safetensors``
        alone, or ``{stem}-0000i-of-0000n.safetensors`` and ``{stem}.safetensors.index.json``."""
        stem = self.stem
        self._close()
        n = len(self.shards)
        if n == 0:
            self._open()
            self._close()
            n = 1
        names = (
            [f"{stem}.safetensors"]
            if n == 1
            else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        paths = []
        for (tmp, _), final in zip(self.shards, names, strict=True):
            tmp.rename(self.directory / final)
            paths.append(self.directory / final)
        if n > 1:
            weight_map = {k: f for (_, h), f in zip(self.shards, names, strict=True) for k in h}
            total = sum(
                e["data_offsets"][1] - e["data_offsets"][0] for _, h in self.shards
                for e in h.values()
            )  # fmt: skip
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.directory / f"{stem}.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n"
            )
        return paths

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


@dataclass
class StreamResult:
    report: EngineReport
    model: nn.Module  # the skeleton (meta parameters), for its config and class
    run_dtype: torch.dtype
    checkpoint_format: str | None = None  # gptq / gptq_v2 with format="gptq"


def compress_checkpoint(
    path: str | Path,
    input_ids: torch.Tensor | None,
    cfg: EngineConfig,
    out: Path,
    run_dtype: torch.dtype,
    out_dtype: torch.dtype,
    format: str = "dense",
    max_shard_bytes: int = 5 * 10**9,
    save_masks: bool = False,
    version: str = "",
) -> StreamResult:
    """Compress the checkpoint in ``path`` into the directory ``out`` (weights, config, masks;
    no tokenizer or manifest), one decoder block in memory at a time. Blocks run in
    ``run_dtype`` on ``cfg.device`` and are written in ``out_dtype`` (GPTQ: packed)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    model = empty_model(config, run_dtype)
    ckpt = Checkpoint(path, model)
    prefix, blocks = find_blocks(model)
    writer = ShardWriter(out, "model", max_shard_bytes)
    masks = ShardWriter(out, Path(MASKS).stem, None, header_bytes=1 << 23) if save_masks else None
    mask_shapes: dict[str, list[int]] = {}
    gptq = format == "gptq"
    # A GPTQ v1 checkpoint stores zero - 1 and cannot hold a zero point of 0, which only
    # asymmetric grids produce. The in-memory path looks at every grid first; here the first
    # blocks are on disk before the last is quantised, so asymmetric grids always get v2.
    v2 = gptq and not cfg.quant.sym
    report = EngineReport()
    trim = lean_malloc()

    def read_into(module: nn.Module, module_prefix: str, device) -> None:
        """Materialise the meta tensors of ``module`` (named ``module_prefix``) on ``device``."""
        local = {
            name: t for name, t in module.state_dict(keep_vars=True).items() if t.is_meta
        }  # fmt: skip
        names = {f"{module_prefix}{name}": name for name in local}
        missing = [n for n in names if n not in ckpt.where]
        if missing:
            raise InputError(f"checkpoint {str(path)!r} lacks {', '.join(missing[:3])}")
        for full, t in ckpt.read(list(names)).items():
            _set_tensor(module, names[full], _cast(t, run_dtype).to(device))
        module.to(device)

    def load(b: int, block: nn.Module) -> None:
        read_into(block, f"{prefix}.{b}.", cfg.device)

    def release(b: int, block: nn.Module) -> None:
        block_prefix = f"{prefix}.{b}"
        packed = {k for k in report.quant if k.startswith(block_prefix + ".")} if gptq else set()
        for name, t in block.state_dict().items():
            full = f"{block_prefix}.{name}"
            if gptq and full.rsplit(".", 1)[0] in packed:
                continue  # written below as qweight / qzeros / scales / g_idx
            writer.add(full, _cast(t, out_dtype))
        for full in sorted(packed):
            mod = model.get_submodule(full)
            bias = getattr(mod, "bias", None)
            for k, v in pack_linear(
                get_weight(mod).cpu(), report.quant.pop(full), bias, v2
            ).items():
                writer.add(f"{full}.{k}", v)
        if masks is not None:
            for full in [k for k in report.masks if k.startswith(block_prefix + ".")]:
                packed_mask, shape = report.masks.pop(full)
                masks.add(full, packed_mask)
                mask_shapes[full] = list(shape)
        block.to("meta")
        trim()

    @contextlib.contextmanager
    def capture() -> Iterator[None]:
        """Modules outside the blocks are read from the checkpoint when the forward first calls
        them (embeddings, positional tables) and set back to meta afterwards; lm_head and the
        final norm, after block 0, are never read."""
        inside = {id(m) for m in blocks.modules()}
        hooks, loaded = [], []

        def on_call(mod, args, name):
            if any(t.is_meta for t in mod.state_dict(keep_vars=True).values()):
                read_into(mod, f"{name}." if name else "", cfg.device)
                loaded.append(mod)

        for name, mod in model.named_modules():
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
            for mod in loaded:
                mod.to("meta")

    try:
        # Tensors outside the blocks go first, copied in the output dtype (a tied lm_head is
        # absent from the checkpoint and stays absent, so it stays tied).
        block_names = f"{prefix}."
        for name in ckpt.names():
            if not name.startswith(block_names):
                writer.add(name, _cast(ckpt.read([name])[name], out_dtype))
        compress_blocks(model, input_ids, cfg, BlockIO(load, release, capture), report)
        writer.finish()
        if masks is not None:
            masks.metadata = masks_metadata(mask_shapes)
            masks.finish()
    except BaseException:
        writer.abort()
        if masks is not None:
            masks.abort()
        raise

    fmt = None
    if gptq:
        fmt = gptq_config_files(config.to_dict(), out, cfg.quant, v2, version, out_dtype)
    else:
        config.architectures = [type(model).__name__]
        config.dtype = out_dtype
        config.save_pretrained(out)
    generation = Path(path) / "generation_config.json"
    if generation.is_file():
        shutil.copy(generation, out / generation.name)
    return StreamResult(report, model, run_dtype, fmt)
