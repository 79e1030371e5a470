#!/usr/bin/env python
"""Train the bundled demo model: a small multilingual Llama, seeded and reproducible.

Trains on the *calibration* part of the bundled corpus (never its held-out part) in
ar de en es ru zh, and deliberately not on Swahili, so that sw plays the paper's role of a
calibration language absent from pre-training. A byte-level BPE tokenizer is trained on the
same text. The result is written in HF format to polyprune/assets/demo/ with a model card.

    python scripts/train_demo_model.py [--out polyprune/assets/demo] [--minutes 40]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from polyprune.data.sources import BundledSource

TRAIN_LANGS = ("ar", "de", "en", "es", "ru", "zh")
PAPER_LANGS = ("ar", "de", "en", "es", "ru", "sw", "zh")
EN_CHAR_CAP = 160_000  # en has ~10x the text of the others; cap it so languages stay balanced

log = logging.getLogger("train_demo_model")


def training_text(src: BundledSource) -> dict[str, list[str]]:
    out = {}
    for lang in TRAIN_LANGS:
        docs = src.documents(lang, "calib")
        if lang == "en":
            kept, n = [], 0
            for d in docs:
                if n >= EN_CHAR_CAP:
                    break
                kept.append(d)
                n += len(d)
            docs = kept
        out[lang] = docs
    return out


def train_tokenizer(texts: dict[str, list[str]], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d for docs in texts.values() for d in docs), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=512, clean_up_tokenization_spaces=False,
    )  # fmt: skip


def token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int64)


def unigram_ppl(train: torch.Tensor, test: torch.Tensor, vocab: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on the training tokens."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return math.exp(-logp[test].mean().item())


@torch.no_grad()
def model_ppl(model, stream: torch.Tensor, seqlen: int, max_tokens: int | None = None) -> float:
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n = (len(stream) - 1) // seqlen
    nll, count = 0.0, 0
    model.eval()
    for i in range(n):
        x = stream[i * seqlen : (i + 1) * seqlen + 1].unsqueeze(0)
        logits = model(x[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum")
        nll += loss.item()
        count += seqlen
    model.train()
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="polyprune/assets/demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--intermediate", type=int, default=768)  # 6 x 128: GPTQ groups of 128
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--minutes", type=float, default=90.0, help="stop early after this long")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--card-only", action="store_true", help="rewrite README.md of --out only")
    args = ap.parse_args()
    if args.card_only:
        write_model_card(Path(args.out))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    src = BundledSource()
    texts = training_text(src)
    tokenizer = train_tokenizer(texts, args.vocab)
    streams = {lang: token_stream(tokenizer, docs) for lang, docs in texts.items()}
    heldout = {
        lang: token_stream(tokenizer, src.documents(lang, "heldout")) for lang in PAPER_LANGS
    }
    # The last 5% of each training stream is a dev slice for choosing the checkpoint: the
    # held-out split stays unseen until the final report.
    dev = {lang: s[int(0.95 * len(s)) :] for lang, s in streams.items()}
    streams = {lang: s[: int(0.95 * len(s))] for lang, s in streams.items()}
    for lang, s in streams.items():
        log.info("train %s: %d tokens", lang, len(s))

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    nparams = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", nparams / 1e6)

    # Each batch draws equally from every training language: random windows of seqlen tokens.
    gen = torch.Generator().manual_seed(args.seed)
    langs = list(streams)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
        ),
    )
    t0 = time.time()
    model.train()
    step = 0
    best: tuple[float, int, dict | None] = (float("inf"), 0, None)
    for step in range(args.steps):
        rows = []
        for b in range(args.batch):
            s = streams[langs[b % len(langs)]]
            i = int(torch.randint(0, len(s) - args.seqlen, (1,), generator=gen))
            rows.append(s[i : i + args.seqlen])
        x = torch.stack(rows)
        loss = model(x, labels=x).loss  # the model shifts labels by one itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            log.info("step %d loss %.3f (%.1f min)", step, loss.item(), (time.time() - t0) / 60)
        if (step + 1) % 200 == 0 or step + 1 == args.steps:
            dev_nll = sum(math.log(model_ppl(model, d, args.seqlen)) for d in dev.values())
            if dev_nll < best[0]:
                best = (dev_nll, step + 1, {k: v.clone() for k, v in model.state_dict().items()})
            log.info("step %d dev mean log-ppl %.3f", step + 1, dev_nll / len(dev))
        if time.time() - t0 > args.minutes * 60:
            log.info("time budget reached at step %d", step)
            break
    train_minutes = (time.time() - t0) / 60
    if best[2] is not None:
        model.load_state_dict(best[2])
        log.info("keeping the checkpoint of step %d (best dev perplexity)", best[1])

    rows = []
    all_train = torch.cat(list(streams.values()))
    for lang in PAPER_LANGS:
        ppl = model_ppl(model, heldout[lang], args.seqlen)
        uni = unigram_ppl(all_train, heldout[lang], len(tokenizer))
        rows.append((lang, len(heldout[lang]), ppl, uni))
        log.info("heldout %s: ppl %.1f unigram %.1f ratio %.3f", lang, ppl, uni, ppl / uni)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stats = {
        "parameters": nparams,
        "steps": step + 1,
        "checkpoint_step": best[1],
        "train_minutes": round(train_minutes, 1),
        "train_tokens": {lang: len(s) for lang, s in streams.items()},
        "heldout": {lang: {"tokens": n, "ppl": p, "unigram_ppl": u} for lang, n, p, u in rows},
        "args": vars(args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "training.json").write_text(json.dumps(stats, indent=2))
    write_model_card(out)
    log.info("wrote %s", out)


def write_model_card(out: Path) -> None:
    """README.md of the demo model from its config and training.json."""
    stats = json.loads((out / "training.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    a = stats["args"]
    rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e4)
    size_mb = (out / "model.safetensors").stat().st_size / 2**20
    rows = []
    for lang in PAPER_LANGS:
        h = stats["heldout"][lang]
        note = " (not in training data)" if lang not in TRAIN_LANGS else ""
        rows.append(
            f"| {lang}{note} | {h['tokens']:,} | {h['ppl']:.1f} | {h['unigram_ppl']:.1f} | "
            f"{h['ppl'] / h['unigram_ppl']:.3f} |"
        )
    train_tokens = ", ".join(f"{k} {v:,}" for k, v in stats["train_tokens"].items())
    card = f"""# polyprune demo model

A small multilingual Llama trained by polyprune's `scripts/train_demo_model.py` so that every
command, test and analysis runs offline on a real language model. It is a research fixture, not
a useful language model.

## Architecture
`LlamaForCausalLM`: {cfg["num_hidden_layers"]} decoder layers, hidden size {cfg["hidden_size"]},
SwiGLU MLP (gate/up/down) of width {cfg["intermediate_size"]}, {cfg["num_attention_heads"]}
attention heads, RMSNorm, RoPE (theta {rope_theta:g}),
{cfg["max_position_embeddings"]} positions, tied input/output embeddings;
{stats["parameters"] / 1e6:.2f}M parameters, stored in bfloat16 ({size_mb:.1f} MiB).
Tokenizer: byte-level BPE of {cfg["vocab_size"]} tokens (the `tokenizers` library) trained on
the same text; `<s>`, `</s>`, `<pad>` are its special tokens.

## Data
The calibration part of polyprune's bundled corpus (`dataset-build`, BSD-2; every 10th
paragraph is held out and was never seen in training) in **ar de en es ru zh**, English capped
at {EN_CHAR_CAP:,} characters to keep the languages balanced. **Swahili (sw) is deliberately
absent**, so it plays the role of a calibration language outside pre-training. Training
tokens: {train_tokens}; the last 5% of each language's stream was a dev slice to choose the
checkpoint.

## Training
Seed {a["seed"]}; AdamW (lr {a["lr"]}, betas 0.9/0.95, weight decay 0.1), 100 warm-up steps,
cosine decay to 10%; batches of {a["batch"]} windows of {a["seqlen"]} tokens drawn equally from
each language; {stats["steps"]} steps, checkpoint of step {stats["checkpoint_step"]} kept (best
dev perplexity); {stats["train_minutes"]} minutes on CPU ({stats["threads"]} threads, torch
{stats["torch"]}).

## Held-out perplexity
On the held-out part of the bundled corpus (documents joined with EOS, windows of
{a["seqlen"]} tokens), next to an add-one-smoothed unigram model fitted on the training tokens
with the same tokenizer:

| language | tokens | model | unigram | model / unigram |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}

Reproduce: `python scripts/train_demo_model.py --out polyprune/assets/demo` (same arguments as
in `training.json`).
"""
    (out / "README.md").write_text(card)


if __name__ == "__main__":
    main()
