"""The report folder of ``polyprune analyze``: PNG figures, ``report.md`` that embeds them with
the key numbers as tables, and ``metrics.json`` with every number plotted.

The folder is written to a temporary directory and renamed into place; an existing report is
replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from polyprune.analysis import plots
from polyprune.analysis.markdown import fmt, table
from polyprune.analysis.metric import ReportContext, get_metric, metric_names
from polyprune.outputs import staged_output

__all__ = ["write_report"]


def _render(m: dict, out: Path) -> list[str]:
    """Write the figures into ``out``; return the lines of report.md: the runs and the text,
    then each metric's own section."""
    labels = [r["label"] for r in m["runs"]]
    colors = plots.run_colors(labels)
    langs = list(m["config"]["langs"])
    md = ["# polyprune analysis", ""]
    md.append(f"Dense model: `{m['dense']}`. {len(labels)} compressed run(s):")
    md.append("")
    md += table(
        ["label", "setting", "calibration mix", "seed", "masks", "directory"],
        [[r["label"], r["setting"], r["mix"], fmt(r["seed"]), "yes" if r["has_masks"] else "no",
          f"`{r['path']}`"] for r in m["runs"]],
    )  # fmt: skip
    if "eval_text" in m:
        t = m["eval_text"]
        win = ", ".join(f"{k} {v}" for k, v in t["windows"].items())
        md += [f"Evaluation text: held-out split of {t['source']} (never used for calibration), "
               f"windows of {t['seqlen']} tokens per language: {win}.", ""]  # fmt: skip
    ctx = ReportContext(m, colors, langs, out)
    for name in metric_names():  # report order
        if name in m:
            md += get_metric(name).report(m[name], ctx)
    return md


def _finite(obj):
    """Non-finite floats become None (JSON null): metrics.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_report(metrics: dict, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write figures, report.md and metrics.json into ``out`` (atomically)."""
    metrics = _finite(metrics)
    out = Path(out).resolve()
    with staged_output(out, overwrite) as tmp:
        md = _render(metrics, tmp)
        (tmp / "report.md").write_text("\n".join(md))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False) + "\n")
    return out
