"""Held-out text as token streams: the documents of a language that calibration never sees
(see ``polyprune.data.sources``), for perplexity (``polyprune.eval``) and hidden-state
analyses (``polyprune.analysis``) alike."""

from __future__ import annotations

import torch

from polyprune.data.sources import TextSource, get_source

__all__ = ["heldout_stream"]


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
