#!/usr/bin/env python
"""Dense against compressed propagation on a real model, side by side (issue 17, item 2).

    python scripts/bench_propagate.py [--model gemma-3-270m] [--methods wanda,sparsegpt]
        [--calib en] [--nsamples 32] [--seqlen 512] [--langs ar,de,en,es,ru,sw,zh]
        [--ppl-tokens 4096] [--out-dir DIR] [--json PATH]

Per method, ``polyprune prune`` at its defaults twice, in fresh subprocesses, on the same
windows: ``--propagate compressed`` (the reference: block b + 1 calibrated on the compressed
block b's outputs) and ``--propagate dense`` (on the dense model's hidden states: one forward
per block instead of two). Reported: compression time (the manifest's ``engine_total`` and its
statistics / solve / forward parts) and the held-out perplexity of each output and of the dense
model in every language, computed by ``scripts/bench_real.py``'s evaluator (polyprune's
perplexity, float32, ``--ppl-tokens`` tokens per language in 512-token windows).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchlib import perplexities, run

HERE = Path(__file__).resolve().parent
PROPAGATIONS = ("compressed", "dense")


def prune(method: str, propagate: str, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "polyprune.cli", "prune", "-q", "--model", args.model,
           "--method", method, "--sparsity", "0.5", "--calib", args.calib,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0",
           "--propagate", propagate, "--out", str(out)]  # fmt: skip
    wall = run(cmd, out.with_name(out.name + ".log"))
    m = json.loads((out / "polyprune.json").read_text())
    s = m["seconds"]
    return {
        "command_s": wall,
        "compress_s": s["engine_total"],
        "parts_s": {k: s.get(f"engine_{k}", 0.0) for k in ("statistics", "solve", "forward")},
        "fingerprint": m["calibration"]["fingerprint"],
        "model_dir": m["model"],
    }


def markdown(data: dict) -> str:
    langs = data["langs"]
    lines = [
        f"{data['model']}, calibration {data['calib']} ({data['nsamples']} x {data['seqlen']}), "
        "50% unstructured, polyprune defaults; held-out perplexity, float32 evaluator",
        "",
        "| method | propagate | compression (s) | stats / solve / forward (s) | "
        + " | ".join(f"ppl {x}" for x in langs)
        + " |",
        "|---|---|---:|---:|" + "---:|" * len(langs),
        "| dense | - | - | - | " + " | ".join(f"{data['dense'][x]:.2f}" for x in langs) + " |",
    ]
    for r in data["rows"]:
        p = r["parts_s"]
        lines.append(
            f"| {r['method']} | {r['propagate']} | {r['compress_s']:.1f} | "
            f"{p['statistics']:.1f} / {p['solve']:.1f} / {p['forward']:.1f} | "
            + " | ".join(f"{r['ppl'][x]:.2f}" for x in langs)
            + " |"
        )
    lines.append("")
    for method in data["methods"]:
        c, d = (next(r for r in data["rows"] if r["method"] == method and r["propagate"] == p)
                for p in PROPAGATIONS)  # fmt: skip
        rel = ", ".join(f"{x} {d['ppl'][x] / c['ppl'][x] - 1:+.1%}" for x in langs)
        lines.append(
            f"- {method}: dense / compressed time {d['compress_s'] / c['compress_s']:.2f}x; "
            f"perplexity dense vs compressed propagation: {rel}"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--calib", default="en")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--langs", default="ar,de,en,es,ru,sw,zh")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--out-dir", help="keep the outputs here (default: a temporary directory)")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    args.langs = args.langs.split(",")
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        rows = []
        for method in methods:
            for propagate in PROPAGATIONS:
                out = root / f"{method}-{propagate}"
                r = {
                    "method": method,
                    "propagate": propagate,
                    **prune(method, propagate, args, out),
                }
                r["ppl"] = perplexities(str(out), args, root / f"{method}-{propagate}-ppl.log")
                rows.append(r)
                ppl = " ".join(f"{x} {r['ppl'][x]:.2f}" for x in args.langs)
                print(f"{method:9s} {propagate:10s} {r['compress_s']:6.1f} s  {ppl}", flush=True)
        assert len({r["fingerprint"] for r in rows}) == 1, "runs calibrated on other windows"
        dense = perplexities(rows[0]["model_dir"], args, root / "dense-ppl.log")
    data = {"model": args.model, "calib": args.calib, "nsamples": args.nsamples,
            "seqlen": args.seqlen, "langs": args.langs, "methods": methods, "rows": rows,
            "dense": dense}  # fmt: skip
    print(markdown(data))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
