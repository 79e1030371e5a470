#!/usr/bin/env python
"""Held-out perplexity per language of the demo model: dense, RTN and GPTQ at 4 bits and
3 bits (group size 128), GPTQ calibrated on de,en from the bundled corpus.

    python scripts/bench_quant.py [--model demo] [--calib de,en] [--nsamples 128] [--seqlen 256]

Prints a Markdown table: perplexity per language and, per configuration, the mean increase
over dense. GPTQ's increase should be well below RTN's.
"""

from __future__ import annotations

import argparse
import copy
import sys

from transformers.utils import logging as hf_logging

from polyprune.api import quantize
from polyprune.eval.perplexity import perplexity
from polyprune.models import load_model

LANGS = ["ar", "de", "en", "es", "ru", "sw", "zh"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--calib", default="de,en")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    loaded = load_model(args.model)
    tok = loaded.tokenizer

    def ppl(model):
        res = perplexity(model, tok, LANGS, seqlen=args.seqlen, progress=False)
        return {lang: r.ppl for lang, r in res.items()}

    rows = [("dense", ppl(loaded.model))]
    # The asked-for settings, then per-channel 3-bit: a harder grid where the methods part more.
    for bits, group in ((4, args.group_size), (3, args.group_size), (3, -1)):
        for method in ("rtn", "gptq"):
            model = copy.deepcopy(loaded.model)
            quantize(
                model, method=method, bits=bits, group_size=group, tokenizer=tok,
                calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, progress=False,
            )  # fmt: skip
            rows.append((f"{method} {bits}-bit g{group}", ppl(model)))
            print(f"  done {rows[-1][0]}", file=sys.stderr)

    dense = rows[0][1]
    print(f"\n{args.model}; GPTQ calibrated on {args.calib} ({args.nsamples} x {args.seqlen})")
    trained = [lang for lang in LANGS if lang != "sw"]  # sw is outside the demo's training data

    def increase(p, langs):
        return 100 * sum(p[lang] / dense[lang] - 1 for lang in langs) / len(langs)

    print("| weights | " + " | ".join(LANGS) + " | mean increase, all | without sw |")
    print("|---" * (len(LANGS) + 3) + "|")
    for name, p in rows:
        cells = " | ".join(f"{p[lang]:.1f}" for lang in LANGS)
        print(f"| {name} | {cells} | {increase(p, LANGS):+.2f}% | {increase(p, trained):+.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
