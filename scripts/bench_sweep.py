#!/usr/bin/env python
"""A calibration-mix sweep against separate runs, and predicted damage against perplexity
(issue 17), side by side in one run.

    python scripts/bench_sweep.py [--model gemma-3-270m] [--method wanda] [--nsamples 16]
        [--seqlen 256] [--langs ar,de,en,es,ru,sw,zh] [--ppl-tokens 4096] [--runs all|K]
        [--skip-ppl | --quality-only [--quality-models sweep|runs]] [--out-dir DIR]
        [--json PATH]

1. ``polyprune sweep`` of the 29 mixes of the issue (the 7 single languages, the 21 equal
   pairs, the uniform mix), exact pools, every mix written: whole-command time.
2. The same 29 mixes as separate default ``polyprune prune`` runs (``--runs K``: the first K
   of them, the rest extrapolated from their mean, and said so): whole-command times.
3. Held-out perplexity (bench_real.py's evaluator: float32, 512-token windows) of the sweep's
   8 outputs of the single languages and the uniform mix, and of the dense model.
4. ``polyprune sweep --predict --no-write`` of those 8 mixes: the predicted damage, and per
   evaluation language the Spearman rank correlation across the 8 mixes between predicted
   damage and measured perplexity. ``--quality-models runs`` measures separate default runs
   of the 8 mixes (compressed propagation) instead of the sweep's entries, ranked by the same
   predicted damage: whether a sweep's ranking carries over to the models users keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from benchlib import perplexities, run

HERE = Path(__file__).resolve().parent


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "polyprune.cli", *args]


def mixes(langs: list[str]) -> list[str]:
    pairs = [f"{a},{b}" for i, a in enumerate(langs) for b in langs[i + 1 :]]
    return [*langs, *pairs, ",".join(langs)]


def dirname(mix: str) -> str:
    return mix.replace(",", "+")


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho with average ranks for ties."""

    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):  # ties: their mean rank
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def common(args) -> list[str]:
    return ["--model", args.model, "--method", args.method, "--sparsity", "0.5",
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--seed", "0"]  # fmt: skip


def bench(args, root: Path) -> dict:
    all_mixes = mixes(args.langs)
    data: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("json",)}}
    if args.quality_only:  # with exact pools an entry does not depend on the other mixes
        all_mixes = [*args.langs, ",".join(args.langs)]
    if args.quality_only and args.quality_models == "runs":
        # the 8 models from separate default runs (compressed propagation), ranked by the
        # damage the sweep predicts (dense propagation): does the ranking carry over?
        runs_out = root / "runs"
        for mix in all_mixes:
            out = runs_out / dirname(mix)
            wall = run(cli("prune", "-q", *common(args), "--calib", mix, "--out", str(out),
                           "--overwrite"), root / "run.log")  # fmt: skip
            print(f"  run {mix}: {wall:.1f} s", flush=True)
        return _quality(args, root, runs_out, data)
    # 1. the sweep
    sweep_out = root / "sweep"
    wall = run(cli("sweep", "-q", *common(args), "--mixes", ";".join(all_mixes),
                   "--out", str(sweep_out)), root / "sweep.log")  # fmt: skip
    info = json.loads((sweep_out / "sweep.json").read_text())
    data["sweep"] = {"command_s": wall, "seconds": info["seconds"], "pools": info["pools"]}
    print(f"sweep of {len(all_mixes)} mixes: {wall:.1f} s", flush=True)
    if args.quality_only:
        return _quality(args, root, sweep_out, data)
    # 2. the separate runs
    k = len(all_mixes) if args.runs == "all" else int(args.runs)
    runs = []
    for mix in all_mixes[:k]:
        out = root / "run"
        wall = run(cli("prune", "-q", *common(args), "--calib", mix, "--out", str(out),
                       "--overwrite"), root / "run.log")  # fmt: skip
        m = json.loads((out / "polyprune.json").read_text())
        runs.append({"mix": mix, "command_s": wall, "engine_total_s": m["seconds"]["engine_total"]})
        print(f"  run {mix}: {wall:.1f} s", flush=True)
    shutil.rmtree(root / "run", ignore_errors=True)
    measured = sum(r["command_s"] for r in runs)
    total = measured * len(all_mixes) / len(runs)
    data["runs"] = {"measured": runs, "measured_s": measured, "count": len(runs),
                    "total_s": total, "extrapolated": len(runs) < len(all_mixes)}  # fmt: skip
    engine = sum(r["engine_total_s"] for r in runs) * len(all_mixes) / len(runs)
    data["runs"]["engine_total_s"] = engine
    data["time_ratio"] = data["sweep"]["command_s"] / total
    data["engine_ratio"] = info["seconds"]["engine_total"] / engine
    print(f"29 runs: {total:.1f} s{' (extrapolated)' if len(runs) < len(all_mixes) else ''}; "
          f"sweep / runs = {data['time_ratio']:.3f} (commands), "
          f"{data['engine_ratio']:.3f} (engine)", flush=True)  # fmt: skip
    if args.skip_ppl:
        return data
    return _quality(args, root, sweep_out, data)


def _quality(args, root: Path, sweep_out: Path, data: dict) -> dict:
    # 3. perplexity of the 8 mixes' outputs and the dense model
    eight = [*args.langs, ",".join(args.langs)]
    ppl = {"dense": perplexities(_model_path(args.model), args, root / "dense-ppl.log")}
    for mix in eight:
        ppl[mix] = perplexities(str(sweep_out / dirname(mix)), args, root / f"{dirname(mix)}.log")
        print(f"  ppl {mix}: {ppl[mix]}", flush=True)
    data["ppl"] = ppl
    shutil.rmtree(sweep_out)
    # 4. predicted damage of the 8 mixes, and Spearman per language
    pred_out = root / "predict"
    wall = run(cli("sweep", "-q", *common(args), "--mixes", ";".join(eight), "--predict",
                   "--no-write", "--out", str(pred_out)), root / "predict.log")  # fmt: skip
    pinfo = json.loads((pred_out / "sweep.json").read_text())
    pred = pinfo["predicted_damage"]
    data["predict"] = {"command_s": wall, "seconds": pinfo["seconds"], "damage": pred}
    rho = {lang: spearman([pred[dirname(m)][lang] for m in eight], [ppl[m][lang] for m in eight])
           for lang in args.langs}  # fmt: skip
    data["spearman"] = rho
    data["spearman_mean"] = float(np.mean(list(rho.values())))
    print(f"Spearman: {rho}; mean {data['spearman_mean']:.3f}", flush=True)
    return data


def _model_path(model: str) -> str:
    from polyprune.models import resolve_model_path

    return resolve_model_path(model)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--langs", default="ar,de,en,es,ru,sw,zh")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--runs", default="all", help="all, or how many of the separate runs")
    ap.add_argument("--skip-ppl", action="store_true", help="timings only")
    ap.add_argument("--quality-only", action="store_true",
                    help="no timings: sweep the 8 mixes, then perplexity and Spearman")  # fmt: skip
    ap.add_argument("--quality-models", choices=["sweep", "runs"], default="sweep",
                    help="with --quality-only: measure the sweep's entries (dense propagation) "
                    "or separate default runs (compressed propagation)")  # fmt: skip
    ap.add_argument("--out-dir", help="work here (default: a temporary directory)")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    args.langs = args.langs.split(",")
    if args.quality_models != "sweep" and not args.quality_only:
        print("--quality-models runs needs --quality-only", file=sys.stderr)
        return 2
    if args.runs != "all" and (not args.runs.isdigit() or int(args.runs) < 1):
        print(f"--runs {args.runs!r}: give all or a positive number", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        data = bench(args, root)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
