"""Tables and heatmaps from a results store, in the layout of the paper's Tables 1-3.

One table per model x method x level x task: rows are calibration mixes (the dense baseline on
top), columns are evaluation languages, each entry the mean ± sample standard deviation over
seeds. The best calibration mix per column (lowest perplexity, highest accuracy or F1) is
marked: bold in Markdown, a frame in the heatmap. Heatmap colours are normalised per column
over the calibration rows, so each column shows which mix suits that language, whatever the
language's own difficulty.

Where the store holds per-unit scores (held-out documents' NLL, lm-eval's per-example
results), each entry also shows its 95% bootstrap interval, and every mix not significantly
worse than the column's best is marked too: italic in Markdown, a dashed frame in the heatmap
(``polyprune.eval.compare``). ``summary.md`` answers the paper's questions in sentences.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polyprune.eval.compare import Marks, entry_samples, table_marks
from polyprune.eval.significance import N_BOOT
from polyprune.eval.summary import summary_markdown
from polyprune.outputs import write_file_atomic

__all__ = ["Table", "build_tables", "heatmap", "to_csv", "to_markdown", "write_tables"]

logger = logging.getLogger(__name__)

DENSE = "dense"
LOWER_IS_BETTER = frozenset({"ppl", "pruning_error", "damage"})


def primary_metric(task: str) -> str:
    """The metric a table shows for a task (all metrics are kept in the store)."""
    special = {"ppl": "ppl", "mkqa": "f1", "snr": "snr_db", "error": "pruning_error"}
    return special.get(task, "acc")


@dataclass
class Table:
    model: str
    method: str
    level: str
    task: str
    metric: str
    mixes: list[str]  # row labels; "dense" first where the store has the baseline
    langs: list[str]  # column labels
    mean: np.ndarray  # (rows, cols), nan where missing
    std: np.ndarray  # (rows, cols), sample std over seeds (0 for one seed)
    n: np.ndarray  # (rows, cols) seeds per entry
    marks: Marks | None = None  # intervals and tests, where the store has per-unit scores

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    @property
    def title(self) -> str:
        how = "higher" if self.higher_is_better else "lower"
        where = f"{self.model} · {self.method} {self.level} · {self.task}"
        return f"{where} ({self.metric}, {how} is better)"

    @property
    def stem(self) -> str:
        raw = f"{Path(self.model).name}__{self.method}-{self.level}__{self.task}-{self.metric}"
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", raw)

    def best(self) -> np.ndarray:
        """Row index of the best calibration mix per column (-1 where none); the dense
        baseline is not a candidate."""
        cand = self.mean.copy()
        if self.mixes and self.mixes[0] == DENSE:
            cand[0] = np.nan
        out = np.full(len(self.langs), -1)
        for j in range(len(self.langs)):
            col = cand[:, j]
            if np.isnan(col).all():
                continue
            out[j] = int(np.nanargmax(col) if self.higher_is_better else np.nanargmin(col))
        return out


def _mix_order(mix: str) -> tuple:
    return (mix != DENSE, len(mix.split(",")), mix)


def build_tables(
    rows: list[dict], units: list[dict] | None = None, n_boot: int = N_BOOT
) -> list[Table]:
    """Tables from store rows (dicts with model, method, level, mix, seed, task, lang, metric,
    value). Dense rows become the top row of every table of the same model and task. With
    ``units`` (the store's per-unit scores) each table gets its intervals and tests."""
    values: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r["metric"] != primary_metric(r["task"]):
            continue
        mix = DENSE if r["method"] == DENSE else r["mix"]
        values[(r["model"], r["method"], r["level"], r["task"], r["metric"], mix, r["lang"])] += [
            r["value"]
        ]
    groups = sorted({k[:5] for k in values if k[1] != DENSE})
    tables = []
    for model, method, level, task, metric in groups:
        mine = {k: v for k, v in values.items() if k[:5] == (model, method, level, task, metric)}
        dense = {
            k: v for k, v in values.items() if k[:2] == (model, DENSE) and k[3:5] == (task, metric)
        }
        entries = {(k[5], k[6]): v for k, v in (mine | dense).items()}
        mixes = sorted({m for m, _ in entries}, key=_mix_order)
        langs = sorted({lang for _, lang in entries})
        shape = (len(mixes), len(langs))
        mean, std, n = np.full(shape, np.nan), np.full(shape, np.nan), np.zeros(shape, int)
        for (mix, lang), v in entries.items():
            i, j = mixes.index(mix), langs.index(lang)
            mean[i, j] = float(np.mean(v))
            std[i, j] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
            n[i, j] = len(v)
        t = Table(model, method, level, task, metric, mixes, langs, mean, std, n)
        if units is not None:
            t.marks = table_marks(t, entry_samples(t, rows, units), n_boot=n_boot)
        tables.append(t)
    return tables


def _fmt(t: Table, i: int, j: int) -> str:
    if np.isnan(t.mean[i, j]):
        return "–"
    # Pruning errors are ~1e-4 on real models: significant digits, not fixed decimals.
    spec = {"acc": ".3f", "acc_norm": ".3f", "f1": ".3f", "exact_match": ".3f",
            "pruning_error": ".2e", "damage": ".4f"}.get(t.metric, ".2f")  # fmt: skip
    text = f"{t.mean[i, j]:{spec}}"
    if t.n[i, j] > 1:
        text += f" ± {t.std[i, j]:{spec}}"
    if t.marks is not None and np.isfinite(t.marks.ci_lo[i, j]):
        text += f" [{t.marks.ci_lo[i, j]:{spec}}, {t.marks.ci_hi[i, j]:{spec}}]"
    return text


def _mark(t: Table, best: np.ndarray, i: int, j: int) -> str:
    """ "best", "tied" (not significantly worse than the best) or ""."""
    if best[j] == i:
        return "best"
    return "tied" if t.marks is not None and t.marks.tied[i, j] else ""


LEGEND = (
    "**bold**: best calibration of the column; *italic*: not significantly worse than it "
    "(paired bootstrap over held-out documents or examples and seeds, max-T over all pairs, "
    "alpha = {alpha:g}); [lo, hi]: 95% bootstrap interval."
)


def to_markdown(t: Table) -> str:
    best = t.best()
    lines = [f"### {t.title}", "", "| calibration | " + " | ".join(t.langs) + " |"]
    lines.append("|---|" + "---:|" * len(t.langs))
    style = {"best": "**{}**", "tied": "*{}*", "": "{}"}
    for i, mix in enumerate(t.mixes):
        cells = [style[_mark(t, best, i, j)].format(_fmt(t, i, j)) for j in range(len(t.langs))]
        lines.append(f"| {mix} | " + " | ".join(cells) + " |")
    if t.marks is not None and t.marks.any:
        lines += ["", LEGEND.format(alpha=t.marks.alpha)]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("", "_std", "_n", "_ci_lo", "_ci_hi", "_mark", "_p_best", "_p_dense")


def _num(x: float) -> str:
    return "" if math.isnan(x) else repr(float(x))


def to_csv(t: Table) -> str:
    """Per language: mean, std, seeds, interval, mark (best/tied), adjusted p-values
    against the column's best and against dense (empty where not computed)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["calibration"] + [f"{lang}{s}" for lang in t.langs for s in CSV_FIELDS])
    best, nan = t.best(), np.full(t.mean.shape, np.nan)
    mk = t.marks
    ci_lo, ci_hi = (mk.ci_lo, mk.ci_hi) if mk else (nan, nan)
    p_best, p_dense = (mk.p_best, mk.p_dense) if mk else (nan, nan)
    for i, mix in enumerate(t.mixes):
        row = [mix]
        for j in range(len(t.langs)):
            m = t.mean[i, j]
            row += [_num(m), "" if math.isnan(m) else repr(float(t.std[i, j])), int(t.n[i, j]),
                    _num(ci_lo[i, j]), _num(ci_hi[i, j]), _mark(t, best, i, j),
                    _num(p_best[i, j]), _num(p_dense[i, j])]  # fmt: skip
        w.writerow(row)
    return buf.getvalue()


def column_scores(t: Table) -> np.ndarray:
    """Per-column colour value in [0, 1], 1 = best, over the calibration rows (the dense row
    gets nan and is drawn grey)."""
    first = 1 if t.mixes and t.mixes[0] == DENSE else 0
    out = np.full(t.mean.shape, np.nan)
    for j in range(len(t.langs)):
        col = t.mean[first:, j]
        if np.isnan(col).all():
            continue
        lo, hi = np.nanmin(col), np.nanmax(col)
        z = np.full_like(col, 0.5) if hi == lo else (col - lo) / (hi - lo)
        out[first:, j] = z if t.higher_is_better else 1 - z
    return out


def heatmap(t: Table, path: str | os.PathLike) -> None:
    """The table as a PNG heatmap (matplotlib, Agg backend), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    scores = column_scores(t)
    best = t.best()
    R, C = t.mean.shape
    fig, ax = plt.subplots(figsize=(1.6 * C + 2.0, (0.65 if t.marks else 0.5) * R + 1.6))
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#dddddd")
    ax.imshow(np.ma.masked_invalid(scores), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i in range(R):
        for j in range(C):
            ax.text(j, i, _fmt(t, i, j).replace(" [", "\n["), ha="center", va="center",
                    fontsize=6 if t.marks is not None else 7,
                    fontweight="bold" if best[j] == i else "normal")  # fmt: skip
            if _mark(t, best, i, j) == "tied":  # not significantly worse than the best
                ax.add_patch(Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, lw=1.2,
                                       ec="black", ls="--"))  # fmt: skip
        if t.mixes[i] == DENSE:
            ax.axhline(i + 0.5, color="black", linewidth=1)
    for j, i in enumerate(best):
        if i >= 0:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="black"))
    ax.set_xticks(range(C), t.langs)
    ax.set_yticks(range(R), t.mixes)
    ax.set_xlabel("evaluation language")
    ax.set_ylabel("calibration")
    ax.xaxis.set_ticks_position("top")
    ax.xaxis.set_label_position("top")
    ax.set_title(t.title, fontsize=9, pad=28)
    fig.tight_layout()
    try:
        write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def _write_text(path: Path, text: str) -> None:
    write_file_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_tables(
    rows: list[dict],
    out_dir: str | os.PathLike,
    png: bool = True,
    units: list[dict] | None = None,
    n_boot: int = N_BOOT,
) -> list[Path]:
    """CSV, Markdown and (``png``) heatmap per table, ``tables.md`` with all tables, and
    ``summary.md``. ``units``: the store's per-unit scores, for intervals and tests."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(rows, units if units is not None else [], n_boot)
    written = []
    for t in tables:
        for suffix, text in ((".csv", to_csv(t)), (".md", to_markdown(t))):
            _write_text(out / f"{t.stem}{suffix}", text)
            written.append(out / f"{t.stem}{suffix}")
        if png:
            heatmap(t, out / f"{t.stem}.png")
            written.append(out / f"{t.stem}.png")
    _write_text(out / "tables.md", "\n".join(to_markdown(t) for t in tables))
    written.append(out / "tables.md")
    _write_text(out / "summary.md", summary_markdown([(t, t.marks) for t in tables]))
    written.append(out / "summary.md")
    logger.info("%d tables written to %s", len(tables), out)
    return written
