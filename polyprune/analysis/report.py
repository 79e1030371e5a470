"""The report folder of ``polyprune analyze``: PNG figures, ``report.md`` that embeds them with
the key numbers as tables, and ``metrics.json`` with every number plotted.

The folder is written to a temporary directory and renamed into place; an existing report is
replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from polyprune.analysis import plots
from polyprune.outputs import staged_output

__all__ = ["write_report"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _model_table(section: dict, panels: list[str], digits: int, best: str) -> list[str]:
    """Rows = runs, columns = evaluation languages; the best value per column in bold."""
    rows = []
    for col in panels:
        vals = [r["model"][col] for r in section.values() if r["model"][col] is not None]
        if vals:
            pick = max(vals) if best == "max" else min(vals)
            for r in section.values():
                r.setdefault("_best", set())
                if r["model"][col] == pick and len(section) > 1:
                    r["_best"].add(col)
    for label, r in section.items():
        cells = [f"**{_fmt(r['model'][c], digits)}**" if c in r.get("_best", ())
                 else _fmt(r["model"][c], digits) for c in panels]  # fmt: skip
        rows.append([label, *cells])
        r.pop("_best", None)
    return _table(["calibration \\ evaluated on", *panels], rows)


def _render(m: dict, out: Path) -> list[str]:
    """Write the figures into ``out``; return the lines of report.md."""
    labels = [r["label"] for r in m["runs"]]
    colors = plots.run_colors(labels)
    langs = list(m["config"]["langs"])
    md = ["# polyprune analysis", ""]
    md.append(f"Dense model: `{m['dense']}`. {len(labels)} compressed run(s):")
    md.append("")
    md += _table(
        ["label", "setting", "calibration mix", "seed", "masks", "directory"],
        [[r["label"], r["setting"], r["mix"], _fmt(r["seed"]), "yes" if r["has_masks"] else "no",
          f"`{r['path']}`"] for r in m["runs"]],
    )  # fmt: skip
    if "eval_text" in m:
        t = m["eval_text"]
        win = ", ".join(f"{k} {v}" for k, v in t["windows"].items())
        md += [f"Evaluation text: held-out split of {t['source']} (never used for calibration), "
               f"windows of {t['seqlen']} tokens per language: {win}.", ""]  # fmt: skip
    panels = [*langs, "all"]
    if "snr" in m:
        png = plots.layer_lines({p: {k: v["layers"][p] for k, v in m["snr"].items()}
                                 for p in panels}, colors, "SNR (dB)",
                                "SNR of hidden states per layer", out / "snr.png")  # fmt: skip
        md += ["## SNR of hidden states", "",
               "SNR_l = 10 log10(sum ||h||^2 / sum ||h - h'||^2) per decoder block output; "
               "higher is closer to the dense model. Model SNR (mean over layers, dB):",
               ""]  # fmt: skip
        md += _model_table(m["snr"], panels, 2, "max")
        md += [f"![SNR per layer]({png.name})", ""]
    if "error" in m:
        png = plots.layer_lines({p: {k: v["layers"][p] for k, v in m["error"].items()}
                                 for p in panels}, colors, "pruning error",
                                "Pruning error per layer (MSE / mean token norm^2)",
                                out / "error.png", logy=True)  # fmt: skip
        md += ["## Pruning error", "",
               "PE_l = mean squared error per coordinate / c_l^2, c_l the mean token norm of "
               "the dense layer. Mean over layers (lower is better):", ""]  # fmt: skip
        md += _model_table(m["error"], panels, 5, "min")
        md += [f"![pruning error per layer]({png.name})", ""]
    for setting, iou in m.get("iou", {}).items():
        slug = _slug(setting)
        mats = {"all": iou["matrices"]["all"]["all"], **iou["matrices"]["sublayer"]}
        heat = plots.iou_heatmaps(
            iou["mixes"],
            mats,
            f"Mask IoU across calibration mixes ({setting}; seeds intersected)",
            out / f"iou-{slug}.png",
        )
        seed_layers = {mix: s["layer"] for mix, s in iou["seed_iou"].items()}
        lines = plots.iou_layer_lines(iou["mixes"], {k: v for k, v in
                                      iou["matrices"]["layer"].items()}, seed_layers,
                                      f"Mask IoU per layer ({setting})",
                                      out / f"iou-layers-{slug}.png")  # fmt: skip
        md += [f"## Pruning-mask IoU: {setting}", "",
               "Weights pruned in every seed of a mix, compared between mixes "
               "(IoU = |P_a ∩ P_b| / |P_a ∪ P_b|, all Linears):", ""]  # fmt: skip
        mat = iou["matrices"]["all"]["all"]
        md += _table(["", *iou["mixes"]],
                     [[a, *[_fmt(v, 3) for v in row]] for a, row in zip(iou["mixes"], mat,
                                                                         strict=True)])  # fmt: skip
        if iou["seed_iou"]:
            md += ["Same-mix IoU across seeds (pruning certainty): "
                   + ", ".join(f"{k} {v['all']['all']:.3f} ({len(iou['seeds'][k])} seeds)"
                               for k, v in iou["seed_iou"].items()), ""]  # fmt: skip
        md += [f"![IoU heatmaps]({heat.name})", "", f"![IoU per layer]({lines.name})", ""]
    if "lsar" in m:
        ls = m["lsar"]
        png = plots.lsar_lines(ls, colors, out / "lsar.png")
        md += ["## LSAR: language-specific and language-agnostic subspaces", "",
               f"Per layer, the dense model's per-language mean prompt embeddings give a "
               f"rank-{ls['rank']} language-specific subspace (Xie et al., 2022). Mean change "
               "of each part, relative to the size of that part in the dense model, averaged "
               "over layers:", ""]  # fmt: skip
        rows = [[k, _fmt(sum(r["relative_specific"]) / len(r["relative_specific"]), 4),
                 _fmt(sum(r["relative_agnostic"]) / len(r["relative_agnostic"]), 4)]
                for k, r in ls["runs"].items()]  # fmt: skip
        md += _table(["calibration", "specific (relative)", "agnostic (relative)"], rows)
        md += [f"![LSAR per layer]({png.name})", ""]
    if "lape" in m:
        lp = m["lape"]
        box = plots.lape_boxes(lp, colors, out / "lape-boxes.png")
        grp = plots.lape_groups(lp, colors, out / "lape-groups.png")
        sel = plots.language_neurons(lp, langs, colors, out / "lape-neurons.png")
        md += ["## LAPE: language-specific neurons", "",
               f"Activation probability entropy of every FFN neuron (Tang et al., 2024) over "
               f"{', '.join(langs)}; neurons sorted by dense LAPE into groups of "
               f"{lp['group_percent']:g}%. Language-specific neurons per language (Tang et "
               "al.'s selection) and their overlap (IoU) with the dense model's:", ""]  # fmt: skip
        header = ["model", *langs]
        rows = [["dense", *[lp["selection"]["dense"][x] for x in langs]]]
        for k, r in lp["models"].items():
            if k != "dense":
                rows.append([k, *[f"{r['selection'][x]['count']} ({r['selection'][x]['iou_with_dense']:.2f})"  # noqa: E501
                                  for x in langs]])  # fmt: skip
        md += _table(header, rows)
        md += [f"![LAPE per neuron group]({box.name})", "", f"![LAPE change]({grp.name})", "",
               f"![language-specific neurons]({sel.name})", ""]  # fmt: skip
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
