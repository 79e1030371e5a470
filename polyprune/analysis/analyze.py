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

and mask IoU is computed from the runs' saved masks, one Linear at a time (``iou.py``). Each
diagnostic is a metric of the registry (``metric.py``) that owns its accumulation, aggregation
and report section; this module only checks, runs the pass and orchestrates. The result is one
JSON-able dict, which ``report.py`` turns into plots, ``report.md`` and ``metrics.json``.
The held-out text is the source's held-out split (never used for calibration): per language,
the first ``nsamples`` windows of ``seqlen`` tokens of its EOS-joined documents, each starting
with BOS where the tokenizer adds one (``data.windows``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from polyprune.analysis.checks import check_masks, check_runs_match
from polyprune.analysis.hidden import lockstep_block_outputs
from polyprune.analysis.metric import Metric, PassContext, get_metric, metric_names
from polyprune.checks import check_device, check_dtype
from polyprune.compress.manifest import MASKS, RunManifest
from polyprune.errors import InputError

__all__ = ["METRICS", "AnalysisConfig", "Run", "analyze", "describe_runs", "heldout_windows"]

logger = logging.getLogger(__name__)

METRICS = metric_names()  # the registry's (polyprune.analysis.metric), in report order


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
    if "sparsity_profile" in s:
        parts.append(str(s["sparsity_profile"]))
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


def _choose_metrics(cfg: AnalysisConfig, ctx: PassContext) -> list[Metric]:
    """The metrics to compute, in the order asked; an explicitly named one that cannot run is an
    InputError, an implicit one is skipped with a warning."""
    wanted = [get_metric(n) for n in cfg.metrics or METRICS]
    chosen = []
    for metric in wanted:
        why = metric.unavailable(ctx)
        if why is None:
            chosen.append(metric)
        elif cfg.metrics is not None:
            raise InputError(f"metric {metric.name}: {why}")
        else:
            (logger.debug if metric.optional else logger.warning)(
                "skipping %s: %s", metric.name, why
            )
    return chosen


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


def _run_pass(
    models: dict[str, nn.Module], ids: torch.Tensor, ctx: PassContext, metrics: list[Metric]
) -> dict[str, dict]:
    """One lockstep pass of the dense model (``"dense"``) and some compressed ones, feeding
    every metric's accumulator (one per ``accumulator_key``); returns key -> state."""
    accs = {}
    for m in metrics:
        if m.needs_pass and m.pass_key not in accs:
            accs[m.pass_key] = m.accumulator(models, ctx)
    for acc in accs.values():
        acc.open()

    def on_batch(name: str, seg: int, rows: slice) -> None:
        for acc in accs.values():
            acc.on_batch(name, seg, rows)

    cfg = ctx.cfg
    try:
        for _, outs in lockstep_block_outputs(
            models, ids, ctx.segments, cfg.batch_size, cfg.device, on_batch, cfg.progress
        ):
            for acc in accs.values():
                acc.on_layer(outs)
    finally:
        for acc in accs.values():
            acc.close()
    return {key: acc.state() for key, acc in accs.items()}


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
    ctx = PassContext(cfg, runs, meta)
    metrics = _choose_metrics(cfg, ctx)
    if not metrics:
        raise InputError("no metric can run on these inputs")
    names = [m.name for m in metrics]
    if "iou" in names:
        check_masks(runs, meta, MASKS)
    tok = tokenizer or load_tokenizer(dense)
    result: dict = {
        "dense": str(dense),
        "runs": [r.summary() for r in runs],
        "metrics": names,
        "config": {k: v for k, v in asdict(cfg).items() if k != "progress"},
        "layers": n_blocks,
    }
    states: dict[str, dict] = {}  # accumulator key -> model name -> state, over all passes
    if any(m.needs_pass for m in metrics):
        ids, ctx.segments, counts = heldout_windows(tok, cfg.langs, src, cfg.nsamples,
                                                    cfg.seqlen)  # fmt: skip
        ctx.keep = _token_mask(ids, tok).to(cfg.device)
        result["eval_text"] = {"source": src.describe(), "windows": counts, "seqlen": cfg.seqlen,
                               "tokens": int(ids.numel())}  # fmt: skip
        logger.info("held-out text: %s windows of %d tokens",
                    ", ".join(f"{k} {v}" for k, v in counts.items()), cfg.seqlen)  # fmt: skip
        dense_model = load_model(dense, device=cfg.device, dtype=cfg.dtype, tokenizer=False).model
        per_pass = cfg.models_per_pass or len(runs)
        for start in range(0, len(runs), per_pass):
            chunk = runs[start : start + per_pass]
            models = {"dense": dense_model}
            for r in chunk:
                models[r.label] = load_model(
                    str(r.path), device=cfg.device, dtype=cfg.dtype, tokenizer=False
                ).model
            logger.info("pass %d: dense + %s", start // per_pass + 1,
                        ", ".join(r.label for r in chunk))  # fmt: skip
            for key, state in _run_pass(models, ids, ctx, metrics).items():
                for name, v in state.items():  # the dense model's are the same in every pass
                    states.setdefault(key, {}).setdefault(name, v)
            del models
    # the pass metrics' sections first, then the others (metrics.json's order as before)
    for m in sorted(metrics, key=lambda m: (not m.needs_pass, METRICS.index(m.name))):
        result[m.name] = m.finish(states.get(m.pass_key, {}), ctx)
    return result
