"""``polyprune.json``: what a compression run did, as one typed record.

Written by every compression run beside its weights (:mod:`polyprune.compress.export`) and
read back by the CLI summary, ``polyprune analyze``, the matrix's reuse check and the API. The
names of the files of an output live here too.

Reading is explicit about old manifests: a field this version does not know is kept in
``extra`` and written back unchanged; a field it needs (``method``) missing, or one of the
wrong type, is an :class:`~polyprune.errors.InputError` naming the file and the field; every
other missing field gets the default below. No torch here: the CLI reads manifests cheaply.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from polyprune.errors import InputError, shorten

__all__ = ["MANIFEST", "MASKS", "QuantizationRecord", "RunManifest"]

MANIFEST = "polyprune.json"
MASKS = "masks.safetensors"


@dataclass
class QuantizationRecord:
    """The quantisation grid of a run and how its checkpoint stores it."""

    bits: int
    group_size: int
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    format: str = "dense"  # dense (dequantised weights) or gptq (packed)
    checkpoint_format: str | None = None  # gptq (v1) or gptq_v2, for format gptq
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        if d["checkpoint_format"] is None:
            del d["checkpoint_format"]
        return d | self.extra

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> QuantizationRecord:
        return cls(**_known(cls, raw, where, required=("bits", "group_size")))


@dataclass
class RunManifest:
    """One compression run. ``settings`` holds the engine settings and those the method's
    registry record names (sparsity, pattern, blocksize, ...); ``calibration`` the calibration
    set's record (None for data-free methods); ``layers`` one record per compressed Linear;
    ``profile`` a calibrated sparsity profile's per-block record (docs/sparsity_profiles.md),
    written only when there is one."""

    method: str
    kind: str = "prune"  # prune or quantize
    model: str | None = None
    tool: str = "polyprune"
    version: str = ""
    command: str = ""
    source: dict | None = None  # e.g. the GGUF file a model was converted from
    settings: dict[str, Any] = field(default_factory=dict)
    quantization: QuantizationRecord | None = None
    calibration: dict[str, Any] | None = None
    achieved_sparsity: float | None = None
    layers: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fields of other versions, kept

    # The order of the fields in the file, as written since the first version.
    _ORDER = ("tool", "version", "command", "model", "source", "kind", "method", "settings",
              "quantization", "calibration", "achieved_sparsity", "layers", "seconds",
              "environment")  # fmt: skip

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self._ORDER}
        d["quantization"] = self.quantization.to_dict() if self.quantization else None
        if self.profile is not None:
            d["profile"] = self.profile
        return d | self.extra

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, raw: dict, where: str = "manifest") -> RunManifest:
        if not isinstance(raw, dict):
            raise InputError(f"{where} is not a JSON object")
        known = _known(cls, raw, where, required=("method",))
        q = known.get("quantization")
        if q is not None:
            known["quantization"] = QuantizationRecord.from_dict(q, f"{where}: quantization")
        if "kind" not in raw:  # manifests before "kind": the method says which
            from polyprune.compress.methods import KINDS, get_method

            try:
                known["kind"] = get_method(known["method"]).kind
            except InputError:
                known["kind"] = KINDS[0]
        return cls(**known)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> RunManifest:
        """The manifest of the output ``directory``; InputError if it has none or it is not
        a manifest."""
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise InputError(f"{str(directory)!r} is not a polyprune output (no {MANIFEST})")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON: {e.msg}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path} cannot be read: {e}") from e
        return cls.from_dict(raw, str(path))


# JSON types each annotated field may hold (None where the annotation allows it).
_TYPES = {"str": str, "int": int, "bool": bool, "float": (int, float), "dict": dict, "Any": object}


def _known(cls, raw: dict, where: str, required: tuple[str, ...]) -> dict:
    """The fields of dataclass ``cls`` in ``raw``, type-checked, the rest under ``extra``."""
    names = {f.name: str(f.type) for f in fields(cls) if f.name != "extra"}
    for name in required:
        if name not in raw:
            raise InputError(f"{where} lacks the field {name!r}")
    known: dict[str, Any] = {"extra": {k: v for k, v in raw.items() if k not in names}}
    for k, v in raw.items():
        if k not in names:
            continue
        options = [t.strip().split("[")[0] for t in names[k].split("|")]
        ok = (v is None and "None" in options) or any(
            t in _TYPES and isinstance(v, _TYPES[t]) and (t == "bool" or not isinstance(v, bool))
            for t in options
        )
        if not ok and "QuantizationRecord" not in options:
            raise InputError(f"{where}: field {k!r} is {shorten(v)}, not {names[k]}")
        if "QuantizationRecord" in options and not (v is None or isinstance(v, dict)):
            raise InputError(f"{where}: field {k!r} is {shorten(v)}, not a mapping")
        known[k] = v
    return known
