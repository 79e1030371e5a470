"""Which combination of per-Linear damage follows measured perplexity: one predict-only sweep
of mixes whose held-out perplexity was measured, every Linear's damage terms kept.

    python scripts/bench_combine.py --measured /tmp/bsg/quality-runs-wanda.json
    python scripts/bench_combine.py --measured /tmp/bsg/desw.json --langs de,sw

``--measured``: a JSON of measured perplexity, ``{mix: {lang: ppl}}`` (mix as ``--calib`` takes
it, or as an output folder names it: ``de1+sw15``), or ``scripts/bench_sweep.py``'s JSON (its
``ppl``; ``dense`` is skipped). The sweep predicts those mixes with the given settings (they must
be those of the measured models: method, ``--nsamples``, ``--seqlen``, ``--seed``; exact pools,
so each entry is the run ``prune --calib MIX --propagate dense``).

Prints, per evaluation language and combination, the Spearman correlation of predicted damage
with measured perplexity over the mixes and the Pearson correlation with log perplexity (what
``mix optimise``'s calibration fits a line to), and the Linears whose damage on each language
moves most between the first two mixes. ``block`` and ``linear`` are
:func:`polyprune.compress.damage.combine`'s; ``mlp``, ``attention`` and ``down_proj`` are
``linear`` over those Linears only (diagnostics, not options).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sweep import spearman  # noqa: E402

from polyprune.compress.damage import combine  # noqa: E402
from polyprune.data.mix import CalibrationMix  # noqa: E402
from polyprune.eval.sweep import mix_dirname, sweep  # noqa: E402


def parse_mix(name: str) -> CalibrationMix:
    """``de:1,sw:15`` or the folder name ``de1+sw15`` (``ar+de`` = equal weights)."""
    if "+" not in name and not re.search(r"[a-z]\d", name):
        return CalibrationMix.parse(name)
    parts = [re.fullmatch(r"([a-z]+)(\d*)", p) for p in name.split("+")]
    if not all(parts):
        raise SystemExit(f"cannot read mix {name!r}")
    return CalibrationMix.parse(",".join(f"{m[1]}:{m[2] or 1}" for m in parts))


def load_measured(path: str) -> dict[str, dict[str, float]]:
    data = json.loads(Path(path).read_text())
    data = data.get("ppl", data)
    return {k: v for k, v in data.items() if k != "dense"}


def _linear_mean(terms, keep) -> float:
    r = [t.ratio for t in terms if keep(t.linear)]
    return math.fsum(r) / len(r)


def combinations(terms, lang: str) -> dict[str, float]:
    mine = [t for t in terms if t.lang == lang]
    return {
        "block": combine(mine, "block")[lang],
        "linear": combine(mine, "linear")[lang],
        "mlp": _linear_mean(mine, lambda n: "mlp" in n),
        "attention": _linear_mean(mine, lambda n: "attn" in n),
        "down_proj": _linear_mean(mine, lambda n: "down_proj" in n),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measured", required=True)
    ap.add_argument("--langs", help="evaluation languages (default: all measured)")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=5, help="Linears listed per language")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    measured = load_measured(args.measured)
    names = list(measured)
    mixes = [parse_mix(n) for n in names]
    langs = args.langs.split(",") if args.langs else sorted({lang for v in measured.values()
                                                             for lang in v})  # fmt: skip
    res = sweep(args.model, args.method, [], predict_only=mixes, predict=True, write=False,
                pooling="exact", langs=langs, damage_langs=langs, sparsity=args.sparsity,
                nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                progress=False)  # fmt: skip
    terms = {n: res.terms[mix_dirname(m)] for n, m in zip(names, mixes, strict=True)}
    out: dict = {"settings": vars(args), "seconds": res.seconds, "languages": {}}
    summary = defaultdict(lambda: defaultdict(list))
    for lang in langs:
        ppl = np.array([measured[n][lang] for n in names])
        comb = {n: combinations(terms[n], lang) for n in names}
        row = {}
        print(
            f"\n{lang}: measured "
            + ", ".join(f"{n} {p:.1f}" for n, p in zip(names, ppl, strict=True))
        )
        for how in comb[names[0]]:
            x = np.array([comb[n][how] for n in names])
            rho = spearman(list(x), list(ppl))
            r = float(np.corrcoef(x, np.log(ppl))[0, 1])
            row[how] = {
                "spearman": rho,
                "pearson_log": r,
                "damage": dict(zip(names, x.tolist(), strict=True)),
            }
            summary[how]["spearman"].append(rho)
            summary[how]["pearson_log"].append(r)
            print(f"  {how:10s} Spearman {rho:+.3f}  Pearson(log ppl) {r:+.3f}  "
                  + " ".join(f"{v:.4f}" for v in x))  # fmt: skip
        a, b = names[0], names[1]
        ra = {(t.block, t.linear): t.ratio for t in terms[a] if t.lang == lang}
        rb = {(t.block, t.linear): t.ratio for t in terms[b] if t.lang == lang}
        moved = sorted(ra, key=lambda k: -abs(math.log(max(ra[k], 1e-12) / max(rb[k], 1e-12))))
        top = moved[: args.top]
        print(f"  Linears moving most from {a} to {b}: "
              + "; ".join(f"{k[0]}.{k[1]} {ra[k]:.4f} -> {rb[k]:.4f}" for k in top))  # fmt: skip
        row["moved"] = [{"block": k[0], "linear": k[1], a: ra[k], b: rb[k]}
                        for k in top]  # fmt: skip
        out["languages"][lang] = row
    print("\nmean over languages:")
    for how, v in summary.items():
        print(f"  {how:10s} Spearman {np.mean(v['spearman']):.3f}  "
              f"Pearson(log ppl) {np.mean(v['pearson_log']):.3f}")  # fmt: skip
    out["mean"] = {how: {k: float(np.mean(x)) for k, x in v.items()} for how, v in summary.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
