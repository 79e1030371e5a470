"""``polyprune sweep``: many calibration mixes of one method and sparsity from one pass.

Plans the language pools of a set of mixes (:func:`plan_sweep`), builds their windows, streams
the checkpoint once through :func:`polyprune.compress.sweep.sweep_blocks`, and writes, in one
staged output folder,

* ``<mix>/``: an ordinary polyprune output per written mix (weights, tokenizer, manifest with
  ``settings.sweep`` saying how it was made and ``settings.propagate = dense``);
* with ``predict``: ``predicted_damage.csv`` / ``.md`` / ``.png``, the mix x language table of
  predicted damage (:mod:`polyprune.compress.damage`, block combination), for every mix,
  written or not;
* ``sweep.json``: the plan, the timings and the predicted table.

Pools (docs/mixes.md): ``exact`` (default) gives each mix the windows its own run would draw:
language ``l`` of mix ``m`` gets the pool ``(l, m.counts(nsamples)[l])``, so every entry equals
``polyprune prune --calib m --nsamples N --propagate dense`` (bit for bit for one language, to
fp32 rounding otherwise) at the cost of one pool per distinct (language, count). ``shared``
draws one pool of ``nsamples`` windows per language and reweights it: any weights, fewest
forwards, but a weighted entry is not any run's windows (the optimiser's search uses it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from polyprune.api import build_manifest, checkpoint_dtype, write_run_files
from polyprune.compress.damage import COMBINES, DamageTerm, combine
from polyprune.compress.engine import EngineConfig
from polyprune.compress.export import CheckpointWriter, output_dtype
from polyprune.compress.langstats import mix_shares
from polyprune.compress.manifest import MANIFEST
from polyprune.compress.masks import Pattern
from polyprune.compress.methods import get_method
from polyprune.compress.solver import PruneConfig
from polyprune.compress.stream import StreamedModel, local_checkpoint, parse_size
from polyprune.compress.sweep import Pool, SweepEntry, SweepReport, sweep_blocks
from polyprune.data.mix import CalibrationMix, CalibrationSet, build_calibration_set
from polyprune.data.sources import get_source
from polyprune.errors import InputError, shorten
from polyprune.models import load_config, load_tokenizer, resolve_dtype, resolve_model_path
from polyprune.outputs import check_not_source, check_output_dir, check_writable, staged_output

__all__ = [
    "POOLINGS",
    "SweepResult",
    "all_pairs",
    "grid_mixes",
    "mix_dirname",
    "parse_mixes",
    "plan_sweep",
    "sweep",
]

logger = logging.getLogger(__name__)

POOLINGS = ("exact", "shared")
PREDICTED = "predicted_damage"


def parse_mixes(spec: str) -> list[CalibrationMix]:
    """``"ar;de;de,en;sw:3,en:1"`` -> mixes (``;`` between mixes, each a ``--calib`` mix)."""
    parts = [p.strip() for p in spec.split(";")]
    if not spec.strip() or any(not p for p in parts):
        raise InputError(f"bad --mixes {spec!r}: mixes separated by ';', e.g. 'de;en;de,en'")
    return [CalibrationMix.parse(p) for p in parts]


def all_pairs(langs: Sequence[str]) -> list[CalibrationMix]:
    """The equal two-language mixes of ``langs``, in the languages' order."""
    return [
        CalibrationMix((a, b), (1.0, 1.0))
        for i, a in enumerate(langs)
        for b in langs[i + 1 :]
    ]  # fmt: skip


def grid_mixes(langs: Sequence[str], resolution: int) -> list[CalibrationMix]:
    """Every point of the simplex lattice of ``resolution`` over ``langs`` (integer weights
    summing to ``resolution``; zero weights left out)."""
    from polyprune.compress.mixopt import compositions

    if resolution < 1:
        raise InputError(f"--grid must be >= 1, got {resolution}")
    out = []
    for counts in compositions(resolution, len(langs)):
        used = [(lang, int(c)) for lang, c in zip(langs, counts, strict=True) if c]
        out.append(CalibrationMix(tuple(u[0] for u in used), tuple(float(u[1]) for u in used)))
    return out


def mix_dirname(mix: CalibrationMix) -> str:
    """The folder of a mix's output: ``de``, ``de+en``, ``sw3+en1`` (weights reduced when
    all equal)."""
    ws = set(mix.weights)
    if len(ws) == 1:
        return "+".join(mix.langs)
    return "+".join(f"{lang}{w:g}" for lang, w in zip(mix.langs, mix.weights, strict=True))


@dataclass
class _Planned:
    name: str
    mix: CalibrationMix
    shares: dict[str, float]  # pool key -> token share
    write: bool
    pools: list[Pool]  # the pools this mix's windows come from, in mix order


def plan_sweep(
    mixes: Sequence[CalibrationMix],
    nsamples: int,
    pooling: str = "exact",
    write: Sequence[bool] | None = None,
    extra_langs: Sequence[str] = (),
) -> tuple[list[Pool], list[_Planned]]:
    """The pools a sweep needs and each mix's shares of them (module docstring).
    ``extra_langs``: languages to predict damage on that no mix uses (a pool of ``nsamples``
    windows each, used by no mix)."""
    if pooling not in POOLINGS:
        raise InputError(f"unknown pooling {pooling!r}; allowed: {', '.join(POOLINGS)}")
    write = [True] * len(mixes) if write is None else list(write)
    pools: dict[str, Pool] = {}
    planned, names = [], set()
    for mix, w in zip(mixes, write, strict=True):
        name = mix_dirname(mix)
        if name in names:
            raise InputError(f"mix {mix} is given twice")
        names.add(name)
        if pooling == "exact":
            counts = mix.counts(nsamples)
            used = [Pool(lang, c) for lang, c in counts.items() if c > 0]
            shares = {p.key: p.count / nsamples for p in used}
        else:
            used = [Pool(lang, nsamples) for lang in mix.langs]
            by_lang = mix_shares(mix)
            shares = {p.key: by_lang[p.lang] for p in used if p.lang in by_lang}
        for p in used:
            pools.setdefault(p.key, p)
        planned.append(_Planned(name, mix, shares, w, used))
    langs = {p.lang for p in pools.values()}
    for lang in extra_langs:
        if lang not in langs:
            pools.setdefault(f"{lang}/{nsamples}", Pool(lang, nsamples))
    # Pools grouped by language (a language's pools are fed one after the other)
    order = sorted(pools.values(), key=lambda p: (_first(planned, extra_langs, p.lang), -p.count))
    return order, planned


def _first(planned: list[_Planned], extra: Sequence[str], lang: str) -> int:
    seen = list(dict.fromkeys([q.lang for p in planned for q in p.pools] + list(extra)))
    return seen.index(lang)


@dataclass
class SweepResult:
    entries: list[str]  # mix names, in the order given
    written: list[str]
    predicted: dict[str, dict[str, float]] = field(default_factory=dict)  # mix -> lang -> dmg
    seconds: dict[str, float] = field(default_factory=dict)
    pools: list[str] = field(default_factory=list)
    out: str | None = None
    # mix -> every Linear's error and energy per language (with predict): what ``predicted``
    # combines, for another combination or a look at single Linears
    terms: dict[str, list[DamageTerm]] = field(default_factory=dict, repr=False)

    def langs(self) -> list[str]:
        return list(dict.fromkeys(lang for row in self.predicted.values() for lang in row))


def _pool_windows(pools, tokenizer, source, seqlen, seed, sampling) -> dict[str, CalibrationSet]:
    out = {}
    for p in pools:
        out[p.key] = build_calibration_set(
            CalibrationMix((p.lang,), (1.0,)), tokenizer, source, p.count, seqlen, seed, sampling
        )
    return out


def _entry_calibration(plan: _Planned, windows: dict[str, CalibrationSet], pooling: str,
                       nsamples: int) -> dict:  # fmt: skip
    """The calibration record of an entry: the windows its statistic comes from, as the run
    it equals would record them (same fingerprint, so the matrix can reuse it)."""
    sets = [windows[p.key] for p in plan.pools]
    ids = torch.cat([s.input_ids for s in sets])
    langs = [lang for s in sets for lang in s.langs]
    first = sets[0]
    counts = {p.lang: p.count for p in plan.pools}
    record = CalibrationSet(ids, langs, counts, str(plan.mix), first.mode, first.seqlen,
                            first.seed, first.source).manifest()  # fmt: skip
    if pooling == "shared":
        record["shares"] = {k.split("/")[0]: v for k, v in plan.shares.items()}
        record["nsamples_per_language"] = nsamples
    return record


def _check(method, sparsity, pattern, nsamples, seqlen, seed, sampling, source, mixes, pooling):
    """Everything that needs neither the model nor the text; returns the prune config."""
    from polyprune.data.mix import check_calibration

    spec = get_method(method, "prune")
    if spec.data_free:
        raise InputError(f"--method {method} uses no calibration data: every mix is the same")
    pat = Pattern.parse(pattern)
    if sparsity is None:
        sparsity = pat.sparsity if pat.structured else 0.5
    check_calibration(nsamples, seqlen, seed, sampling)
    src = get_source(source)
    for mix in mixes:
        if pooling == "exact":  # shared pools reweight: any weights will do
            mix.counts(nsamples)
        for lang in mix.langs:
            src.check_language(lang)
    if not mixes:
        raise InputError("no mixes to sweep: give --mixes, --all-single, --all-pairs or --grid")
    return PruneConfig(sparsity, pat)


def sweep(
    model: str | os.PathLike,
    method: str,
    mixes: Sequence[CalibrationMix],
    sparsity: float | None = None,
    pattern: str = "unstructured",
    predict_only: Sequence[CalibrationMix] = (),
    predict: bool = False,
    write: bool = True,
    pooling: str = "exact",
    langs: Sequence[str] = (),
    damage_langs: Sequence[str] | None = None,
    damage_combine: str = "block",
    source: str = "bundled",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    sampling: str = "concat",
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 8,
    offload: str = "auto",
    offload_dir: str | None = None,
    max_shard_size: str | int = "5GB",
    save_masks: bool = False,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> SweepResult:
    """Compress ``model`` (a safetensors checkpoint: hub id, directory, ``demo``,
    ``gemma-3-270m``) once per mix of ``mixes`` from one pass, writing each to
    ``out/<mix>/`` (unless ``write`` is False); ``predict_only`` mixes are solved for the
    predicted damage only. ``langs``: more languages to predict the damage on;
    ``damage_langs``: only these (default: every language of a mix or of ``langs``);
    ``damage_combine``: how Linears combine into one damage per language
    (:func:`polyprune.compress.damage.combine`)."""
    t0 = time.perf_counter()
    if damage_combine not in COMBINES:
        raise InputError(f"unknown damage combination {shorten(str(damage_combine))}; allowed: "
                         f"{', '.join(COMBINES)}")  # fmt: skip
    cfg, pools, plans = _settings(method, mixes, predict_only, predict, write, pooling, langs,
                                  sparsity, pattern, nsamples, seqlen, seed, sampling, source,
                                  device, batch_size, save_masks, progress, offload, offload_dir,
                                  out)  # fmt: skip
    prune_cfg = cfg.prune
    max_shard = parse_size(max_shard_size)
    if out is not None:
        check_output_dir(out, overwrite)
        check_writable(os.path.dirname(os.path.abspath(out)))
    path = resolve_model_path(model)
    if out is not None:
        check_not_source(out, [path] if os.path.isdir(path) else [])
    config = load_config(path)
    tokenizer = load_tokenizer(path)
    path = local_checkpoint(path)
    t = time.perf_counter()
    windows = _pool_windows(pools, tokenizer, source, seqlen, seed, sampling)
    timings = {"calibration_data": time.perf_counter() - t}
    input_ids = torch.cat([windows[p.key].input_ids for p in pools])
    logger.info("sweep: %d mixes from %d pools (%s), %d windows", len(plans), len(pools),
                ", ".join(p.key for p in pools), input_ids.shape[0])  # fmt: skip
    src_dtype = checkpoint_dtype(config)
    run_dtype = resolve_dtype(dtype, device, src_dtype)
    if run_dtype == "auto":
        run_dtype = src_dtype or torch.float32
    result = SweepResult([p.name for p in plans], [p.name for p in plans if p.write],
                         pools=[p.key for p in pools],
                         out=None if out is None else str(out))  # fmt: skip
    staged = staged_output(out, overwrite) if out is not None else contextlib.nullcontext()
    with staged as tmp:
        out_dtype = output_dtype("dense", None, src_dtype, run_dtype)
        rep = _stream(path, plans, pools, input_ids, cfg, tmp, out_dtype, run_dtype, max_shard,
                      predict, damage_langs)  # fmt: skip
        timings.update({f"engine_{k}": v for k, v in rep.seconds.items()})
        if predict:
            result.terms = {n: rep.damage[n] for n in result.entries}
            result.predicted = {n: combine(rep.damage[n], damage_combine)
                                for n in result.entries}  # fmt: skip
        timings["total"] = time.perf_counter() - t0
        result.seconds = timings
        if tmp is not None:
            shared = None
            for plan in plans:
                if plan.write:
                    where = Path(tmp) / plan.name
                    before = set(where.iterdir())
                    _write_entry(where, plan, cfg, prune_cfg, path, run_dtype, windows,
                                 rep.reports[plan.name], command, timings, tokenizer, pooling,
                                 nsamples, len(plans), shared)  # fmt: skip
                    if shared is None:  # what the tokenizer wrote (the manifest aside)
                        shared = sorted(f for f in set(where.iterdir()) - before
                                        if f.name != MANIFEST)  # fmt: skip
            _write_tables(Path(tmp), result, plans, str(model), method, prune_cfg, pooling,
                          nsamples, damage_combine)  # fmt: skip
    return result


def _settings(method, mixes, predict_only, predict, write, pooling, langs, sparsity, pattern,
              nsamples, seqlen, seed, sampling, source, device, batch_size, save_masks,
              progress, offload, offload_dir, out):  # fmt: skip
    """The engine config and the plan, every setting checked (no model, no text yet)."""
    all_mixes = list(mixes) + list(predict_only)
    prune_cfg = _check(method, sparsity, pattern, nsamples, seqlen, seed, sampling, source,
                       all_mixes, pooling)  # fmt: skip
    if predict_only and not predict:
        raise InputError("predict-only mixes (--grid) need --predict")
    writes = [write] * len(mixes) + [False] * len(predict_only)
    if out is None and any(writes):
        raise InputError("a sweep that writes models needs an output folder (--out)")
    cfg = EngineConfig(method, prune_cfg, device, batch_size, keep_masks=save_masks,
                       progress=progress, offload=offload, offload_dir=offload_dir,
                       propagate="dense")  # fmt: skip
    # languages no mix uses get a pool only to predict the damage on them
    pools, plans = plan_sweep(all_mixes, nsamples, pooling, writes, langs if predict else ())
    return cfg, pools, plans


def _stream(path, plans, pools, input_ids, cfg: EngineConfig, tmp: Path | None, out_dtype,
            run_dtype, max_shard: int, predict: bool, damage_langs) -> SweepReport:  # fmt: skip
    """Stream the checkpoint once through the sweep's block loop, one writer per written mix
    in ``tmp/<mix>/`` (all aborted if anything fails)."""
    sm = StreamedModel(path, cfg.device, run_dtype)
    writers = {}
    for p in plans:
        if p.write:
            (Path(tmp) / p.name).mkdir()
            writers[p.name] = CheckpointWriter(Path(tmp) / p.name, "dense", out_dtype, None,
                                               max_shard, cfg.keep_masks)  # fmt: skip
    entries = [SweepEntry(p.name, p.shares, p.write) for p in plans]
    try:
        for name, tensor in sm.outside():
            for w in writers.values():
                w.add(name, tensor)
        rep = sweep_blocks(sm.model, input_ids, pools, entries, cfg,
                           sm.io(lambda b, block: sm.free(block)),
                           {n: _sink(sm.prefix, w) for n, w in writers.items()}, predict,
                           None if damage_langs is None else tuple(damage_langs))  # fmt: skip
        for w in writers.values():
            w.finish(sm.finish_config(), sm.generation_config(), _version())
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return rep


def _version() -> str:
    from polyprune import __version__

    return __version__


def _sink(prefix: str, writer: CheckpointWriter):
    def sink(b, block, report) -> None:
        where = f"{prefix}.{b}."
        grids = {k: report.quant.pop(k) for k in [k for k in report.quant if k.startswith(where)]}
        masks = {k: report.masks.pop(k) for k in [k for k in report.masks if k.startswith(where)]}
        writer.add_module(where[:-1], block, grids, masks)

    return sink


def _write_entry(directory, plan, cfg, prune_cfg, path, run_dtype, windows, report, command,
                 timings, tokenizer, pooling, nsamples, n_entries,
                 tokenizer_from: list[Path] | None = None) -> None:  # fmt: skip
    calib = _entry_calibration(plan, windows, pooling, nsamples)

    class _Calib:  # build_manifest reads the record through .manifest()
        def manifest(self):
            return calib

    manifest = build_manifest(cfg, prune_cfg, None, "dense", path, run_dtype, _Calib(), report,
                              command, dict(timings), True, None)  # fmt: skip
    manifest.settings["sweep"] = {
        "pooling": pooling,
        "entries": n_entries,
        "shares": {k: round(v, 12) for k, v in plan.shares.items()},
        "equals": f"polyprune prune --calib {plan.mix} --nsamples {nsamples} --propagate dense"
        if pooling == "exact"
        else None,
    }
    if tokenizer_from is None:
        write_run_files(directory, tokenizer, manifest)
        return
    # The same tokenizer files in every entry (Gemma's tokenizer.json is 33 MB): hard links to
    # the first entry's, copies where the filesystem has none.
    for f in tokenizer_from:
        try:
            os.link(f, directory / f.name)
        except OSError:
            shutil.copy2(f, directory / f.name)
    write_run_files(directory, None, manifest)


def _write_tables(tmp: Path, result: SweepResult, plans, model, method, prune_cfg, pooling,
                  nsamples, damage_combine) -> None:  # fmt: skip
    from polyprune.eval.tables import Table, heatmap, to_csv, to_markdown

    info = {
        "model": model,
        "method": method,
        "sparsity": prune_cfg.sparsity,
        "pattern": str(prune_cfg.pattern),
        "pooling": pooling,
        "nsamples": nsamples,
        "pools": result.pools,
        "mixes": {
            p.name: {"mix": str(p.mix), "written": p.write, "shares": p.shares} for p in plans
        },  # fmt: skip
        "seconds": result.seconds,
        "damage_combine": damage_combine,
        "predicted_damage": result.predicted,
    }
    (tmp / "sweep.json").write_text(json.dumps(info, indent=2) + "\n")
    if not result.predicted:
        return
    langs = result.langs()
    names = result.entries
    mean = np.array([[result.predicted[n].get(lang, math.nan) for lang in langs] for n in names])
    t = Table(model=Path(model).name, method=method, level=f"{prune_cfg.sparsity:g}",
              task="predicted", metric="damage", mixes=names, langs=langs, mean=mean,
              std=np.zeros_like(mean), n=np.ones_like(mean))  # fmt: skip
    (tmp / f"{PREDICTED}.csv").write_text(to_csv(t))
    (tmp / f"{PREDICTED}.md").write_text(to_markdown(t))
    heatmap(t, tmp / f"{PREDICTED}.png")
