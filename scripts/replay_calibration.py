#!/usr/bin/env python
"""Replay the mix optimiser's choice on measured mixes: raw damage against calibrated damage.

    python scripts/replay_calibration.py BENCH_SWEEP.json [--targets "de,sw;ar,zh;en,es,ru"]

Reads the JSON of ``scripts/bench_sweep.py`` (measured held-out perplexity of the dense model
and of 8 mixes: the single languages and the uniform mix; predicted damage of the same mixes
on every language). For each target set it picks, among those mixes, the one of lowest
worst-case score over the targets three ways, and prints them beside the measured best:

* ``raw``: the largest predicted damage (``mix optimise --no-calibrate``);
* ``calibrated``: the largest predicted perplexity after
  :func:`polyprune.eval.mixsearch.fit_calibration` on the anchors ``mix optimise`` uses (each
  target alone, the uniform mix), the package's own code;
* ``origin``: a line through the origin fitted on each target's own-language run only.

The anchors are among the 8 mixes, so for them the calibrated choice is in-sample; the question
it answers is whether calibrated damage compares *languages* correctly.
"""

from __future__ import annotations

import argparse
import json
import math

from polyprune.eval.mixsearch import fit_calibration


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bench_json")
    ap.add_argument("--targets", default="de,sw;ar,zh;en,es,ru;ar,de;sw,zh;en,sw;ru,zh")
    args = ap.parse_args()
    with open(args.bench_json) as f:
        d = json.load(f)
    ppl, damage = d["ppl"], d["predict"]["damage"]
    langs = d["settings"]["langs"]
    uniform = ",".join(langs)
    damage = {m.replace("+", ","): v for m, v in damage.items()}
    mixes = [m for m in ppl if m != "dense"]
    print("| targets | measured best (worst ppl) | raw damage picks | calibrated picks | "
          "origin picks |\n|---|---|---|---|---|")  # fmt: skip
    hits = {"raw": 0, "calibrated": 0, "origin": 0}
    sets = [s.split(",") for s in args.targets.split(";")]
    for targets in sets:
        measured = {m: max(ppl[m][t] for t in targets) for m in mixes}
        anchors = [(a, damage[a], ppl[a]) for a in [*targets, uniform]]
        cal = fit_calibration({t: ppl["dense"][t] for t in targets}, anchors)
        k = {t: math.log(ppl[t][t] / ppl["dense"][t]) / damage[t][t] for t in targets}
        scores = {
            "raw": {m: max(damage[m][t] for t in targets) for m in mixes},
            "calibrated": {m: max(cal.log_ppl(damage[m]).values()) for m in mixes},
            "origin": {
                m: max(math.log(ppl["dense"][t]) + k[t] * damage[m][t] for t in targets)
                for m in mixes
            },  # fmt: skip
        }
        best = min(measured, key=measured.get)
        row = [",".join(targets), f"{_name(best, uniform)} ({measured[best]:.1f})"]
        for how, sc in scores.items():
            pick = min(sc, key=sc.get)
            hits[how] += pick == best
            row.append(f"{_name(pick, uniform)} ({measured[pick]:.1f})")
        print("| " + " | ".join(row) + " |")
    picks = ", ".join(f"{h} {n}/{len(sets)}" for h, n in hits.items())
    print(f"\npicks the measured best: {picks}")
    return 0


def _name(mix: str, uniform: str) -> str:
    return "uniform" if mix == uniform else mix


if __name__ == "__main__":
    raise SystemExit(main())
