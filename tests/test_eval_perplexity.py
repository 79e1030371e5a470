"""Held-out perplexity against an independent token-by-token computation."""

import math

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from polyprune.data.heldout import heldout_stream
from polyprune.data.sources import DirectorySource
from polyprune.eval.perplexity import (
    perplexity,
    split_head,
    stream_losses,
    stream_perplexity,
)

from .conftest import VOCAB, tiny_model


def reference_ppl(model, stream: torch.Tensor, seqlen: int) -> float:
    """exp(mean NLL) window by window, one position at a time, from log-softmax by hand."""
    nll, count = 0.0, 0
    for start in range(0, len(stream), seqlen):
        w = stream[start : start + seqlen]
        if len(w) < 2:
            continue
        with torch.no_grad():
            logits = model(w[None]).logits[0].double()
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        for t in range(len(w) - 1):
            nll -= logp[t, w[t + 1]].item()
            count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("seqlen, batch_size", [(32, 1), (48, 3), (17, 8)])
def test_perplexity_equals_a_token_by_token_reference(tokenizer, seqlen, batch_size):
    model = tiny_model("llama").eval()
    stream = heldout_stream(tokenizer, "de", max_tokens=300)
    got = perplexity(model, tokenizer, ["de"], seqlen=seqlen, batch_size=batch_size,
                     max_tokens=300, progress=False)["de"]  # fmt: skip
    n_windows = math.ceil(300 / seqlen) if 300 % seqlen != 1 else 300 // seqlen
    assert got.windows == n_windows
    assert got.tokens == 300 - n_windows
    assert got.ppl == pytest.approx(reference_ppl(model, stream, seqlen), rel=1e-5)


def test_stream_is_heldout_documents_joined_with_eos(tokenizer, tmp_path):
    docs = [f"Paragraph number {i} of the test." for i in range(30)]
    (tmp_path / "en.txt").write_text("\n\n".join(docs))
    stream = heldout_stream(tokenizer, "en", DirectorySource(tmp_path)).tolist()
    held = [docs[9], docs[19], docs[29]]  # every 10th document is held out
    want = []
    for d in held:
        want += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert stream == want


def test_perplexity_of_each_language_from_a_directory(tokenizer, tmp_path):
    for lang in ("de", "en"):
        (tmp_path / f"{lang}.txt").write_text("\n\n".join(f"{lang} text {i}." for i in range(20)))
    model = tiny_model("llama").eval()
    res = perplexity(model, tokenizer, ["de", "en"], DirectorySource(tmp_path), seqlen=16,
                     progress=False)  # fmt: skip
    assert set(res) == {"de", "en"} and all(r.ppl > 1 for r in res.values())


def tiny_extra(family: str, **kw):
    """Families with a head transform: Gemma 2 (softcap), Gemma 3 text, Cohere, Granite."""
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GraniteConfig,
        GraniteForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    if family == "gemma2":
        cfg = Gemma2Config(head_dim=16, **common, **kw)
        return Gemma2ForCausalLM(cfg)
    if family == "gemma3":
        return Gemma3ForCausalLM(Gemma3TextConfig(head_dim=16, **common, **kw))
    if family == "cohere":
        return CohereForCausalLM(CohereConfig(**common, **kw))
    if family == "granite":
        return GraniteForCausalLM(GraniteConfig(**common, **kw))
    raise ValueError(family)


def scaled_head(model, factor: float = 5.0):
    """Larger output weights, so that a missed softcap or logit scale changes the NLL a lot."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model.eval()


FAMILIES = {
    "llama": lambda: tiny_model("llama"),
    "qwen2": lambda: tiny_model("qwen2"),
    "opt": lambda: tiny_model("opt"),
    "gpt2": lambda: tiny_model("gpt2"),
    "gemma2-softcap": lambda: tiny_extra("gemma2", final_logit_softcapping=0.5),
    "gemma3": lambda: tiny_extra("gemma3"),
    "cohere-logit-scale": lambda: tiny_extra("cohere", logit_scale=0.25),
    "granite-logits-scaling": lambda: tiny_extra("granite", logits_scaling=4.0),
}


class OpaqueHead(torch.nn.Linear):
    """A head module the split cannot cut into vocabulary blocks (its own forward)."""

    def forward(self, h):
        return super().forward(h)


def with_opaque_head(model):
    old = model.get_output_embeddings()
    head = OpaqueHead(old.in_features, old.out_features, bias=False)
    head.weight = torch.nn.Parameter(old.weight.detach().clone())
    model.set_output_embeddings(head)
    return model


FAMILIES["llama-opaque-head"] = lambda: with_opaque_head(tiny_model("llama"))


# 7 tokens x the whole vocabulary a tile; 1 token x 300 rows: blocks of vocabulary rows, the
# last one partial. Token chunks cross window boundaries and the last one is partial.
@pytest.mark.parametrize("chunk_elems", [7 * VOCAB, 300])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_perplexity_equals_the_full_logit_one(tokenizer, family, chunk_elems):
    model = scaled_head(FAMILIES[family]())
    stream = heldout_stream(tokenizer, "en", max_tokens=300)
    assert split_head(model, stream[:16]) is not None  # the split path, not the fallback
    full = stream_perplexity(model, stream, 40, batch_size=3, chunked=False)
    chunked = stream_perplexity(model, stream, 40, batch_size=3, logit_chunk_bytes=4 * chunk_elems)
    assert chunked[1:] == full[1:]
    assert chunked[0] == pytest.approx(full[0], rel=1e-4)


def test_a_head_the_split_cannot_reproduce_falls_back_to_the_full_forward(tokenizer):
    model = tiny_model("llama").eval()
    forward = model.forward

    def doubled(*args, **kwargs):  # a custom forward scaling the logits, unknown to the split
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = doubled
    stream = heldout_stream(tokenizer, "en", max_tokens=200)
    assert split_head(model, stream[:16]) is None
    full = stream_perplexity(model, stream, 32, chunked=False)
    assert stream_perplexity(model, stream, 32) == full


class VocabAllocations(TorchDispatchMode):
    """Largest tensor allocated with a last dimension of the vocabulary size (logits)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in pytree.tree_leaves(out):
            new = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
            if new and t.dim() and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_logit_tensor_larger_than_one_chunk_is_allocated(tokenizer, family):
    model = tiny_model(family).eval()
    stream = heldout_stream(tokenizer, "en", max_tokens=600)
    chunk_tokens = 16
    with VocabAllocations(VOCAB) as seen:
        stream_perplexity(
            model, stream, 64, batch_size=8, logit_chunk_bytes=chunk_tokens * 4 * VOCAB
        )
    assert 0 < seen.largest <= chunk_tokens * VOCAB  # the full logits are 8 x 64 x VOCAB


def reference_document_nll(model, stream, seqlen, eos_id, bos=None):
    """Per document: (summed NLL, predicted tokens), token by token, from log-softmax by hand;
    the token at stream position p belongs to the document that p's EOS (or a later) ends.
    With ``bos`` each window is BOS + ``seqlen - 1`` stream tokens, all of them predicted."""
    sums: dict[int, list[float]] = {}
    doc = 0
    docs = []
    for tok in stream.tolist():
        docs.append(doc)
        doc += tok == eos_id
    text = seqlen - (bos is not None)
    for start in range(0, len(stream), text):
        pos = list(range(start, min(start + text, len(stream))))  # stream positions
        ids = [stream[p].item() for p in pos]
        if bos is not None:
            pos, ids = [None] + pos, [bos] + ids
        if len(ids) < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        for t in range(len(ids) - 1):
            entry = sums.setdefault(docs[pos[t + 1]], [0.0, 0])
            entry[0] -= logp[t, ids[t + 1]].item()
            entry[1] += 1
    return [tuple(sums[k]) for k in sorted(sums)]


def short_documents(tmp_path):
    """A directory source whose held-out documents (every 10th) are 5 short paragraphs."""
    paragraphs = [f"Paragraph {i}: " + "word " * (3 + 7 * (i % 4)) for i in range(50)]
    (tmp_path / "en.txt").write_text("\n\n".join(paragraphs))
    return DirectorySource(tmp_path)


@pytest.mark.parametrize("chunked, bos", [(True, None), (False, None), (True, 0)])
def test_per_document_nll_and_tokens_equal_a_token_by_token_reference(
    tokenizer, chunked, bos, tmp_path
):
    model = tiny_model("llama").eval()
    stream = heldout_stream(tokenizer, "en", short_documents(tmp_path))
    got = stream_losses(model, stream, 48, batch_size=3, chunked=chunked, bos=bos,
                        eos_id=tokenizer.eos_token_id)  # fmt: skip
    want = reference_document_nll(model, stream, 48, tokenizer.eos_token_id, bos)
    assert len(want) == 5 and len(stream) > 3 * 48  # documents that straddle windows
    assert list(got.unit_tokens) == [n for _, n in want]
    assert list(got.unit_nll) == pytest.approx([s for s, _ in want], rel=1e-5)
    assert sum(got.unit_tokens) == got.tokens and sum(got.unit_nll) == pytest.approx(got.nll)


def test_without_eos_each_window_is_a_unit(tokenizer):
    model = tiny_model("llama").eval()
    stream = heldout_stream(tokenizer, "de", max_tokens=100)
    got = stream_losses(model, stream, 32, eos_id=None)
    assert got.unit_tokens == (31, 31, 31, 3)
    assert math.exp(sum(got.unit_nll) / sum(got.unit_tokens)) == pytest.approx(got.ppl)


def test_perplexity_results_carry_their_documents(tokenizer, tmp_path):
    model = tiny_model("llama").eval()
    res = perplexity(model, tokenizer, ["en"], short_documents(tmp_path), seqlen=64,
                     progress=False)["en"]  # fmt: skip
    assert len(res.unit_nll) == len(res.unit_tokens) == 5
    assert sum(res.unit_tokens) == res.tokens
    assert math.exp(sum(res.unit_nll) / res.tokens) == pytest.approx(res.ppl)
