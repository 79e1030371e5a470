"""The metric registry of ``polyprune analyze``: one name -> one metric object.

A metric says whether it can run on the given inputs (``unavailable``), whether it needs the
lockstep pass over the decoder blocks and, if so, which accumulator collects its per-layer
numbers (``accumulator``: metrics that share sums, SNR and pruning error, name the same one),
how it turns them into its part of ``metrics.json`` (``finish``), and its figures and
``report.md`` section (``report``). ``analyze.py`` only orchestrates over the registry and
``eval/matrix.py`` reuses the same objects, so a new metric is its module plus one line in
``_REGISTRY``.

This module imports neither torch nor matplotlib: the CLI reads the names for ``--metrics``
from here, and ``polyprune --help`` stays fast. The metric classes load on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Accumulator",
    "Metric",
    "PassContext",
    "ReportContext",
    "get_metric",
    "metric_names",
    "too_few_languages",
]

# name -> "module:attribute", in report order. The order of metrics.json's sections is
# this order with the lockstep-pass metrics first (as analyze has always written them).
_REGISTRY = {
    "snr": "polyprune.analysis.snr:SNR",
    "error": "polyprune.analysis.snr:ERROR",
    "iou": "polyprune.analysis.iou:IOU",
    "lsar": "polyprune.analysis.lsar:LSAR",
    "lape": "polyprune.analysis.lape:LAPE",
    "profile": "polyprune.analysis.profile:PROFILE",
}


def metric_names() -> tuple[str, ...]:
    """Every metric ``analyze --metrics`` accepts, in report order."""
    return tuple(_REGISTRY)


def get_metric(name: str) -> Metric:
    """The metric object registered as ``name`` (KeyError for an unknown one)."""
    module, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class PassContext:
    """What a metric sees of ``analyze``: its config, the runs, and (for the lockstep pass) the
    held-out windows' language segments and token mask (1 = ordinary token)."""

    cfg: Any  # AnalysisConfig
    runs: list  # analyze.Run
    meta: Any = None  # the dense model's skeleton (shapes only, no weights)
    segments: list[slice] = field(default_factory=list)
    keep: Any = None  # (N, T) float tensor on the analysis device


@dataclass
class ReportContext:
    """What a metric's report section needs besides its own numbers."""

    metrics: dict  # the whole metrics dict (run table, config, layers)
    colors: dict  # run label -> colour, "dense" black
    langs: list[str]
    out: Path  # the folder the figures go to


class Accumulator:
    """Collects one metric's numbers during one lockstep pass. ``open``/``close`` bracket the
    pass (hooks), ``on_batch`` names the model, language segment and rows about to run,
    ``on_layer`` sees every model's block output of one layer, ``state`` is the result."""

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def on_batch(self, name: str, seg: int, rows: slice) -> None:
        pass

    def on_layer(self, outs: dict) -> None:
        pass

    def state(self) -> dict:
        """Model name -> what was collected for it; passes are merged by name (first wins:
        the dense model's numbers are the same in every pass)."""
        raise NotImplementedError


class Metric:
    """One diagnostic. Subclasses set ``name`` and override what applies to them."""

    name: str = ""
    needs_pass: bool = False  # computed from the lockstep pass over the decoder blocks
    row_metric: str | None = None  # the matrix's result-row metric name, if it offers one
    optional: bool = False  # skipped without a warning when it does not apply (not asked for)

    def unavailable(self, ctx: PassContext) -> str | None:
        """Why this metric cannot run on these inputs, or None when it can."""
        return None

    accumulator_key: str = ""  # metrics with the same key share one accumulator per pass

    @property
    def pass_key(self) -> str:
        """The key of this metric's accumulator (its name unless it shares one)."""
        return self.accumulator_key or self.name

    def accumulator(self, models: dict, ctx: PassContext) -> Accumulator:
        """A new accumulator for one lockstep pass over ``models`` (``"dense"`` first)."""
        raise NotImplementedError

    def finish(self, state: dict, ctx: PassContext) -> dict:
        """This metric's section of metrics.json from the merged accumulator state (model name
        -> what the accumulator kept for it; empty for metrics without a pass)."""
        raise NotImplementedError

    def model_value(self, layers: list) -> float:
        """For metrics with a ``row_metric``: the model's value from one language's per-layer
        accumulator state (the matrix's result row)."""
        raise NotImplementedError

    def report(self, section: dict, ctx: ReportContext) -> list[str]:
        """Write this metric's figures into ``ctx.out``; return its lines of report.md."""
        raise NotImplementedError


def too_few_languages(ctx: PassContext) -> str | None:
    """Why a metric that compares languages cannot run on one, or None."""
    return "needs at least two evaluation languages" if len(ctx.cfg.langs) < 2 else None
