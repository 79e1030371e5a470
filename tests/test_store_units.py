"""The store's per-unit scores: written with their cell, and an older store still opens."""

import sqlite3

import pytest

from polyprune.eval.store import ResultRow, ResultStore, UnitScores
from polyprune.eval.tables import write_tables

KEYS = {"model": "demo", "method": "wanda", "level": "0.5", "mix": "de", "seed": 0}
OLD_SCHEMA = """
CREATE TABLE cells (cell_id TEXT PRIMARY KEY, label TEXT NOT NULL, config TEXT NOT NULL,
    seconds REAL, unavailable TEXT NOT NULL DEFAULT '[]', finished_at REAL NOT NULL);
CREATE TABLE results (cell_id TEXT NOT NULL REFERENCES cells(cell_id), model TEXT NOT NULL,
    method TEXT NOT NULL, level TEXT NOT NULL, mix TEXT NOT NULL, seed INTEGER,
    task TEXT NOT NULL, lang TEXT NOT NULL, metric TEXT NOT NULL, value REAL NOT NULL,
    n INTEGER, config TEXT NOT NULL, PRIMARY KEY (cell_id, task, lang, metric));
INSERT INTO cells VALUES ('old', 'old', '{}', 1.0, '[]', 0);
INSERT INTO results VALUES ('old', 'demo', 'wanda', '0.5', 'de', 0, 'ppl', 'de', 'ppl', 12.0,
    100, '{}');
"""


def test_units_are_stored_with_their_cell(tmp_path):
    units = [UnitScores("ppl", "de", "ppl", (0, 1), (20.0, 31.5), (10.0, 12.0)),
             UnitScores("nextsent", "de", "acc", (3, 7), (1.0, 0.0), (1.0, 1.0))]  # fmt: skip
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.write_cell("c", "c", {}, KEYS, [ResultRow("ppl", "de", "ppl", 9.0)], units=units)
        got = store.units()
    assert [(u["task"], u["unit"], u["value"], u["weight"]) for u in got] == [
        ("nextsent", 3, 1.0, 1.0), ("nextsent", 7, 0.0, 1.0),
        ("ppl", 0, 20.0, 10.0), ("ppl", 1, 31.5, 12.0),
    ]  # fmt: skip


def test_a_cell_whose_units_fail_to_insert_leaves_nothing(tmp_path):
    twice = [UnitScores("ppl", "de", "ppl", (0, 0), (1.0, 2.0), (1.0, 1.0))]  # duplicate unit
    with ResultStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(sqlite3.IntegrityError):
            store.write_cell("c", "c", {}, KEYS, [ResultRow("ppl", "de", "ppl", 9.0)], units=twice)
        assert store.done_cells() == set() and store.results() == [] and store.units() == []


def test_a_store_from_before_units_opens_and_its_cells_have_none(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
    with ResultStore(path) as store:
        assert store.done_cells() == {"old"} and store.units() == []
        row, unit = (
            ResultRow("ppl", "de", "ppl", 9.0),
            UnitScores("ppl", "de", "ppl", (0,), (2.0,), (1.0,)),
        )
        store.write_cell("new", "new", {}, KEYS | {"mix": "en"}, [row], units=[unit])
        rows, units = store.results(), store.units()
    assert {u["cell_id"] for u in units} == {"new"}
    write_tables(rows, tmp_path / "tables", png=False, units=units, n_boot=50)
    lines = (tmp_path / "tables" / "tables.md").read_text().splitlines()
    assert "| de | 12.00 |" in lines  # the old cell: no units, no interval
    assert any(line.startswith("| en | **9.00 [") for line in lines)
