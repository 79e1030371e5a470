"""An offline multiple-choice task from held-out text: pick the true next sentence.

Each item takes a held-out paragraph of one language, shows sentences ``k - 2 .. k`` of it and
asks for sentence ``k + 1`` among four: the true one and three sentences of *other* held-out
paragraphs of the same language, at a seeded random position. A model that has learnt the
language and follows the topic scores well above chance (25%); one that has lost the language
falls towards it. The text is the held-out split of a source (``polyprune.data.sources``),
never calibration text, so the task needs no network and is safe to run on compressed models.
It is served to lm-eval as the ``polyprune_nextsent_<lang>`` tasks (``tasks/nextsent/``).
"""

from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass

import numpy as np

from polyprune.data.sources import TextSource, get_source
from polyprune.errors import InputError

__all__ = ["NextSentenceItem", "load_nextsent", "nextsent_items", "sentences"]

logger = logging.getLogger(__name__)

# End of a sentence: ., !, ?, their CJK / Arabic forms, and any closing quotes or brackets.
_TERMINATOR = re.compile(r"[.!?؟。！？]+[\"'“”‘’»」』）)\]]*")
_CJK_END = frozenset("。！？")
_HAS_WORD = re.compile(r"\w")
# Scripts written without spaces between sentences.
NO_SPACE_LANGS = frozenset({"zh", "ja", "th", "km", "lo", "my"})
N_CHOICES = 4
# The context is at most the 3 sentences before the answer: enough to carry the topic, and
# short enough for small context windows (the demo model has 512 positions).
CONTEXT_SENTENCES = 3


@dataclass(frozen=True)
class NextSentenceItem:
    context: str
    choices: tuple[str, ...]  # each with its leading separator (" " or "")
    label: int


def sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph, stripped. A sentence ends at a terminator (with its closing
    quotes) followed by a space, or at a CJK terminator; a piece without a word character (a
    stray quote) joins the sentence before it."""
    out: list[str] = []
    start = 0
    for m in _TERMINATOR.finditer(paragraph):
        end = m.end()
        if end < len(paragraph) and not paragraph[end].isspace() and m.group()[0] not in _CJK_END:
            continue  # "3.5", "z.B.", "U.S.A": no sentence end inside a word
        out.append(paragraph[start:end])
        start = end
    out.append(paragraph[start:])
    merged: list[str] = []
    for piece in (p.strip() for p in out):
        if not piece:
            continue
        if merged and not _HAS_WORD.search(piece):
            merged[-1] += piece
        else:
            merged.append(piece)
    return merged


def nextsent_items(
    lang: str, source: TextSource | str = "bundled", seed: int = 1234
) -> list[NextSentenceItem]:
    """The task's items for ``lang``: one per sentence boundary of every held-out paragraph."""
    docs = [sentences(d) for d in get_source(source).documents(lang, "heldout")]
    sep = "" if lang in NO_SPACE_LANGS else " "
    items = []
    for i, sents in enumerate(docs):
        pool = sorted({s for j, other in enumerate(docs) if j != i for s in other})
        for k in range(1, len(sents)):
            target = sents[k]
            candidates = [s for s in pool if s != target]
            if len(candidates) < N_CHOICES - 1:
                continue
            # A generator per item, keyed by (seed, lang, paragraph, position): adding text to
            # one paragraph does not reshuffle the items of the others.
            rng = np.random.default_rng([seed, zlib.crc32(lang.encode()), i, k])
            picks = rng.choice(len(candidates), N_CHOICES - 1, replace=False)
            choices = [candidates[p] for p in picks]
            label = int(rng.integers(N_CHOICES))
            choices.insert(label, target)
            items.append(
                NextSentenceItem(
                    sep.join(sents[max(0, k - CONTEXT_SENTENCES) : k]),
                    tuple(sep + c for c in choices),
                    label,
                )
            )
    if not items:
        raise InputError(f"no held-out paragraph of {lang!r} has two sentences for the task")
    return items


def load_nextsent(lang: str, source: str = "bundled", seed: int = 1234, **_metadata):
    """lm-eval ``custom_dataset`` hook: the items of ``lang`` as a ``DatasetDict`` with a
    ``test`` split (lm-eval passes its task metadata as extra keyword arguments)."""
    import datasets

    items = nextsent_items(lang, source, seed)
    logger.debug("polyprune_nextsent_%s: %d items from %s", lang, len(items), source)
    ds = datasets.Dataset.from_dict(
        {
            "context": [it.context for it in items],
            "choices": [list(it.choices) for it in items],
            "label": [it.label for it in items],
        }
    )
    return datasets.DatasetDict({"test": ds})
