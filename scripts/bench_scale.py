#!/usr/bin/env python
"""Peak memory and time of streamed compression against model depth: random Llama-shaped
checkpoints (sharded safetensors, bf16) of several depths, each compressed from disk with
``polyprune.compress.stream.compress_checkpoint`` in a fresh process.

    python scripts/bench_scale.py                        # CPU: 4 and 16 layers, hidden 2048
    python scripts/bench_scale.py --layers 32 --hidden 4096 --intermediate 14336 \\
        --heads 32 --kv-heads 8 --vocab 128256 --nsamples 128 --seqlen 2048 \\
        --device cuda --method wanda                    # Llama-3-8B-shaped, on a GPU

The checkpoint is written one tensor at a time (never a whole model in memory) by a separate
process, so the compression process's peak RSS (``ru_maxrss``) is its own. Calibration windows
are random token ids: the weights are random too, and only time and memory are measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_checkpoint(root: Path, args, layers: int) -> None:
    """A random Llama checkpoint in ``root``, shards of ``--shard-size``."""
    import torch
    from transformers import LlamaConfig

    from polyprune.compress.shards import ShardWriter
    from polyprune.compress.stream import parse_size

    H, I, V = args.hidden, args.intermediate, args.vocab
    head_dim = H // args.heads
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seqlen), dtype="bfloat16",
    )  # fmt: skip
    cfg.save_pretrained(root)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    writer = ShardWriter(root, "model", parse_size(args.shard_size))
    writer.add("model.embed_tokens.weight", randn(V, H))
    kv = args.kv_heads * head_dim
    for b in range(layers):
        p = f"model.layers.{b}"
        shapes = {
            "self_attn.q_proj": (H, H), "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H),
            "self_attn.o_proj": (H, H), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H),
            "mlp.down_proj": (H, I),
        }  # fmt: skip
        for name, shape in shapes.items():
            writer.add(f"{p}.{name}.weight", randn(*shape))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            writer.add(f"{p}.{norm}.weight", torch.ones(H, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(H, dtype=torch.bfloat16))
    writer.add("lm_head.weight", randn(V, H))
    writer.finish()


def compress(root: Path, args) -> dict:
    import torch

    from polyprune.compress.engine import EngineConfig
    from polyprune.compress.export import CheckpointWriter
    from polyprune.compress.solver import PruneConfig
    from polyprune.compress.stream import compress_checkpoint

    ids = torch.randint(0, args.vocab, (args.nsamples, args.seqlen),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    cfg = EngineConfig(
        args.method, PruneConfig(0.5), device=args.device, batch_size=args.batch_size,
        offload=args.offload, progress=False,
    )  # fmt: skip
    run_dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    out = root / "out"
    out.mkdir()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = compress_checkpoint(root, ids, cfg, CheckpointWriter(out, "dense", torch.bfloat16),
                                 run_dtype)  # fmt: skip
    seconds = time.perf_counter() - t0
    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    return {
        "seconds": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "peak_gpu_mib": gpu,
        "per_block_s": result.report.block_seconds,
        "capture_s": result.report.seconds.get("capture", 0.0),
        "sparsity": result.report.overall_sparsity(),
    }


def checkpoint_mib(root: Path) -> float:
    return sum(f.stat().st_size for f in root.glob("model*.safetensors")) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--method", default="sparsegpt",
                    help="magnitude, wanda, sparsegpt, or several separated by commas: each "
                    "compresses the same checkpoint in a fresh process")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--offload", default="auto", choices=["auto", "none", "cpu", "disk"])
    ap.add_argument("--shard-size", default="1GB", help="shard size of the random checkpoint")
    ap.add_argument("--dir", help="where to write checkpoints (default: a temporary directory)")
    ap.add_argument("--worker", choices=["write", "compress"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write every row here")
    args = ap.parse_args()
    methods = args.method.split(",")
    bad = [m for m in methods if m not in ("magnitude", "wanda", "sparsegpt")]
    if bad:
        print(f"--method {bad[0]!r}: allowed magnitude, wanda, sparsegpt", file=sys.stderr)
        return 2
    if args.worker == "write":
        write_checkpoint(Path(args.root), args, args.layers[0])
        return 0
    if args.worker == "compress":
        print(json.dumps(compress(Path(args.root), args)))
        return 0

    flags = _flags(args)
    rows = []
    if args.dir:  # a folder to hold the temporary checkpoints: made if missing
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for layers in args.layers:
            root = Path(tmp) / f"llama-{layers}"
            root.mkdir()
            base = [sys.executable, __file__, "--root", str(root), "--layers", str(layers), *flags]
            subprocess.run([*base, "--worker", "write"], check=True)
            size = checkpoint_mib(root)
            for method in methods:
                shutil.rmtree(root / "out", ignore_errors=True)
                proc = subprocess.run([*base, "--method", method, "--worker", "compress"],
                                      capture_output=True, text=True)  # fmt: skip
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr)
                    return 1
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append((layers, method, size, r))
                per = ", ".join(f"{s:.1f}" for s in r["per_block_s"])
                print(f"{layers} layers, {method}: checkpoint {size:.0f} MiB, peak RSS "
                      f"{r['peak_rss_mib']:.0f} MiB, {r['seconds']:.1f} s; per layer (s): {per}",
                      file=sys.stderr, flush=True)  # fmt: skip
            shutil.rmtree(root)

    print(f"\nrandom Llama, hidden {args.hidden}, intermediate {args.intermediate}, heads "
          f"{args.heads}/{args.kv_heads} kv, vocab {args.vocab}, bf16 checkpoint; 50% unstructured "
          f"on {args.nsamples} x {args.seqlen} tokens, batch {args.batch_size}, "
          f"device {args.device}, offload {args.offload}")  # fmt: skip
    print("| layers | method | checkpoint (MiB) | peak RSS (MiB) | RSS / checkpoint | "
          "peak GPU (MiB) | total (s) | capture (s) | mean per layer (s) |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for layers, method, size, r in rows:
        gpu = f"{r['peak_gpu_mib']:.0f}" if r["peak_gpu_mib"] is not None else "-"
        mean = sum(r["per_block_s"]) / len(r["per_block_s"])
        print(f"| {layers} | {method} | {size:.0f} | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_rss_mib'] / size:.2f} | {gpu} | {r['seconds']:.1f} | "
              f"{r['capture_s']:.1f} | {mean:.2f} |")  # fmt: skip
    for method in methods:
        mine = [row for row in rows if row[1] == method]
        if len(mine) > 1:
            ratio = mine[-1][3]["peak_rss_mib"] / mine[0][3]["peak_rss_mib"]
            print(f"\n{method}: peak RSS {mine[-1][0]} layers / {mine[0][0]} layers: {ratio:.2f}x")
    if args.json:
        keep = {k: v for k, v in vars(args).items() if k not in ("worker", "root", "json")}
        data = {"settings": keep,
                "rows": [{"layers": la, "method": m, "checkpoint_mib": size, **r}
                         for la, m, size, r in rows]}  # fmt: skip
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


def _flags(args) -> list[str]:
    """The options a worker needs, as command-line flags."""
    keys = ("hidden", "intermediate", "heads", "kv_heads", "vocab", "nsamples", "seqlen",
            "batch_size", "method", "device", "offload", "shard_size")  # fmt: skip
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


if __name__ == "__main__":
    sys.exit(main())
