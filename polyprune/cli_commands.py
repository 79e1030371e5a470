"""What each ``polyprune`` subcommand does once its arguments are parsed: build the library's
settings from them, call the library, print a summary. The parser is in :mod:`polyprune.cli`;
heavy modules (torch, transformers) are imported inside each command, so ``--help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable

from polyprune.cli_mixes import cmd_mix, cmd_sweep
from polyprune.compress.methods import get_method
from polyprune.errors import InputError

__all__ = ["CALIB_DESTS", "COMMANDS"]

log = logging.getLogger("polyprune")

# The calibration flags (argparse dests) a data-free method says it ignores when given.
CALIB_DESTS = ("calib", "source", "nsamples", "seqlen", "seed", "sampling")


def _split(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _cmd_eval(args) -> int:
    from polyprune.eval.evaluate import EvalSettings, PplSettings, evaluate, write_json
    from polyprune.outputs import check_output_file, check_writable

    ev = EvalSettings(
        langs=_split(args.langs), tasks=_split(args.tasks),
        ppl=PplSettings(args.source, args.seqlen, args.max_tokens), limit=args.limit,
        num_fewshot=args.num_fewshot, batch_size=args.batch_size,
    )  # fmt: skip
    ev.check()
    check_output_file(args.out, args.overwrite)
    check_writable(os.path.dirname(os.path.abspath(args.out)))
    report = evaluate(args.model, ev, args.device, args.dtype, progress=not args.quiet)
    report["command"] = shlex.join(["polyprune", *args.argv])
    write_json(report, args.out, args.overwrite)
    for r in report["results"]:
        print(f"{r['task']:<12}{r['lang']:<6}{r['metric']:<10}{r['value']:>10.4f}")
    for u in report["unavailable"]:
        print(f"{u['task']:<12}{u['lang']:<6}unavailable: {u['reason']}")
    print(f"written to  {args.out}")
    return 0


def _cmd_matrix(args) -> int:
    from polyprune.eval.matrix import load_config, run_matrix
    from polyprune.eval.store import ResultStore
    from polyprune.eval.tables import write_tables

    cfg = load_config(args.config)
    if not args.dry_run:
        from polyprune.outputs import check_writable

        check_writable(cfg.store_path.parent)
        check_writable(cfg.tables_dir)
    if not args.tables_only:
        report = run_matrix(cfg, args.executor, dry_run=args.dry_run, progress=not args.quiet)
        if args.dry_run:
            done = {c.cell_id for c in report.done_before}
            for c in report.cells:
                print(f"{'done' if c.cell_id in done else 'todo':<6}{c.cell_id}  {c.label}")
            print(f"{len(report.cells)} cells, {len(done)} done")
            return 0
        print(f"{len(report.cells)} cells: {len(report.done_before)} done before, "
              f"{len(report.ran)} run now, {len(report.failed)} failed")  # fmt: skip
        for cell, why in report.failed:
            print(f"failed  {cell.label}: {why}")
    if not cfg.store_path.is_file():
        raise InputError(f"no results store at {cfg.store_path}; run the matrix first")
    with ResultStore(cfg.store_path) as store:
        written = write_tables(store.results(), cfg.tables_dir, units=store.units())
        missing = {
            (u["task"], u["lang"], u["reason"]) for c in store.cells() for u in c["unavailable"]
        }
    for task, lang, why in sorted(missing):
        print(f"unavailable {task}/{lang}: {why}")
    print(f"tables      {cfg.tables_dir} ({len(written)} files)")
    print(f"summary     {cfg.tables_dir / 'summary.md'}")
    print(f"store       {cfg.store_path}")
    return 1 if not args.tables_only and report.failed else 0


def _common(args) -> dict:
    """Arguments prune and quantize share: calibration, placement, output."""
    keys = ("calib", "source", "nsamples", "seqlen", "seed", "sampling", "device", "dtype",
            "batch_size", "offload", "offload_dir", "max_shard_size", "true_sequential",
            "propagate",
            "blocksize", "percdamp", "out", "overwrite", "format", "bits", "group_size",
            "sym")  # fmt: skip
    return {k: getattr(args, k) for k in keys} | {
        "stream": "auto" if args.stream is None else args.stream,
        "progress": not args.quiet,
        "command": shlex.join(["polyprune", *args.argv]),
    }


def _check_calibration_flags(args) -> None:
    """A calibrating method needs ``--calib``; a data-free one (magnitude, rtn) reads no text:
    say so once if calibration flags were given, rather than ignoring them silently."""
    if not get_method(args.method).data_free:
        if not args.calib:
            raise InputError(f"--method {args.method} needs --calib MIX (e.g. --calib de,en)")
        return
    given = getattr(args, "given", None) or {}
    flags = [given[d] for d in CALIB_DESTS if d in given]
    if flags:
        log.warning(
            "--method %s uses no calibration data; ignoring %s", args.method, ", ".join(flags)
        )


def _cmd_prune(args) -> int:
    from polyprune.api import prune
    from polyprune.compress.profiles import OwlParams

    _check_calibration_flags(args)
    _, manifest = prune(
        args.model, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
        save_masks=args.save_masks, sparsity_profile=args.sparsity_profile,
        owl=OwlParams(args.owl_m, args.owl_lambda), **_common(args),
    )  # fmt: skip
    _summary(manifest, args.out)
    return 0


def _cmd_quantize(args) -> int:
    from polyprune.api import quantize

    _check_calibration_flags(args)
    _, manifest = quantize(
        args.model, method=args.method, act_order=args.act_order,
        static_groups=args.static_groups, **_common(args),
    )  # fmt: skip
    _summary(manifest, args.out)
    return 0


def _summary(manifest: dict, out: str) -> None:
    from polyprune.compress.manifest import RunManifest

    m = RunManifest.from_dict(manifest)
    cal, q = m.calibration, m.quantization
    what = m.settings.get("pattern", "")
    if q:
        what = f"{what + ', ' if what else ''}{q.bits}-bit, group {q.group_size}, "
        what += f"{'sym' if q.sym else 'asym'}{', act-order' if q.act_order else ''}"
    print(f"method      {m.method} ({what})")
    if cal:
        counts = ", ".join(f"{k} {v}" for k, v in cal["counts"].items())
        print(f"calibration {cal['mix']}: {counts} windows x {cal['seqlen']} tokens")
    label = "zeros" if m.kind == "quantize" else "sparsity"
    print(f"{label:<12}{m.achieved_sparsity:.4f} of {len(m.layers)} Linears")
    if q:
        print(f"format      {q.format}{f' ({q.checkpoint_format})' if q.checkpoint_format else ''}")
    print(f"time        {m.seconds['total']:.1f} s")
    print(f"written to  {out}")


def _cmd_analyze(args) -> int:
    from polyprune.analysis.analyze import AnalysisConfig, analyze
    from polyprune.analysis.report import write_report
    from polyprune.api import model_dirs
    from polyprune.outputs import check_not_source, check_output_dir, check_writable, output_lock

    cfg = AnalysisConfig(
        langs=tuple(x.strip() for x in args.langs.split(",") if x.strip()),
        metrics=tuple(x.strip() for x in args.metrics.split(",")) if args.metrics else None,
        source=args.source, nsamples=args.nsamples, seqlen=args.seqlen,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        lsar_rank=args.lsar_rank, lape_group_percent=args.lape_group,
        lape_top_rate=args.lape_top_rate, lape_filter_rate=args.lape_filter_rate,
        lape_bar_ratio=args.lape_bar_ratio, models_per_pass=args.models_per_pass,
        progress=not args.quiet,
    )  # fmt: skip
    check_output_dir(args.out, args.overwrite)  # the device: checked by AnalysisConfig
    sources = [d for m in (args.dense, *args.compressed) for d in model_dirs(m)]
    check_not_source(args.out, sources, inside_ok=True)  # a report beside the weights is harmless
    check_writable(os.path.dirname(os.path.abspath(args.out)))
    with output_lock(args.out):
        metrics = analyze(args.dense, args.compressed, cfg)
        out = write_report(metrics, args.out, args.overwrite)
    figures = sorted(p.name for p in out.glob("*.png"))
    print(f"metrics     {', '.join(metrics['metrics'])}")
    if "snr" in metrics:
        for label, r in metrics["snr"].items():
            per = ", ".join(f"{k} {v:.1f}" for k, v in r["model"].items())
            print(f"SNR (dB)    {label}: {per}")
    print(f"figures     {', '.join(figures)}")
    print(f"written to  {out / 'report.md'}")
    return 0


def _cmd_data(args) -> int:
    from polyprune.data.mix import CalibrationMix, check_calibration
    from polyprune.data.sources import Mc4Source, get_source

    src = get_source(args.source)
    if args.data_command == "ls":
        if isinstance(src, Mc4Source):
            print(f"{src.describe()}: {len(src.languages())} languages (fetched on use)")
            print(" ".join(src.languages()))
            return 0
        header = ("calib docs", "calib chars", "heldout docs", "heldout chars")
        print(f"{'lang':<6}" + "".join(f"{h:>14}" for h in header))
        for lang in src.languages():
            c, h = src.documents(lang, "calib"), src.documents(lang, "heldout")
            values = (len(c), sum(map(len, c)), len(h), sum(map(len, h)))
            print(f"{lang:<6}" + "".join(f"{v:>14,}" for v in values))
        return 0
    mix = CalibrationMix.parse(args.mix)
    check_calibration(args.nsamples, args.seqlen, args.seed, args.sampling)
    counts = mix.counts(args.nsamples)
    for lang in mix.langs:
        src.check_language(lang)
    calib_set = None
    if args.model:
        from polyprune.data.mix import build_calibration_set
        from polyprune.models import load_config, load_tokenizer, max_positions

        # The tokenizer and the config only: the weights are not needed to show windows.
        limit = max_positions(load_config(args.model))
        if limit is not None and args.seqlen > limit:
            raise InputError(
                f"seqlen {args.seqlen} is above the model's maximum positions ({limit})"
            )
        tok = load_tokenizer(args.model)
        calib_set = build_calibration_set(
            mix, tok, src, args.nsamples, args.seqlen, args.seed, args.sampling
        )
    print(f"mix {mix} from {src.describe()}: {args.nsamples} windows of {args.seqlen} tokens")
    print(f"{'lang':<6}{'weight':>8}{'windows':>9}{'tokens':>10}")
    for lang, w in zip(mix.langs, mix.weights, strict=True):
        print(f"{lang:<6}{w:>8g}{counts[lang]:>9}{counts[lang] * args.seqlen:>10,}")
    if calib_set is not None:
        print(
            f"sampling {calib_set.mode}, seed {calib_set.seed}, fingerprint {calib_set.fingerprint}"
        )
        first = 0
        for lang in mix.langs:
            text = tok.decode(calib_set.input_ids[first][:40]).replace("\n", " ")
            print(f"  {lang}: {text[:100]!r}")
            first += counts[lang]
    return 0


# subcommand -> the function that runs it with the parsed arguments; returns the exit code
COMMANDS: dict[str, Callable[..., int]] = {
    "sweep": cmd_sweep,
    "mix": cmd_mix,
    "prune": _cmd_prune,
    "quantize": _cmd_quantize,
    "data": _cmd_data,
    "analyze": _cmd_analyze,
    "eval": _cmd_eval,
    "matrix": _cmd_matrix,
}
