"""Safetensors shards written one tensor at a time, so that no shard is ever held in memory.

The output of every compression run goes through :class:`ShardWriter` (via
:class:`polyprune.compress.export.CheckpointWriter`): ``model.safetensors``, or
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from polyprune.errors import InputError

__all__ = ["INDEX", "ST_DTYPES", "ShardWriter"]

INDEX = "model.safetensors.index.json"
ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


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
            "dtype": ST_DTYPES[t.dtype],
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
