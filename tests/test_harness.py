"""lm-eval adapter: the offline next-sentence task through the real lm-eval, the task map,
unavailable tasks, and MKQA's token F1."""

import gzip
import json

import numpy as np
import pytest
import torch

from polyprune.errors import InputError
from polyprune.eval.harness import HarnessConfig, run_tasks, task_name
from polyprune.eval.localtask import nextsent_items, sentences
from polyprune.eval.mkqa import mkqa_docs, token_f1
from polyprune.models import load_model

pytest.importorskip("lm_eval")
LIMIT = 8


@pytest.fixture(scope="module")
def demo():
    loaded = load_model("demo")
    return loaded.model, loaded.tokenizer


def reference_scores(model, tok, items, per_item=False):
    """acc and acc_norm from log-likelihoods computed here: the choice continuing the context
    is scored token by token, as lm-eval's loglikelihood requests do. ``per_item``: the 0/1
    lists instead of their means."""
    acc, acc_norm = [], []
    for it in items:
        ctx = tok(it.context, add_special_tokens=False)["input_ids"]
        lls = []
        for choice in it.choices:
            whole = tok(it.context + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx) :]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            lls.append(sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)))
        lens = [len(c.encode()) for c in it.choices]
        acc.append(int(np.argmax(lls)) == it.label)
        acc_norm.append(int(np.argmax(np.array(lls) / lens)) == it.label)
    if per_item:
        return [float(a) for a in acc], [float(a) for a in acc_norm]
    return float(np.mean(acc)), float(np.mean(acc_norm))


def test_nextsent_runs_through_lm_eval_and_matches_a_direct_computation(demo):
    model, tok = demo
    res = run_tasks(model, tok, ["nextsent"], ["de"], HarnessConfig(limit=LIMIT))
    scores = {s.metric: s for s in res.scores}
    assert set(scores) == {"acc", "acc_norm"} and not res.unavailable
    assert scores["acc"].n == LIMIT and scores["acc"].lm_eval_task == "polyprune_nextsent_de"
    acc, acc_norm = reference_scores(model, tok, nextsent_items("de")[:LIMIT])
    assert scores["acc"].value == pytest.approx(acc)
    assert scores["acc_norm"].value == pytest.approx(acc_norm)


def test_per_example_correctness_is_kept_and_averages_to_the_task_score(demo):
    model, tok = demo
    res = run_tasks(model, tok, ["nextsent"], ["en"], HarnessConfig(limit=LIMIT))
    acc, acc_norm = reference_scores(model, tok, nextsent_items("en")[:LIMIT], per_item=True)
    per_doc = res.per_sample[("nextsent", "en", "acc")]
    assert sorted(per_doc) == list(range(LIMIT))
    assert [per_doc[i] for i in range(LIMIT)] == acc
    norm = res.per_sample[("nextsent", "en", "acc_norm")]
    assert [norm[i] for i in range(LIMIT)] == acc_norm
    scores = {s.metric: s.value for s in res.scores}
    assert np.mean(list(per_doc.values())) == pytest.approx(scores["acc"])


def test_a_task_without_data_is_unavailable_and_the_rest_still_runs(demo, caplog):
    model, tok = demo
    res = run_tasks(model, tok, ["belebele", "nextsent"], ["sw"], HarnessConfig(limit=4))
    assert [(u.task, u.lang) for u in res.unavailable] == [("belebele", "sw")]
    assert "belebele_swh_Latn" in res.unavailable[0].reason
    assert {s.task for s in res.scores} == {"nextsent"}
    lines = [r.message for r in caplog.records if "unavailable" in r.message]
    assert len(lines) == 1 and "\n" not in lines[0]


def test_task_names_follow_lm_eval_per_language():
    assert task_name("belebele", "de") == "belebele_deu_Latn"
    assert task_name("belebele", "zh") == "belebele_zho_Hans"
    assert task_name("belebele", "sw") == "belebele_swh_Latn"
    assert task_name("arc", "en") == "arc_challenge" and task_name("arc", "ru") == "arc_ru"
    assert task_name("hellaswag", "es") == "hellaswag_es"
    assert task_name("mmlu", "ar") == "m_mmlu_ar"
    assert task_name("xcopa", "sw") == "xcopa_sw" and task_name("xnli", "de") == "xnli_de"
    assert task_name("xstorycloze", "zh") == "xstorycloze_zh"
    with pytest.raises(InputError, match="unknown task"):
        task_name("squad", "en")


def test_the_paper_tasks_exist_in_lm_eval_for_the_paper_languages():
    from lm_eval.tasks import TaskManager

    from polyprune.eval.harness import TASKS_DIR

    known = set(TaskManager(include_path=str(TASKS_DIR)).all_tasks)
    expected = {"belebele": "ar de en es ru sw zh", "arc": "ar de en es ru zh",
                "hellaswag": "ar de en es ru", "mmlu": "ar de en es ru zh",
                "xnli": "ar de en es ru sw zh", "xcopa": "sw zh",
                "xstorycloze": "ar en es ru sw zh",
                "mkqa": "ar de en es ru zh", "nextsent": "ar de en es ru sw zh"}  # fmt: skip
    for family, langs in expected.items():
        for lang in langs.split():
            assert task_name(family, lang) in known, (family, lang)


def test_nextsent_items_hold_the_true_next_sentence_among_distractors_of_other_paragraphs():
    from polyprune.data.sources import BundledSource

    docs = [sentences(d) for d in BundledSource().documents("es", "heldout")]
    items = nextsent_items("es")
    assert items == nextsent_items("es")  # deterministic
    assert len(items) == sum(max(len(s) - 1, 0) for s in docs)
    labels = [it.label for it in items]
    assert set(labels) == {0, 1, 2, 3}
    first = items[0]
    assert first.context == docs[0][0]
    long = next(it for it in items if it.context.count(". ") >= 2)
    assert long.context.count(". ") == 2  # at most three sentences of context
    assert first.choices[first.label] == " " + docs[0][1]
    others = {s for d in docs[1:] for s in d}
    for j, c in enumerate(first.choices):
        if j != first.label:
            assert c[1:] in others
    zh = nextsent_items("zh")[0]
    assert not zh.choices[0].startswith(" ")  # no spaces between Chinese sentences


@pytest.mark.parametrize(
    "pred, gold, lang, f1",
    [
        ("Paris", "paris", "en", 1.0),
        ("the city of Paris", "Paris", "en", 2 * (1 / 3) * 1 / (1 / 3 + 1)),
        ("Berlin", "Paris", "en", 0.0),
        ("Der Rhein.", "Rhein", "de", 1.0),
        ("北京市", "北京", "zh_cn", 2 * (2 / 3) * 1 / (2 / 3 + 1)),
        ("", "Paris", "en", 0.0),
    ],
)
def test_mkqa_token_f1(pred, gold, lang, f1):
    assert token_f1(pred, gold, lang) == pytest.approx(f1)


MKQA_RECORDS = [
    {"example_id": 1, "query": "capital of france",
     "queries": {"en": "What is the capital of France?",
                 "de": "Was ist die Hauptstadt Frankreichs?"},
     "answers": {"en": [{"type": "entity", "text": "Paris", "aliases": ["City of Paris"]}],
                 "de": [{"type": "entity", "text": "Paris", "aliases": []}]}},
    {"example_id": 2, "query": "why is the sky blue",
     "queries": {"en": "Why is the sky blue?", "de": "Warum ist der Himmel blau?"},
     "answers": {"en": [{"type": "long_answer", "text": None, "aliases": []}],
                 "de": [{"type": "long_answer", "text": None, "aliases": []}]}},
    {"example_id": 3, "query": "who is x",
     "queries": {"en": "Who is the king of the moon?", "de": "Wer ist der König des Mondes?"},
     "answers": {"en": [{"type": "unanswerable", "text": None, "aliases": []}],
                 "de": [{"type": "unanswerable", "text": None, "aliases": []}]}},
    {"example_id": 4, "query": "year",
     "queries": {"en": "In which year did the Berlin wall fall?", "de": "Wann fiel die Mauer?"},
     "answers": {"en": [{"type": "date", "text": "1989", "aliases": []}],
                 "de": [{"type": "date", "text": "1989", "aliases": []}]}},
]  # fmt: skip


def test_mkqa_keeps_answerable_short_answers_only():
    docs = mkqa_docs(MKQA_RECORDS, "de")
    assert [d["question"] for d in docs] == [
        "Was ist die Hauptstadt Frankreichs?",
        "Wann fiel die Mauer?",
    ]
    assert mkqa_docs(MKQA_RECORDS, "en")[0]["answers"] == ["Paris", "City of Paris"]


def test_mkqa_generates_through_lm_eval_from_a_local_copy(demo, tmp_path, monkeypatch):
    path = tmp_path / "mkqa.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in MKQA_RECORDS)
    monkeypatch.setenv("POLYPRUNE_MKQA", str(path))
    model, tok = demo
    res = run_tasks(model, tok, ["mkqa"], ["en"], HarnessConfig(limit=2))
    scores = {s.metric: s for s in res.scores}
    assert set(scores) == {"f1", "exact_match"} and scores["f1"].n == 2
    assert 0.0 <= scores["f1"].value <= 1.0
    assert scores["exact_match"].value <= scores["f1"].value


@pytest.mark.parametrize(
    "text, want",
    [
        ("Er sagte: „Nein.“ Dann ging er. Es kostet 3.5 Euro! Wirklich?",
         ["Er sagte: „Nein.“", "Dann ging er.", "Es kostet 3.5 Euro!", "Wirklich?"]),
        ("她说：“为什么？”我不知道。好。", ["她说：“为什么？”", "我不知道。", "好。"]),
        ("هل أنت هنا؟ نعم.", ["هل أنت هنا؟", "نعم."]),
        ("No end", ["No end"]),
    ],
)  # fmt: skip
def test_sentences_keep_closing_quotes_and_numbers(text, want):
    assert sentences(text) == want
