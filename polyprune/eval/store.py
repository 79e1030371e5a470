"""The results store of an evaluation matrix: one SQLite file.

Three tables. ``cells`` has one row per *finished* cell (its id, full config as JSON, wall
time, tasks that were unavailable). ``results`` has one row per cell x task x language x
metric, with the cell's identifying settings in columns (for SQL and tables) and its full
config as JSON. ``units`` has the per-unit scores behind a result, for intervals and paired
tests: one row per held-out document (perplexity: summed NLL and predicted tokens) or lm-eval
example (its score, weight 1). A cell's rows of all three tables are written in one
transaction, so a cell killed midway leaves nothing behind and counts as not done; the primary
keys make a duplicate row impossible. Only the matrix driver writes. A store made before the
``units`` table existed gets it, empty, when opened: its cells simply have no units.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from polyprune.errors import InputError

__all__ = ["ResultRow", "ResultStore", "UnitScores"]

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    cell_id     TEXT PRIMARY KEY,
    label       TEXT NOT NULL,
    config      TEXT NOT NULL,
    seconds     REAL,
    unavailable TEXT NOT NULL DEFAULT '[]',
    finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    cell_id  TEXT NOT NULL REFERENCES cells(cell_id),
    model    TEXT NOT NULL,
    method   TEXT NOT NULL,
    level    TEXT NOT NULL,
    mix      TEXT NOT NULL,
    seed     INTEGER,
    task     TEXT NOT NULL,
    lang     TEXT NOT NULL,
    metric   TEXT NOT NULL,
    value    REAL NOT NULL,
    n        INTEGER,
    config   TEXT NOT NULL,
    PRIMARY KEY (cell_id, task, lang, metric)
);
CREATE TABLE IF NOT EXISTS units (
    cell_id  TEXT NOT NULL REFERENCES cells(cell_id),
    task     TEXT NOT NULL,
    lang     TEXT NOT NULL,
    metric   TEXT NOT NULL,
    unit     INTEGER NOT NULL,
    value    REAL NOT NULL,
    weight   REAL NOT NULL,
    PRIMARY KEY (cell_id, task, lang, metric, unit)
) WITHOUT ROWID;
"""
_CELL_COLUMNS = ("cell_id", "label", "config", "seconds", "unavailable", "finished_at")
RESULT_COLUMNS = ("cell_id", "model", "method", "level", "mix", "seed", "task", "lang",
                  "metric", "value", "n", "config")  # fmt: skip
UNIT_COLUMNS = ("cell_id", "task", "lang", "metric", "unit", "value", "weight")


@dataclass(frozen=True)
class ResultRow:
    """One measured number of a cell."""

    task: str
    lang: str
    metric: str
    value: float
    n: int | None = None


@dataclass(frozen=True)
class UnitScores:
    """Per-unit scores of one cell's task x language x metric: ``values[k]`` with weight
    ``weights[k]`` for unit ``ids[k]`` (a held-out document, or an lm-eval ``doc_id``)."""

    task: str
    lang: str
    metric: str
    ids: tuple[int, ...]
    values: tuple[float, ...]
    weights: tuple[float, ...]

    def rows(self, cell_id: str) -> list[tuple]:
        return [(cell_id, self.task, self.lang, self.metric, int(i), float(v), float(w))
                for i, v, w in zip(self.ids, self.values, self.weights, strict=True)]  # fmt: skip


class ResultStore:
    """The SQLite results store at ``path`` (created with its folder if missing)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=60)
        self.conn.row_factory = sqlite3.Row
        try:
            self._check()
            with self.conn:
                self.conn.executescript(_SCHEMA)
        except (sqlite3.DatabaseError, InputError) as e:
            self.conn.close()
            why = str(e) if isinstance(e, InputError) else f"not a readable SQLite database: {e}"
            raise InputError(
                f"results store {self.path} is {why}; move it aside (e.g. rename it to "
                f"{self.path.name}.bad) to start a new store"
            ) from e

    def _check(self) -> None:
        """A new file, or a whole, readable SQLite file with this store's tables (checked before
        anything is written to it): a damaged page would otherwise surface midway through a
        matrix, and another program's database would get this store's tables added."""
        status = self.conn.execute("PRAGMA quick_check").fetchone()[0]
        if status != "ok":
            raise sqlite3.DatabaseError(status)
        tables = {
            r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if tables and not {"cells", "results"} <= tables:
            raise InputError(f"a SQLite file of other tables ({', '.join(sorted(tables)[:3])})")
        pairs = (("cells", _CELL_COLUMNS), ("results", RESULT_COLUMNS), ("units", UNIT_COLUMNS))
        for table, want in pairs:
            have = tuple(r[1] for r in self.conn.execute(f"PRAGMA table_info({table})"))
            if have and have != want:
                raise InputError(f"a SQLite file whose {table} table is not this store's")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def done_cells(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT cell_id FROM cells")}

    def write_cell(
        self,
        cell_id: str,
        label: str,
        config: dict,
        keys: dict,
        rows: list[ResultRow],
        seconds: float | None = None,
        unavailable: list | None = None,
        units: list[UnitScores] | None = None,
    ) -> None:
        """All rows of a finished cell, and its per-unit scores, in one transaction.
        ``keys``: the identifying columns (model, method, level, mix, seed)."""
        config_json = json.dumps(config, sort_keys=True)
        values = [
            (cell_id, keys["model"], keys["method"], keys["level"], keys["mix"], keys["seed"],
             r.task, r.lang, r.metric, float(r.value), r.n, config_json)
            for r in rows
        ]  # fmt: skip
        with self.conn:  # BEGIN ... COMMIT, or ROLLBACK on any error
            self.conn.execute(
                "INSERT INTO cells VALUES (?, ?, ?, ?, ?, ?)",
                (cell_id, label, config_json, seconds, json.dumps(unavailable or []),
                 time.time()),
            )  # fmt: skip
            self.conn.executemany(
                f"INSERT INTO results VALUES ({', '.join('?' * len(RESULT_COLUMNS))})", values
            )
            self.conn.executemany(
                f"INSERT INTO units VALUES ({', '.join('?' * len(UNIT_COLUMNS))})",
                [row for u in units or [] for row in u.rows(cell_id)],
            )
        logger.debug("stored cell %s (%s): %d rows", label, cell_id, len(rows))

    def results(self, **where) -> list[dict]:
        """Result rows as dicts, optionally filtered by column equality."""
        for k in where:
            if k not in RESULT_COLUMNS:
                raise KeyError(f"unknown results column {k!r}")
        clause = " AND ".join(f"{k} = ?" for k in where)
        sql = "SELECT * FROM results" + (f" WHERE {clause}" if clause else "")
        sql += " ORDER BY model, method, level, mix, seed, task, lang, metric"
        return [dict(r) for r in self.conn.execute(sql, tuple(where.values()))]

    def units(self) -> list[dict]:
        """All per-unit scores as dicts (cell_id, task, lang, metric, unit, value, weight)."""
        sql = "SELECT * FROM units ORDER BY cell_id, task, lang, metric, unit"
        return [dict(r) for r in self.conn.execute(sql)]

    def cells(self) -> list[dict]:
        rows = self.conn.execute("SELECT * FROM cells ORDER BY finished_at")
        return [dict(r) | {"unavailable": json.loads(r["unavailable"])} for r in rows]
