"""``polyprune analyze``: a dense model and compressed runs in, every diagnostic's numbers out.

All inputs are checked before any weights load (runs, languages, metrics, architectures,
masks, held-out text). Then one lockstep pass over the decoder blocks (``hidden.py``) feeds
three of the diagnostics at once:

* SNR and pruning error per layer, per evaluation language (``snr.py``), over the ordinary
  tokens: special tokens are left out, as for LSAR (Gemma's BOS hidden state is its attention
  sink, the same in every window and ten times the norm of the others: it would dominate);
* LSAR: per layer, the mean embedding of every prompt (token mean, special tokens left out)
  for the dense and each compressed model (``lsar.py``);
* LAPE: hooks on the gated MLPs (any activation) count activations per language while the blocks run
  (``lape.py``);

and mask IoU is computed from the runs' saved masks, one Linear at a time (``iou.py``). The
result is one JSON-able dict, which ``report.py`` turns into plots, ``report.md`` and
``metrics.json``. The held-out text is the source's held-out split (never used for
calibration): per language, the first ``nsamples`` windows of ``seqlen`` tokens of its
EOS-joined documents, each starting with BOS where the tokenizer adds one (``data.windows``).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from polyprune.analysis.checks import check_masks, check_runs_match
from polyprune.analysis.hidden import lockstep_block_outputs
from polyprune.analysis.iou import MaskFile, group_of, pair_counts, ratio
from polyprune.analysis.lape import (
    GATED_PARTS,
    LapeCounter,
    box_stats,
    gated_mlps,
    neuron_groups,
    select_language_neurons,
)
from polyprune.analysis.lsar import lsar_subspace, projected_change, projected_norms
from polyprune.analysis.snr import LayerErrorStats
from polyprune.checks import check_device, check_dtype
from polyprune.compress.manifest import MASKS, RunManifest
from polyprune.errors import InputError

__all__ = ["METRICS", "AnalysisConfig", "Run", "analyze", "describe_runs", "heldout_windows"]

logger = logging.getLogger(__name__)

METRICS = ("snr", "error", "iou", "lsar", "lape")


@dataclass(frozen=True)
class AnalysisConfig:
    """What to analyse and how. ``metrics=None`` means every diagnostic the runs allow (IoU
    needs saved masks, LAPE a gated MLP); naming one that cannot run is an error."""

    langs: tuple[str, ...]
    metrics: tuple[str, ...] | None = None
    source: str = "bundled"
    nsamples: int = 16  # held-out windows per language
    seqlen: int = 512
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "auto"
    lsar_rank: int | None = None  # default L - 1
    lape_group_percent: float = 2.0
    lape_top_rate: float = 0.01
    lape_filter_rate: float = 0.95
    lape_bar_ratio: float = 0.95
    models_per_pass: int | None = None  # compressed models held beside the dense one
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.langs:
            raise InputError("no evaluation languages given (--langs)")
        if len(set(self.langs)) != len(self.langs):
            raise InputError(f"--langs {','.join(self.langs)} names a language twice")
        for m in self.metrics or ():
            if m not in METRICS:
                raise InputError(f"unknown metric {m!r}; allowed: {', '.join(METRICS)}")
        for name, v in (("nsamples", self.nsamples), ("seqlen", self.seqlen),
                        ("batch-size", self.batch_size)):  # fmt: skip
            if v < 1:
                raise InputError(f"--{name} {v} must be at least 1")
        if self.seqlen < 2:
            raise InputError(f"--seqlen {self.seqlen} must be at least 2")
        if self.models_per_pass is not None and self.models_per_pass < 1:
            raise InputError(f"--models-per-pass {self.models_per_pass} must be at least 1")
        if not 0 < self.lape_group_percent <= 50:
            raise InputError(f"--lape-group {self.lape_group_percent}% must be in (0, 50]")
        for name, v in (("lape-top-rate", self.lape_top_rate),
                        ("lape-filter-rate", self.lape_filter_rate),
                        ("lape-bar-ratio", self.lape_bar_ratio)):  # fmt: skip
            if not 0 < v < 1:
                raise InputError(f"--{name} {v} must be in (0, 1)")
        check_device(self.device)
        check_dtype(self.dtype)
        if self.lsar_rank is not None and not 1 <= self.lsar_rank <= len(self.langs) - 1:
            raise InputError(
                f"--lsar-rank {self.lsar_rank} must be in [1, {len(self.langs) - 1}] for "
                f"{len(self.langs)} languages"
            )


@dataclass
class Run:
    """One compressed output directory and what its manifest says about it."""

    path: Path
    label: str
    method: str
    setting: str  # method and strength, e.g. "sparsegpt unstructured 0.50"
    mix: str  # calibration mix, "-" for data-free methods
    seed: int | None
    has_masks: bool
    manifest: RunManifest = field(repr=False)

    def summary(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v)
                for k, v in asdict(self).items() if k != "manifest"}  # fmt: skip


def _setting(manifest: RunManifest) -> str:
    s = manifest.settings
    parts = [manifest.method]
    if "pattern" in s:
        parts.append(str(s["pattern"]))
    if "sparsity" in s:
        parts.append(f"{s['sparsity']:.2f}")
    q = manifest.quantization
    if q:
        parts.append(f"{q.bits}bit g{q.group_size}")
    return " ".join(parts)


def describe_runs(dirs: list[str | Path]) -> list[Run]:
    """Read each run's manifest and give it a short label: its calibration mix, with the
    method setting and the seed added only where they are needed to tell runs apart."""
    runs = []
    for d in dirs:
        path = Path(d)
        manifest = RunManifest.from_dir(path)
        cal = manifest.calibration or {}
        runs.append(Run(path, "", manifest.method, _setting(manifest), cal.get("mix", "-"),
                        cal.get("seed"), (path / MASKS).is_file(), manifest))  # fmt: skip
    if len({r.path.resolve() for r in runs}) != len(runs):
        raise InputError("a compressed run is named twice")
    many_settings = len({r.setting for r in runs}) > 1
    for r in runs:
        r.label = f"{r.setting} / {r.mix}" if many_settings else r.mix
    _disambiguate(runs, lambda r: f" s{r.seed}" if r.seed is not None else "")
    _disambiguate(runs, lambda r: f" ({r.path.name})")
    return runs


def _disambiguate(runs: list[Run], suffix) -> None:
    """Append ``suffix(run)`` to every label that more than one run has."""
    seen = [r.label for r in runs]
    for r in runs:
        if seen.count(r.label) > 1:
            r.label += suffix(r)


def _choose_metrics(cfg: AnalysisConfig, runs: list[Run], gated: bool) -> tuple[str, ...]:
    """The metrics to compute; an explicitly named one that cannot run is an InputError."""
    explicit = cfg.metrics is not None
    wanted = list(cfg.metrics or METRICS)

    def drop(metric: str, why: str) -> None:
        if explicit:
            raise InputError(f"metric {metric}: {why}")
        logger.warning("skipping %s: %s", metric, why)
        wanted.remove(metric)

    if "iou" in wanted:
        missing = [str(r.path) for r in runs if not r.has_masks]
        if missing:
            drop("iou", f"no {MASKS} in {', '.join(missing)} (prune with --save-masks)")
        elif all(
            len({r.mix for r in runs if r.setting == s}) < 2 for s in {r.setting for r in runs}
        ):
            drop("iou", "needs runs of at least two calibration mixes with the same setting")
    if "lsar" in wanted and len(cfg.langs) < 2:
        drop("lsar", "needs at least two evaluation languages")
    if "lape" in wanted:
        if not gated:
            drop("lape", f"the model has no gated MLP ({', '.join(GATED_PARTS)})")
        elif len(cfg.langs) < 2:
            drop("lape", "needs at least two evaluation languages")
    return tuple(wanted)


def heldout_windows(
    tokenizer, langs: tuple[str, ...], source, nsamples: int, seqlen: int
) -> tuple[torch.Tensor, list[slice], dict[str, int]]:
    """Up to ``nsamples`` consecutive ``seqlen``-token windows of held-out text per language,
    each starting with BOS where the tokenizer adds one (``data.windows``): (windows (N,
    seqlen), one slice of rows per language, windows per language)."""
    from polyprune.data.heldout import heldout_stream
    from polyprune.data.windows import cut_windows, window_bos

    parts, segments, counts = [], [], {}
    start = 0
    bos = window_bos(tokenizer)
    for lang in langs:
        stream = heldout_stream(tokenizer, lang, source, max_tokens=nsamples * seqlen)
        rows = cut_windows(stream, seqlen, bos, nsamples)
        n = rows.shape[0]
        if n == 0:
            raise InputError(
                f"language {lang} has only {len(stream)} held-out tokens, fewer than one "
                f"window of --seqlen {seqlen}; use a smaller --seqlen"
            )
        if n < nsamples:
            logger.warning("%s: %d held-out windows of %d tokens (asked for %d)",
                           lang, n, seqlen, nsamples)  # fmt: skip
        parts.append(rows)
        segments.append(slice(start, start + n))
        counts[lang] = n
        start += n
    return torch.cat(parts), segments, counts


def _token_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """(N, T) float: 1 for ordinary tokens, 0 for special ones (left out of prompt means)."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype)
    keep = ~torch.isin(input_ids, special)
    if not keep.any(1).all():
        raise InputError("a held-out window holds special tokens only")
    return keep.float()


@dataclass
class _PassResult:
    errors: dict[str, list[list[LayerErrorStats]]]  # run -> language -> layer
    embeddings: dict[str, list[torch.Tensor]]  # model -> layer -> (N, d) prompt means
    lape: dict[str, LapeCounter]


def _run_pass(
    models: dict[str, nn.Module], ids: torch.Tensor, segments: list[slice], keep: torch.Tensor,
    cfg: AnalysisConfig, metrics: tuple[str, ...], n_langs: int,
) -> _PassResult:  # fmt: skip
    """One lockstep pass of the dense model (``"dense"``) and some compressed ones."""
    runs = [n for n in models if n != "dense"]
    res = _PassResult({n: [[] for _ in segments] for n in runs}, {n: [] for n in models}, {})
    counters = {}
    if "lape" in metrics:
        counters = {n: LapeCounter(m, n_langs, device=cfg.device) for n, m in models.items()}
    for c in counters.values():
        c.__enter__()

    keep_d = keep.to(cfg.device)

    def on_batch(name: str, seg: int, rows: slice) -> None:
        if name in counters:
            counters[name].lang = seg
            counters[name].keep = keep_d[rows].bool().reshape(-1)  # special tokens left out

    n_tokens = keep.sum(1, keepdim=True)  # (N, 1)
    try:
        for _, outs in lockstep_block_outputs(
            models, ids, segments, cfg.batch_size, cfg.device, on_batch, cfg.progress
        ):
            if "snr" in metrics or "error" in metrics:
                for name in runs:
                    for i, seg in enumerate(segments):
                        s = LayerErrorStats()
                        k = keep_d[seg].bool()  # BOS: a context-free sink, huge norms
                        s.update(outs["dense"][seg][k], outs[name][seg][k])
                        res.errors[name][i].append(s)
            if "lsar" in metrics:
                for name, h in outs.items():  # (N, T, d) -> prompt means (N, d)
                    k = keep_d.to(h.device, h.dtype).unsqueeze(-1)
                    means = (h * k).sum(1).float().cpu() / n_tokens
                    res.embeddings[name].append(means)
    finally:
        for c in counters.values():
            c.__exit__(None, None, None)
    res.lape = counters
    return res


def _sum_stats(stats: list[LayerErrorStats]) -> LayerErrorStats:
    out = LayerErrorStats()
    for s in stats:
        out.signal += s.signal
        out.error += s.error
        out.norm_sum += s.norm_sum
        out.tokens += s.tokens
        out.dim = s.dim
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _error_metrics(
    errors: dict[str, list[list[LayerErrorStats]]], langs: tuple[str, ...]
) -> tuple[dict, dict]:
    """SNR and pruning error per run, per language (and ``all``), per layer."""
    snr, pe = {}, {}
    for run, per_lang in errors.items():
        depth = len(per_lang[0])
        tables = {lang: per_lang[i] for i, lang in enumerate(langs)}
        tables["all"] = [_sum_stats([per_lang[i][layer] for i in range(len(langs))])
                         for layer in range(depth)]  # fmt: skip
        snr[run] = {
            "layers": {k: [s.snr_db for s in v] for k, v in tables.items()},
            "model": {k: sum(s.snr_db for s in v) / depth for k, v in tables.items()},
        }
        pe[run] = {
            "layers": {k: [_finite(s.pruning_error) for s in v] for k, v in tables.items()},
            "model": {
                k: _finite(sum(s.pruning_error for s in v) / depth) for k, v in tables.items()
            },  # fmt: skip
        }
    return snr, pe


def _lsar_metrics(
    emb: dict[str, list[torch.Tensor]], segments: list[slice], langs: tuple[str, ...],
    rank: int | None,
) -> dict:  # fmt: skip
    """Per layer: the LSAR subspace of the dense model, and for each run how far its prompt
    embeddings moved in the language-specific and language-agnostic parts."""
    dense = emb["dense"]
    r = len(langs) - 1 if rank is None else rank
    out: dict = {"rank": r, "dense_norm": {"specific": [], "agnostic": []}, "runs": {}}
    subspaces = []
    for layer_emb in dense:
        M = torch.stack([layer_emb[seg].mean(0) for seg in segments], 1)  # (d, L)
        Ms = lsar_subspace(M, r)
        subspaces.append(Ms)
        s, a = projected_norms(Ms, layer_emb)
        out["dense_norm"]["specific"].append(s)
        out["dense_norm"]["agnostic"].append(a)
    for run, layers in emb.items():
        if run == "dense":
            continue
        rec: dict = {"specific": [], "agnostic": [], "relative_specific": [],
                     "relative_agnostic": [], "per_language": {lang: {"specific": [],
                     "agnostic": []} for lang in langs}}  # fmt: skip
        for layer, (Ms, e2) in enumerate(zip(subspaces, layers, strict=True)):
            s, a = projected_change(Ms, dense[layer], e2)
            rec["specific"].append(s)
            rec["agnostic"].append(a)
            rec["relative_specific"].append(s / out["dense_norm"]["specific"][layer])
            rec["relative_agnostic"].append(a / out["dense_norm"]["agnostic"][layer])
            for lang, seg in zip(langs, segments, strict=True):
                ls, la = projected_change(Ms, dense[layer][seg], e2[seg])
                rec["per_language"][lang]["specific"].append(ls)
                rec["per_language"][lang]["agnostic"].append(la)
        out["runs"][run] = rec
    return out


def _lape_metrics(counters: dict[str, LapeCounter], langs: tuple[str, ...], cfg) -> dict:
    """LAPE of the dense and each compressed model: box statistics per neuron group (groups
    of ``lape_group_percent`` % of neurons, sorted by dense LAPE), mean change and output
    magnitude per group, and Tang et al.'s language-specific neurons per language."""
    dense = counters["dense"]
    lape_d = dense.entropy()  # (layers, width)
    groups = neuron_groups(lape_d, cfg.lape_group_percent)
    width = lape_d.shape[1]
    sel_kw = dict(top_rate=cfg.lape_top_rate, filter_rate=cfg.lape_filter_rate,
                  activation_bar_ratio=cfg.lape_bar_ratio)  # fmt: skip
    sel_d = select_language_neurons(dense.probabilities(), **sel_kw)
    sets_d = sel_d.per_language()
    out: dict = {
        "group_percent": cfg.lape_group_percent,
        "groups": [{"neurons": len(g), "dense_lape_range": [lape_d.flatten()[g].min().item(),
                    lape_d.flatten()[g].max().item()]} for g in groups],  # fmt: skip
        "never_firing": {"dense": int(lape_d.isnan().sum())},
        "neurons": lape_d.numel(),
        "selection": {"top_rate": cfg.lape_top_rate, "filter_rate": cfg.lape_filter_rate,
                      "activation_bar_ratio": cfg.lape_bar_ratio,
                      "dense": {lang: len(s) for lang, s in zip(langs, sets_d, strict=True)}},
        "models": {},
    }  # fmt: skip
    for name, counter in counters.items():
        lape = lape_d if name == "dense" else counter.entropy()
        flat, mag = lape.flatten(), counter.output_magnitude().flatten()
        rec = {
            "boxes": [box_stats(flat[g]) for g in groups],
            "magnitude": [mag[g].mean().item() for g in groups],
            "mean_lape": _finite(flat[~flat.isnan()].mean().item()),
        }
        if name != "dense":
            delta = flat - lape_d.flatten()
            rec["change"] = [_finite(delta[g][~delta[g].isnan()].mean().item()) for g in groups]
            out["never_firing"][name] = int(lape.isnan().sum())
            sel = select_language_neurons(counter.probabilities(), **sel_kw)
            rec["selection"] = {}
            for lang, s_d, s_c in zip(langs, sets_d, sel.per_language(), strict=True):
                idx = torch.tensor(sorted(s_d), dtype=torch.long)
                union = len(s_d | s_c)
                rec["selection"][lang] = {
                    "count": len(s_c),
                    "iou_with_dense": len(s_d & s_c) / union if union else 1.0,
                    "lape_change": _finite(delta[idx].nanmean().item()) if len(idx) else None,
                    "magnitude_ratio": _finite(
                        (mag[idx].sum() / counters["dense"].output_magnitude().flatten()[idx]
                         .sum()).item()) if len(idx) else None,
                }  # fmt: skip
        out["models"][name] = rec
    out["layer_of_group"] = [torch.bincount(g // width, minlength=lape_d.shape[0]).tolist()
                             for g in groups]  # fmt: skip
    return out


def _iou_metrics(runs: list[Run]) -> dict:
    """Per setting: the seed-intersected masks of each calibration mix compared pairwise
    (all Linears, per sub-layer type, per layer), and each mix's seed IoU; streamed one
    Linear at a time."""
    out = {}
    for setting in dict.fromkeys(r.setting for r in runs):
        by_mix: dict[str, list[Run]] = {}
        for r in runs:
            if r.setting == setting:
                by_mix.setdefault(r.mix, []).append(r)
        mixes = list(by_mix)
        if len(mixes) < 2:
            logger.warning("IoU: setting %r has one calibration mix only; skipped", setting)
            continue
        files = {m: [MaskFile(r.path / MASKS) for r in rs] for m, rs in by_mix.items()}
        names = files[mixes[0]][0].names()
        for m, fs in files.items():
            for f in fs:
                if set(f.names()) != set(names):
                    raise InputError(f"the masks of mix {m} cover other Linears than {mixes[0]}")
        pairs = list(itertools.combinations(mixes, 2))
        counts = {p: {by: {} for by in ("all", "sublayer", "layer")} for p in pairs}
        seed_counts = {m: {p: {by: {} for by in ("all", "sublayer", "layer")}
                           for p in itertools.combinations(range(len(fs)), 2)}
                       for m, fs in files.items()}  # fmt: skip
        for name in names:
            per_seed = {m: [f[name] for f in fs] for m, fs in files.items()}
            inter = {m: torch.stack(v).all(0) for m, v in per_seed.items()}  # seed intersection
            for by in ("all", "sublayer", "layer"):
                for a, b in pairs:
                    pair_counts({name: inter[a]}, {name: inter[b]}, by, counts[(a, b)][by])
                for m, v in per_seed.items():
                    for i, j in seed_counts[m]:
                        pair_counts({name: v[i]}, {name: v[j]}, by, seed_counts[m][(i, j)][by])
        groups = {by: list(dict.fromkeys(group_of(n, by) for n in names))
                  for by in ("all", "sublayer", "layer")}  # fmt: skip
        matrices: dict = {by: {} for by in groups}
        for by, gs in groups.items():
            for g in gs:
                mat = [[1.0] * len(mixes) for _ in mixes]
                for (a, b), c in counts.items():
                    v = ratio(c[by])[g]
                    mat[mixes.index(a)][mixes.index(b)] = mat[mixes.index(b)][mixes.index(a)] = v
                matrices[by][g] = mat
        seed = {}
        for m, per_pair in seed_counts.items():
            if not per_pair:
                continue
            seed[m] = {by: {g: sum(ratio(c[by])[g] for c in per_pair.values()) / len(per_pair)
                            for g in gs} for by, gs in groups.items()}  # fmt: skip
        out[setting] = {
            "mixes": mixes,
            "seeds": {m: [r.seed for r in rs] for m, rs in by_mix.items()},
            "matrices": matrices,
            "seed_iou": seed,
        }
    return out


def analyze(dense: str, compressed: list[str | Path], cfg: AnalysisConfig, tokenizer=None) -> dict:
    """Every diagnostic of ``cfg.metrics`` for ``dense`` (hub id, directory or ``demo``) and
    the compressed output directories; returns the metrics dict written as metrics.json."""
    from polyprune.data.sources import get_source
    from polyprune.models import (
        find_blocks,
        load_config,
        load_model,
        load_tokenizer,
        max_positions,
        skeleton,
    )

    if not compressed:
        raise InputError("no compressed runs given (--compressed DIR ...)")
    runs = describe_runs(compressed)
    src = get_source(cfg.source)
    for lang in cfg.langs:
        src.check_language(lang)
    config = load_config(dense)
    limit = max_positions(config)  # longer windows run past the position embeddings
    if limit is not None and cfg.seqlen > limit:
        raise InputError(f"--seqlen {cfg.seqlen} is above the model's maximum positions ({limit})")
    meta = skeleton(config)  # shapes only, no weights
    n_blocks = len(find_blocks(meta)[1])
    check_runs_match(dense, config, runs)
    try:
        gated_mlps(meta)
        gated = True
    except ValueError:
        gated = False
    metrics = _choose_metrics(cfg, runs, gated)
    if not metrics:
        raise InputError("no metric can run on these inputs")
    if "iou" in metrics:
        check_masks(runs, meta, MASKS)
    tok = tokenizer or load_tokenizer(dense)
    needs_pass = bool({"snr", "error", "lsar", "lape"} & set(metrics))
    result: dict = {
        "dense": str(dense),
        "runs": [r.summary() for r in runs],
        "metrics": list(metrics),
        "config": {k: v for k, v in asdict(cfg).items() if k != "progress"},
        "layers": n_blocks,
    }
    if needs_pass:
        ids, segments, counts = heldout_windows(tok, cfg.langs, src, cfg.nsamples, cfg.seqlen)
        keep = _token_mask(ids, tok)
        result["eval_text"] = {"source": src.describe(), "windows": counts, "seqlen": cfg.seqlen,
                               "tokens": int(ids.numel())}  # fmt: skip
        logger.info("held-out text: %s windows of %d tokens",
                    ", ".join(f"{k} {v}" for k, v in counts.items()), cfg.seqlen)  # fmt: skip
        dense_model = load_model(dense, device=cfg.device, dtype=cfg.dtype, tokenizer=False).model
        per_pass = cfg.models_per_pass or len(runs)
        errors, emb, lape = {}, {}, {}
        for start in range(0, len(runs), per_pass):
            chunk = runs[start : start + per_pass]
            models = {"dense": dense_model}
            for r in chunk:
                models[r.label] = load_model(
                    str(r.path), device=cfg.device, dtype=cfg.dtype, tokenizer=False
                ).model
            logger.info("pass %d: dense + %s", start // per_pass + 1,
                        ", ".join(r.label for r in chunk))  # fmt: skip
            res = _run_pass(models, ids, segments, keep, cfg, metrics, len(cfg.langs))
            errors.update(res.errors)
            for name, v in res.embeddings.items():
                emb.setdefault(name, v)  # the dense model's are the same in every pass
            for name, c in res.lape.items():
                lape.setdefault(name, c)
            del models, res
        if "snr" in metrics or "error" in metrics:
            snr, pe = _error_metrics(errors, cfg.langs)
            if "snr" in metrics:
                result["snr"] = snr
            if "error" in metrics:
                result["error"] = pe
        if "lsar" in metrics:
            result["lsar"] = _lsar_metrics(emb, segments, cfg.langs, cfg.lsar_rank)
        if "lape" in metrics:
            result["lape"] = _lape_metrics(lape, cfg.langs, cfg)
    if "iou" in metrics:
        result["iou"] = _iou_metrics(runs)
    return result
