"""Held-out perplexity per language.

The held-out documents of a language are joined with EOS into one token stream, cut into
consecutive ``seqlen``-token windows (the last one may be shorter; each starts with BOS where
the tokenizer adds one, see ``polyprune.data.windows``), and
PPL = exp(mean token NLL) over every predicted token (each window predicts all its tokens but
the first). Held-out text is never used for calibration (see ``polyprune.data.sources``).

Besides the perplexity, each language gives its *units* for intervals and paired tests
(``polyprune.eval.significance``): per held-out document (the tokens up to and including its
EOS), the summed NLL of its predicted tokens and their number. A document cut by a window
boundary is one unit; without an EOS token, each window is a unit.

The (batch, seqlen, vocab) logit tensor is never built (2 GiB for 4 x 512 tokens of a 262k
vocabulary): the model's base module gives the final hidden states, and the output head turns
them into logits one tile of (tokens, vocabulary rows) at a time (at most ``LOGIT_CHUNK_BYTES``
of fp32 logits), the log-sum-exp accumulated over the tiles in fp32; the head's product runs in
its own dtype (16-bit for a 16-bit model), as in the model's forward. A model whose head
cannot be split off its forward (checked once per stream on a few tokens) is evaluated through
its full forward instead.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from polyprune.data.heldout import heldout_stream
from polyprune.data.sources import TextSource, get_source
from polyprune.errors import InputError
from polyprune.models import max_positions

__all__ = [
    "LOGIT_CHUNK_BYTES",
    "LogitHead",
    "PerplexityResult",
    "StreamLosses",
    "document_ids",
    "perplexity",
    "split_head",
    "stream_losses",
    "stream_perplexity",
]

logger = logging.getLogger(__name__)

# fp32 logits of one tile: 64 MiB is ~2k tokens x 8k vocabulary rows of a 262k vocabulary, a
# product large enough for the head's matmul to run at full speed, the weight read once per
# batch of <= 8192 tokens. (8 MiB tiles measured no faster on Gemma 3 270M in bf16 on a CPU.)
LOGIT_CHUNK_BYTES = 64 << 20
_PROBE_TOKENS = 8  # tokens run both ways to check that the head splits off the forward


@dataclass(frozen=True)
class PerplexityResult:
    lang: str
    ppl: float
    tokens: int  # predicted tokens
    windows: int
    unit_nll: tuple[float, ...] = ()  # summed NLL per held-out document (unit)
    unit_tokens: tuple[int, ...] = ()  # predicted tokens per unit


@dataclass(frozen=True)
class StreamLosses:
    """Losses of a model on a token stream: totals and per unit (document or window)."""

    nll: float  # summed NLL of every predicted token
    tokens: int
    windows: int
    unit_nll: tuple[float, ...]
    unit_tokens: tuple[int, ...]

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)


@dataclass(frozen=True)
class LogitHead:
    """How a causal LM turns its final hidden states into logits, split off its forward.

    ``logits = softcap(head(base(x).last_hidden_state) * scale)``: run once over the whole
    batch for the hidden states, then through ``head`` a tile of (tokens, vocabulary rows) at a
    time, so that the (batch, seqlen, vocab) logit tensor never exists. A plain ``nn.Linear``
    head is cut into blocks of vocabulary rows (its weight is then read once per batch, not once
    per token chunk); any other head module only into chunks of tokens.
    """

    base: nn.Module
    head: nn.Module
    vocab: int
    scale: float = 1.0  # Cohere's ``logit_scale``, 1 / Granite's ``logits_scaling``
    softcap: float | None = None  # Gemma 2's ``final_logit_softcapping``

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids=x, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    @property
    def blockable(self) -> bool:
        return type(self.head).forward is nn.Linear.forward

    def logits(self, h: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """fp32 logits ``[lo, hi)`` of hidden states ``h`` (..., hidden), the product in the
        head's dtype; a head that is not ``blockable`` gives all of them."""
        if self.blockable:
            bias = self.head.bias
            w = self.head.weight[lo:hi]
            z = F.linear(h, w, None if bias is None else bias[lo:hi]).float()
        else:
            z = self.head(h).float()
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z


def _head_transform(model) -> tuple[float, float | None]:
    """(scale, softcap) a model's forward applies to the head's output, from its config."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    scale = 1.0
    for holder in (model, text):  # Cohere, Cohere 2: logits * logit_scale
        value = getattr(holder, "logit_scale", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scale = float(value)
            break
    divisor = getattr(text, "logits_scaling", None)  # Granite: logits / logits_scaling
    if isinstance(divisor, (int, float)) and divisor:
        scale /= float(divisor)
    softcap = getattr(text, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


def split_head(model, probe: torch.Tensor) -> LogitHead | None:
    """The model's :class:`LogitHead`, or None when the split does not reproduce its logits.

    ``probe`` (1-D or (B, T) token ids) is run both ways once: any head a generic split misses
    (a scaling in a custom forward, an unusual base model) shows up as a mismatch, and the
    caller then falls back to the full forward.
    """
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if base is None or base is model or head is None:
        return None
    x = probe.reshape(-1)[:_PROBE_TOKENS].unsqueeze(0)
    try:
        want = model(x, use_cache=False).logits.float()
        spec = LogitHead(base, head, want.shape[-1], *_head_transform(model))
        got = spec.logits(spec.hidden(x))
    except Exception as exc:  # a base model that cannot run alone: use the full forward
        logger.info("perplexity: cannot split the output head (%s)", exc)
        return None
    # The split runs the same modules on the same input, so only the softcap (fp32 here, the
    # model's dtype in its forward) may differ, by rounding; any missed scaling is far bigger.
    tol = 1e-4 if _head_dtype(head) == torch.float32 else 2e-2
    scale = max(want.abs().max().item(), 1e-6)
    if got.shape != want.shape or (got - want).abs().max().item() > tol * scale:
        logger.warning(
            "perplexity: the output head of %s does not split off its forward; "
            "using the full-logit forward", type(model).__name__,
        )  # fmt: skip
        return None
    return spec


def _head_dtype(head: nn.Module) -> torch.dtype:
    weight = getattr(head, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.float32


def _tiles(n: int, vocab: int, chunk_bytes: int, blockable: bool) -> tuple[int, int]:
    """(tokens, vocabulary rows) of one tile of fp32 logits of at most ``chunk_bytes``."""
    elems = max(1, chunk_bytes // 4)
    if not blockable:
        return max(1, elems // vocab), vocab
    # as many tokens as fit beside >= 2048 rows: the head's weight is read once per token chunk
    tokens = max(1, min(n, elems // min(vocab, 2048)))
    return tokens, max(1, min(vocab, elems // tokens))


def _tile_nll(spec: LogitHead, h: torch.Tensor, y: torch.Tensor, rows: int) -> torch.Tensor:
    """NLL of each target of ``y`` from hidden states ``h``: log-sum-exp accumulated online
    over blocks of ``rows`` vocabulary rows, in fp32.

    Within 1e-8 nats a token of a float64 log-sum-exp on 262k random logits, where fp32
    ``F.cross_entropy`` over the whole row is 2e-5 nats low: the chunked perplexities of a
    262k-vocabulary model are ~2e-5 relative above the full-logit ones, and closer to exact.
    """
    n = len(y)
    top = torch.full((n,), -math.inf, device=h.device)  # running max logit
    total = torch.zeros(n, device=h.device)  # sum of exp(logit - top)
    target = torch.zeros(n, device=h.device)
    for lo in range(0, spec.vocab, rows):
        z = spec.logits(h, lo, lo + rows)
        inside = ((y >= lo) & (y < lo + z.shape[-1])).nonzero().squeeze(1)
        target[inside] = z[inside, y[inside] - lo]
        new_top = torch.maximum(top, z.amax(dim=-1))
        total = total * torch.exp(top - new_top) + z.sub_(new_top[:, None]).exp_().sum(dim=-1)
        top = new_top
    return top + total.log() - target


def _chunked_nll(spec: LogitHead, x: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """NLL of each prediction of ``x[:, 1:]`` (flattened), through the head one tile of logits
    at a time."""
    h = spec.hidden(x)[:, :-1]
    h = h.reshape(-1, h.shape[-1])  # (B * (T - 1), hidden): small beside the logits
    y = x[:, 1:].reshape(-1)
    tokens, rows = _tiles(len(y), spec.vocab, chunk_bytes, spec.blockable)
    return torch.cat(
        [
            _tile_nll(spec, h[i : i + tokens], y[i : i + tokens], rows)
            for i in range(0, len(y), tokens)
        ]
    )


def _full_nll(model, x: torch.Tensor) -> torch.Tensor:
    """NLL of each prediction of ``x[:, 1:]`` (flattened) from the model's own forward: the
    whole (B, T, vocab) logit tensor."""
    logits = model(x, use_cache=False).logits.float()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
    )


def document_ids(stream: torch.Tensor, eos_id: int | None, per_window: int) -> torch.Tensor:
    """The unit of each stream position: its document (an EOS ends the document it closes),
    or without ``eos_id`` its window (of ``per_window`` stream tokens)."""
    if eos_id is None:
        return torch.arange(len(stream)) // per_window
    is_eos = (stream == eos_id).long()
    return torch.cumsum(is_eos, 0) - is_eos


def _cut(stream: torch.Tensor, seqlen: int, batch_size: int, bos: int | None) -> list[torch.Tensor]:
    """Consecutive ``seqlen`` windows (BOS + ``seqlen - 1`` stream tokens with ``bos``) in
    batches, the shorter tail (>= 2 tokens with its BOS) last alone."""
    from polyprune.data.windows import cut_windows

    full = cut_windows(stream, seqlen, bos)  # (n_full, seqlen)
    n_full = full.shape[0]
    tail = stream[n_full * (seqlen - (bos is not None)) :]
    if bos is not None and len(tail):
        tail = torch.cat([torch.tensor([bos], dtype=stream.dtype), tail])
    batches = [full[i : i + batch_size] for i in range(0, n_full, batch_size)]
    if len(tail) >= 2:
        batches.append(tail.unsqueeze(0))
    return batches


@torch.inference_mode()
def stream_losses(
    model, stream: torch.Tensor, seqlen: int, batch_size: int = 8, device: str = "cpu",
    progress: bool = False, desc: str = "ppl", chunked: bool = True,
    logit_chunk_bytes: int = LOGIT_CHUNK_BYTES, bos: int | None = None,
    eos_id: int | None = None,
) -> StreamLosses:  # fmt: skip
    """Summed NLL and predicted tokens of ``model`` on a 1-D token stream, in total and per
    unit: per document where ``eos_id`` separates them, else per window.

    With ``bos`` (``data.windows.window_bos``) each window is BOS + ``seqlen - 1`` stream
    tokens, all of them predicted. ``chunked=False`` computes the loss from the model's full
    logits (the reference, slower and (batch x seqlen x vocab) large); otherwise at most
    ``logit_chunk_bytes`` of logits at once.
    """
    batches = _cut(stream, seqlen, batch_size, bos)
    if not batches:
        raise InputError(f"only {len(stream)} held-out tokens: too few for a perplexity")
    # The units are cut exactly as the tokens are; a window's first position (BOS, or the
    # first stream token without BOS) is never a target, so the id BOS gets there is unused.
    ids = document_ids(stream, eos_id, seqlen - (bos is not None))
    units = _cut(ids, seqlen, batch_size, None if bos is None else 0)
    n_units = int(units[-1].max()) + 1
    unit_nll = torch.zeros(n_units, dtype=torch.float64)
    unit_tokens = torch.zeros(n_units, dtype=torch.int64)
    was_training = model.training
    model.eval()
    spec = split_head(model, batches[0][0].to(device)) if chunked else None
    for x, u in tqdm(list(zip(batches, units, strict=True)), desc=desc, disable=not progress,
                     leave=False):  # fmt: skip
        x = x.to(device)
        nll = _full_nll(model, x) if spec is None else _chunked_nll(spec, x, logit_chunk_bytes)
        u = u[:, 1:].reshape(-1)  # each window predicts all its tokens but the first
        unit_nll += torch.bincount(u, nll.double().cpu(), minlength=n_units)
        unit_tokens += torch.bincount(u, minlength=n_units)
    model.train(was_training)
    keep = unit_tokens > 0  # a one-token document that starts a window predicts nothing
    return StreamLosses(
        float(unit_nll.sum()), int(unit_tokens.sum()), _n_windows(batches),
        tuple(unit_nll[keep].tolist()), tuple(unit_tokens[keep].tolist()),
    )  # fmt: skip


def _n_windows(batches: list[torch.Tensor]) -> int:
    return sum(len(b) for b in batches)


def stream_perplexity(
    model, stream: torch.Tensor, seqlen: int, batch_size: int = 8, device: str = "cpu",
    progress: bool = False, desc: str = "ppl", chunked: bool = True,
    logit_chunk_bytes: int = LOGIT_CHUNK_BYTES, bos: int | None = None,
) -> tuple[float, int, int]:  # fmt: skip
    """(ppl, predicted tokens, windows) of ``model`` on a 1-D token stream
    (:func:`stream_losses` has the per-unit sums too; ``bos`` as there)."""
    out = stream_losses(model, stream, seqlen, batch_size, device, progress, desc, chunked,
                        logit_chunk_bytes, bos)  # fmt: skip
    return out.ppl, out.tokens, out.windows


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
    from polyprune.data.windows import window_bos

    limit = max_positions(model.config)
    seqlen = seqlen or min(limit or 2048, 2048)
    if limit is not None and seqlen > limit:
        raise InputError(f"seqlen {seqlen} is above the model's maximum positions ({limit})")
    src = get_source(source)
    bos = window_bos(tokenizer)
    out = {}
    for lang in langs:
        stream = heldout_stream(tokenizer, lang, src, max_tokens)
        res = stream_losses(model, stream, seqlen, batch_size, device, progress,
                            desc=f"ppl {lang}", bos=bos,
                            eos_id=tokenizer.eos_token_id)  # fmt: skip
        out[lang] = PerplexityResult(lang, res.ppl, res.tokens, res.windows, res.unit_nll,
                                     res.unit_tokens)  # fmt: skip
        logger.info("%s: perplexity %.2f over %d tokens (%d documents)", lang, res.ppl,
                    res.tokens, len(res.unit_nll))  # fmt: skip
    return out
