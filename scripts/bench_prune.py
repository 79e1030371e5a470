#!/usr/bin/env python
"""Wall time and peak memory of magnitude, Wanda and SparseGPT on a random 8-layer Llama
(hidden 512, intermediate 1408, vocab 8192) with 32 calibration windows of 256 tokens, on CPU;
side by side with llm-compressor's ``oneshot`` (WandaPruningModifier / SparseGPTModifier,
sparsity 0.5) on the same model and the same token windows, measured in the same run.

    python scripts/bench_prune.py [--llmc-python /tmp/llmc/bin/python] [--repeats 1]

Each measurement runs in a fresh subprocess: time is the compression call alone (model already
loaded), peak memory is the process's maximum resident set size. llm-compressor is never a
dependency of polyprune: install it in a throw-away virtual environment and pass its python.
Both tools use batches of 8 windows, one pass over each dense block, and SparseGPT's
defaults (block 128, damping 0.01).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, LAYERS, VOCAB, HEADS = 512, 1408, 8, 8192, 8
NSAMPLES, SEQLEN, BATCH = 32, 256, 8


def make_inputs(root: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=2048,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    # llm-compressor insists on a processor when given a dataset: the demo tokenizer (8192).
    from transformers import AutoTokenizer

    from polyprune.models import DEMO_MODEL_DIR

    AutoTokenizer.from_pretrained(DEMO_MODEL_DIR).save_pretrained(root / "model")
    ids = torch.randint(0, VOCAB, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(0))
    torch.save(ids, root / "ids.pt")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_polyprune(root: Path, method: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from polyprune.compress.engine import EngineConfig, compress_model
    from polyprune.compress.solver import PruneConfig

    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    ids = torch.load(root / "ids.pt")
    cfg = EngineConfig(method, PruneConfig(0.5), batch_size=BATCH, progress=False)
    t0 = time.perf_counter()
    report = compress_model(model, ids, cfg)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "sparsity": report.overall_sparsity(),
        "stages": report.seconds,
    }


def worker_llmcompressor(root: Path, method: str, batch: int = BATCH) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    ids = torch.load(root / "ids.pt")
    ds = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
    recipe = modifier(sparsity=0.5, targets=["Linear"], ignore=["re:.*lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=NSAMPLES,
            max_seq_length=SEQLEN, batch_size=batch, shuffle_calibration_samples=False)  # fmt: skip
    seconds = time.perf_counter() - t0
    linears = [m for n, m in model.named_modules() if "layers." in n and hasattr(m, "weight")
               and isinstance(m, torch.nn.Linear)]  # fmt: skip
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    total = sum(m.weight.numel() for m in linears)
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "sparsity": zeros / total}


def measure(python: str, tool: str, root: Path, method: str, batch: int = BATCH) -> dict:
    cmd = [python, __file__, "--worker", tool, "--method", method, "--root", str(root)]
    cmd += ["--batch", str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"{tool} {method} failed: {' | '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llmc-python", help="python of a venv with llmcompressor installed")
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell; the minimum is kept")
    ap.add_argument("--worker", choices=["polyprune", "llmcompressor"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.worker == "polyprune":
            print(json.dumps(worker_polyprune(Path(args.root), args.method)))
        else:
            print(json.dumps(worker_llmcompressor(Path(args.root), args.method, args.batch)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_inputs(root)
        rows = []
        for method in ("magnitude", "wanda", "sparsegpt"):
            # (label, worker, python, batch): llm-compressor at our batch size and at its own
            # default (batch_size=1), which is what `oneshot` does when not told otherwise.
            tools = [("polyprune", "polyprune", sys.executable, BATCH)]
            if args.llmc_python and method != "magnitude":
                tools.append(("llm-compressor", "llmcompressor", args.llmc_python, BATCH))
                tools.append(("llm-compressor (batch 1)", "llmcompressor", args.llmc_python, 1))
            for label, worker, python, batch in tools:
                runs = [measure(python, worker, root, method, batch) for _ in range(args.repeats)]
                best = min(runs, key=lambda r: r["seconds"])
                best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
                rows.append((method, label, best))
                print(f"  {method:<10} {label:<25} {best['seconds']:7.2f} s", file=sys.stderr)

    print(f"\nrandom Llama: {LAYERS} layers, hidden {HIDDEN}, intermediate {INTER}, vocab {VOCAB}; "
          f"{NSAMPLES} x {SEQLEN} tokens, batch {BATCH}, CPU, sparsity 0.5")  # fmt: skip
    print("| method | tool | seconds | peak RSS (MiB) | sparsity | time / fastest llm-compressor |")
    print("|---|---|---:|---:|---:|---:|")
    ref: dict[str, float] = {}  # the fastest llm-compressor configuration per method
    for method, tool, r in rows:
        if tool.startswith("llm-compressor"):
            ref[method] = min(ref.get(method, float("inf")), r["seconds"])
    for method, tool, r in rows:
        ratio = f"{r['seconds'] / ref[method]:.2f}x" if method in ref else "-"
        print(f"| {method} | {tool} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['sparsity']:.4f} | {ratio} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
