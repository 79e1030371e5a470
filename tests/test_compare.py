"""Significance marks and summary sentences of a table, from hand-made per-document scores."""

import math

import numpy as np
import pytest

from polyprune.eval.compare import column_rng, entry_samples, table_marks
from polyprune.eval.significance import compare_with_best
from polyprune.eval.summary import dense_sentence, target_sentence, worst_sentence
from polyprune.eval.tables import build_tables, to_csv, to_markdown, write_tables

DOCS = 30
SHIFTS = {  # extra NLL per token over the dense model, per (mix, language)
    ("de", "de"): 0.10, ("de,en", "de"): 0.10, ("en", "de"): 0.40,
    ("de", "en"): 0.30, ("de,en", "en"): 0.10, ("en", "en"): 0.10,
}  # fmt: skip


def planted(seeds=(0, 1)):
    """(result rows, unit rows): dense, and Wanda on de, en, de+en with two seeds each; in de
    the de and de,en mixes are equally good and en is far worse; in en, en and de,en tie."""
    rng = np.random.default_rng(0)
    tokens = {lang: rng.integers(40, 120, DOCS).astype(float) for lang in ("de", "en")}
    base = {lang: (2.0 + rng.normal(0, 0.5, DOCS)) * tokens[lang] for lang in tokens}
    rows, units = [], []

    def cell(cid, method, mix, seed, shifts):
        for lang in ("de", "en"):
            t = tokens[lang]
            nll = base[lang] + shifts.get(lang, 0.0) * t + rng.normal(0, 0.05, DOCS) * np.sqrt(t)
            rows.append({"cell_id": cid, "model": "demo", "method": method,
                         "level": "dense" if method == "dense" else "0.5", "mix": mix,
                         "seed": seed, "task": "ppl", "lang": lang, "metric": "ppl",
                         "value": math.exp(nll.sum() / t.sum()), "n": int(t.sum())})  # fmt: skip
            units.extend({"cell_id": cid, "task": "ppl", "lang": lang, "metric": "ppl",
                          "unit": k, "value": float(nll[k]), "weight": float(t[k])}
                         for k in range(DOCS))  # fmt: skip

    cell("d", "dense", "-", None, {})
    for mix in ("de", "en", "de,en"):
        for seed in seeds:
            cell(
                f"{mix}{seed}",
                "wanda",
                mix,
                seed,
                {lang: SHIFTS[(mix, lang)] for lang in ["de", "en"]},
            )
    return rows, units


@pytest.fixture(scope="module")
def marked():
    rows, units = planted()
    (table,) = build_tables(rows)
    samples = entry_samples(table, rows, units)
    return table, samples, table_marks(table, samples, n_boot=500)


def test_every_entry_gets_a_sample_with_its_seeds(marked):
    table, samples, _ = marked
    assert len(samples) == 8  # dense + 3 mixes, 2 languages
    assert samples[(1, 0)].seeds == 2 and samples[(0, 0)].seeds == 1
    # the sample's value is the table's: the mean over seeds of exp(mean NLL)
    assert samples[(1, 0)].estimate() == pytest.approx(table.mean[1, 0])


def test_intervals_contain_the_value(marked):
    table, _, m = marked
    assert np.all(m.ci_lo < table.mean) and np.all(table.mean < m.ci_hi)


def test_ties_are_the_planted_ones(marked):
    table, _, m = marked
    de, en, both = (table.mixes.index(x) for x in ("de", "en", "de,en"))
    assert m.tested.all()
    assert m.tied[[de, both], 0].all() and not m.tied[en, 0]
    assert m.tied[[en, both], 1].all() and not m.tied[de, 1]
    assert not m.tied[0].any()  # the dense model is never a candidate


def test_marks_are_exactly_what_the_test_of_each_column_says(marked):
    table, samples, m = marked
    for j in range(len(table.langs)):
        cand = {table.mixes[i]: s for (i, jj), s in samples.items() if jj == j and i > 0}
        res = compare_with_best(cand, False, column_rng(table, j, "best"), n_boot=500,
                                best=table.mixes[table.best()[j]])  # fmt: skip
        assert {table.mixes[i] for i in np.flatnonzero(m.tied[:, j])} == res.tied


def test_every_pruned_entry_differs_from_dense(marked):
    _, _, m = marked
    assert m.differs_from_dense[1:].all()
    assert np.isnan(m.p_dense[0]).all()


def test_entries_without_units_are_not_tested():
    rows, units = planted()
    units = [u for u in units if u["cell_id"] != "de,en1"]  # one seed of de,en lost its units
    (table,) = build_tables(rows)
    samples = entry_samples(table, rows, units)
    m = table_marks(table, samples, n_boot=200)
    both = table.mixes.index("de,en")
    assert (both, 0) not in samples
    assert np.isnan(m.ci_lo[both]).all() and not m.tied[both].any()


def test_summary_sentences_follow_the_marks(marked):
    table, _, m = marked
    assert target_sentence(table, m).startswith(
        "Calibrating on the target language is best or tied with the best in 2 of 2 "
    )
    assert "significantly worse than the best: none" in target_sentence(table, m)
    worst = worst_sentence(table, m)
    assert worst == (
        "The worst calibration is de (last in 1 of 2 evaluation languages, significantly worse "
        "than the best in 1 of them, last or second to last in 1) and en (last in 1 of 2 "
        "evaluation languages, significantly worse than the best in 1 of them, last or second "
        "to last in 1); by mean rank over the languages (1 = best, 3 = last) the worst is de, "
        "de,en and en (2.0)."
    )
    assert dense_sentence(table, m).startswith(
        "6 of 6 entries (calibration x language) differ significantly from the dense model "
        "(6 worse, 0 better"
    )


def test_accuracy_entries_with_one_seed_are_compared_by_mcnemar():
    rng = np.random.default_rng(1)
    easy = rng.random(300)
    rows, units = [], []
    for cid, method, mix, p in (("d", "dense", "-", 0.8), ("a", "wanda", "de", 0.7),
                                ("b", "wanda", "en", 0.4)):  # fmt: skip
        right = (easy < p).astype(float)
        rows.append({"cell_id": cid, "model": "demo", "method": method, "level": "0.5",
                     "mix": mix, "seed": 0, "task": "nextsent", "lang": "de", "metric": "acc",
                     "value": right.mean(), "n": 300})  # fmt: skip
        units += [{"cell_id": cid, "task": "nextsent", "lang": "de", "metric": "acc",
                   "unit": k, "value": right[k], "weight": 1.0} for k in range(300)]  # fmt: skip
    (table,) = build_tables(rows)
    m = table_marks(table, entry_samples(table, rows, units), n_boot=200)
    assert "McNemar exact with Holm over the table (against dense)" in m.methods
    assert m.tied[:, 0].tolist() == [False, True, False]  # dense, de (best), en
    assert m.differs_from_dense[1:, 0].all()


def _cells(markdown: str) -> dict[str, list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    return {r.split(" | ")[0][2:]: r.strip("| ").split(" | ")[1:] for r in rows[1:]}


def test_markdown_marks_exactly_the_mixes_the_test_says():
    rows, units = planted()
    (table,) = build_tables(rows, units, n_boot=500)
    cells = _cells(to_markdown(table))
    for j in range(len(table.langs)):
        cand = {table.mixes[i]: s for (i, jj), s in entry_samples(table, rows, units).items()
                if jj == j and i > 0}  # fmt: skip
        best = table.mixes[table.best()[j]]
        res = compare_with_best(cand, False, column_rng(table, j, "best"), n_boot=500, best=best)
        assert cells[best][j].startswith("**")
        italic = {m for m in table.mixes if cells[m][j].startswith("*") and m != best}
        assert italic == res.tied - {best}
    assert cells["de,en"][0].startswith("*") and not cells["de,en"][0].startswith("**")
    assert not cells["en"][0].startswith("*")
    assert "95% bootstrap interval" in to_markdown(table)


def test_cells_show_the_interval_and_csv_the_marks_and_p_values():
    rows, units = planted()
    (table,) = build_tables(rows, units, n_boot=300)
    lo, hi = table.marks.ci_lo[1, 0], table.marks.ci_hi[1, 0]
    assert f"[{lo:.2f}, {hi:.2f}]" in _cells(to_markdown(table))["de"][0]
    lines = to_csv(table).splitlines()
    header = lines[0].split(",")
    en_row = next(line for line in lines if line.startswith("en,")).split(",")
    assert en_row[header.index("de_mark")] == ""  # significantly worse than the best in de
    assert float(en_row[header.index("de_p_best")]) <= 0.05
    assert float(en_row[header.index("de_p_dense")]) <= 0.05


def test_write_tables_writes_the_summary(tmp_path):
    rows, units = planted()
    write_tables(rows, tmp_path, png=False, units=units, n_boot=200)
    text = (tmp_path / "summary.md").read_text()
    assert "## demo · wanda 0.5 · ppl (ppl, lower is better)" in text
    assert "best or tied with the best in 2 of 2 evaluation languages" in text
    assert "6 of 6 entries (calibration x language) differ significantly" in text


def test_equal_values_are_all_last_and_share_their_rank():
    rows = [{"cell_id": c, "model": "demo", "method": "wanda", "level": "0.5", "mix": mix,
             "seed": 0, "task": "nextsent", "lang": lang, "metric": "acc", "value": 0.5, "n": 12}
            for c, mix in (("a", "de"), ("b", "en")) for lang in ("de", "en")]  # fmt: skip
    (table,) = build_tables(rows, [])
    assert worst_sentence(table, table.marks) == (
        "The worst calibration is de (last in 2 of 2 evaluation languages, significantly worse "
        "than the best in 0 of them) and en (last in 2 of 2 evaluation languages, significantly "
        "worse than the best in 0 of them); by mean rank over the languages (1 = best, 2 = last) "
        "the worst is de and en (1.5)."
    )
