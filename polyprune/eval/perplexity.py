"""Held-out perplexity per language.

The held-out documents of a language are joined with EOS into one token stream, cut into
consecutive ``seqlen``-token windows (the last one may be shorter; each starts with BOS where
the tokenizer adds one, see ``polyprune.data.windows``), and
PPL = exp(mean token NLL) over every predicted token (each window predicts all its tokens but
the first). Held-out text is never used for calibration (see ``polyprune.data.sources``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from polyprune.data.sources import TextSource, get_source
from polyprune.errors import InputError
from polyprune.models import max_positions

__all__ = ["PerplexityResult", "heldout_stream", "perplexity", "stream_perplexity"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    lang: str
    ppl: float
    tokens: int  # predicted tokens
    windows: int


def heldout_stream(
    tokenizer, lang: str, source: TextSource | str = "bundled", max_tokens: int | None = None
) -> torch.Tensor:
    """The held-out documents of ``lang`` as one EOS-joined token stream (1-D int64)."""
    src = get_source(source)
    docs = src.documents(lang, "heldout")
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(enc)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.int64)


# Logits per forward pass at most (fp32: 1 GiB): a 262k vocabulary (Gemma) at batch 8 x 2048
# tokens would otherwise be 17 GiB of logits, plus as much again for the loss.
LOGITS_BUDGET = 1 << 28
_LOSS_CHUNK = 256  # positions whose fp32 log-softmax is held at once


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL of ``targets`` (B, T - 1) under ``logits`` (B, T, V), a few positions at a
    time so that the fp32 copy and log-softmax stay small whatever the vocabulary."""
    total = 0.0
    for a in range(0, targets.shape[1], _LOSS_CHUNK):
        b = min(a + _LOSS_CHUNK, targets.shape[1])
        part = logits[:, a:b].float().reshape(-1, logits.shape[-1])
        total += F.cross_entropy(part, targets[:, a:b].reshape(-1), reduction="sum").item()
    return total


@torch.inference_mode()
def stream_perplexity(
    model, stream: torch.Tensor, seqlen: int, batch_size: int = 8, device: str = "cpu",
    progress: bool = False, desc: str = "ppl", bos: int | None = None,
) -> tuple[float, int, int]:  # fmt: skip
    """(ppl, predicted tokens, windows) of ``model`` on a 1-D token stream. With ``bos``
    (``data.windows.window_bos``) each window is BOS + ``seqlen - 1`` stream tokens, all of
    them predicted."""
    from polyprune.data.windows import cut_windows

    full = cut_windows(stream, seqlen, bos)
    n_full = full.shape[0]
    text = seqlen - (bos is not None)
    tail = stream[n_full * text :]
    if bos is not None and len(tail):
        tail = torch.cat([torch.tensor([bos], dtype=stream.dtype), tail])
    vocab = getattr(model.config, "vocab_size", None) or 1
    batch_size = max(1, min(batch_size, LOGITS_BUDGET // (seqlen * vocab)))
    batches = [full[i : i + batch_size] for i in range(0, n_full, batch_size)]
    if len(tail) >= 2:
        batches.append(tail.unsqueeze(0))
    if not batches:
        raise InputError(f"only {len(stream)} held-out tokens: too few for a perplexity")
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for x in tqdm(batches, desc=desc, disable=not progress, leave=False):
        x = x.to(device)
        logits = model(x, use_cache=False).logits  # (B, T, V)
        nll += _nll_sum(logits, x[:, 1:])
        count += x[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count), count, n_full + (len(tail) >= 2)


def perplexity(
    model,
    tokenizer,
    langs: list[str],
    source: TextSource | str = "bundled",
    seqlen: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, PerplexityResult]:
    """Held-out perplexity of ``model`` for each language of ``langs``."""
    limit = max_positions(model.config)
    seqlen = seqlen or min(limit or 2048, 2048)
    if limit is not None and seqlen > limit:
        raise InputError(f"seqlen {seqlen} is above the model's maximum positions ({limit})")
    from polyprune.data.windows import window_bos

    src = get_source(source)
    bos = window_bos(tokenizer)
    out = {}
    for lang in langs:
        stream = heldout_stream(tokenizer, lang, src, max_tokens)
        ppl, tokens, windows = stream_perplexity(
            model, stream, seqlen, batch_size, device, progress, desc=f"ppl {lang}", bos=bos
        )
        out[lang] = PerplexityResult(lang, ppl, tokens, windows)
        logger.info("%s: perplexity %.2f over %d tokens", lang, ppl, tokens)
    return out
