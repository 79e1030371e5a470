"""Per-block sparsities of runs pruned with a layer-wise sparsity profile (OWL).

:data:`PROFILE` is the ``profile`` metric of ``polyprune analyze``: read from the runs'
manifests (``profile`` record, docs/sparsity_profiles.md), no lockstep pass. For each run with
a profile: the profile's sparsity per block, the sparsity its Linears reached (from the
manifest's ``layers``), and the outlier ratios it came from, of all calibration windows and of
each calibration language. Runs without a profile are left out; with none, the metric is
skipped quietly (it is optional).
"""

from __future__ import annotations

import re

from polyprune.analysis.markdown import fmt, table
from polyprune.analysis.metric import Metric, PassContext, ReportContext

__all__ = ["PROFILE", "achieved_by_block", "profile_metrics"]

_BLOCK = re.compile(r"^(.*\.\d+)\.")


def achieved_by_block(layers: dict[str, dict], blocks: list[str]) -> list[float | None]:
    """Parameter-weighted sparsity of each block's Linears from a manifest's ``layers``."""
    zeros = dict.fromkeys(blocks, 0.0)
    sizes = dict.fromkeys(blocks, 0)
    for name, rec in layers.items():
        match = _BLOCK.match(name)
        if match is None or match[1] not in zeros:
            continue
        n = rec["shape"][0] * rec["shape"][1]
        zeros[match[1]] += rec["sparsity"] * n
        sizes[match[1]] += n
    return [zeros[b] / sizes[b] if sizes[b] else None for b in blocks]


def profile_metrics(runs: list) -> dict:
    """Run label -> its profile record, with the achieved sparsity per block added."""
    out = {}
    for run in runs:
        prof = run.manifest.profile
        if not prof:
            continue
        out[run.label] = dict(prof) | {
            "achieved": achieved_by_block(run.manifest.layers, list(prof["blocks"])),
            "achieved_sparsity": run.manifest.achieved_sparsity,
        }
    return out


def profile_figure(section: dict, colors: dict, path):
    """Left: sparsity per block (profile, dashed; achieved, solid; target, grey). Right: the
    outlier ratios, all windows (solid) and per calibration language (thin)."""
    import matplotlib.pyplot as plt

    from polyprune.analysis.plots import save  # sets the Agg backend first

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, p in section.items():
        c = colors.get(label, "C0")
        x = range(len(p["blocks"]))
        left.plot(
            x, p["sparsity"], ls="--", marker="o", ms=3, color=c, label=f"{label}: {p['name']}"
        )
        left.plot(x, p["achieved"], lw=1, color=c, alpha=0.6)
        left.axhline(p["target"], color="0.6", lw=0.8)
        right.plot(x, [100 * r for r in p["outlier_ratio"]], marker="o", ms=3, color=c,
                   label=f"{label}: all windows")  # fmt: skip
        for i, (lang, ratios) in enumerate(p["outlier_ratio_by_language"].items()):
            style = [":", "-.", (0, (1, 2)), (0, (3, 1, 1, 1))][i % 4]
            right.plot(x, [100 * r for r in ratios], lw=0.8, color=c, alpha=0.5, ls=style,
                       label=lang)  # fmt: skip
    left.set(xlabel="block", ylabel="sparsity", title="Sparsity per block (dashed: profile)")
    right.set(xlabel="block", ylabel="outlier ratio (%)", title="Outlier ratio (M x mean score)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path)


class _Profile(Metric):
    name = "profile"
    optional = True

    def unavailable(self, ctx: PassContext) -> str | None:
        if not any(r.manifest.profile for r in ctx.runs):
            return "no run was pruned with a sparsity profile (--sparsity-profile)"
        return None

    def finish(self, state: dict, ctx: PassContext) -> dict:
        return profile_metrics(ctx.runs)

    def report(self, section: dict, ctx: ReportContext) -> list[str]:
        fig = profile_figure(section, ctx.colors, ctx.out / "profile.png")
        md = ["## Layer-wise sparsity profiles", "",
              "Per-block sparsity of runs pruned with a profile (docs/sparsity_profiles.md), "
              "and the outlier ratios of the dense model it was set from:", ""]  # fmt: skip
        rows = []
        for label, p in section.items():
            rows.append([label, p["name"], fmt(p["target"], 2), fmt(p["achieved_sparsity"], 4),
                         fmt(min(p["sparsity"]), 3), fmt(max(p["sparsity"]), 3),
                         ", ".join(p["outlier_ratio_by_language"]) or "-"])  # fmt: skip
        md += table(["run", "profile", "target", "achieved", "min block", "max block",
                     "languages"], rows)  # fmt: skip
        return md + [f"![Sparsity per block]({fig.name})", ""]


PROFILE = _Profile()
