"""Calibration mixes: ``LANG[:WEIGHT],...`` -> per-language sample counts -> token windows.

The sample budget is split by the largest-remainder method, so ``de,en`` with 128 samples is
64 + 64 (the paper's setting) and seven equal languages get 19 or 18 each. Each language is
sampled with its own generator seeded by ``(seed, lang)``: the German windows of ``de,en`` and
``de,fr`` are the same for the same seed and count.

Two sampling modes:

* ``window`` — what the reference Wanda / SparseGPT code does: pick a random document longer
  than ``seqlen`` tokens, then a random offset in it. Windows may overlap.
* ``concat`` — join documents with EOS (in a seeded random order), cut the stream into
  ``seqlen``-token slots and pick distinct slots at random: no window overlaps another. Needed
  when documents are shorter than ``seqlen`` (the bundled corpus, 8192-token windows on mC4).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from polyprune.checks import check_int, check_seed
from polyprune.data.cache import cache_path, load_cached, save_cached, tokenizer_fingerprint
from polyprune.data.sources import TextSource, get_source
from polyprune.data.windows import window_bos
from polyprune.errors import MAX_ECHO, InputError, cut, shorten

__all__ = [
    "WINDOWS_PROTOCOL",
    "CalibrationMix",
    "CalibrationSet",
    "SamplingMode",
    "build_calibration_set",
    "check_calibration",
    "largest_remainder",
    "sample_windows",
]

logger = logging.getLogger(__name__)

SamplingMode = Literal["window", "concat"]
SAMPLING_MODES = ("window", "concat")
_LANG = re.compile(r"^[a-z]{2,3}(-[A-Za-z]{2,8})?$")
# Tokenise at most this many times the needed tokens before sampling, so a 350k-document mC4
# shard is not tokenised whole for 128 windows.
_OVERSAMPLE = 4


def largest_remainder(weights: list[float], total: int) -> list[int]:
    """Split ``total`` integer units in proportion to ``weights`` (Hamilton's method).

    Each share is the floor of its quota; the units left go to the largest fractional parts,
    ties going to the earlier entry. The result sums to ``total`` exactly.
    """
    # Scaled by the largest weight first: 1e308 + 1e308 overflows to inf (and inf / inf is nan),
    # but 1 + 1 does not; the shares are the same.
    top = max(weights)
    scaled = [w / top for w in weights]
    wsum = math.fsum(scaled)
    quotas = [total * w / wsum for w in scaled]
    counts = [math.floor(q) for q in quotas]
    left = total - sum(counts)
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class CalibrationMix:
    """Languages and relative weights of the calibration data, e.g. ``de:3,en:1``."""

    langs: tuple[str, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        # Built directly from Python (not parsed): the same rule as parse's.
        if not self.langs or len(self.langs) != len(self.weights):
            raise InputError("a calibration mix needs one weight per language")
        for lang, w in zip(self.langs, self.weights, strict=True):
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise InputError(f"weight of {lang} must be a number, got {shorten(w)}")
            if not math.isfinite(w) or w <= 0:
                raise InputError(f"weight of {lang} must be > 0 and finite, got {w}")

    @classmethod
    def parse(cls, spec: str) -> CalibrationMix:
        if not isinstance(spec, str) or not spec.strip():
            raise InputError("empty calibration mix; expected LANG[:WEIGHT][,LANG[:WEIGHT]...]")
        # A long spec is not echoed whole twice: the part at fault is named after it.
        bad = "bad calibration mix" + (f" {spec!r}" if len(spec) <= MAX_ECHO else "")
        langs, weights = [], []
        for part in spec.split(","):
            part = part.strip()
            lang, sep, w = part.partition(":")
            lang = lang.strip()
            if not _LANG.match(lang):
                raise InputError(
                    f"{bad}: {shorten(part)} is not LANG[:WEIGHT] "
                    "with LANG an ISO 639-1 code such as de or en"
                )
            if sep:
                try:
                    weight = float(w)
                except ValueError:
                    raise InputError(
                        f"{bad}: weight {shorten(w)} of {lang} is not a number"
                    ) from None
                if not math.isfinite(weight) or weight <= 0:
                    raise InputError(
                        f"{bad}: weight of {lang} must be > 0 and finite, got {shorten(w.strip())}"
                    )
            else:
                weight = 1.0
            if lang in langs:
                raise InputError(f"{bad}: {lang} appears twice")
            langs.append(lang)
            weights.append(weight)
        return cls(tuple(langs), tuple(weights))

    def counts(self, nsamples: int) -> dict[str, int]:
        """Samples per language for a budget of ``nsamples`` (largest remainder)."""
        check_int("nsamples", nsamples, 1)
        counts = dict(zip(self.langs, largest_remainder(list(self.weights), nsamples), strict=True))
        empty = [lang for lang, c in counts.items() if c == 0]
        if empty:
            raise InputError(
                f"nsamples {nsamples} leaves {cut(', '.join(empty))} with no sample in "
                f"mix {cut(str(self))}; "
                "raise --nsamples or the weight"
            )
        return counts

    def __str__(self) -> str:
        return ",".join(
            lang if w == 1 else f"{lang}:{w:g}"
            for lang, w in zip(self.langs, self.weights, strict=True)
        )


@dataclass
class CalibrationSet:
    """Token windows of a mix: ``input_ids`` [nsamples, seqlen], languages in mix order."""

    input_ids: torch.Tensor  # (N, T) int64
    langs: list[str]  # language of each window
    counts: dict[str, int]
    mix: str
    mode: SamplingMode
    seqlen: int
    seed: int
    source: str
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = windows_fingerprint(self.input_ids)

    @property
    def nsamples(self) -> int:
        return self.input_ids.shape[0]

    def manifest(self) -> dict:
        return {
            "mix": self.mix,
            "counts": self.counts,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "sampling": self.mode,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "windows": WINDOWS_PROTOCOL,
        }


# How windows are cut: "bos-first" = BOS + seqlen - 1 text tokens where the tokenizer adds a BOS
# (data.windows). Recorded in manifests so that outputs calibrated before it are not reused.
WINDOWS_PROTOCOL = "bos-first-v1"


def windows_fingerprint(input_ids: torch.Tensor) -> str:
    """sha256 of the token windows (int64, row-major): equal iff the windows are equal."""
    data = input_ids.to(torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _lang_rng(seed: int, lang: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(lang.encode())])


def _tokenize(tokenizer, docs: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(docs), 256):
        batch = tokenizer(docs[i : i + 256], add_special_tokens=False, verbose=False)
        out.extend(batch["input_ids"])
    return out


class _NoBos:
    """A tokenizer seen as adding no BOS (the caller adds it to each window)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.bos_token_id = None

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)


def sample_windows(
    docs: list[str],
    tokenizer,
    n: int,
    seqlen: int,
    seed: int,
    mode: SamplingMode,
    lang: str,
) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens from ``docs``, seeded by ``(seed, lang)``: (n, T).
    Where the tokenizer adds a BOS, each window is BOS + ``seqlen - 1`` text tokens
    (``data.windows``): the model is calibrated on text as it sees it."""
    if mode not in SAMPLING_MODES:
        raise InputError(f"unknown sampling mode {mode!r}; allowed: {', '.join(SAMPLING_MODES)}")
    bos = window_bos(tokenizer)
    if bos is not None:
        if seqlen < 2:
            raise InputError(f"seqlen {seqlen} leaves no room for text after the BOS token")
        rows = sample_windows(docs, _NoBos(tokenizer), n, seqlen - 1, seed, mode, lang)
        return torch.cat([torch.full((n, 1), bos, dtype=rows.dtype), rows], 1)
    rng = _lang_rng(seed, lang)
    need = n * seqlen
    order = rng.permutation(len(docs))
    toks: list[list[int]] = []
    total = 0
    for i in range(0, len(order), 256):
        chunk = _tokenize(tokenizer, [docs[j] for j in order[i : i + 256]])
        toks.extend(chunk)
        total += sum(len(t) for t in chunk)
        if total >= _OVERSAMPLE * need:
            break
    if total < need:
        raise InputError(
            f"too little text in {lang}: {total:,} calibration tokens in {len(docs):,} documents, "
            f"but {n} x {seqlen} = {need:,} are needed; lower --nsamples or --seqlen"
        )
    if mode == "window":
        long_docs = [t for t in toks if len(t) > seqlen]
        if not long_docs:
            longest = max(len(t) for t in toks)
            raise InputError(
                f"no {lang} document is longer than seqlen {seqlen} tokens (longest: {longest}); "
                "use --sampling concat"
            )
        rows = []
        for _ in range(n):
            t = long_docs[rng.integers(len(long_docs))]
            start = int(rng.integers(0, len(t) - seqlen))
            rows.append(t[start : start + seqlen])
        return torch.tensor(rows, dtype=torch.int64)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for t in toks:
        stream.extend(t)
        if eos is not None:
            stream.append(eos)
    slots = len(stream) // seqlen
    shift = int(rng.integers(0, len(stream) - slots * seqlen + 1))
    chosen = rng.choice(slots, size=n, replace=False)
    stream_t = torch.tensor(stream, dtype=torch.int64)
    return torch.stack([stream_t[shift + s * seqlen : shift + (s + 1) * seqlen] for s in chosen])


def check_calibration(nsamples: int, seqlen: int, seed: int, sampling: str) -> None:
    """The calibration settings every entry point (CLI, API, matrix config) checks alike."""
    check_int("nsamples", nsamples, 1)
    check_int("seqlen", seqlen, 2)  # one token is no context to calibrate on
    check_seed(seed)
    if sampling not in SAMPLING_MODES:
        raise InputError(
            f"unknown sampling mode {shorten(sampling)}; allowed: {', '.join(SAMPLING_MODES)}"
        )


def build_calibration_set(
    mix: CalibrationMix | str,
    tokenizer,
    source: TextSource | str = "bundled",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    mode: SamplingMode = "concat",
    use_cache: bool = True,
) -> CalibrationSet:
    """Tokenised calibration windows for ``mix``; cached on disk by content hash."""
    if isinstance(mix, str):
        mix = CalibrationMix.parse(mix)
    src = get_source(source)
    check_calibration(nsamples, seqlen, seed, mode)
    counts = mix.counts(nsamples)
    for lang in mix.langs:
        src.check_language(lang)
    tok_fp = tokenizer_fingerprint(tokenizer)
    parts, langs = [], []
    for lang, n in counts.items():
        key = {
            "source": src.fingerprint(),
            "lang": lang,
            "tokenizer": tok_fp,
            "n": n,
            "seqlen": seqlen,
            "seed": seed,
            "mode": mode,
            "bos": window_bos(tokenizer),  # windows start with it (data.windows)
        }
        path = cache_path("calib", key)
        windows = load_cached(path) if use_cache else None
        if windows is None:
            docs = src.documents(lang, "calib")
            windows = sample_windows(docs, tokenizer, n, seqlen, seed, mode, lang)
            if use_cache:
                save_cached(path, windows)
        else:
            logger.debug("calibration windows for %s from cache %s", lang, path)
        parts.append(windows)
        langs.extend([lang] * n)
    return CalibrationSet(
        input_ids=torch.cat(parts),
        langs=langs,
        counts=counts,
        mix=str(mix),
        mode=mode,
        seqlen=seqlen,
        seed=seed,
        source=src.describe(),
    )
