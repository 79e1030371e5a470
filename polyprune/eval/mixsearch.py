"""``polyprune mix optimise``: the calibration mix that minimises predicted damage on targets.

1. One predict-only sweep (:func:`polyprune.eval.sweep.sweep`, ``shared`` pools: one pool of
   ``nsamples`` windows per candidate language, reweighted) over Scheffé's {N, 2} lattice (the
   N single languages and the N(N-1)/2 equal pairs) and the uniform mix.
2. :func:`polyprune.compress.mixopt.optimise_with_surrogate` fits, per target language, the
   quadratic mixture model of predicted damage against the shares, optimises it on a fine
   lattice, and asks for the predicted damage at its optimum: one more predict-only sweep of
   that one mix.
3. :func:`polyprune.compress.mixopt.local_search` from the best evaluated mix over the mixes
   of ``nsamples`` whole windows (``local_rounds`` predict-only sweeps at most, each of a
   batch of mixes). The recommended mix is the best *evaluated* one (docs/mixes.md says why);
   for ``worst``, near ties (within :data:`NEAR_TIE`) go to the best mean over the targets
   (:func:`polyprune.compress.mixopt.balanced_best`).
4. The report: the recommended mix next to the best single language and the uniform mix, with
   predicted damage per language. ``verify`` then prunes the three (one sweep, ``exact``
   pools: each is the run ``--calib MIX --nsamples N --propagate dense``) and measures their
   held-out perplexity in every language. Every mix measured on all targets (the three, and
   the anchors) is then ranked by the objective over its *measured* perplexities, and the
   report's verdict names the best one: the search's mix if it measured best, otherwise the
   measured mix that beat it, with the margin. A mix measured worse than another one that was
   measured is never left as the answer.

Calibration (default with two or more targets). Damage ranks mixes well *within* a language
but is not comparable *across* languages: on Gemma 3 270M (Wanda, 50%) the same damage 0.020
costs ar a factor e^1.5 in perplexity and en e^1.0, and the languages start from different
dense perplexities (en 21, sw 61). A worst-case objective over raw damage therefore picks the
wrong language to protect. So before the search the anchors (each target alone, and the
uniform mix) are pruned (one sweep, exact pools) and measured on the targets, with the dense
model, and per target ``log(ppl / dense ppl) = a + b * damage`` is fitted over the anchors
(:func:`fit_calibration`; an intercept, because the relation does not pass through zero: a
little damage costs less than the line through the origin says). The search then scores mixes
by predicted log perplexity. Replayed on the 8 mixes of ``scripts/bench_sweep.py`` it picks
the measured best mix for all seven target sets tried, raw damage for three (docs/mixes.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from polyprune.compress.damage import COMBINES
from polyprune.compress.mixopt import (
    MixPoint,
    MixResult,
    balanced_best,
    local_search,
    optimise_with_surrogate,
    parse_objective,
)
from polyprune.data.mix import CalibrationMix, largest_remainder
from polyprune.errors import InputError, shorten
from polyprune.eval.sweep import all_pairs, mix_dirname, sweep
from polyprune.outputs import check_output_dir, check_writable, staged_output

__all__ = [
    "Calibration",
    "Candidate",
    "OptimiseReport",
    "Verdict",
    "fit_calibration",
    "measured_verdict",
    "optimise",
    "to_mix",
]

logger = logging.getLogger(__name__)

# Predictions of ``worst`` this close are near ties (compress.mixopt.balanced_best): 0.005 in log
# perplexity (0.5%) when calibrated, 0.5% of the damage otherwise.
NEAR_TIE = 0.005


@dataclass
class Candidate:
    role: str  # recommended, best single, uniform
    mix: str  # as --calib takes it
    predicted: dict[str, float]  # language -> predicted damage
    score: float  # the objective over the targets (predicted; log perplexity if calibrated)
    measured: dict[str, float] = field(default_factory=dict)  # language -> perplexity
    predicted_ppl: dict[str, float] = field(default_factory=dict)  # calibrated only


@dataclass
class Calibration:
    """Per target ``t``: ``log(ppl_t / dense_t) = offset[t] + slope[t] * damage_t``, fitted on
    the anchors' measured perplexities (:func:`fit_calibration`)."""

    dense: dict[str, float]  # the dense model's perplexity per target
    offset: dict[str, float]
    slope: dict[str, float]
    rms: dict[str, float]  # root-mean-square residual of log perplexity over the anchors
    fit: dict[str, str]  # "affine" | "through origin" | "flat" (fit_calibration says when)
    anchors: list[dict]  # {"mix", "damage": {t: d}, "measured": {t: ppl}}

    def log_ppl(self, damage: dict[str, float]) -> dict[str, float]:
        return {t: math.log(self.dense[t]) + self.offset[t] + self.slope[t] * damage[t]
                for t in self.dense}  # fmt: skip

    def ppl(self, damage: dict[str, float]) -> dict[str, float]:
        return {t: math.exp(v) for t, v in self.log_ppl(damage).items()}


def fit_calibration(
    dense: dict[str, float], anchors: Sequence[tuple[str, dict[str, float], dict[str, float]]]
) -> Calibration:
    """Fit, per language of ``dense``, ``log(ppl / dense) = a + b * damage`` by least squares
    over ``anchors`` ((mix, damage, measured perplexity) triples). The slope must be positive
    (more damage, more perplexity, which is what makes damage usable at all); where the
    affine fit's is not (anchors too close, or noise), the line through the origin is used,
    and where even that is not positive the damage is not informative for that language: the
    objective then sees its mean over the anchors, flat (logged)."""
    offset, slope, rms, how = {}, {}, {}, {}
    for t, d0 in dense.items():
        x = np.array([a[1][t] for a in anchors], dtype=np.float64)
        y = np.array([math.log(a[2][t] / d0) for a in anchors], dtype=np.float64)
        a, b, kind = 0.0, 0.0, "affine"
        if len(x) >= 2 and np.ptp(x) > 0:
            a, b = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)[0]
        if not b > 0:
            kind, a = "through origin", 0.0
            b = float(x @ y / (x @ x)) if x @ x > 0 else 0.0
        if not b > 0:
            kind, a, b = "flat", float(y.mean()), 0.0
            logger.warning("damage does not predict the perplexity of %s on these anchors: "
                           "it enters the objective as a constant", t)  # fmt: skip
        offset[t], slope[t], how[t] = float(a), float(b), kind
        rms[t] = float(np.sqrt(np.mean((a + b * x - y) ** 2)))
    rows = [{"mix": m, "damage": {t: dmg[t] for t in dense}, "measured": {t: p[t] for t in dense}}
            for m, dmg, p in anchors]  # fmt: skip
    return Calibration(dict(dense), offset, slope, rms, how, rows)


@dataclass
class Verdict:
    """Every mix measured on all targets, ranked by the objective over measured perplexity."""

    objective: str
    searched: str  # the search's recommended mix
    best: str  # the best measured mix: the answer
    best_role: str  # its role (recommended, best single, uniform, anchor)
    measured: dict[str, float]  # mix -> objective over its measured target perplexities

    @property
    def margin(self) -> float:
        """Relative excess of the search's mix over the best measured one (0 if it is best)."""
        return self.measured[self.searched] / self.measured[self.best] - 1.0

    def markdown(self) -> str:
        lines = ["", f"### Verdict (measured {self.objective} perplexity over the targets)", ""]
        for mix, v in sorted(self.measured.items(), key=lambda kv: kv[1]):
            lines.append(f"- {mix}: {v:.2f}" + (" (the search's mix)" if mix == self.searched
                                                 else ""))  # fmt: skip
        if self.best == self.searched:
            lines += ["", f"**Use {self.best}**: the search's mix measured best."]
        else:
            lines += ["", f"**Use {self.best}** ({self.best_role}): the search's mix "
                      f"{self.searched} measured {100 * self.margin:.2f}% higher."]  # fmt: skip
        return "\n".join(lines)


def measured_verdict(report: OptimiseReport, measured: dict[str, dict[str, float]]) -> Verdict:
    """Rank every mix in ``measured`` that has all targets (not the dense model) by the
    report's objective applied to log perplexity (worst: the highest target perplexity; mean:
    their geometric mean; weighted: the weighted geometric mean) and name the best. Ties go
    to the search's mix, then to the candidates' order."""
    obj = parse_objective(report.objective, report.targets)
    roles = {c.mix: c.role for c in report.candidates}
    order = [c.mix for c in report.candidates] + sorted(m for m in measured if m not in roles)
    scores = {}
    for mix in order:
        ppl = measured.get(mix, {})
        if mix == "dense" or any(t not in ppl for t in report.targets):
            continue
        scores[mix] = math.exp(obj({t: math.log(ppl[t]) for t in report.targets}))
    searched = report.candidates[0].mix
    best = min(scores, key=lambda m: (scores[m], m != searched))
    return Verdict(str(obj), searched, best, roles.get(best, "anchor"), scores)


@dataclass
class OptimiseReport:
    objective: str
    targets: list[str]
    langs: list[str]
    candidates: list[Candidate]
    evaluated: list[dict]  # every mix whose damage was predicted
    seconds: dict[str, float]
    surrogate_check: dict[str, float] = field(default_factory=dict)
    calibration: Calibration | None = None
    dense: dict[str, float] = field(default_factory=dict)  # measured, with --verify
    verdict: Verdict | None = None  # with --verify
    searched: dict[str, int] = field(default_factory=dict)  # mixes evaluated, per stage
    near_ties: list[str] = field(default_factory=list)  # worst: mixes predicted within NEAR_TIE

    def markdown(self) -> str:
        cols = self.targets + [lang for lang in self.langs if lang not in self.targets]
        cal = self.calibration
        score = f"{self.objective} (ppl)" if cal else str(self.objective)
        head = "| mix | role | " + " | ".join(cols) + f" | {score} |"
        lines = [f"### Predicted damage (targets {', '.join(self.targets)}; lower is better)", ""]
        if self.searched:
            lines += [
                "Mixes evaluated: "
                + ", ".join(f"{n} {stage}" for stage, n in self.searched.items()),
                "",
            ]
        if len(self.near_ties) > 1:
            lines += [f"Near ties (predicted within {100 * NEAR_TIE:g}% of the best "
                      f"{self.objective}; recommended: the best mean over the targets): "
                      f"{', '.join(self.near_ties)}", ""]  # fmt: skip
        lines += [head, "|---|---|" + "---:|" * (len(cols) + 1)]  # fmt: skip
        for c in self.candidates:
            vals = " | ".join(_f(c.predicted.get(lang)) for lang in cols)
            s = _f(math.exp(c.score), ".2f") if cal else _f(c.score)
            lines.append(f"| {c.mix} | {c.role} | {vals} | {s} |")
        if cal:
            ts = self.targets
            lines += ["", "### Predicted perplexity (calibrated on the anchors)", "",
                      "| mix | role | " + " | ".join(ts) + f" | {self.objective} |",
                      "|---|---|" + "---:|" * (len(ts) + 1)]  # fmt: skip
            for c in self.candidates:
                vals = " | ".join(_f(c.predicted_ppl.get(t), ".2f") for t in ts)
                lines.append(f"| {c.mix} | {c.role} | {vals} | {_f(math.exp(c.score), '.2f')} |")
            lines += ["", "### Calibration: log(ppl / dense) = a + b * damage, per target", "",
                      "| target | dense ppl | a | b | fit | rms (log ppl) "
                      "| anchors: damage -> ppl |",
                      "|---|---:|---:|---:|---|---:|---|"]  # fmt: skip
            for t in ts:
                pts = "; ".join(f"{a['mix']}: {a['damage'][t]:.4f} -> {a['measured'][t]:.1f}"
                                for a in cal.anchors)  # fmt: skip
                fit = f"{cal.offset[t]:.3f} | {cal.slope[t]:.1f} | {cal.fit[t]} | {cal.rms[t]:.3f}"
                lines.append(f"| {t} | {cal.dense[t]:.2f} | {fit} | {pts} |")
        if any(c.measured for c in self.candidates):
            lines += ["", "### Measured held-out perplexity (--verify; worst over targets)", "",
                      "| mix | role | " + " | ".join(cols) + " | worst target |",
                      "|---|---|" + "---:|" * (len(cols) + 1)]  # fmt: skip
            rows = [(c.mix, c.role, c.measured) for c in self.candidates]
            if self.dense:
                rows.append(("(dense)", "unpruned", self.dense))
            for mix, role, measured in rows:
                vals = " | ".join(_f(measured.get(lang), ".2f") for lang in cols)
                worst = max(measured.get(t, math.nan) for t in self.targets)
                lines.append(f"| {mix} | {role} | {vals} | {_f(worst, '.2f')} |")
        if self.verdict is not None:
            lines.append(self.verdict.markdown())
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
    calibrate: bool | None = None,
    ppl_tokens: int | None = 4096,
    ppl_seqlen: int | None = 512,
    local_rounds: int = 4,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    **sweep_kw,
) -> OptimiseReport:
    """Search the mix of ``langs`` minimising the predicted damage ``objective`` on
    ``targets`` (module docstring); ``calibrate`` (default: with two or more targets) scores
    predicted perplexity instead. ``local_rounds``: of the local search over whole windows
    after the surrogate (0: none). ``sweep_kw``: :func:`polyprune.eval.sweep.sweep`'s method,
    calibration and placement settings. Writes ``out`` (report; the anchors' and, with
    ``verify``, the candidates' pruned models) if given."""
    t0 = time.perf_counter()
    langs, targets = list(dict.fromkeys(langs)), list(dict.fromkeys(targets))
    if len(langs) < 2:
        raise InputError(f"--langs needs at least two candidate languages, got {','.join(langs)}")
    if sweep_kw.get("damage_combine", "block") not in COMBINES:
        raise InputError(f"unknown damage combination {shorten(str(sweep_kw['damage_combine']))}"
                         f"; allowed: {', '.join(COMBINES)}")  # fmt: skip
    if not isinstance(local_rounds, int) or local_rounds < 0:
        raise InputError(f"--local-rounds must be an integer >= 0, got {local_rounds}")
    obj = parse_objective(objective, targets)
    calibrate = len(targets) >= 2 if calibrate is None else calibrate
    if out is not None:
        check_output_dir(out, overwrite)
        check_writable(os.path.dirname(os.path.abspath(out)))
    if verify and out is None:
        raise InputError("--verify writes the pruned models: give --out")
    # checked before any work, and only when perplexity will be measured
    evs = (
        _eval_settings(langs, targets, ppl_tokens, ppl_seqlen, sweep_kw)
        if (verify or calibrate)
        else None
    )
    singles = [CalibrationMix((lang,), (1.0,)) for lang in langs]
    uniform = CalibrationMix(tuple(langs), (1.0,) * len(langs))
    design = singles + all_pairs(langs) + [uniform]
    # damage on the targets only: the search needs no other (each language costs a product per
    # Linear and mix); the report's table shows the targets. ``langs=targets`` gives every
    # target a pool even in a sweep of one mix that leaves it out (the surrogate's optimum).
    kw = dict(sweep_kw, predict=True, write=False, pooling="shared", langs=targets,
              damage_langs=targets)  # fmt: skip
    staged = staged_output(out, overwrite) if out is not None else _scratch(sweep_kw)
    with staged as tmp:
        first = sweep(model, method, [], predict_only=design, **kw)
        cache = {}
        for mix, name in zip(design, first.entries, strict=True):
            cache[_shares_key(_shares(mix))] = first.predicted[name]
        seconds = {"design_sweep": first.seconds.get("total", 0.0)}
        measured: dict[str, dict[str, float]] = {}  # mix (or "dense") -> lang -> perplexity
        cal = None
        if calibrate:
            cal = _calibrate(model, method, langs, targets, tmp / "anchors", evs, measured,
                             sweep_kw, seconds)  # fmt: skip
            obj = obj.calibrated({t: math.log(cal.dense[t]) + cal.offset[t] for t in targets},
                                 cal.slope)  # fmt: skip

        def damage(weights: dict[str, float]) -> dict[str, float]:
            key = _shares_key(weights)
            if key not in cache:  # the surrogate's optimum: one more pass
                used = {k: v for k, v in weights.items() if v > 0}
                mix = CalibrationMix(tuple(used), tuple(used.values()))
                again = sweep(model, method, [], predict_only=[mix], **kw)
                cache[key] = again.predicted[again.entries[0]]
                seconds["optimum_sweep"] = again.seconds.get("total", 0.0)
            return cache[key]

        def damage_many(many: list[dict[str, float]]) -> list[dict[str, float]]:
            todo = {}
            for w in many:
                used = {k: v for k, v in w.items() if v > 0}
                if _shares_key(used) not in cache:
                    todo[_shares_key(used)] = CalibrationMix(tuple(used), tuple(used.values()))
            if todo:  # one pass for the whole batch
                t1 = time.perf_counter()
                again = sweep(model, method, [], predict_only=list(todo.values()), **kw)
                for key, name in zip(todo, again.entries, strict=True):
                    cache[key] = again.predicted[name]
                seconds["local_search"] = seconds.get("local_search", 0.0) + (
                    time.perf_counter() - t1
                )
            return [cache[_shares_key(w)] for w in many]

        res = optimise_with_surrogate(langs, damage, obj)
        searched = {"design": len(design), "surrogate optimum": res.evaluations - len(design)}
        if local_rounds:
            local = local_search(
                langs,
                damage_many,
                obj,
                res.best.weights,
                sweep_kw.get("nsamples", 128),
                receivers=[t for t in targets if t in langs],
                rounds=local_rounds,
            )
            res = _merge(res, local)
            searched["local search"] = res.evaluations - sum(searched.values())
        # near ties of ``worst`` go to the better mean over the targets (balanced_best)
        tol = NEAR_TIE if calibrate else NEAR_TIE * abs(res.best.score)
        pick, near = balanced_best(res.table, obj, tol)
        if pick is not res.best:
            logger.info("%d mixes predicted within %.1f%% of the best worst case; the one with "
                        "the best mean over the targets: %s", len(near), 100 * NEAR_TIE,
                        {k: v for k, v in pick.weights.items() if v})  # fmt: skip
            res = replace(res, best=pick)
        report = _report(res, obj, langs, targets, singles, uniform, cache, sweep_kw)
        report.calibration = cal
        report.searched = searched
        nsamples = sweep_kw.get("nsamples", 128)
        report.near_ties = list(
            dict.fromkeys(
                str(to_mix({k: v for k, v in p.weights.items() if v > 0}, nsamples)) for p in near
            )
        )
        if cal is not None:
            for c in report.candidates:
                c.predicted_ppl = cal.ppl(c.predicted)
        if verify:
            _verify(report, model, method, tmp, evs, measured, sweep_kw, seconds)
        seconds["total"] = time.perf_counter() - t0
        report.seconds = seconds
        if out is not None:
            (tmp / "optimise.md").write_text(report.markdown())
            (tmp / "optimise.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def _merge(res: MixResult, local: MixResult) -> MixResult:
    """The surrogate's result with the local search's points added (the surrogate's prediction
    beside each), best first."""
    seen = {_shares_key(p.weights) for p in res.table}
    extra = [MixPoint(p.weights, p.damage, p.score, res.surrogate(p.weights) if res.surrogate
                      else None)
             for p in local.table if _shares_key(p.weights) not in seen]  # fmt: skip
    table = sorted(res.table + extra, key=lambda p: p.score)
    logger.info("local search: %d more mixes evaluated; best %s (score %.4g; the surrogate "
                "stage's best %.4g)", len(extra), {k: v for k, v in table[0].weights.items() if v},
                table[0].score, res.best.score)  # fmt: skip
    return replace(res, best=table[0], table=table, evaluations=res.evaluations + len(extra))


def _scratch(sweep_kw):
    """Where the anchors go when there is no ``out``: removed afterwards."""
    return _TempPath(tempfile.TemporaryDirectory(prefix="polyprune-mix-",
                                                 dir=sweep_kw.get("offload_dir")))  # fmt: skip


class _TempPath:
    def __init__(self, tmp: tempfile.TemporaryDirectory):
        self.tmp = tmp

    def __enter__(self) -> Path:
        return Path(self.tmp.__enter__())

    def __exit__(self, *exc):
        return self.tmp.__exit__(*exc)


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


def _eval_settings(langs, targets, ppl_tokens, ppl_seqlen, sweep_kw):
    """Held-out perplexity settings, checked before any work: every language (for --verify)."""
    from polyprune.eval.evaluate import EvalSettings, PplSettings

    every = tuple(dict.fromkeys(list(targets) + list(langs)))
    ppl = PplSettings(sweep_kw.get("source", "bundled"), ppl_seqlen, ppl_tokens)
    ev = EvalSettings(every, ("ppl",), ppl, batch_size=sweep_kw.get("batch_size", 8))
    ev.check()
    return ev


def _measure(spec, wanted: Sequence[str], evs, measured: dict, key: str, device: str) -> None:
    """Held-out perplexity of the model at ``spec`` in the ``wanted`` languages not yet in
    ``measured[key]`` (anchors are measured on the targets first, --verify adds the rest)."""
    from polyprune.eval.evaluate import evaluate_model
    from polyprune.models import load_model

    have = measured.setdefault(key, {})
    todo = tuple(lang for lang in wanted if lang not in have)
    if not todo:
        return
    loaded = load_model(spec, device=device, dtype="float32")
    rows, _ = evaluate_model(loaded.model, loaded.tokenizer, replace(evs, langs=todo), device)
    have.update({r.lang: r.value for r in rows})


def _calibrate(model, method, langs, targets, anchors_dir: Path, evs, measured, sweep_kw,
               seconds) -> Calibration:  # fmt: skip
    """Prune the anchors (each target that is a candidate language, alone, and the uniform
    mix; one sweep, exact pools, damage predicted on the targets), measure them and the dense
    model on the targets, and fit :func:`fit_calibration`."""
    t0 = time.perf_counter()
    device = sweep_kw.get("device", "cpu")
    mixes = [CalibrationMix((t,), (1.0,)) for t in targets if t in langs]
    mixes.append(CalibrationMix(tuple(langs), (1.0,) * len(langs)))
    res = sweep(model, method, mixes, pooling="exact", predict=True, damage_langs=targets,
                out=anchors_dir, **sweep_kw)  # fmt: skip
    _measure(model, targets, evs, measured, "dense", device)
    anchors = []
    for mix, name in zip(mixes, res.entries, strict=True):
        _measure(anchors_dir / mix_dirname(mix), targets, evs, measured, str(mix), device)
        anchors.append((str(mix), res.predicted[name], measured[str(mix)]))
    cal = fit_calibration({t: measured["dense"][t] for t in targets}, anchors)
    seconds["calibration"] = time.perf_counter() - t0
    fits = ", ".join(f"{t} b={cal.slope[t]:.0f} rms={cal.rms[t]:.3f}" for t in targets)
    logger.info("calibrated on %d anchors in %.0f s: %s", len(anchors), seconds["calibration"],
                fits)  # fmt: skip
    return cal


def _verify(report, model, method, root: Path, evs, measured, sweep_kw, seconds):
    """Prune the candidates not pruned as anchors (one sweep, exact pools) into
    ``root/models`` and measure every candidate and the dense model in every language."""
    t0 = time.perf_counter()
    device = sweep_kw.get("device", "cpu")
    mixes = list({c.mix: CalibrationMix.parse(c.mix) for c in report.candidates}.values())
    anchored = {a["mix"] for a in report.calibration.anchors} if report.calibration else set()
    new = [m for m in mixes if str(m) not in anchored]
    if new:
        sweep(model, method, new, pooling="exact", out=root / "models", **sweep_kw)
    for mix in mixes:
        where = root / ("anchors" if str(mix) in anchored else "models") / mix_dirname(mix)
        _measure(where, report.langs, evs, measured, str(mix), device)
    _measure(model, report.langs, evs, measured, "dense", device)
    for c in report.candidates:
        c.measured = dict(measured[c.mix])
    report.dense = dict(measured["dense"])
    report.verdict = measured_verdict(report, measured)
    if report.verdict.best != report.verdict.searched:
        logger.warning("the search's mix %s measured %.2f%% above %s: the verdict is %s",
                       report.verdict.searched, 100 * report.verdict.margin,
                       report.verdict.best, report.verdict.best)  # fmt: skip
    seconds["verify"] = time.perf_counter() - t0
