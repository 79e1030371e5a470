#!/usr/bin/env python
"""polyprune vs llm-compressor 0.14 on Gemma 3 270M (bf16 checkpoint), CPU, side by side.

    python scripts/bench_real.py --llmc-python /tmp/llmc-venv/bin/python [--out-dir DIR]
        [--methods wanda,sparsegpt] [--nsamples 32] [--seqlen 512] [--langs ar,de,en,zh]
        [--ppl-tokens 4096] [--skip-llmc] [--json PATH]

Both tools prune the same model at 50% unstructured, calibrated on the SAME token windows:
polyprune's own (bundled corpus, en, seed 0, concat sampling) built here with
``polyprune.data.mix.build_calibration_set``, saved to ``DIR/calib_ids.pt`` and given to
llm-compressor as a dataset of token ids; polyprune's manifest fingerprint of its windows is
checked against them. Configurations, each a fresh subprocess:

* polyprune ``prune`` CLI at its defaults (``--dtype auto``: bf16 forwards on a CPU with fast
  bf16 matmuls; streamed, since the model is a safetensors checkpoint), and with
  ``--dtype float32`` (the reference). Compression time: the manifest's
  ``seconds.engine_total``.
* llm-compressor ``oneshot`` (``WandaPruningModifier`` / ``SparseGPTModifier``, batch 8 as
  polyprune's default, ``ignore=["re:.*lm_head"]``: the plain name ``"lm_head"`` does not match
  in 0.14 and then the tied embedding is pruned too, so the zero fraction of ``embed_tokens``
  is checked) on the model loaded in float32 and in bfloat16. Compression time: the
  ``oneshot`` call alone. Its output is saved in the checkpoint's dtype (bf16), as
  polyprune's is.

Per configuration: compression time, whole-command time (the subprocess's wall time: imports,
loading, windows, compression, export), peak RSS (``os.wait4`` of that subprocess), sparsity,
and the held-out perplexity (``--langs``, ``--ppl-tokens`` tokens each, 512-token windows) of
its output, computed by one evaluator for every output: polyprune's perplexity, float32, in a
fresh subprocess per output (the dense model too). POLYPRUNE_FAST_CPU_DTYPES is left as the
environment has it (unset: the real default is measured).

llm-compressor is never a dependency of polyprune. Put it in a throw-away venv with the CPU
torch pinned, so that nothing pulls CUDA wheels or another torch:

    python3 -m venv /tmp/llmc-venv
    echo 'torch==2.13.0+cpu' > /tmp/llmc-constraints.txt
    /tmp/llmc-venv/bin/pip install -c /tmp/llmc-constraints.txt torch==2.13.0+cpu \\
        'llmcompressor==0.14.*'

(``pip list`` there must show no ``nvidia-*-cu*`` packages; ``nvidia-ml-py`` is a pure-Python
binding and harmless.) Outputs (9 checkpoints of ~540 MB) go to ``--out-dir`` (kept), or to a
temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "gemma-3-270m"
METHODS = ("wanda", "sparsegpt")
SPARSITY, BATCH, SEED, CALIB = 0.5, 8, 0, "en"
PPL_SEQLEN = 512
# The bounds: polyprune default time / llm-compressor bf16 time, per method, and the
# largest relative perplexity difference of the default against --dtype float32.
TIME_BOUNDS = {"sparsegpt": 0.5, "wanda": 0.8}
PPL_BOUND = 0.02
# Files of the source checkpoint copied next to llm-compressor's weights.
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "tokenizer.model", "special_tokens_map.json")  # fmt: skip


class BenchError(Exception):
    """A configuration that failed or broke a check: one line for the user."""


# ---------------------------------------------------------------- workers (in subprocesses)


def worker_llmc(model_dir: str, ids_path: str, method: str, dtype: str, out: str) -> dict:
    """llm-compressor's oneshot on the saved windows; runs in the llm-compressor venv."""
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    source_dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or dtype)
    ids = torch.load(ids_path)
    ds = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
    recipe = modifier(sparsity=SPARSITY, targets=["Linear"], ignore=["re:.*lm_head"])
    embed = model.get_input_embeddings().weight
    embed_zeros = float((embed == 0).float().mean())  # a GGUF-converted one has some
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], batch_size=BATCH,
            shuffle_calibration_samples=False)  # fmt: skip
    seconds = time.perf_counter() - t0
    linears = [
        m for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)
    ]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    total = sum(m.weight.numel() for m in linears)
    embed = model.get_input_embeddings().weight
    # Written by hand, not by save_pretrained: llm-compressor wraps that to write a
    # compressed-tensors checkpoint, which polyprune's evaluator need not be able to read.
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # the embedding itself: saved once, as in the source
    save_file(
        {k: v.detach().to(source_dtype).contiguous() for k, v in sd.items()},
        str(Path(out) / "model.safetensors"),
        metadata={"format": "pt"},
    )
    for name in _COPY:
        if (Path(model_dir) / name).exists():
            shutil.copy(Path(model_dir) / name, Path(out) / name)
    return {
        "seconds": seconds,
        "sparsity": zeros / total,
        "embed_zero_fraction_before": embed_zeros,
        "embed_zero_fraction": float((embed == 0).float().mean()),
        "version": llmcompressor.__version__,
        "torch": torch.__version__,
    }


def worker_ppl(model_dir: str, langs: list[str], tokens: int) -> dict:
    """The one evaluator: polyprune's held-out perplexity in float32."""
    from polyprune.eval.perplexity import perplexity
    from polyprune.models import load_model

    loaded = load_model(model_dir, dtype="float32")
    t0 = time.perf_counter()
    res = perplexity(
        loaded.model, loaded.tokenizer, langs, seqlen=PPL_SEQLEN, max_tokens=tokens, progress=False
    )
    return {"ppl": {k: r.ppl for k, r in res.items()}, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- the driver


def run_timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``cmd``; its stdout and stderr go to ``log``
    (llm-compressor logs to stdout: which modules it pruned)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        # wait4: this child's own rusage (RUSAGE_CHILDREN would give the max over all so far)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = " | ".join(log.read_text().strip().splitlines()[-3:])
        raise BenchError(f"{' '.join(cmd[:6])} ... failed ({rc}; log {log}): {tail}")
    return wall, usage.ru_maxrss / 1024


def run_polyprune(model: str, method: str, dtype: str | None, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "polyprune.cli", "prune", "-q", "--model", model,
           "--method", method, "--sparsity", str(SPARSITY), "--calib", CALIB,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(SEED),
           "--out", str(out)]  # fmt: skip
    if dtype is not None:  # None: polyprune's default (--dtype auto)
        cmd += ["--dtype", dtype]
    wall, rss = run_timed(cmd, out.with_name(out.name + ".log"))
    manifest = json.loads((out / "polyprune.json").read_text())
    if manifest["calibration"]["fingerprint"] != args.fingerprint:
        raise BenchError(f"polyprune {method} {dtype}: calibrated on other windows than saved")
    return {
        "compress_s": manifest["seconds"]["engine_total"],
        "command_s": wall,
        "peak_rss_mb": rss,
        "sparsity": manifest["achieved_sparsity"],
        "run_dtype": manifest["settings"]["dtype"],
        "stages_s": {k: v for k, v in manifest["seconds"].items() if k.startswith("engine_")},
    }


def run_llmc(model: str, method: str, dtype: str, args, out: Path) -> dict:
    out.mkdir()
    result = out.with_name(out.name + ".json")
    cmd = [args.llmc_python, __file__, "--worker", "llmc", "--model-dir", model,
           "--method", method, "--dtype", dtype, "--ids", str(args.ids), "--target", str(out),
           "--result", str(result)]  # fmt: skip
    wall, rss = run_timed(cmd, out.with_name(out.name + ".log"))
    r = json.loads(result.read_text())
    # Pruned at 50%, the tied embedding (= lm_head) would be half zeros.
    if r["embed_zero_fraction"] > r["embed_zero_fraction_before"] + 0.01:
        raise BenchError(
            f"llm-compressor {method} {dtype} pruned the tied embedding "
            f"({r['embed_zero_fraction']:.1%} zeros): the lm_head ignore did not match"
        )
    return {
        "compress_s": r["seconds"],
        "command_s": wall,
        "peak_rss_mb": rss,
        "sparsity": r["sparsity"],
        "run_dtype": dtype,
        "embed_zero_fraction": r["embed_zero_fraction"],
        "llmcompressor": r["version"],
    }


def evaluate(model_dir: str, args, log: Path) -> dict:
    result = log.with_suffix(".json")
    cmd = [sys.executable, __file__, "--worker", "ppl", "--model-dir", model_dir,
           "--langs", ",".join(args.langs), "--ppl-tokens", str(args.ppl_tokens),
           "--result", str(result)]  # fmt: skip
    run_timed(cmd, log)
    return json.loads(result.read_text())


def configurations(args) -> list[tuple[str, str, str, str | None]]:
    """(method, tool, label, dtype) in run order."""
    rows = []
    for method in args.methods:
        rows += [
            (method, "polyprune", "polyprune default (auto)", None),
            (method, "polyprune", "polyprune float32", "float32"),
        ]
        if not args.skip_llmc:
            rows += [
                (method, "llm-compressor", "llm-compressor float32", "float32"),
                (method, "llm-compressor", "llm-compressor bfloat16", "bfloat16"),
            ]
    return rows


def slug(*parts: str | None) -> str:
    return "-".join(p.replace(" ", "_") for p in parts if p)


def prepare_windows(model_path: str, args) -> None:
    """polyprune's own calibration windows, saved for llm-compressor."""
    import torch

    from polyprune.data.mix import build_calibration_set
    from polyprune.models import load_tokenizer

    tok = load_tokenizer(model_path)
    calib = build_calibration_set(CALIB, tok, "bundled", args.nsamples, args.seqlen, SEED)
    args.ids = args.out_dir / "calib_ids.pt"
    torch.save(calib.input_ids, args.ids)
    args.fingerprint = calib.fingerprint


def bench(args) -> dict:
    from polyprune.models import resolve_model_path

    model_path = resolve_model_path(MODEL)
    prepare_windows(model_path, args)
    results = []
    for method, tool, label, dtype in configurations(args):
        out = args.out_dir / slug(method, tool, dtype or "default")
        if tool == "polyprune":
            r = run_polyprune(model_path, method, dtype, args, out)
        else:
            r = run_llmc(model_path, method, dtype, args, out)
        r["ppl"] = evaluate(str(out), args, out.with_name(out.name + "-ppl.log"))["ppl"]
        results.append({"method": method, "tool": tool, "config": label, **r})
        print(
            f"  {method:<9} {label:<26} {r['compress_s']:7.1f} s  {r['command_s']:7.1f} s  "
            f"{r['peak_rss_mb']:6.0f} MiB  ppl {fmt_ppl(r['ppl'])}",
            file=sys.stderr,
        )
    dense = evaluate(model_path, args, args.out_dir / "dense-ppl.log")["ppl"]
    return {"model": MODEL, "model_path": model_path, "settings": settings(args),
            "dense_ppl": dense, "results": results,
            "ratios": ratios(results, args.langs)}  # fmt: skip


def settings(args) -> dict:
    return {"methods": args.methods, "sparsity": SPARSITY, "calib": CALIB, "seed": SEED,
            "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": BATCH,
            "langs": args.langs, "ppl_tokens": args.ppl_tokens, "ppl_seqlen": PPL_SEQLEN,
            "windows_fingerprint": args.fingerprint, "cpu_count": os.cpu_count(),
            "POLYPRUNE_FAST_CPU_DTYPES": os.environ.get("POLYPRUNE_FAST_CPU_DTYPES")}  # fmt: skip


def ratios(results: list[dict], langs: list[str]) -> dict:
    """The issue's bounds: default time / llm-compressor bf16 time, default vs fp32 ppl."""
    by = {(r["method"], r["config"]): r for r in results}
    out = {}
    for method in dict.fromkeys(r["method"] for r in results):
        default = by[(method, "polyprune default (auto)")]
        entry: dict = {}
        peer = by.get((method, "llm-compressor bfloat16"))
        if peer is not None:
            t = default["compress_s"] / peer["compress_s"]
            fastest = min(r["compress_s"] for r in results
                          if r["method"] == method and r["tool"] == "llm-compressor")  # fmt: skip
            bound = TIME_BOUNDS[method]
            vs_fastest = default["compress_s"] / fastest
            entry["time_vs_llmc_bf16"] = {"ratio": t, "bound": bound, "met": t <= bound,
                                          "vs_fastest_llmc": vs_fastest}  # fmt: skip
        ref = by[(method, "polyprune float32")]["ppl"]
        rel = {lang: default["ppl"][lang] / ref[lang] - 1 for lang in langs}
        entry["ppl_default_vs_float32"] = {
            "relative": rel,
            "bound": PPL_BOUND,
            "met": all(abs(v) <= PPL_BOUND for v in rel.values()),
        }
        out[method] = entry
    return out


def fmt_ppl(ppl: dict) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in ppl.items())


def markdown(data: dict) -> str:
    langs = data["settings"]["langs"]
    s = data["settings"]
    lines = [
        f"Gemma 3 270M (bf16), {s['nsamples']} x {s['seqlen']} calibration tokens "
        f"({s['calib']}, seed {s['seed']}), sparsity {s['sparsity']}, batch "
        f"{s['batch_size']}, CPU ({s['cpu_count']} cores); held-out perplexity: "
        f"{s['ppl_tokens']} tokens per language, {s['ppl_seqlen']}-token windows, float32",
        "",
        "| method | configuration | forwards | compression (s) | command (s) | peak RSS (MiB) | "
        "sparsity | " + " | ".join(f"ppl {x}" for x in langs) + " |",
        "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(langs),
    ]
    lines.append(
        "| - | dense | - | - | - | - | - | "
        + " | ".join(f"{data['dense_ppl'][x]:.2f}" for x in langs)
        + " |"
    )
    for r in data["results"]:
        lines.append(
            f"| {r['method']} | {r['config']} | {r['run_dtype']} | {r['compress_s']:.1f} | "
            f"{r['command_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['sparsity']:.4f} | "
            + " | ".join(f"{r['ppl'][x]:.2f}" for x in langs)
            + " |"
        )
    lines += ["", "Bounds (issue 16):", ""]
    for method, e in data["ratios"].items():
        if "time_vs_llmc_bf16" in e:
            t = e["time_vs_llmc_bf16"]
            lines.append(
                f"- {method}: polyprune default / llm-compressor bf16 compression time "
                f"= **{t['ratio']:.2f}x** (bound <= {t['bound']}: "
                f"{'met' if t['met'] else 'NOT met'}; vs llm-compressor's faster "
                f"configuration: {t['vs_fastest_llmc']:.2f}x)"
            )
        p = e["ppl_default_vs_float32"]
        rel = ", ".join(f"{k} {v:+.2%}" for k, v in p["relative"].items())
        lines.append(
            f"- {method}: polyprune default ppl vs --dtype float32: {rel} "
            f"(bound within {p['bound']:.0%}: {'met' if p['met'] else 'NOT met'})"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated: wanda, sparsegpt"
    )
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--langs", default="ar,de,en,zh", help="held-out perplexity languages")
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens per language")
    ap.add_argument("--llmc-python", help="python of a venv with llmcompressor 0.14 installed")
    ap.add_argument("--skip-llmc", action="store_true", help="polyprune configurations only")
    ap.add_argument(
        "--out-dir",
        help="where outputs and logs are kept (default: a temporary directory, removed at the end)",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    ap.add_argument("--json", help="write every number to this JSON file")
    # worker mode (internal)
    for flag in ("--worker", "--model-dir", "--method", "--dtype", "--ids", "--target",
                 "--result"):  # fmt: skip
        ap.add_argument(flag, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """The first bad input, as one line naming the value and what is allowed; else None."""
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        return f"unknown method {','.join(bad) or repr('')}; allowed: {', '.join(METHODS)}"
    if args.nsamples < 1:
        return f"--nsamples {args.nsamples}: must be at least 1"
    if args.seqlen < 2:
        return f"--seqlen {args.seqlen}: must be at least 2"
    if args.ppl_tokens < 2:
        return f"--ppl-tokens {args.ppl_tokens}: must be at least 2"
    args.langs = [x for x in args.langs.split(",") if x]
    from polyprune.data.sources import get_source
    from polyprune.errors import InputError

    try:
        for lang in args.langs or [""]:
            get_source("bundled").check_language(lang)
    except InputError as e:
        return str(e)
    if not args.skip_llmc:
        if not args.llmc_python:
            return "give --llmc-python PATH (a venv with llmcompressor 0.14) or --skip-llmc"
        if not os.access(args.llmc_python, os.X_OK):
            return f"--llmc-python {args.llmc_python!r}: not an executable file"
    if args.out_dir and Path(args.out_dir).exists():
        d = Path(args.out_dir)
        if not d.is_dir():
            return f"--out-dir {args.out_dir!r}: exists and is not a directory"
        if any(d.iterdir()) and not args.overwrite:
            return f"--out-dir {args.out_dir!r} is not empty; pass --overwrite to replace it"
        if any(d.iterdir()) and not (d / "calib_ids.pt").exists():
            # --overwrite removes the directory: only one this script made
            return f"--out-dir {args.out_dir!r} is not empty and not a bench_real output"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        if args.worker == "llmc":
            r = worker_llmc(args.model_dir, args.ids, args.method, args.dtype, args.target)
        else:
            r = worker_ppl(args.model_dir, args.langs.split(","), args.ppl_tokens)
        Path(args.result).write_text(json.dumps(r))
        return 0
    error = check_args(args)
    if error:
        print(f"bench_real: error: {error}", file=sys.stderr)
        return 2
    tmp = None
    if args.out_dir:
        args.out_dir = Path(args.out_dir)
        if args.out_dir.exists():
            shutil.rmtree(args.out_dir)  # checked above: empty, or --overwrite
        args.out_dir.mkdir(parents=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_real-")
        args.out_dir = Path(tmp.name)
    try:
        data = bench(args)
    except BenchError as e:
        print(f"bench_real: error: {e}", file=sys.stderr)
        return 1
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(markdown(data))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
