#!/usr/bin/env python
"""OWL against uniform layer-wise sparsity on a real model (issue 18), side by side.

    python scripts/bench_owl.py [--model gemma-3-270m] [--methods wanda,sparsegpt]
        [--sparsities 0.6,0.7] [--calibs "en;ar,de,en,es,ru,sw,zh"] [--nsamples 16]
        [--seqlen 256] [--langs ar,de,en,es,ru,sw,zh] [--ppl-tokens 4096] [--out-dir DIR]
        [--profiles uniform,owl] [--owl-m 5] [--owl-lambda 0.08] [--json PATH]

Every (method, sparsity, calibration) is pruned twice with ``polyprune prune`` at its defaults,
``--sparsity-profile uniform`` and ``owl`` (M = 5, lambda = 0.08; ``--profiles``, ``--owl-m``,
``--owl-lambda`` change that), and every output's held-out
perplexity is measured in every language (bench_real.py's evaluator: float32, 512-token
windows). Printed: the perplexity table, the mean over languages, and per OWL run its
per-block sparsities and outlier ratios (all windows and per language) from the manifest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from benchlib import perplexities, run

HERE = Path(__file__).resolve().parent
PROFILES = ("uniform", "owl")


def prune(method: str, sparsity: float, calib: str, profile: str, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "polyprune.cli", "prune", "-q", "--model", args.model,
           "--method", method, "--sparsity", str(sparsity), "--calib", calib,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0",
           "--sparsity-profile", profile, "--out", str(out), "--overwrite"]  # fmt: skip
    if profile == "owl":
        cmd += ["--owl-m", str(args.owl_m), "--owl-lambda", str(args.owl_lambda)]
    run(cmd, out.with_name(out.name + ".log"))
    m = json.loads((out / "polyprune.json").read_text())
    return {"achieved": m["achieved_sparsity"], "profile": m.get("profile"),
            "engine_total_s": m["seconds"]["engine_total"]}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--sparsities", default="0.6,0.7")
    ap.add_argument("--calibs", default="en;ar,de,en,es,ru,sw,zh")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--langs", default="ar,de,en,es,ru,sw,zh")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--profiles", default=",".join(PROFILES), help="uniform,owl or one of them")
    ap.add_argument("--owl-m", type=float, default=5.0, help="OWL's outlier threshold M")
    ap.add_argument("--owl-lambda", type=float, default=0.08, help="OWL's bound lambda")
    ap.add_argument("--out-dir")
    ap.add_argument("--json")
    args = ap.parse_args()
    args.langs = args.langs.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for method in args.methods.split(","):
            for sparsity in [float(s) for s in args.sparsities.split(",")]:
                for calib in args.calibs.split(";"):
                    for profile in args.profiles.split(","):
                        out = root / "model"
                        r = prune(method, sparsity, calib, profile, args, out)
                        r["ppl"] = perplexities(str(out), args, root / "ppl.log")
                        shutil.rmtree(out)
                        r |= {"method": method, "sparsity": sparsity, "calib": calib,
                              "profile_name": profile}  # fmt: skip
                        r["mean_ppl"] = sum(r["ppl"].values()) / len(r["ppl"])
                        rows.append(r)
                        print(f"{method} {sparsity} {calib:>20} {profile:>7}: achieved "
                              f"{r['achieved']:.4f}, mean ppl {r['mean_ppl']:.2f}, "
                              + " ".join(f"{k} {v:.2f}" for k, v in r["ppl"].items()),
                              flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
