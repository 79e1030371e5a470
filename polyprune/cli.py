"""The ``polyprune`` command. Parsing only: the work is done by the library.

What each subcommand does with its parsed arguments is in :mod:`polyprune.cli_commands`.

Exit codes: 0 done, 2 bad input (one line on stderr), 1 anything else, 130 interrupted
(SIGINT), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from polyprune.compress.methods import Kind, allowed, method_names, methods
from polyprune.compress.profiles import OwlParams, profile_names, profiles
from polyprune.errors import InputError, one_line

__all__ = ["main"]

DTYPE_HELP = (
    "dtype of the forward passes: auto (the checkpoint's; a 16-bit one runs in float32 on a "
    "CPU without fast 16-bit matmuls), float32 (the reference), bfloat16, float16. "
    "Statistics and solvers are float32 in every case"
)


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
    p.add_argument(
        "--propagate",
        choices=["compressed", "dense"],
        default="compressed",
        help="what each block is calibrated on: the outputs of the blocks before it once "
        "compressed (the reference algorithms; default) or the dense model's (one forward "
        "per block instead of two)",
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


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="hub id, local HF directory, .gguf file, demo or gemma-3-270m",
    )


def _add_method_arg(p: argparse.ArgumentParser, kind: Kind) -> None:
    """``--method``: the registry's methods of ``kind``, each with its one-line help."""
    p.add_argument(
        "--method",
        required=True,
        choices=method_names(kind),
        help="; ".join(f"{s.name}: {s.help}" for s in methods(kind)),
    )


def _add_prune_command(sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = sub.add_parser("prune", parents=[common], help="prune a model with a calibration mix")
    _add_model_arg(p)
    _add_method_arg(p, "prune")
    p.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="fraction pruned, in [0, 1); default 0.5, or N/M with --pattern N:M",
    )
    p.add_argument("--pattern", default="unstructured", help="unstructured, 2:4, 4:8, ...")
    _add_profile_args(p)
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
    return p


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    """``--sparsity-profile`` from the profile registry, and OWL's hyperparameters."""
    p.add_argument(
        "--sparsity-profile",
        choices=profile_names(),
        default="uniform",
        help="how the sparsity is shared out over the blocks: "
        + "; ".join(f"{s.name}: {s.help}" for s in profiles()),
    )
    p.add_argument("--owl-m", type=float, default=OwlParams.m,
                   help="owl: outliers are scores above M x their block's mean")  # fmt: skip
    p.add_argument("--owl-lambda", type=float, default=OwlParams.lmbda,
                   help="owl: block sparsities lie within the sparsity +- 2 lambda")  # fmt: skip


def _add_quantize_command(sub, common: argparse.ArgumentParser) -> None:
    q = sub.add_parser("quantize", parents=[common], help="quantise a model (GPTQ or RTN)")
    _add_model_arg(q)
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


def _add_data_command(sub, common: argparse.ArgumentParser, prune: argparse.ArgumentParser) -> None:
    """``data ls`` and ``data show``; ``show`` takes prune's calibration flags as they are."""
    d = sub.add_parser("data", parents=[common], help="inspect calibration text sources and mixes")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    ls = dsub.add_parser("ls", parents=[common], help="languages of a source")
    ls.add_argument("--source", default="bundled")
    show = dsub.add_parser("show", parents=[common], help="how a mix splits the sample budget")
    show.add_argument("mix")
    show.add_argument("--model", help="tokenise with this model's tokenizer and fingerprint")
    for a in ("source", "nsamples", "seqlen", "seed", "sampling"):
        show._add_action(next(x for x in prune._actions if x.dest == a))


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="polyprune", description=__doc__.splitlines()[0])
    _add_verbosity(ap, False)
    # The same flags after the subcommand; SUPPRESS keeps them from resetting the top level's.
    common = argparse.ArgumentParser(add_help=False)
    _add_verbosity(common, argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = _add_prune_command(sub, common)
    _add_quantize_command(sub, common)

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

    _add_data_command(sub, common, p)
    _add_eval_commands(sub, common)
    from polyprune.cli_mixes import add_mix_commands

    add_mix_commands(sub, common)
    return ap


# --- eval and matrix (issue 7) ------------------------------------------------------------


def _add_eval_commands(sub, common: argparse.ArgumentParser) -> None:
    e = sub.add_parser(
        "eval", parents=[common], help="perplexity and lm-eval tasks per language, to JSON"
    )
    _add_model_arg(e)
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
    from polyprune.cli_commands import COMMANDS

    try:
        return COMMANDS[args.command](args)
    except InputError as e:
        sys.stderr.write(f"polyprune {args.command}: error: {one_line(str(e))}\n")
        return 2
    except BrokenPipeError:  # e.g. `polyprune data ls | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        sys.stderr.write("polyprune: interrupted; outputs are written only when complete\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
