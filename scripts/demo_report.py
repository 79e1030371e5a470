#!/usr/bin/env python
"""Print held-out perplexity per language of a dense model and a compressed one, side by side.

python scripts/demo_report.py --dense demo --compressed runs/demo-sparsegpt-de-en
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers.utils import logging as hf_logging

from polyprune.compress.manifest import RunManifest
from polyprune.errors import InputError
from polyprune.eval.perplexity import perplexity
from polyprune.models import load_model

PAPER_LANGS = ["ar", "de", "en", "es", "ru", "sw", "zh"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", default="demo")
    ap.add_argument("--compressed", required=True)
    ap.add_argument("--langs", default=",".join(PAPER_LANGS))
    ap.add_argument("--source", default="bundled")
    ap.add_argument("--seqlen", type=int, default=None)
    args = ap.parse_args()
    langs = args.langs.split(",")
    hf_logging.disable_progress_bar()
    try:
        manifest = RunManifest.from_dir(args.compressed)  # before any weights load
        dense = load_model(args.dense)
        pruned = load_model(args.compressed, tokenizer=False)
        kw = dict(source=args.source, seqlen=args.seqlen, progress=False)
        before = perplexity(dense.model, dense.tokenizer, langs, **kw)
        after = perplexity(pruned.model, dense.tokenizer, langs, **kw)
    except InputError as e:
        print(f"demo_report: error: {e}", file=sys.stderr)
        return 2
    cal = manifest.calibration or {}
    print()
    print(
        f"Held-out perplexity, {args.dense} vs {manifest.method} "
        f"{manifest.settings['pattern']} at sparsity {manifest.achieved_sparsity:.2f}, "
        f"calibrated on {cal.get('mix', '-')} ({args.source} corpus)"
    )
    print(f"{'lang':<6}{'tokens':>8}{'dense':>10}{'pruned':>10}{'ratio':>8}")
    for lang in langs:
        b, a = before[lang], after[lang]
        mark = "  (calibration language)" if lang in cal.get("counts", {}) else ""
        mark += "  (not in pre-training)" if lang == "sw" and args.dense == "demo" else ""
        print(f"{lang:<6}{b.tokens:>8}{b.ppl:>10.2f}{a.ppl:>10.2f}{a.ppl / b.ppl:>8.2f}{mark}")
    print(f"\npruned model, masks and manifest: {Path(args.compressed).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
