"""MKQA (Longpre et al., 2021) as a closed-book lm-eval task: data loading and token F1.

lm-eval ships no MKQA task. Ours (``tasks/mkqa/``, tasks ``polyprune_mkqa_<lang>``) asks the
question in the evaluation language and generates an answer greedily up to a newline. As in
the paper only answerable short-answer questions count: answer types ``unanswerable`` and
``long_answer`` are dropped. The score is MKQA's token F1: answers are lower-cased, stripped of
punctuation and articles, split into words (into characters for scripts without spaces), and
the best F1 over the gold answer and its aliases is taken.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import string
import unicodedata

__all__ = [
    "MKQA_LANGS",
    "MKQA_URL",
    "SHORT_ANSWER_TYPES",
    "load_mkqa",
    "normalize_answer",
    "process_results",
    "token_f1",
]

logger = logging.getLogger(__name__)

MKQA_URL = "https://github.com/apple/ml-mkqa/raw/main/dataset/mkqa.jsonl.gz"
# Our language codes -> MKQA's (Chinese: simplified, as in the paper).
_SAME_CODE = ("ar", "da", "de", "en", "es", "fi", "fr", "he", "hu", "it", "ja", "km", "ko",
              "ms", "nl", "no", "pl", "pt", "ru", "sv", "th", "tr", "vi")  # fmt: skip
MKQA_LANGS = {code: code for code in _SAME_CODE} | {"zh": "zh_cn"}
SHORT_ANSWER_TYPES = frozenset(
    {"entity", "short_phrase", "date", "number", "number_with_unit", "binary"}
)
_CHAR_TOKEN_LANGS = frozenset({"zh", "zh_cn", "zh_hk", "zh_tw", "ja", "th", "km"})
_ARTICLES = {
    "en": r"\b(a|an|the)\b",
    "de": r"\b(der|die|das|den|dem|des|ein|eine|einer|eines|einem|einen)\b",
    "es": r"\b(el|la|lo|las|los|un|una|unos|unas)\b",
    "fr": r"\b(le|la|les|l'|un|une|des)\b",
    "it": r"\b(il|lo|la|i|gli|le|l'|un|uno|una)\b",
    "pt": r"\b(o|a|os|as|um|uma|uns|umas)\b",
    "nl": r"\b(de|het|een)\b",
    "ar": r"\bال",
}


def normalize_answer(text: str, lang: str) -> str:
    """Lower case, no punctuation (any Unicode P* character), no articles, single spaces."""
    text = text.lower()
    text = "".join(
        " " if unicodedata.category(c).startswith("P") or c in string.punctuation else c
        for c in text
    )
    if lang in _ARTICLES:
        text = re.sub(_ARTICLES[lang], " ", text)
    return " ".join(text.split())


def _tokens(text: str, lang: str) -> list[str]:
    norm = normalize_answer(text, lang)
    return [c for c in norm if not c.isspace()] if lang in _CHAR_TOKEN_LANGS else norm.split()


def token_f1(prediction: str, gold: str, lang: str) -> float:
    """SQuAD-style token F1 of one prediction against one gold answer."""
    pred, ref = _tokens(prediction, lang), _tokens(gold, lang)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval hook: best F1 and exact match of the generation over the gold answers."""
    pred, lang = results[0].strip(), doc["lang"]
    return {
        "f1": max(token_f1(pred, a, lang) for a in doc["answers"]),
        "exact_match": float(
            any(normalize_answer(pred, lang) == normalize_answer(a, lang) for a in doc["answers"])
        ),
    }


def mkqa_docs(records, lang: str) -> list[dict]:
    """Answerable short-answer questions of ``lang`` from MKQA records (dicts of the jsonl)."""
    code = MKQA_LANGS[lang]
    docs = []
    for r in records:
        answers = r["answers"][code]
        if not answers or answers[0]["type"] not in SHORT_ANSWER_TYPES:
            continue
        gold = [a["text"] for a in answers if a.get("text")]
        gold += [alias for a in answers for alias in a.get("aliases") or []]
        if gold:
            docs.append({"question": r["queries"][code], "answers": gold, "lang": code})
    return docs


def load_mkqa(lang: str, path: str | None = None, **_metadata):
    """lm-eval ``custom_dataset`` hook. ``path``: a local ``mkqa.jsonl[.gz]``; default
    ``$POLYPRUNE_MKQA`` or the file on GitHub (cached by ``datasets``)."""
    import datasets

    if lang not in MKQA_LANGS:
        raise ValueError(f"MKQA has no language {lang!r}")
    path = path or os.environ.get("POLYPRUNE_MKQA") or MKQA_URL
    raw = datasets.load_dataset("json", data_files=path, split="train")
    docs = mkqa_docs(raw, lang)
    logger.debug("polyprune_mkqa_%s: %d answerable short-answer questions", lang, len(docs))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
