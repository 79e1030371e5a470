"""Signal-to-noise ratio and pruning error of hidden states, per layer (Kuzmin et al., 2023,
"Pruning vs Quantization: Which is Better?", as adapted in the paper this toolkit grew from).

With dense hidden states h and compressed ones h' of layer l (the output of decoder block l)
over all tokens t of the held-out text:

* SNR_l = 10 log10( sum_t ||h_t||^2 / sum_t ||h_t - h'_t||^2 ) in dB. Identical states give
  an infinite ratio; it is capped at ``SNR_CAP_DB`` so that layer means stay finite.
* PE_l = (1 / (T d)) sum_t ||h_t - h'_t||^2 / c_l^2, with c_l = (1/T) sum_t ||h_t|| the mean
  token-vector norm of the dense layer: the mean squared error per coordinate in units of the
  layer's typical scale, so layers whose residual streams differ in size are comparable.
* Model SNR = the mean of SNR_l over layers.

Only sums are kept (:class:`LayerErrorStats`), so any number of tokens streams through in
constant memory; the squared sums go through the kernel dispatcher (``kernels.errors``).
The metrics ``snr`` and ``error`` of ``analyze`` (and of the matrix's ``analyses``) share one
accumulator of these sums (:class:`ErrorSums`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from polyprune.analysis.markdown import fmt, table
from polyprune.analysis.metric import Accumulator, Metric, PassContext, ReportContext
from polyprune.kernels.errors import error_sums

__all__ = [
    "ERROR",
    "SNR",
    "SNR_CAP_DB",
    "ErrorSums",
    "LayerErrorStats",
    "model_snr",
    "pruning_error",
    "snr_db",
]

SNR_CAP_DB = 100.0


def snr_db(signal: float, error: float, cap: float = SNR_CAP_DB) -> float:
    """10 log10(signal / error), capped at ``cap`` (also when error is 0)."""
    if error <= 0:
        return cap
    if signal <= 0:
        return -cap
    return min(cap, 10.0 * math.log10(signal / error))


def pruning_error(error: float, norm_sum: float, tokens: int, dim: int) -> float:
    """(1 / (T d)) sum ||h - h'||^2 / c^2 with c = norm_sum / T."""
    c = norm_sum / tokens
    return error / (tokens * dim) / (c * c) if c > 0 else math.inf


@dataclass
class LayerErrorStats:
    """Running sums for one layer: sum ||h||^2, sum ||h - h'||^2, sum ||h||, tokens, dim."""

    signal: float = 0.0
    error: float = 0.0
    norm_sum: float = 0.0
    tokens: int = 0
    dim: int = 0

    def update(self, h: torch.Tensor, h2: torch.Tensor) -> None:
        h, h2 = h.reshape(-1, h.shape[-1]), h2.reshape(-1, h2.shape[-1])
        sig, err = error_sums(h, h2)
        self.signal += sig
        self.error += err
        self.norm_sum += h.float().norm(dim=-1).sum(dtype=torch.float64).item()
        self.tokens += h.shape[0]
        self.dim = h.shape[1]

    @property
    def snr_db(self) -> float:
        return snr_db(self.signal, self.error)

    @property
    def pruning_error(self) -> float:
        return pruning_error(self.error, self.norm_sum, self.tokens, self.dim)


def model_snr(layers: list[LayerErrorStats]) -> float:
    """The mean per-layer SNR in dB (the ``snr`` metric's model value)."""
    return SNR.model_value(layers)


def sum_stats(stats: list[LayerErrorStats]) -> LayerErrorStats:
    """The sums of several token sets (e.g. every language) as one."""
    out = LayerErrorStats()
    for s in stats:
        out.signal += s.signal
        out.error += s.error
        out.norm_sum += s.norm_sum
        out.tokens += s.tokens
        out.dim = s.dim
    return out


class ErrorSums(Accumulator):
    """Per compressed model, per language segment, per layer: the sums of
    :class:`LayerErrorStats` of its block outputs against the dense model's (``"dense"``),
    over the tokens where ``keep`` (N, T) is set (all where it is None)."""

    def __init__(self, runs: list[str], segments: list[slice], keep: torch.Tensor | None):
        self.runs, self.segments, self.keep = runs, segments, keep
        self.stats: dict[str, list[list[LayerErrorStats]]] = {
            n: [[] for _ in segments] for n in runs
        }

    def on_layer(self, outs: dict) -> None:
        for name in self.runs:
            for i, seg in enumerate(self.segments):
                h, h2 = outs["dense"][seg], outs[name][seg]
                if self.keep is not None:
                    k = self.keep[seg].to(h.device).bool()  # BOS: a context-free sink, huge norms
                    h, h2 = h[k], h2[k]
                s = LayerErrorStats()
                s.update(h, h2)
                self.stats[name][i].append(s)

    def state(self) -> dict:
        return self.stats


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass(frozen=True, kw_only=True)
class _HiddenStateMetric(Metric):
    """SNR or pruning error: a value per layer from :class:`LayerErrorStats`, averaged over the
    layers for the model, per evaluation language and over all of them (``all``)."""

    name: str
    row_metric: str
    value: Callable[[LayerErrorStats], float]
    json_value: Callable[[float], float | None]  # what metrics.json holds of a value
    ylabel: str
    title: str
    plot_title: str
    figure_alt: str
    explain: str
    digits: int  # in report.md's table
    best: str  # "max" or "min": which value is bold
    logy: bool = False

    needs_pass = True
    accumulator_key = "errors"

    def accumulator(self, models: dict, ctx: PassContext) -> ErrorSums:
        return ErrorSums([n for n in models if n != "dense"], ctx.segments, ctx.keep)

    def model_value(self, layers: list[LayerErrorStats]) -> float:
        """The model's value: the mean of the per-layer values (the matrix's result row)."""
        return sum(self.value(s) for s in layers) / len(layers)

    def finish(self, state: dict, ctx: PassContext) -> dict:
        langs = ctx.cfg.langs
        out = {}
        for run, per_lang in state.items():
            depth = len(per_lang[0])
            tables = {lang: per_lang[i] for i, lang in enumerate(langs)}
            tables["all"] = [sum_stats([per_lang[i][layer] for i in range(len(langs))])
                             for layer in range(depth)]  # fmt: skip
            out[run] = {
                "layers": {k: [self.json_value(self.value(s)) for s in v]
                           for k, v in tables.items()},
                "model": {k: self.json_value(self.model_value(v)) for k, v in tables.items()},
            }  # fmt: skip
        return out

    def report(self, section: dict, ctx: ReportContext) -> list[str]:
        from polyprune.analysis import plots

        panels = [*ctx.langs, "all"]
        png = plots.layer_lines({p: {k: v["layers"][p] for k, v in section.items()}
                                 for p in panels}, ctx.colors, self.ylabel,
                                self.plot_title, ctx.out / f"{self.name}.png",
                                logy=self.logy)  # fmt: skip
        md = [f"## {self.title}", "", self.explain, ""]
        md += model_table(section, panels, self.digits, self.best)
        return md + [f"![{self.figure_alt}]({png.name})", ""]


def model_table(section: dict, panels: list[str], digits: int, best: str) -> list[str]:
    """Rows = runs, columns = evaluation languages; the best value per column in bold."""
    bold: dict[str, set] = {label: set() for label in section}
    for col in panels:
        vals = [r["model"][col] for r in section.values() if r["model"][col] is not None]
        if vals:
            pick = max(vals) if best == "max" else min(vals)
            for label, r in section.items():
                if r["model"][col] == pick and len(section) > 1:
                    bold[label].add(col)
    rows = []
    for label, r in section.items():
        cells = [f"**{fmt(r['model'][c], digits)}**" if c in bold[label]
                 else fmt(r["model"][c], digits) for c in panels]  # fmt: skip
        rows.append([label, *cells])
    return table(["calibration \\ evaluated on", *panels], rows)


SNR = _HiddenStateMetric(
    name="snr", row_metric="snr_db", value=lambda s: s.snr_db, json_value=lambda v: v,
    ylabel="SNR (dB)", title="SNR of hidden states", plot_title="SNR of hidden states per layer",
    figure_alt="SNR per layer",
    explain="SNR_l = 10 log10(sum ||h||^2 / sum ||h - h'||^2) per decoder block output; "
    "higher is closer to the dense model. Model SNR (mean over layers, dB):",
    digits=2, best="max",
)  # fmt: skip
ERROR = _HiddenStateMetric(
    name="error", row_metric="pruning_error", value=lambda s: s.pruning_error,
    json_value=_finite, ylabel="pruning error", title="Pruning error",
    plot_title="Pruning error per layer (MSE / mean token norm^2)",
    figure_alt="pruning error per layer",
    explain="PE_l = mean squared error per coordinate / c_l^2, c_l the mean token norm of "
    "the dense layer. Mean over layers (lower is better):",
    digits=5, best="min", logy=True,
)  # fmt: skip
