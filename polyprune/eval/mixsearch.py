"""``polyprune mix optimise``: the calibration mix that minimises predicted damage on targets.

1. One predict-only sweep (:func:`polyprune.eval.sweep.sweep`, ``shared`` pools: one pool of
   ``nsamples`` windows per candidate language, reweighted) over Scheffé's {N, 2} lattice (the
   N single languages and the N(N-1)/2 equal pairs) and the uniform mix.
2. :func:`polyprune.compress.mixopt.optimise_with_surrogate` fits, per target language, the
   quadratic mixture model of predicted damage against the shares, optimises it on a fine
   lattice, and asks for the predicted damage at its optimum: one more predict-only sweep of
   that one mix. The recommended mix is the best *evaluated* one (docs/mixes.md says why).
3. The report: the recommended mix next to the best single language and the uniform mix, with
   predicted damage per language. ``verify`` then prunes the three (one sweep, ``exact``
   pools: each is the run ``--calib MIX --nsamples N --propagate dense``) and measures their
   held-out perplexity in every language.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from polyprune.compress.mixopt import MixResult, optimise_with_surrogate, parse_objective
from polyprune.data.mix import CalibrationMix, largest_remainder
from polyprune.errors import InputError
from polyprune.eval.sweep import all_pairs, mix_dirname, sweep
from polyprune.outputs import check_output_dir, check_writable, staged_output

__all__ = ["Candidate", "OptimiseReport", "optimise", "to_mix"]

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    role: str  # recommended, best single, uniform
    mix: str  # as --calib takes it
    predicted: dict[str, float]  # language -> predicted damage
    score: float  # the objective over the targets (predicted)
    measured: dict[str, float] = field(default_factory=dict)  # language -> perplexity


@dataclass
class OptimiseReport:
    objective: str
    targets: list[str]
    langs: list[str]
    candidates: list[Candidate]
    evaluated: list[dict]  # every mix whose damage was predicted
    seconds: dict[str, float]
    surrogate_check: dict[str, float] = field(default_factory=dict)

    def markdown(self) -> str:
        cols = self.targets + [lang for lang in self.langs if lang not in self.targets]
        head = "| mix | role | " + " | ".join(cols) + f" | {self.objective} |"
        lines = [f"### Predicted damage (targets {', '.join(self.targets)}; lower is better)",
                 "", head, "|---|---|" + "---:|" * (len(cols) + 1)]  # fmt: skip
        for c in self.candidates:
            vals = " | ".join(_f(c.predicted.get(lang)) for lang in cols)
            lines.append(f"| {c.mix} | {c.role} | {vals} | {_f(c.score)} |")
        if any(c.measured for c in self.candidates):
            lines += ["", "### Measured held-out perplexity (--verify; worst over targets)", "",
                      "| mix | role | " + " | ".join(cols) + " | worst target |",
                      "|---|---|" + "---:|" * (len(cols) + 1)]  # fmt: skip
            for c in self.candidates:
                vals = " | ".join(_f(c.measured.get(lang), ".2f") for lang in cols)
                worst = max(c.measured.get(t, math.nan) for t in self.targets)
                lines.append(f"| {c.mix} | {c.role} | {vals} | {_f(worst, '.2f')} |")
        return "\n".join(lines) + "\n"


def _f(v, spec: str = ".4f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}"


def to_mix(weights: dict[str, float], nsamples: int) -> CalibrationMix:
    """Shares -> a ``--calib`` mix whose split of ``nsamples`` windows is the shares rounded
    (largest remainder); languages with no window left out."""
    langs = list(weights)
    counts = largest_remainder([weights[lang] for lang in langs], nsamples)
    used = [(lang, c) for lang, c in zip(langs, counts, strict=True) if c > 0]
    g = math.gcd(*(c for _, c in used))
    return CalibrationMix(tuple(u[0] for u in used), tuple(float(c // g) for _, c in used))


def _shares_key(weights: dict[str, float]) -> tuple:
    return tuple(sorted((k, round(v, 9)) for k, v in weights.items() if v > 0))


def optimise(
    model: str | os.PathLike,
    method: str,
    langs: Sequence[str],
    targets: Sequence[str],
    objective: str = "worst",
    verify: bool = False,
    ppl_tokens: int | None = 4096,
    ppl_seqlen: int | None = 512,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    **sweep_kw,
) -> OptimiseReport:
    """Search the mix of ``langs`` minimising the predicted damage ``objective`` on
    ``targets`` (module docstring). ``sweep_kw``: :func:`polyprune.eval.sweep.sweep`'s
    method, calibration and placement settings. Writes ``out`` (report, and with ``verify``
    the three pruned models) if given."""
    t0 = time.perf_counter()
    langs, targets = list(dict.fromkeys(langs)), list(dict.fromkeys(targets))
    if len(langs) < 2:
        raise InputError(f"--langs needs at least two candidate languages, got {','.join(langs)}")
    obj = parse_objective(objective, targets)
    if out is not None:
        check_output_dir(out, overwrite)
        check_writable(os.path.dirname(os.path.abspath(out)))
    if verify and out is None:
        raise InputError("--verify writes the pruned models: give --out")
    extra = [t for t in targets if t not in langs]
    singles = [CalibrationMix((lang,), (1.0,)) for lang in langs]
    uniform = CalibrationMix(tuple(langs), (1.0,) * len(langs))
    design = singles + all_pairs(langs) + [uniform]
    # damage on the targets only: the search needs no other (each language costs a product per
    # Linear and mix); the report's table shows the targets
    kw = dict(sweep_kw, predict=True, write=False, pooling="shared", langs=extra,
              damage_langs=targets)  # fmt: skip
    first = sweep(model, method, [], predict_only=design, **kw)
    cache = {}
    for mix, name in zip(design, first.entries, strict=True):
        cache[_shares_key(_shares(mix))] = first.predicted[name]
    seconds = {"design_sweep": first.seconds.get("total", 0.0)}

    def damage(weights: dict[str, float]) -> dict[str, float]:
        key = _shares_key(weights)
        if key not in cache:  # the surrogate's optimum: one more pass
            used = {k: v for k, v in weights.items() if v > 0}
            mix = CalibrationMix(tuple(used), tuple(used.values()))
            again = sweep(model, method, [], predict_only=[mix], **kw)
            cache[key] = again.predicted[again.entries[0]]
            seconds["optimum_sweep"] = again.seconds.get("total", 0.0)
        return cache[key]

    res = optimise_with_surrogate(langs, damage, obj)
    report = _report(res, obj, langs, targets, singles, uniform, cache, sweep_kw)
    staged = staged_output(out, overwrite) if out is not None else contextlib.nullcontext()
    with staged as tmp:
        if verify:
            _verify(report, model, method, tmp / "models", ppl_tokens, ppl_seqlen, sweep_kw,
                    seconds)  # fmt: skip
        seconds["total"] = time.perf_counter() - t0
        report.seconds = seconds
        if tmp is not None:
            (tmp / "optimise.md").write_text(report.markdown())
            (tmp / "optimise.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def _shares(mix: CalibrationMix) -> dict[str, float]:
    total = sum(mix.weights)
    return {lang: w / total for lang, w in zip(mix.langs, mix.weights, strict=True)}


def _report(res: MixResult, obj, langs, targets, singles, uniform, cache, sweep_kw):
    nsamples = sweep_kw.get("nsamples", 128)
    best = res.best
    rec_mix = to_mix({k: v for k, v in best.weights.items() if v > 0}, nsamples)
    single_rows = [(m, cache[_shares_key(_shares(m))]) for m in singles]
    s_mix, s_dmg = min(single_rows, key=lambda r: obj(r[1]))
    u_dmg = cache[_shares_key(_shares(uniform))]
    cands = [
        Candidate("recommended", str(rec_mix), dict(best.damage), best.score),
        Candidate("best single", str(s_mix), dict(s_dmg), obj(s_dmg)),
        Candidate("uniform", str(uniform), dict(u_dmg), obj(u_dmg)),
    ]
    evaluated = [{"shares": p.weights, "damage": p.damage, "score": p.score,
                  "surrogate": p.predicted} for p in res.table]  # fmt: skip
    check = {}
    if res.predicted_best is not None:
        check = {"surrogate_optimum_predicted": res.predicted_best.score,
                 "surrogate_optimum_evaluated": obj(cache[_shares_key(res.predicted_best.weights)])
                 if _shares_key(res.predicted_best.weights) in cache else math.nan}  # fmt: skip
    all_langs = list(dict.fromkeys(list(langs) + list(targets)))
    return OptimiseReport(str(obj), list(targets), all_langs, cands, evaluated, {}, check)


def _verify(report, model, method, models: Path, ppl_tokens, ppl_seqlen, sweep_kw, seconds):
    """Prune the candidates (one sweep, exact pools) into ``models`` and measure their
    held-out perplexity in every language."""
    from polyprune.eval.evaluate import EvalSettings, PplSettings, evaluate_model
    from polyprune.models import load_model

    t0 = time.perf_counter()
    mixes = list({c.mix: CalibrationMix.parse(c.mix) for c in report.candidates}.values())
    ev = EvalSettings(tuple(report.langs), ("ppl",), PplSettings(
        sweep_kw.get("source", "bundled"), ppl_seqlen, ppl_tokens),
        batch_size=sweep_kw.get("batch_size", 8))  # fmt: skip
    ev.check()
    sweep(model, method, mixes, pooling="exact", out=models, **sweep_kw)
    device = sweep_kw.get("device", "cpu")
    measured = {}
    for mix in mixes:
        loaded = load_model(models / mix_dirname(mix), device=device, dtype="float32")
        rows, _ = evaluate_model(loaded.model, loaded.tokenizer, ev, device)
        measured[str(mix)] = {r.lang: r.value for r in rows}
        del loaded
    for c in report.candidates:
        c.measured = measured[c.mix]
    seconds["verify"] = time.perf_counter() - t0
