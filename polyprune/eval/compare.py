"""Significance marks of one matrix table, from the per-unit scores in the results store.

For each entry (calibration mix x evaluation language) the seeds' per-unit scores form a
:class:`~polyprune.eval.significance.Sample`; from these come

* a 95% percentile-bootstrap interval of the entry's value (units, and seeds when several);
* per column, the best calibration mix (the table's own mark) and every mix not significantly
  worse than it (max-T paired bootstrap over all pairs of the column's mixes);
* per entry, a paired test against the dense model, Holm-corrected over all entries of the
  table (one family per table).

An entry without per-unit scores (a cell stored before they were kept, a task without
per-sample results) gets no interval and is never tested: it is not marked as tied, and a
column whose best entry has none gets only the best mark. Entries whose units differ (another
``max_tokens`` or ``limit``) cannot be paired and are left out of the tests in the same way.

Random streams are seeded from the table's name and the column, so regenerating the tables
from the same store gives the same intervals and marks.
"""

from __future__ import annotations

import logging
import zlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from polyprune.eval.significance import (
    ALPHA,
    N_BOOT,
    Sample,
    bootstrap_ci,
    compare_with_best,
    holm,
    paired_test,
)

__all__ = ["DENSE", "Marks", "column_rng", "entry_samples", "table_marks", "unit_index"]

logger = logging.getLogger(__name__)

DENSE = "dense"
LOG_TRANSFORM_METRICS = frozenset({"ppl"})  # per-unit summed NLL -> exp(mean) is the value


@dataclass
class Marks:
    """Intervals and test results of a table, arrays of the table's shape (rows, cols)."""

    ci_lo: np.ndarray
    ci_hi: np.ndarray
    tied: np.ndarray  # bool: not significantly worse than the column's best (best included)
    tested: np.ndarray  # bool (cols,): the column's comparisons with the best were run
    p_best: np.ndarray  # max-T adjusted p-value against the column's best; nan if untested
    p_dense: np.ndarray  # Holm-adjusted p-value against the dense model; nan if untested
    methods: set[str] = field(default_factory=set)  # tests used, e.g. {"paired bootstrap"}
    alpha: float = ALPHA

    @property
    def differs_from_dense(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return self.p_dense <= self.alpha

    @property
    def any(self) -> bool:
        return bool(np.isfinite(self.ci_lo).any() or self.tested.any())


UnitKey = tuple[str, str, str, str]  # cell_id, task, lang, metric


def unit_index(units: list[dict]) -> dict[UnitKey, dict[int, tuple[float, float]]]:
    """Store unit rows (cell_id, task, lang, metric, unit, value, weight) by cell and metric."""
    out: dict[UnitKey, dict[int, tuple[float, float]]] = defaultdict(dict)
    for u in units:
        key = (u["cell_id"], u["task"], u["lang"], u["metric"])
        out[key][int(u["unit"])] = (float(u["value"]), float(u["weight"]))
    return out


def _sample(per_seed: list[dict[int, tuple[float, float]]], metric: str) -> Sample | None:
    """One entry's Sample, or None where a seed lacks units or the seeds' units differ."""
    if not per_seed or any(not s for s in per_seed):
        return None
    ids = sorted(per_seed[0])
    if any(sorted(s) != ids for s in per_seed):
        return None
    weights = [per_seed[0][i][1] for i in ids]
    if any([s[i][1] for i in ids] != weights for s in per_seed):
        return None
    values = [[s[i][0] for i in ids] for s in per_seed]
    return Sample(values, weights, "exp" if metric in LOG_TRANSFORM_METRICS else "identity")


def entry_samples(table, rows: list[dict], units: list[dict]) -> dict[tuple[int, int], Sample]:
    """(row, col) -> Sample of ``table``'s entries that have per-unit scores in ``units``.

    ``rows``: the store's result rows (they name each entry's cells); ``table``: a
    :class:`polyprune.eval.tables.Table`."""
    index = unit_index(units)
    cells: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in rows:
        if (r["model"], r["task"], r["metric"]) != (table.model, table.task, table.metric):
            continue
        if r["method"] == DENSE:
            mix = DENSE
        elif (r["method"], r["level"]) == (table.method, table.level):
            mix = r["mix"]
        else:
            continue
        cells[(mix, r["lang"])].append(r["cell_id"])
    out = {}
    for (mix, lang), ids in cells.items():
        if mix not in table.mixes or lang not in table.langs:
            continue
        per_seed = [index.get((cid, table.task, lang, table.metric), {}) for cid in sorted(ids)]
        s = _sample(per_seed, table.metric)
        if s is not None:
            out[(table.mixes.index(mix), table.langs.index(lang))] = s
    return out


def column_rng(table, col: int, what: str) -> np.random.Generator:
    key = f"{table.stem}|{table.langs[col]}|{what}".encode()
    return np.random.default_rng([zlib.crc32(key), col])


def _pairable(samples: dict) -> dict:
    """The samples of one column scored on the same units as most of them."""
    groups: dict[bytes, list] = defaultdict(list)
    for k, s in samples.items():
        groups[s.weights.tobytes()].append(k)
    if not groups:
        return {}
    keep = max(groups.values(), key=len)
    return {k: samples[k] for k in keep}


def table_marks(
    table, samples: dict[tuple[int, int], Sample], alpha: float = ALPHA, n_boot: int = N_BOOT
) -> Marks:
    """Intervals, ties with the best and differences from dense of one table."""
    R, C = table.mean.shape
    nan = np.full((R, C), np.nan)
    m = Marks(nan.copy(), nan.copy(), np.zeros((R, C), bool), np.zeros(C, bool), nan.copy(),
              nan.copy(), alpha=alpha)  # fmt: skip
    for (i, j), s in sorted(samples.items()):
        m.ci_lo[i, j], m.ci_hi[i, j] = bootstrap_ci(s, column_rng(table, j, f"ci{i}"), 0.95, n_boot)
    best = table.best()
    first = 1 if table.mixes and table.mixes[0] == DENSE else 0
    dense_p, dense_at = [], []
    for j in range(C):
        col = _pairable({i: s for (i, jj), s in samples.items() if jj == j})
        if best[j] >= 0:
            m.tied[best[j], j] = True
        cand = {table.mixes[i]: s for i, s in col.items() if i >= first}
        if best[j] >= 0 and table.mixes[best[j]] in cand and len(cand) > 1:
            res = compare_with_best(cand, table.higher_is_better, column_rng(table, j, "best"),
                                    alpha, n_boot, best=table.mixes[best[j]])  # fmt: skip
            m.tested[j] = True
            for name, p in res.p_adjusted.items():
                i = table.mixes.index(name)
                m.p_best[i, j], m.tied[i, j] = p, name in res.tied
            m.methods.add(f"{res.method} over all pairs of mixes (ties with the best)")
        if first and 0 in col:
            rng = column_rng(table, j, "dense")
            for i, s in sorted(col.items()):
                if i >= first:
                    t = paired_test(s, col[0], rng, n_boot)
                    dense_p.append(t.p_value)
                    dense_at.append((i, j))
                    m.methods.add(f"{t.method} with Holm over the table (against dense)")
    for (i, j), p in zip(dense_at, holm(dense_p), strict=True):
        m.p_dense[i, j] = p
    return m
