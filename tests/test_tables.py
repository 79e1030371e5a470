"""Tables from a hand-filled store: Markdown in the paper's layout, CSV, and a real PNG."""

import math

import pytest
from PIL import Image

from polyprune.eval.store import ResultRow, ResultStore
from polyprune.eval.tables import build_tables, column_scores, to_csv, to_markdown, write_tables


def fill(store: ResultStore) -> None:
    """Dense baseline, and Wanda calibrated on de, en and de,en with two seeds (one for de,en)."""

    def cell(cid, method, level, mix, seed, values):
        rows = [ResultRow("ppl", lang, "ppl", v) for lang, v in values.items()]
        rows += [ResultRow("ppl", lang, "tokens_seen", 1.0) for lang in values]  # not shown
        keys = {"model": "demo", "method": method, "level": level, "mix": mix, "seed": seed}
        store.write_cell(cid, cid, keys, keys, rows)

    cell("d", "dense", "dense", "-", None, {"de": 10.0, "en": 20.0})
    cell("a0", "wanda", "0.5", "de", 0, {"de": 11.0, "en": 30.0})
    cell("a1", "wanda", "0.5", "de", 1, {"de": 13.0, "en": 32.0})
    cell("b0", "wanda", "0.5", "en", 0, {"de": 15.0, "en": 24.0})
    cell("b1", "wanda", "0.5", "en", 1, {"de": 15.0, "en": 22.0})
    cell("c0", "wanda", "0.5", "de,en", 0, {"de": 12.5})
    store.conn.execute("INSERT INTO cells VALUES ('x', 'x', '{}', 0, '[]', 0)")  # no rows


EXPECTED_MD = """\
### demo · wanda 0.5 · ppl (ppl, lower is better)

| calibration | de | en |
|---|---:|---:|
| dense | 10.00 | 20.00 |
| de | **12.00 ± 1.41** | 31.00 ± 1.41 |
| en | 15.00 ± 0.00 | **23.00 ± 1.41** |
| de,en | 12.50 | – |
"""


@pytest.fixture
def rows(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        fill(store)
        return store.results()


def test_markdown_has_dense_on_top_mean_and_std_over_seeds_and_the_best_per_column(rows):
    (table,) = build_tables(rows)
    assert to_markdown(table) == EXPECTED_MD


def test_accuracy_tables_mark_the_highest(rows):
    ppl = [r for r in rows if r["metric"] == "ppl"]
    acc = [r | {"task": "nextsent", "metric": "acc", "value": 1 / r["value"]} for r in ppl]
    md = to_markdown(build_tables(acc)[0])
    assert "(acc, higher is better)" in md
    # German: de 1/11 and 1/13 (mean 0.084) beats de,en 1/12.5 = 0.080; English: en wins.
    assert "| de | **0.084 ± 0.010** | 0.032 ± 0.001 |" in md
    assert "| en | 0.067 ± 0.000 | **0.044 ± 0.003** |" in md


def test_csv_holds_mean_std_and_seed_count(rows):
    lines = to_csv(build_tables(rows)[0]).splitlines()
    fields = ["", "_std", "_n", "_ci_lo", "_ci_hi", "_mark", "_p_best", "_p_dense"]
    assert lines[0] == "calibration," + ",".join(f"{x}{f}" for x in ("de", "en") for f in fields)
    # no per-unit scores in this store: no interval, no p-values; the best is still marked
    assert lines[2] == f"de,12.0,{math.sqrt(2)!r},2,,,best,,,31.0,{math.sqrt(2)!r},2,,,,,"
    assert lines[4] == '"de,en",12.5,0.0,1,,,,,,,,0,,,,,'


def test_colours_are_normalised_per_column_over_the_calibration_rows(rows):
    scores = column_scores(build_tables(rows)[0])
    assert math.isnan(scores[0, 0])  # the dense row is grey
    # German: 12 (de), 15 (en), 12.5 (de,en): lower is better -> 1, 0, 5/6
    assert scores[1:, 0].tolist() == pytest.approx([1.0, 0.0, 5 / 6])
    assert scores[1:3, 1].tolist() == pytest.approx([0.0, 1.0])


def test_write_tables_gives_csv_markdown_and_a_real_png(rows, tmp_path):
    written = write_tables(rows, tmp_path / "tables")
    names = sorted(p.name for p in written)
    stem = "demo__wanda-0.5__ppl-ppl"
    want = [f"{stem}.csv", f"{stem}.md", f"{stem}.png", "tables.md", "summary.md"]
    assert names == sorted(want)
    png = tmp_path / "tables" / f"{stem}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.width > 100 and im.height > 100
    assert not [p for p in (tmp_path / "tables").iterdir() if p.name.startswith(".")]


def test_pruning_errors_are_printed_in_scientific_notation(rows):
    """Real models' pruning errors are ~1e-4: four fixed decimals printed 0.0001 for all."""
    ppl = [r for r in rows if r["metric"] == "ppl"]
    err = [r | {"task": "error", "metric": "pruning_error", "value": r["value"] * 1e-5}
           for r in ppl]  # fmt: skip
    md = to_markdown(build_tables(err)[0])
    assert "| de | **1.20e-04 ± 1.41e-05** | 3.10e-04 ± 1.41e-05 |" in md
