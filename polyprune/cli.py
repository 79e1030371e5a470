"""The ``polyprune`` command. Parsing only: the work is done by the library.

Exit codes: 0 done, 2 bad input (one line on stderr), 1 anything else, 130 interrupted
(SIGINT), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys

from polyprune.compress.methods import Kind, allowed, get_method, method_names, methods
from polyprune.errors import InputError, one_line

__all__ = ["main"]

DTYPE_HELP = (
    "dtype of the forward passes: auto (the checkpoint's; a 16-bit one runs in float32 on a "
    "CPU without fast 16-bit matmuls), float32 (the reference), bfloat16, float16. "
    "Statistics and solvers are float32 in every case"
)

log = logging.getLogger("polyprune")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage dump) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {one_line(message)}\n")
        sys.exit(2)


class _Given(argparse.Action):
    """``store``, and notes the flag in ``namespace.given``: which settings the user gave
    explicitly (a data-free method warns that it ignores them)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        given = getattr(namespace, "given", None) or {}
        given[self.dest] = self.option_strings[0]
        namespace.given = given


CALIB_DESTS = ("calib", "source", "nsamples", "seqlen", "seed", "sampling")


def _add_calibration_args(p: argparse.ArgumentParser, calib_required: bool) -> None:
    p.add_argument(
        "--calib",
        action=_Given,
        required=calib_required,
        metavar="MIX",
        help="calibration mix LANG[:WEIGHT],... e.g. de,en or de:3,en:1",
    )
    p.add_argument(
        "--source",
        action=_Given,
        default="bundled",
        help="text source: bundled (offline corpus), mc4[:N] (allenai/c4 multilingual, "
        "N train shards), or a directory of <lang>.txt / <lang>.jsonl",
    )
    p.add_argument("--nsamples", action=_Given, type=int, default=128,
                   help="calibration windows in all")  # fmt: skip
    p.add_argument("--seqlen", action=_Given, type=int, default=2048, help="tokens per window")
    p.add_argument("--seed", action=_Given, type=int, default=0, help="0 to 2**32 - 1")
    p.add_argument(
        "--sampling",
        action=_Given,
        choices=["concat", "window"],
        default="concat",
        help="concat: documents joined with EOS, distinct random windows; window: a "
        "random document longer than seqlen at a random offset (reference code)",
    )


def _add_verbosity(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="warnings only, no progress bars",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument(
        "--offload",
        choices=["auto", "none", "cpu", "disk"],
        default="auto",
        help="where calibration activations live: auto (the GPU if they fit, else host "
        "memory), none (the device), cpu (host memory), disk (a memory-mapped file)",
    )
    p.add_argument("--offload-dir", metavar="DIR", help="directory of --offload disk files")
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read and write one decoder block at a time (default: whenever --model is a "
        "safetensors checkpoint); --no-stream loads the whole model in memory",
    )
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest output safetensors shard (e.g. 2GB)"
    )
    p.add_argument(
        "--true-sequential",
        action="store_true",
        help="solve q/k/v -> o -> gate/up -> down in turn, each on the outputs of the "
        "groups already compressed",
    )
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT / GPTQ column block")
    p.add_argument("--percdamp", type=float, default=0.01, help="damping, x mean(diag H)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _add_grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="input columns sharing one grid; -1: one per output channel",
    )
    sym = p.add_mutually_exclusive_group()
    sym.add_argument(
        "--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)"
    )
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid")


def _add_method_arg(p: argparse.ArgumentParser, kind: Kind) -> None:
    """``--method``: the registry's methods of ``kind``, each with its one-line help."""
    p.add_argument(
        "--method",
        required=True,
        choices=method_names(kind),
        help="; ".join(f"{s.name}: {s.help}" for s in methods(kind)),
    )


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="polyprune", description=__doc__.splitlines()[0])
    _add_verbosity(ap, False)
    # The same flags after the subcommand; SUPPRESS keeps them from resetting the top level's.
    common = argparse.ArgumentParser(add_help=False)
    _add_verbosity(common, argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", parents=[common], help="prune a model with a calibration mix")
    p.add_argument(
        "--model",
        required=True,
        help="hub id, local HF directory, .gguf file, demo or gemma-3-270m",
    )
    _add_method_arg(p, "prune")
    p.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="fraction pruned, in [0, 1); default 0.5, or N/M with --pattern N:M",
    )
    p.add_argument("--pattern", default="unstructured", help="unstructured, 2:4, 4:8, ...")
    _add_calibration_args(p, calib_required=False)
    _add_run_args(p)
    p.add_argument(
        "--bits",
        type=int,
        default=None,
        help=f"with {allowed([s.name for s in methods('prune') if s.joint_quant], ' or ')}: "
        "also quantise to 2, 3, 4 or 8 bits in the same pass",
    )
    _add_grid_args(p)
    p.add_argument(
        "--format",
        choices=["dense", "gptq"],
        default="dense",
        help="dense: HF checkpoint; gptq: packed GPTQ checkpoint (needs --bits)",
    )
    p.add_argument("--save-masks", action="store_true", help="also write masks.safetensors")

    q = sub.add_parser("quantize", parents=[common], help="quantise a model (GPTQ or RTN)")
    q.add_argument(
        "--model",
        required=True,
        help="hub id, local HF directory, .gguf file, demo or gemma-3-270m",
    )
    _add_method_arg(q, "quantize")
    q.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8")
    _add_grid_args(q)
    q.add_argument(
        "--act-order",
        action="store_true",
        help="quantise columns by descending diag(H) (GPTQ's desc_act)",
    )
    q.add_argument(
        "--static-groups",
        action="store_true",
        help="fix each group's grid before any update (with --act-order)",
    )
    _add_calibration_args(q, calib_required=False)
    _add_run_args(q)
    q.add_argument(
        "--format",
        choices=["gptq", "dense"],
        default="gptq",
        help="gptq: packed checkpoint for GPTQModel / vLLM / transformers; dense: "
        "dequantised weights (fp32) in an ordinary HF checkpoint",
    )

    a = sub.add_parser(
        "analyze", parents=[common], help="language-wise diagnostics of compressed runs"
    )
    a.add_argument("--dense", required=True, metavar="MODEL", help="hub id, directory, or demo")
    a.add_argument("--compressed", required=True, nargs="+", metavar="DIR",
                   help="polyprune outputs of the dense model")  # fmt: skip
    a.add_argument("--langs", required=True, help="evaluation languages, e.g. ar,de,en,sw")
    from polyprune.analysis.metric import metric_names  # torch-free: --help stays fast

    a.add_argument(
        "--metrics",
        default=None,
        help=f"comma-separated subset of {','.join(metric_names())} (default: all that apply; "
        "iou needs runs pruned with --save-masks)",
    )
    a.add_argument("--source", default="bundled", help="held-out text: bundled, mc4[:N], DIR")
    a.add_argument("--nsamples", type=int, default=16, help="held-out windows per language")
    a.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    a.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    a.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    a.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    a.add_argument("--lsar-rank", type=int, default=None, help="LSAR subspace rank (default L-1)")
    a.add_argument("--lape-group", type=float, default=2.0, metavar="PERCENT",
                   help="neuron group size in %% of neurons, by dense LAPE")  # fmt: skip
    a.add_argument(
        "--lape-top-rate",
        type=float,
        default=0.01,
        help="Tang et al. selection: fraction of neurons with the lowest LAPE",
    )
    a.add_argument(
        "--lape-filter-rate",
        type=float,
        default=0.95,
        help="... among neurons above this activation-probability quantile",
    )
    a.add_argument("--lape-bar-ratio", type=float, default=0.95,
                   help="... assigned to languages above this quantile")  # fmt: skip
    a.add_argument(
        "--models-per-pass",
        type=int,
        default=None,
        help="compressed models held in memory beside the dense one (default all)",
    )
    a.add_argument("--out", required=True, metavar="REPORT_DIR")
    a.add_argument("--overwrite", action="store_true", help="replace an existing report")

    d = sub.add_parser("data", parents=[common], help="inspect calibration text sources and mixes")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    ls = dsub.add_parser("ls", parents=[common], help="languages of a source")
    ls.add_argument("--source", default="bundled")
    show = dsub.add_parser("show", parents=[common], help="how a mix splits the sample budget")
    show.add_argument("mix")
    show.add_argument("--model", help="tokenise with this model's tokenizer and fingerprint")
    for a in ("source", "nsamples", "seqlen", "seed", "sampling"):
        show._add_action(next(x for x in p._actions if x.dest == a))
    _add_eval_commands(sub, common)
    return ap


# --- eval and matrix (issue 7) ------------------------------------------------------------


def _add_eval_commands(sub, common: argparse.ArgumentParser) -> None:
    e = sub.add_parser(
        "eval", parents=[common], help="perplexity and lm-eval tasks per language, to JSON"
    )
    e.add_argument(
        "--model",
        required=True,
        help="hub id, local HF directory, .gguf file, demo or gemma-3-270m",
    )
    e.add_argument("--langs", required=True, help="evaluation languages, e.g. de,en,sw")
    e.add_argument(
        "--tasks",
        default="ppl",
        help="ppl and/or lm-eval task families: nextsent (offline), belebele, arc, hellaswag, "
        "mmlu, xnli, xcopa, xstorycloze, mkqa",
    )
    e.add_argument("--out", required=True, metavar="FILE.json")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    e.add_argument("--source", default="bundled", help="held-out text for ppl: bundled, mc4, DIR")
    e.add_argument("--seqlen", type=int, default=None, help="ppl window (default: model max)")
    e.add_argument("--max-tokens", type=int, default=None, help="held-out tokens per language")
    e.add_argument("--limit", type=int, default=None, help="lm-eval examples per task")
    e.add_argument("--num-fewshot", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    e.add_argument("--dtype", default="auto", help=DTYPE_HELP)

    m = sub.add_parser(
        "matrix", parents=[common], help="run an evaluation matrix from a YAML config"
    )
    m.add_argument("config", metavar="CONFIG.yaml")
    m.add_argument("--executor", choices=["local", "ray"], default="local")
    m.add_argument(
        "--resume",
        action="store_true",
        help="continue a matrix (the default: finished cells in the store are never redone)",
    )
    m.add_argument("--dry-run", action="store_true", help="list the cells and which are done")
    m.add_argument(
        "--tables-only", action="store_true", help="only regenerate tables from the store"
    )


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

    _check_calibration_flags(args)
    _, manifest = prune(
        args.model, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
        save_masks=args.save_masks, **_common(args),
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


class _Terminated(BaseException):
    """SIGTERM (timeout, Slurm, docker stop), raised where the program is, so that staged
    outputs and locks are cleaned up by the normal unwinding, as for Ctrl-C."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the cleanup short
    raise _Terminated


def _install_signals() -> dict:
    """SIGTERM handled like SIGINT; returns the old handlers. (SIGXFSZ needs nothing: CPython
    ignores it at startup, so a write over the file size limit fails with EFBIG.)"""
    try:
        return {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm)}
    except ValueError:  # not the main thread: leave signals alone
        return {}


def main(argv: list[str] | None = None) -> int:
    old_handlers = _install_signals()
    try:
        return _main(argv)
    except _Terminated:  # here, not in _main: a TERM may come during parsing or imports
        sys.stderr.write("polyprune: terminated; outputs are written only when complete\n")
        return 143
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.quiet and as_program:
        # Before tqdm is first imported (it reads its environment switch then), and for child
        # processes; not from a caller's process, whose environment is not ours to change.
        os.environ.setdefault("TQDM_DISABLE", "1")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    try:
        if args.command == "prune":
            return _cmd_prune(args)
        if args.command == "quantize":
            return _cmd_quantize(args)
        if args.command == "data":
            return _cmd_data(args)
        if args.command == "analyze":
            return _cmd_analyze(args)
        if args.command in ("eval", "matrix"):
            return _cmd_eval(args) if args.command == "eval" else _cmd_matrix(args)
    except InputError as e:
        sys.stderr.write(f"polyprune {args.command}: error: {one_line(str(e))}\n")
        return 2
    except BrokenPipeError:  # e.g. `polyprune data ls | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        sys.stderr.write("polyprune: interrupted; outputs are written only when complete\n")
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
