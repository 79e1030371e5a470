"""Many calibration mixes from one pass: per-language statistics, one solve per mix.

The block loop of ``polyprune sweep`` (the API and the command are in
:mod:`polyprune.eval.sweep`). The calibration windows are language *pools* (:class:`Pool`:
``count`` windows of one language, drawn exactly as a run with that count draws them), laid
out one after the other; no batch straddles two pools (:func:`polyprune.compress.capture.
batch_slices`). Per block:

1. one forward of the dense block over every pool (dense propagation: its outputs are the next
   block's inputs, the same for every mix), accumulating one statistic per pool for every
   Linear group (:class:`~polyprune.compress.langstats.LanguageStats`), and with ``predict``
   the Hessian of each language for the predicted damage (the pools' own Hessians where the
   method keeps Hessians; a second accumulator per language for Wanda, whose column norms
   would give only the diagonal estimate);
2. per mix (:class:`SweepEntry`: pool -> token share): each group's statistic is the weighted
   sum of its pools', each Linear is solved through the engine (:func:`~polyprune.compress.
   engine.solve_group`, the same call a run makes), the compressed block goes to that mix's
   sink (its output writer) and its damage on every language is recorded; then the dense
   weights are put back for the next mix.

A single-pool entry is the run ``--calib LANG --nsamples COUNT --propagate dense`` bit for bit:
the same windows, in the same batches, through the same dense blocks, the same statistic (a
copy of the pool's), the same solve. A multi-pool entry equals its run to fp32 rounding (the
running means are cut at other batch boundaries). See docs/mixes.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from polyprune.compress.capture import block_output, capture_block_inputs
from polyprune.compress.damage import DamageTerm, damage_terms, output_energy, statistic_matrix
from polyprune.compress.engine import (
    BlockIO,
    EngineConfig,
    EngineReport,
    activation_allocator,
    check_widths,
    engine_method,
    solve_group,
)
from polyprune.compress.langstats import LanguageStats, Storage
from polyprune.compress.passes import probe_groups
from polyprune.errors import InputError
from polyprune.models import find_blocks, get_weight, set_weight

__all__ = ["Pool", "SweepEntry", "SweepReport", "Sink", "sweep_blocks"]

logger = logging.getLogger(__name__)

# Writes block ``b`` of a mix (compressed weights in place) and drains that block's masks and
# grids from the mix's report.
Sink = Callable[[int, nn.Module, EngineReport], None]


@dataclass(frozen=True)
class Pool:
    """``count`` calibration windows of ``lang``: what ``--calib LANG --nsamples COUNT``
    draws (and what a mix's run draws for LANG when its share of the budget is COUNT)."""

    lang: str
    count: int

    @property
    def key(self) -> str:
        return f"{self.lang}/{self.count}"


@dataclass(frozen=True)
class SweepEntry:
    """One mix of a sweep: ``shares`` maps pool keys to token shares (summing to 1)."""

    name: str
    shares: Mapping[str, float]
    write: bool = True


@dataclass
class SweepReport:
    reports: dict[str, EngineReport] = field(default_factory=dict)  # per entry
    damage: dict[str, list[DamageTerm]] = field(default_factory=dict)  # per entry, with predict
    seconds: dict[str, float] = field(default_factory=dict)


def _storage(cfg: EngineConfig) -> Storage:
    """Where the per-pool statistics wait while another is updated: as the activations do."""
    return {"none": "device", "disk": "disk"}.get(cfg.offload, "cpu")


def sweep_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    pools: list[Pool],
    entries: list[SweepEntry],
    cfg: EngineConfig,
    io: BlockIO,
    sinks: Mapping[str, Sink],
    predict: bool = False,
    damage_langs: tuple[str, ...] | None = None,
) -> SweepReport:
    """Compress the model once per entry from one dense pass per block. ``input_ids`` holds
    the pools' windows, pool after pool; ``sinks`` the writer of each entry that is written
    (``entry.write``). With ``predict``, each entry's damage on ``damage_langs`` (default:
    every pool's language; each costs one (out, in) x (in, in) product per Linear and entry).
    The model's blocks end dense (``io.release`` frees them)."""
    method = engine_method(cfg.method)
    if method.stat is None:
        raise InputError(f"method {cfg.method} uses no calibration data: every mix is the same")
    if cfg.propagate != "dense":
        raise InputError("a sweep propagates dense activations (one pass serves every mix)")
    if sum(p.count for p in pools) != input_ids.shape[0]:
        raise ValueError(f"{input_ids.shape[0]} windows for pools of {[p.key for p in pools]}")
    keys = [p.key for p in pools]
    pool_langs = list(dict.fromkeys(p.lang for p in pools))
    damage_langs = tuple(pool_langs if damage_langs is None else damage_langs)
    if set(damage_langs) - set(pool_langs):
        raise ValueError(f"no pool for damage languages {set(damage_langs) - set(pool_langs)}")
    for e in entries:
        unknown = set(e.shares) - set(keys)
        if unknown:
            raise ValueError(f"entry {e.name} uses pools {sorted(unknown)} the sweep lacks")
    prefix, blocks = find_blocks(model)
    check_widths(model, cfg)
    result = SweepReport({e.name: EngineReport() for e in entries})
    result.damage = {e.name: [] for e in entries} if predict else {}
    timers = dict.fromkeys(("statistics", "solve", "damage", "write"), 0.0)
    t_start = time.perf_counter()
    alloc = activation_allocator(cfg)
    segments = tuple(p.count for p in pools)
    with io.capture():
        inputs = capture_block_inputs(model, blocks, input_ids, cfg.device, cfg.batch_size,
                                      cfg.progress, alloc=alloc, segments=segments)  # fmt: skip
    timers["capture"] = time.perf_counter() - t_start
    out = alloc(tuple(inputs.hidden.shape), inputs.hidden.dtype)
    row_pool = [p for p in pools for _ in range(p.count)]
    structure: list[list[str]] | None = None
    for b, block in enumerate(tqdm(blocks, desc=f"sweep {cfg.method}", disable=not cfg.progress)):
        io.load(b, block)
        inputs.block = b
        if structure is None:
            probed = probe_groups(block, inputs, cfg.batch_size, cfg.device)
            structure = [[name for name, _ in g] for g in probed]
        groups = [[(name, block.get_submodule(name)) for name in g] for g in structure]
        t0 = time.perf_counter()
        stats, lang_h = _pass(block, inputs, out, groups, pools, row_pool, method.stat, cfg,
                              io.forwards, damage_langs if predict else None)  # fmt: skip
        timers["statistics"] += time.perf_counter() - t0
        _solve_entries(f"{prefix}.{b}", b, block, groups, stats, lang_h, entries, cfg, method,
                       sinks, result, timers)  # fmt: skip
        del stats, lang_h
        io.release(b, block)
        inputs.hidden, out = out, inputs.hidden
    result.seconds = timers | {"total": time.perf_counter() - t_start}
    return result


def _pass(block, inputs, out, groups, pools, row_pool, kind, cfg, forwards, langs):
    """One forward of the dense block over every pool: per group, one statistic per pool
    (and the Hessians of ``langs`` for the damage, unless None), and the outputs in ``out``.
    Returns the per-group :class:`LanguageStats` and, with ``langs``, per group
    ``{lang: H_l}``."""
    keys = [p.key for p in pools]
    predict = langs is not None
    storage = _storage(cfg)
    stats, extra = [], []
    current: list[Pool] = [pools[0]]
    handles = []
    for group in groups:
        dim = get_weight(group[0][1]).shape[1]
        st = LanguageStats(kind, dim, keys, cfg.device, storage, cfg.offload_dir)
        hs = None
        if predict and kind != "hessian":
            hs = LanguageStats("hessian", dim, langs, cfg.device, storage, cfg.offload_dir)
        stats.append(st)
        extra.append(hs)

        def hook(module, args, st=st, hs=hs):
            st.update(current[0].key, args[0])
            if hs is not None and current[0].lang in hs.n:
                hs.update(current[0].lang, args[0])

        handles.append(group[0][1].register_forward_pre_hook(hook))
    try:  # accumulators made outside inference mode: the mixes are read outside it
        with forwards(), torch.inference_mode():
            for sl, args, kwargs in inputs.batches(cfg.batch_size):
                current[0] = row_pool[sl.start]
                y = block(inputs.hidden[sl].to(cfg.device), *args, **kwargs)
                out[sl] = block_output(y).to(out.device)
    finally:
        for h in handles:
            h.remove()
    if not predict:
        return stats, None
    lang_h = []
    for st, hs in zip(stats, extra, strict=True):
        per_lang = {}
        for lang in langs:
            if hs is not None:
                per_lang[lang] = statistic_matrix(hs.get(lang))
            else:  # the language's pools together, by their tokens
                mine = {p.key: p.count for p in pools if p.lang == lang}
                per_lang[lang] = statistic_matrix(st.mix(mine))
        lang_h.append(per_lang)
    return stats, lang_h


def _solve_entries(prefix, b, block, groups, stats, lang_h, entries, cfg, method, sinks, result,
                   timers) -> None:  # fmt: skip
    """Every entry's solve of this block, its damage and its write; dense weights restored
    after each."""
    linears = [(name, mod) for group in groups for name, mod in group]
    dense = {name: get_weight(mod).detach().clone() for name, mod in linears}
    energy = None
    if lang_h is not None:
        t0 = time.perf_counter()
        energy = [
            {name: {lang: output_energy(dense[name], H) for lang, H in hl.items()}
             for name, _ in group}
            for group, hl in zip(groups, lang_h, strict=True)
        ]  # fmt: skip
        timers["damage"] += time.perf_counter() - t0
    for entry in entries:
        rep = result.reports[entry.name]
        t0 = time.perf_counter()
        for group, st in zip(groups, stats, strict=True):
            solve_group(group, st.mix(entry.shares), method, cfg, prefix, rep)
        t1 = time.perf_counter()
        timers["solve"] += t1 - t0
        if lang_h is not None:
            for gi, group in enumerate(groups):
                for name, mod in group:
                    result.damage[entry.name] += damage_terms(
                        b, name, dense[name], get_weight(mod), lang_h[gi], energy[gi][name]
                    )
        t2 = time.perf_counter()
        timers["damage"] += t2 - t1
        if entry.write:
            sinks[entry.name](b, block, rep)
        else:  # nothing to write: keep the manifest's records, not the masks or grids
            rep.masks.clear()
            rep.quant.clear()
        for name, mod in linears:
            set_weight(mod, dense[name])
        timers["write"] += time.perf_counter() - t2
