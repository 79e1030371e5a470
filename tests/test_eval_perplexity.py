"""Held-out perplexity against an independent token-by-token computation."""

import math

import pytest
import torch

from polyprune.data.sources import DirectorySource
from polyprune.eval.perplexity import heldout_stream, perplexity

from .conftest import tiny_model


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
