"""Per-language input statistics of one Linear group, and the statistic of any mix of them.

Both statistics (:mod:`polyprune.compress.stats`) are means over tokens: ``H = (2/n) sum x x^T``
and ``s = (1/n) sum x^2``. The statistic of a set of windows made of per-language parts is
therefore the token-share-weighted sum of the parts' statistics,

    S(mix) = sum_l p_l S_l,    p_l = n_l / sum_k n_k    (n_l: tokens of language l),

so one pass that keeps one accumulator per language gives the statistic of every mix of them.

Which single run a weighted mix equals
--------------------------------------
``data.mix`` gives language ``l`` of a ``--calib`` run ``c_l`` windows (largest remainder of
``--nsamples``), drawn by ``sample_windows(n=c_l)`` from a generator seeded by ``(seed, l)``.
The windows of a language depend on nothing else in the mix, but they *do* depend on ``c_l``:
the number of documents tokenised and the slot draw both depend on ``n``, so the first ``k``
of ``sample_windows(n=P)`` are not ``sample_windows(n=k)`` (concat mode, checked in the tests).
A pool of ``P_l`` windows of language ``l`` is thus exactly what a run gives ``l`` when
``c_l = P_l``, and nothing else. Hence, with language pools of ``P_l`` windows (all ``seqlen``
long, so token shares are window shares):

* A mix whose weights are proportional to the pool sizes of the languages it uses,
  ``w_l ∝ P_l`` for ``l`` in its support, equals (to fp32 rounding) the single run
  ``--calib l1:P_1,l2:P_2,... --nsamples sum P_l`` with the same ``--seqlen/--seed/--sampling``:
  same windows, same token weights. With equal pools ``P`` that is every equal-weight mix:
  ``de,en`` = ``--calib de,en --nsamples 2P``, and the 7-language uniform mix is
  ``--nsamples 7P``. :func:`equivalent_run` names that run, or says there is none.
* A single-language mix (weight on one language only) is ``--calib l --nsamples P_l``, and
  :meth:`LanguageStats.mix` returns that language's tensors unchanged (copied, not recomputed:
  ``1.0 * H`` is exact, but a sum over several languages with zero weights need not be), so it
  is bit for bit the run's statistic when the language's windows were fed in the run's batches.
* Any other weights (``de:3,en:1`` over equal pools) reweight the tokens of those same windows:
  each German token counts three times as much as an English one. No plain run has those
  windows with those weights; the run ``--calib de:3,en:1 --nsamples N`` draws other windows
  (``sample_windows(n=3N/4)``), and both estimate the same population statistic.

Bit-for-bit equality with a run also needs the same arithmetic: a running mean depends on how
the tokens were split into batches. The run batches its windows ``batch_size`` at a time from
the first; feed each language's pool in the same way (batches that never straddle languages;
:meth:`LanguageStats.update_rows` splits a mixed batch by language, which keeps the values
equal only to rounding).

Memory: one accumulator per language (7 languages: 7 Hessians per group). ``storage`` says
where the languages not being updated wait: ``device`` (all on the device), ``cpu`` (host
memory) or ``disk`` (a memory-mapped file, unlinked at once). With ``cpu``/``disk`` one
language at a time is resident on the device; feeding the pools language by language loads
each once per group and block.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch

from polyprune.compress.stats import InputStats, StatKind
from polyprune.data.mix import CalibrationMix
from polyprune.errors import InputError, cut

__all__ = ["STORAGES", "LanguageStats", "Storage", "equivalent_run", "mix_shares"]

logger = logging.getLogger(__name__)

Storage = Literal["device", "cpu", "disk"]
STORAGES: tuple[str, ...] = ("device", "cpu", "disk")


def mix_shares(
    weights: CalibrationMix | Mapping[str, float], langs: tuple[str, ...] | None = None
) -> dict[str, float]:
    """Token shares (summing to 1) of a mix given as relative weights; zero weights dropped.

    ``langs``: the languages that may appear (an unknown one is an ``InputError``)."""
    if isinstance(weights, CalibrationMix):
        weights = dict(zip(weights.langs, weights.weights, strict=True))
    for lang, w in weights.items():
        if langs is not None and lang not in langs:
            raise InputError(f"mix names {lang}, which has no statistics (have {', '.join(langs)})")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise InputError(f"weight of {lang} must be a finite number >= 0, got {w!r}")
    total = math.fsum(weights.values())
    if total <= 0:
        raise InputError("a mix needs a weight > 0 on at least one language")
    return {lang: w / total for lang, w in weights.items() if w > 0}


def equivalent_run(
    weights: CalibrationMix | Mapping[str, float], pools: Mapping[str, int]
) -> tuple[str, int] | None:
    """``(--calib, --nsamples)`` of the single run whose statistic the mix equals, given the
    pool size (windows) of each language; None when no run does (the weights are not
    proportional to the pools of the languages they use). See the module docstring."""
    shares = mix_shares(weights, tuple(pools))
    used = {lang: pools[lang] for lang in shares}
    nsamples = sum(used.values())
    if any(not math.isclose(shares[lang], n / nsamples, rel_tol=1e-9) for lang, n in used.items()):
        return None
    g = math.gcd(*used.values())
    spec = str(CalibrationMix(tuple(used), tuple(n // g for n in used.values())))
    # The run's own split of the budget must give each language exactly its pool.
    if CalibrationMix.parse(spec).counts(nsamples) != used:
        return None
    return spec, nsamples


def _memmap_zeros(shape: tuple[int, ...], directory: str | None) -> torch.Tensor:
    """fp32 zeros backed by a memory-mapped file, unlinked at once (nothing is left behind if
    the run dies; the mapping keeps the space until the tensor is freed)."""
    fd, path = tempfile.mkstemp(prefix="polyprune-langstats-", suffix=".bin", dir=directory)
    os.close(fd)
    try:
        mm = np.memmap(path, dtype=np.float32, mode="w+", shape=shape)
    finally:
        os.unlink(path)
    return torch.from_numpy(mm)


class LanguageStats:
    """One :class:`InputStats` per language for one Linear group (same kind and width).

    ``update(lang, x)`` adds activations of one language; ``mix(weights)`` is the statistic of
    a mix (token-share-weighted sum); ``get(lang)`` one language's statistic.
    """

    def __init__(
        self,
        kind: StatKind,
        dim: int,
        langs: tuple[str, ...] | list[str],
        device: torch.device | str = "cpu",
        storage: Storage = "device",
        directory: str | None = None,
    ) -> None:
        if storage not in STORAGES:
            raise InputError(f"unknown storage {storage!r}; allowed: {', '.join(STORAGES)}")
        langs = tuple(langs)
        if not langs or len(set(langs)) != len(langs):
            raise InputError(f"languages must be distinct and at least one, got {cut(str(langs))}")
        self.kind, self.dim, self.langs = kind, dim, langs
        self.device, self.storage = device, storage
        self.n = dict.fromkeys(langs, 0)
        if storage == "device":
            self._stats = {lang: InputStats(kind, dim, device) for lang in langs}
            return
        shape = (dim, dim) if kind == "hessian" else (dim,)
        if storage == "disk":
            self._parked = {lang: _memmap_zeros(shape, directory) for lang in langs}
        else:
            self._parked = {lang: torch.zeros(shape, dtype=torch.float32) for lang in langs}
        self._resident = InputStats(kind, dim, device)  # the one language on the device
        self._resident_lang: str | None = None

    @staticmethod
    def _tensor(st: InputStats) -> torch.Tensor:
        return st.H_upper if st.kind == "hessian" else st.colsq

    def _check_lang(self, lang: str) -> None:
        if lang not in self.n:
            raise InputError(f"no statistics for {lang}; have {', '.join(self.langs)}")

    def _load(self, lang: str) -> InputStats:
        """The accumulator of ``lang`` on the device (others parked)."""
        self._check_lang(lang)
        if self.storage == "device":
            return self._stats[lang]
        if self._resident_lang != lang:
            self._park()
            self._tensor(self._resident).copy_(self._parked[lang])
            self._resident.n = self.n[lang]
            self._resident_lang = lang
        return self._resident

    def _park(self) -> None:
        if self._resident_lang is not None:
            self._parked[self._resident_lang].copy_(self._tensor(self._resident))
            self._resident_lang = None

    def update(self, lang: str, x: torch.Tensor) -> None:
        """Add the activations ``x`` (..., dim) of windows in ``lang``."""
        st = self._load(lang)
        st.update(x)
        self.n[lang] = st.n

    def update_rows(self, x: torch.Tensor, langs: list[str] | tuple[str, ...]) -> None:
        """Add a batch ``x`` (B, T, dim) whose row ``i`` is a window in ``langs[i]``: each run of
        consecutive rows in one language goes to that language's accumulator, in order."""
        if len(langs) != x.shape[0]:
            raise ValueError(f"{len(langs)} language labels for a batch of {x.shape[0]} rows")
        start = 0
        for i in range(1, len(langs) + 1):
            if i == len(langs) or langs[i] != langs[start]:
                self.update(langs[start], x[start:i])
                start = i

    def get(self, lang: str) -> InputStats:
        """The statistic of ``lang`` alone, on the device (with ``storage='device'`` the
        accumulator itself, else a copy)."""
        st = self._load(lang)
        return st if self.storage == "device" else self._copy(st)

    def _copy(self, st: InputStats, device: torch.device | str | None = None) -> InputStats:
        out = InputStats(self.kind, self.dim, device or self.device, n=st.n)
        self._tensor(out).copy_(self._tensor(st))
        return out

    def mix(
        self,
        weights: CalibrationMix | Mapping[str, float],
        device: torch.device | str | None = None,
    ) -> InputStats:
        """The statistic of a mix: ``sum_l p_l S_l`` with ``p`` the weights normalised to token
        shares (see the module docstring for which run it equals). A mix of one language
        returns a copy of that language's tensors. ``n`` of the result is the tokens of the
        languages used (what a run over their windows would count)."""
        shares = mix_shares(weights, self.langs)
        device = device or self.device
        empty = [lang for lang in shares if self.n[lang] == 0]
        if empty:
            raise InputError(f"no activations seen for {', '.join(empty)}")
        if len(shares) == 1:
            (lang,) = shares
            return self._copy(self._load(lang), device)
        out = InputStats(self.kind, self.dim, device, n=sum(self.n[lang] for lang in shares))
        acc = self._tensor(out)
        # A fixed order (the languages' order here), so a mix gives the same bits every time.
        for lang in self.langs:
            if lang in shares:
                src = (
                    self._parked[lang]
                    if self._parked_here(lang)
                    else self._tensor(self._load(lang))
                )
                acc.add_(src.to(acc.device), alpha=shares[lang])
        return out

    def _parked_here(self, lang: str) -> bool:
        return self.storage != "device" and self._resident_lang != lang

    def nbytes(self) -> dict[str, int]:
        """Bytes of statistics held on the device and off it (host memory or disk)."""
        one = self.dim * (self.dim if self.kind == "hessian" else 1) * 4
        k = len(self.langs)
        if self.storage == "device":
            return {"device": one * k, "off_device": 0}
        return {"device": one, "off_device": one * k}
