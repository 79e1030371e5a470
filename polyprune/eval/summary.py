"""``summary.md``: the seed paper's questions answered in sentences generated from the numbers.

Per table (model x method x level x task): in how many evaluation languages calibrating on
the target language is best or tied with the best; which calibration is worst (most often
last, and by mean rank); how many entries differ significantly from the dense model. "Tied"
is the test of :mod:`polyprune.eval.compare`: not significantly worse than the column's best.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy.stats import rankdata

from polyprune.eval.compare import DENSE, Marks

__all__ = ["summary_markdown", "table_summary"]


def _calibration_rows(t) -> list[int]:
    return [i for i, mix in enumerate(t.mixes) if mix != DENSE]


def _langs(names) -> str:
    return ", ".join(names) if names else "none"


def _and(names: list[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def target_sentence(t, m: Marks) -> str:
    """How often the target-language calibration is best or tied with the best."""
    best = t.best()
    cols = [j for j, lang in enumerate(t.langs) if lang in t.mixes and best[j] >= 0]
    if not cols:
        return "No evaluation language has its own (monolingual) calibration mix in this table."
    outright = [t.langs[j] for j in cols if t.mixes[best[j]] == t.langs[j]]
    tied = [t.langs[j] for j in cols
            if t.langs[j] not in outright and m.tied[t.mixes.index(t.langs[j]), j]]  # fmt: skip
    worse = [t.langs[j] for j in cols if m.tested[j] and t.langs[j] not in outright + tied]
    untested = [t.langs[j] for j in cols
                if not m.tested[j] and t.langs[j] not in outright]  # fmt: skip
    text = (f"Calibrating on the target language is best or tied with the best in "
            f"{len(outright) + len(tied)} of {len(cols)} evaluation languages that have their "
            f"own calibration mix (best: {_langs(outright)}; tied: {_langs(tied)}; "
            f"significantly worse than the best: {_langs(worse)}")  # fmt: skip
    if untested:
        text += f"; not tested, no per-unit scores: {_langs(untested)}"
    return text + ")."


def _badness(t, rows: list[int], j: int) -> np.ndarray:
    """Column ``j`` of ``rows`` oriented so that larger is worse."""
    col = t.mean[rows, j]
    return -col if t.higher_is_better else col


def _ranks(t) -> dict[str, list[float]]:
    """Rank (1 = best; ties share their mean rank) of each calibration mix in each column
    where it has a value."""
    rows = _calibration_rows(t)
    out: dict[str, list[float]] = {t.mixes[i]: [] for i in rows}
    for j in range(len(t.langs)):
        have = [i for i in rows if not np.isnan(t.mean[i, j])]
        if have:
            for i, r in zip(have, rankdata(_badness(t, have, j), "average"), strict=True):
                out[t.mixes[i]].append(float(r))
    return out


def worst_sentence(t, m: Marks) -> str:
    """Which calibration is worst: most often last (ties are all last), and last or second
    to last."""
    rows = _calibration_rows(t)
    if len(rows) < 2:
        return "Only one calibration mix: no worst one."
    last, last2, sig = Counter(), Counter(), Counter()
    n_cols = 0
    for j in range(len(t.langs)):
        have = [i for i in rows if not np.isnan(t.mean[i, j])]
        if len(have) < 2:
            continue
        n_cols += 1
        from_worst = rankdata(-_badness(t, have, j), "min")  # 1 = worst, ties share it
        for i, r in zip(have, from_worst, strict=True):
            last[t.mixes[i]] += r == 1
            last2[t.mixes[i]] += r <= 2
            sig[t.mixes[i]] += bool(r == 1 and m.tested[j] and not m.tied[i, j])
    if not n_cols:
        return "No evaluation language has two calibration mixes to compare."
    top = max(last.values())
    worst = sorted(k for k, v in last.items() if v == top)
    ranks = {k: float(np.mean(v)) for k, v in _ranks(t).items() if v}
    low = max(ranks.values())
    by_rank = sorted(k for k, v in ranks.items() if v == low)
    second = ", last or second to last in {}" if len(rows) > 2 else ""
    each = [
        f"{k} (last in {top} of {n_cols} evaluation languages, significantly worse than the "
        f"best in {sig[k]} of them" + second.format(last2[k]) + ")"
        for k in worst
    ]
    return (
        f"The worst calibration is {_and(each)}; by mean rank over the languages "
        f"(1 = best, {len(rows)} = last) the worst is {_and(by_rank)} ({low:.1f})."
    )


def dense_sentence(t, m: Marks) -> str:
    """How many entries differ significantly from the dense model, and in which direction."""
    if not t.mixes or t.mixes[0] != DENSE:
        return "No dense baseline in the store for this table."
    tested = np.isfinite(m.p_dense)
    if not tested.any():
        return "No entry could be tested against the dense model (no per-unit scores)."
    diff = m.differs_from_dense & tested
    delta = t.mean - t.mean[0]
    better = delta > 0 if t.higher_is_better else delta < 0
    n_better = int((diff & better).sum())
    return (f"{int(diff.sum())} of {int(tested.sum())} entries (calibration x language) "
            f"differ significantly from the dense model ({int(diff.sum()) - n_better} worse, "
            f"{n_better} better; Holm over the table's {int(tested.sum())} comparisons, "
            f"alpha = {m.alpha:g}).")  # fmt: skip


def table_summary(t, m: Marks) -> str:
    """The Markdown section of one table."""
    lines = [f"## {t.title}", ""]
    if not m.any:
        lines.append("- No per-unit scores in the store for this table: no intervals or tests "
                     "(the SNR and error analyses keep none; ppl and lm-eval cells evaluated "
                     "before polyprune kept them have none).")  # fmt: skip
    for sentence in (target_sentence(t, m), worst_sentence(t, m), dense_sentence(t, m)):
        lines.append(f"- {sentence}")
    return "\n".join(lines) + "\n"


def summary_markdown(tables_with_marks: list[tuple]) -> str:
    """The whole ``summary.md``: a header on the method, then one section per table."""
    methods = sorted({x for _, m in tables_with_marks for x in m.methods})
    head = [
        "# Summary",
        "",
        "Generated from the results store by `polyprune matrix CONFIG --tables-only`; every "
        "number below is recomputed from it. *Tied with the best*: not significantly worse "
        "than the best calibration of that evaluation language (paired tests over held-out "
        "documents or examples, and over seeds where there are several; max-T correction "
        "over all pairs of mixes of the language; alpha = 0.05). "
        f"Tests used: {', '.join(methods) if methods else 'none'}. See docs/eval.md.",
        "",
    ]
    return "\n".join(head + [table_summary(t, m) for t, m in tables_with_marks])
