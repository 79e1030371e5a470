"""Evaluate one model on perplexity and lm-eval tasks per language: ``polyprune eval``.

``evaluate_model`` is what a matrix cell runs after compression; ``evaluate`` loads a model by
name or directory and returns the JSON report that ``polyprune eval --out`` writes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from polyprune.errors import InputError
from polyprune.eval.store import ResultRow, UnitScores
from polyprune.outputs import check_output_file, write_file_atomic

__all__ = [
    "EvalOutcome",
    "EvalSettings",
    "PplSettings",
    "evaluate",
    "evaluate_cell",
    "evaluate_model",
    "write_json",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PplSettings:
    source: str = "bundled"
    seqlen: int | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class EvalSettings:
    langs: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("ppl",)
    ppl: PplSettings = field(default_factory=PplSettings)
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8

    def check(self) -> None:
        """Tasks, languages and sizes, before any model is loaded."""
        from polyprune.data.sources import get_source
        from polyprune.eval.harness import task_name

        if not self.langs:
            raise InputError("no evaluation languages given")
        if not self.tasks:
            raise InputError("no tasks given")
        for task in self.tasks:
            if task != "ppl":
                task_name(task, "en")
        if len(set(self.tasks)) != len(self.tasks):
            raise InputError("a task is listed twice")
        if "ppl" in self.tasks:
            src = get_source(self.ppl.source)
            for lang in self.langs:
                src.check_language(lang)
            if self.ppl.seqlen is not None and self.ppl.seqlen < 2:
                raise InputError(f"ppl seqlen must be >= 2, got {self.ppl.seqlen}")
            if self.ppl.max_tokens is not None and self.ppl.max_tokens < 2:
                raise InputError(f"ppl max_tokens must be >= 2, got {self.ppl.max_tokens}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"limit must be >= 1, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise InputError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size}")


@dataclass
class EvalOutcome:
    """Rows, unavailable tasks, and the per-unit scores behind the rows."""

    rows: list[ResultRow]
    unavailable: list[dict]
    units: list[UnitScores]


def evaluate_model(
    model, tokenizer, ev: EvalSettings, device: str = "cpu", progress: bool = False
) -> tuple[list[ResultRow], list[dict]]:
    """(rows, unavailable) of a model on every task x language of ``ev``."""
    out = evaluate_cell(model, tokenizer, ev, device, progress)
    return out.rows, out.unavailable


def evaluate_cell(
    model, tokenizer, ev: EvalSettings, device: str = "cpu", progress: bool = False
) -> EvalOutcome:
    """A model on every task x language of ``ev``, with per-unit scores: held-out documents'
    summed NLL and tokens for perplexity, lm-eval's per-example scores for its tasks."""
    from polyprune.eval.harness import HarnessConfig, run_tasks
    from polyprune.eval.perplexity import perplexity

    # Models are loaded and compressed on the CPU (the engine streams blocks to the GPU);
    # evaluation runs the whole model on ``device``.
    if next(model.parameters()).device != torch.device(device):
        model.to(device)
    rows: list[ResultRow] = []
    units: list[UnitScores] = []
    if "ppl" in ev.tasks:
        ppl = perplexity(model, tokenizer, list(ev.langs), ev.ppl.source, ev.ppl.seqlen,
                         ev.batch_size, device, ev.ppl.max_tokens, progress)  # fmt: skip
        rows += [ResultRow("ppl", r.lang, "ppl", r.ppl, r.tokens) for r in ppl.values()]
        units += [UnitScores("ppl", r.lang, "ppl", tuple(range(len(r.unit_nll))), r.unit_nll,
                             tuple(float(t) for t in r.unit_tokens))
                  for r in ppl.values() if r.unit_nll]  # fmt: skip
    families = [t for t in ev.tasks if t != "ppl"]
    unavailable: list[dict] = []
    if families:
        hc = HarnessConfig(limit=ev.limit, num_fewshot=ev.num_fewshot,
                           batch_size=ev.batch_size, device=device, progress=progress)  # fmt: skip
        res = run_tasks(model, tokenizer, families, list(ev.langs), hc)
        rows += [ResultRow(s.task, s.lang, s.metric, s.value, s.n) for s in res.scores]
        unavailable = [asdict(u) for u in res.unavailable]
        for (family, lang, metric), per_doc in sorted(res.per_sample.items()):
            ids = tuple(sorted(per_doc))
            units.append(UnitScores(family, lang, metric, ids, tuple(per_doc[i] for i in ids),
                                    (1.0,) * len(ids)))  # fmt: skip
    return EvalOutcome(rows, unavailable, units)


def evaluate(
    model: str | os.PathLike, ev: EvalSettings, device: str = "cpu", dtype: str = "auto",
    progress: bool = True,
) -> dict:  # fmt: skip
    """Load ``model`` (hub id, directory or ``demo``) and evaluate it: the JSON-ready report."""
    from polyprune.checks import check_device, check_dtype
    from polyprune.models import load_model, resolve_model_path

    t0 = time.perf_counter()
    ev.check()
    check_device(device)
    check_dtype(dtype)
    loaded = load_model(resolve_model_path(model), device=device, dtype=dtype)
    rows, unavailable = evaluate_model(loaded.model, loaded.tokenizer, ev, device, progress)
    return {
        "model": str(model),
        "path": loaded.path,
        "settings": asdict(ev),
        "results": [asdict(r) for r in rows],
        "unavailable": unavailable,
        "seconds": time.perf_counter() - t0,
    }


def write_json(obj, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``obj`` as JSON to a temporary file beside ``out`` and rename it into place; an
    ``out`` that appeared meanwhile is replaced only with ``overwrite``."""
    out = check_output_file(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    return write_file_atomic(
        out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite
    )
