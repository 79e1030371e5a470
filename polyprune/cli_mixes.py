"""``polyprune sweep`` and ``polyprune mix optimise``: parsers and commands.

The work is in :mod:`polyprune.eval.sweep` and :mod:`polyprune.eval.mixsearch`; heavy modules
are imported inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import shlex

from polyprune.compress.methods import methods
from polyprune.errors import InputError

__all__ = ["add_mix_commands", "cmd_mix", "cmd_sweep"]


def _split(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _calibrated_prune_methods() -> list[str]:
    return [s.name for s in methods("prune") if not s.data_free]


def _add_shared(p: argparse.ArgumentParser) -> None:
    """Method, calibration and placement flags both commands take."""
    p.add_argument(
        "--model", required=True,
        help="safetensors checkpoint: hub id, directory, demo or gemma-3-270m",
    )  # fmt: skip
    p.add_argument("--method", required=True, choices=_calibrated_prune_methods(),
                   help="; ".join(f"{s.name}: {s.help}" for s in methods("prune")
                                  if s.name in _calibrated_prune_methods()))  # fmt: skip
    p.add_argument("--sparsity", type=float, default=None, help="fraction pruned (default 0.5)")
    p.add_argument("--pattern", default="unstructured", help="unstructured, 2:4, 4:8, ...")
    p.add_argument("--source", default="bundled", help="calibration text: bundled, mc4[:N], DIR")
    p.add_argument("--nsamples", type=int, default=128,
                   help="calibration windows per mix (as prune's --nsamples)")  # fmt: skip
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    p.add_argument("--seed", type=int, default=0, help="0 to 2**32 - 1")
    p.add_argument("--sampling", choices=["concat", "window"], default="concat")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="dtype of the forward passes (as prune's)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--offload", choices=["auto", "none", "cpu", "disk"], default="auto",
                   help="where activations and per-language statistics wait")  # fmt: skip
    p.add_argument("--offload-dir", metavar="DIR", help="directory of --offload disk files")
    # not argparse choices: the names live in compress/damage.py (torch), checked by the sweep
    p.add_argument("--damage-combine", default="block",
                   help="predicted damage of a language from its Linears: block (per block, "
                   "errors over energies, then the mean over blocks) or linear (the mean of "
                   "each Linear's relative error); docs/mixes.md")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def add_mix_commands(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "sweep", parents=[common],
        help="many calibration mixes of one method from one pass; predicted per-language damage",
    )  # fmt: skip
    _add_shared(s)
    s.add_argument("--mixes", help="mixes separated by ';', e.g. 'ar;de;de,en;sw:3,en:1'")
    s.add_argument("--langs", help="languages for --all-single / --all-pairs / --uniform / "
                   "--grid, and to predict the damage on")  # fmt: skip
    s.add_argument("--all-single", action="store_true", help="each language of --langs alone")
    s.add_argument("--all-pairs", action="store_true", help="every equal pair of --langs")
    s.add_argument("--uniform", action="store_true", help="all of --langs, equal weights")
    s.add_argument("--grid", type=int, metavar="N",
                   help="with --predict: also predict (not write) every mix of --langs whose "
                   "weights are multiples of 1/N")  # fmt: skip
    s.add_argument(
        "--predict",
        action="store_true",
        help="write the mix x language table of predicted damage (csv, md, png)",
    )
    s.add_argument("--no-write", action="store_true", help="predict only; write no models")
    s.add_argument("--pools", choices=["exact", "shared"], default="exact",
                   help="exact: each mix gets the windows its own prune run would (one pool per "
                   "language and count); shared: one pool per language, reweighted")  # fmt: skip
    s.add_argument("--max-shard-size", default="5GB", help="largest output safetensors shard")
    s.add_argument("--save-masks", action="store_true", help="also write masks.safetensors")

    m = sub.add_parser("mix", parents=[common], help="calibration-mix tools")
    msub = m.add_subparsers(dest="mix_command", required=True, parser_class=type(m))
    o = msub.add_parser(
        "optimise", parents=[common],
        help="the mix of --langs minimising predicted damage on --target",
    )  # fmt: skip
    _add_shared(o)
    o.add_argument("--langs", required=True, help="candidate calibration languages")
    o.add_argument("--target", required=True, help="languages the model is for, e.g. de,sw")
    o.add_argument("--objective", default="worst",
                   help="worst (max over targets), mean, or weighted:de=2,sw=1")  # fmt: skip
    o.add_argument("--verify", action="store_true",
                   help="prune with the recommended, best single and uniform mixes and measure "
                   "their held-out perplexity")  # fmt: skip
    o.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="score predicted perplexity, fitted per target on pruned and measured "
                   "anchors (each target alone, the uniform mix), instead of raw damage, which "
                   "is not comparable across languages (default: with two or more targets)",
                   )  # fmt: skip
    o.add_argument("--local-rounds", type=int, default=4,
                   help="rounds of the local search over whole calibration windows after the "
                   "surrogate's pick (each one predict-only pass; 0: none)")  # fmt: skip
    o.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens per language")
    o.add_argument("--ppl-seqlen", type=int, default=512, help="perplexity window")


def _sweep_kw(args) -> dict:
    return {
        "sparsity": args.sparsity, "pattern": args.pattern, "source": args.source,
        "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
        "sampling": args.sampling, "device": args.device, "dtype": args.dtype,
        "batch_size": args.batch_size, "offload": args.offload,
        "offload_dir": args.offload_dir, "progress": not args.quiet,
        "damage_combine": args.damage_combine,
    }  # fmt: skip


def _mix_list(args):
    from polyprune.data.mix import CalibrationMix
    from polyprune.eval.sweep import all_pairs, grid_mixes, parse_mixes

    langs = _split(args.langs)
    wants = [f for f in ("all_single", "all_pairs", "uniform") if getattr(args, f)]
    if (wants or args.grid) and not langs:
        flag = "--" + (wants[0] if wants else "grid").replace("_", "-")
        raise InputError(f"{flag} needs --langs (e.g. --langs ar,de,en)")
    mixes = parse_mixes(args.mixes) if args.mixes else []
    if args.all_single:
        mixes += [CalibrationMix((lang,), (1.0,)) for lang in langs]
    if args.all_pairs:
        mixes += all_pairs(langs)
    if args.uniform:
        mixes.append(CalibrationMix(tuple(langs), (1.0,) * len(langs)))
    grid = grid_mixes(langs, args.grid) if args.grid is not None else []
    if grid and not args.predict:
        raise InputError("--grid mixes are predicted, not written: add --predict")
    from polyprune.eval.sweep import mix_dirname

    named = {mix_dirname(m) for m in mixes}
    return mixes, [g for g in grid if mix_dirname(g) not in named], langs


def cmd_sweep(args) -> int:
    from polyprune.eval.sweep import sweep

    mixes, grid, langs = _mix_list(args)
    if args.no_write and not args.predict:
        raise InputError("--no-write writes nothing: add --predict")
    if args.damage_combine != "block" and not args.predict:
        raise InputError(f"--damage-combine {args.damage_combine} combines predicted damage: "
                         "add --predict")  # fmt: skip
    res = sweep(args.model, args.method, mixes, predict_only=grid, predict=args.predict,
                write=not args.no_write, pooling=args.pools, langs=langs,
                max_shard_size=args.max_shard_size, save_masks=args.save_masks, out=args.out,
                overwrite=args.overwrite, command=shlex.join(["polyprune", *args.argv]),
                **_sweep_kw(args))  # fmt: skip
    print(f"mixes       {len(res.entries)} ({len(res.written)} written) from pools "
          f"{', '.join(res.pools)}")  # fmt: skip
    secs = res.seconds
    print(f"time        {secs['total']:.1f} s (statistics {secs.get('engine_statistics', 0):.1f}, "
          f"solve {secs.get('engine_solve', 0):.1f}, damage {secs.get('engine_damage', 0):.1f}, "
          f"write {secs.get('engine_write', 0):.1f})")  # fmt: skip
    if res.predicted:
        print(f"predicted   {args.out}/predicted_damage.md (.csv, .png)")
    print(f"written to  {args.out}")
    return 0


def cmd_mix(args) -> int:
    from polyprune.eval.mixsearch import optimise

    report = optimise(args.model, args.method, _split(args.langs), _split(args.target),
                      args.objective, verify=args.verify, calibrate=args.calibrate,
                      ppl_tokens=args.ppl_tokens, local_rounds=args.local_rounds,
                      ppl_seqlen=args.ppl_seqlen, out=args.out, overwrite=args.overwrite,
                      **_sweep_kw(args))  # fmt: skip
    print(report.markdown(), end="")
    print(f"written to  {args.out}")
    return 0
