#!/usr/bin/env python
"""Held-out perplexity: the old full-logit computation against the chunked one, side by side.

    python scripts/bench_ppl.py [MODEL_DIR] [--dtype float32,bfloat16] [--batch-size 4]
                                [--modes full,chunked]

Default model: /tmp/gemma3-hf (a converted Gemma 3 270M, 262k vocabulary) if it exists.
4 languages (ar, de, en, zh) x 4096 held-out tokens, seqlen 512, on CPU. Each computation
runs in a fresh subprocess: wall and CPU (user + system) time are the perplexity passes alone
(model loaded, streams tokenised), peak memory is the process's maximum resident set size
(model included; also given after loading). The float32 full-logit perplexities are the
reference of both dtypes' relative differences.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

LANGS, TOKENS, SEQLEN = ("ar", "de", "en", "zh"), 4096, 512
DEFAULT_MODEL = "/tmp/gemma3-hf"


def worker(model_dir: str, dtype: str, chunked: bool, batch_size: int) -> dict:
    import torch

    from polyprune.data.heldout import heldout_stream
    from polyprune.data.windows import window_bos
    from polyprune.eval.perplexity import stream_perplexity
    from polyprune.models import load_model

    torch.manual_seed(0)
    loaded = load_model(model_dir, dtype=dtype)
    streams = {lang: heldout_stream(loaded.tokenizer, lang, max_tokens=TOKENS) for lang in LANGS}
    bos = window_bos(loaded.tokenizer)  # windows as polyprune eval cuts them (Gemma: BOS first)
    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    ppl = {
        lang: stream_perplexity(loaded.model, s, SEQLEN, batch_size, chunked=chunked, bos=bos)[0]
        for lang, s in streams.items()
    }
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss, "load_rss_mb": load_rss, "ppl": ppl}


def cpu_seconds() -> float:
    """User + system CPU time of this process: less noisy than wall time on a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_child(model_dir: str, dtype: str, chunked: bool, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, model_dir, "--dtype", dtype, "--batch-size", str(batch_size)]
    cmd += ["--child", "chunked" if chunked else "full"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def max_rel(a: dict, b: dict) -> float:
    return max(abs(a[k] - b[k]) / b[k] for k in a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes to run")
    # 4 x 512 tokens: the full-logit path holds ~3 copies of 2 GiB of fp32 logits at once
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--modes", default="full,chunked", help="comma-separated: full, chunked")
    ap.add_argument("--child", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not Path(args.model).is_dir():
        print(f"bench_ppl: error: no model directory {args.model!r}", file=sys.stderr)
        return 2
    if args.child:
        res = worker(args.model, args.dtype, args.child == "chunked", args.batch_size)
        print(json.dumps(res))
        return 0
    if not set(args.modes.split(",")) <= {"full", "chunked"}:
        print(f"bench_ppl: error: unknown --modes {args.modes!r}; allowed: full, chunked",
              file=sys.stderr)  # fmt: skip
        return 2
    print(f"{args.model}: {len(LANGS)} langs x {TOKENS} tokens, seqlen {SEQLEN}, "
          f"batch {args.batch_size}")  # fmt: skip
    ref = None
    for dtype in args.dtype.split(","):
        res = {}
        for name in args.modes.split(","):  # printed as soon as measured
            r = res[name] = run_child(args.model, dtype, name == "chunked", args.batch_size)
            if ref is None and (dtype, name) == ("float32", "full"):
                ref = r["ppl"]
            line = (
                f"{dtype:>9} {name:>8}: wall {r['wall_s']:6.1f} s  CPU {r['cpu_s']:6.1f} s  "
                f"peak RSS {r['peak_rss_mb']:6.0f} MB ({r['load_rss_mb']:.0f} MB after loading)"
            )
            if ref is not None:
                line += f"  max rel diff vs float32 full {max_rel(r['ppl'], ref):.2e}"
            print(line, flush=True)
            print(f"{'':>19}ppl " + ", ".join(f"{k} {v:.6g}" for k, v in r["ppl"].items()))
        if len(res) < 2:
            continue
        full, chunked = res["full"], res["chunked"]
        ppl = ", ".join(f"{k} {v:.2f}" for k, v in chunked["ppl"].items())
        print(f"{dtype:>9} speed-up wall {full['wall_s'] / chunked['wall_s']:.2f}x, "
              f"CPU {full['cpu_s'] / chunked['cpu_s']:.2f}x, "
              f"chunked vs full max rel diff {max_rel(chunked['ppl'], full['ppl']):.2e}, "
              f"ppl {ppl}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
