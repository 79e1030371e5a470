"""The calibration mix that minimises predicted damage on target languages.

A mix is a point of the simplex over the candidate languages (token shares summing to 1). Its
damage is a callback, ``mix shares -> {language: damage}``, so it can be backed by re-solving
the model with the mix (:mod:`polyprune.compress.damage`, expensive) or by a fitted model. The
objective over the target languages is ``worst`` (max), ``mean`` or ``weighted:de=2,sw=1``
(weighted mean); damages should be comparable across languages (relative errors, or perplexity
over the dense model's), since ``worst`` compares them directly.

Two searches:

* :func:`optimise_mix`, direct search on the callback: every point of the simplex lattice of
  resolution ``G`` (all compositions of ``G`` into N parts, ``C(G+N-1, N-1)`` points), then
  from the best one pairwise moves ``+h e_i - h e_j`` (mass moved from one language to
  another), steepest first, until none improves, at ``h = 1/(2G), 1/(4G), ...`` (``refine``
  halvings). Where no single move improves, pairs of moves are tried: the worst-case objective
  is a max of functions and has ridges along which no single exchange descends. Every
  evaluation is memoised on the finest lattice, so the count in the result is what the
  callback cost.
* :func:`local_search`, on the mixes a run can have: ``W`` calibration windows split in whole
  windows between the languages. From a start (the surrogate's pick), each round evaluates in
  one batch (one predict-only sweep) every mix reached by moving 1 or 2 windows from one
  language of the mix to another language of the mix or to a target, takes the best and
  repeats; where no such move improves, one round tries pairs of one-window moves (the ridges
  of ``worst``, as above), and it stops when those do not improve either. Why it is needed: the
  quadratic is fitted at shares 0, 1/2 and 1, and damage is steepest at small shares (a
  language's first windows of its own), where the fit is worst; on Gemma 3 270M, {de, sw}, the
  surrogate picked en:3,sw:13 while de:3,sw:13 had less damage on de and the same on sw
  (docs/results.md).
* :func:`optimise_with_surrogate`, the cheap one (what ``mix optimise`` should use when each
  evaluation is a solve): evaluate the callback on Scheffé's ``{N, 2}`` simplex lattice (the N
  single languages and the N(N-1)/2 equal pairs: for the paper's seven languages, the 28
  two-language mixes a sweep writes anyway) and the uniform mix, fit per target language
  Scheffé's quadratic mixture model

      d_l(w) = sum_k b_k w_k + sum_{i<j} b_ij w_i w_j,

  optimise the fitted model with :func:`optimise_mix` on a fine lattice, then evaluate the
  callback at the recommended mix. The quadratic is chosen because it is the smallest model
  with pairwise interactions (a language's damage can depend on which other languages share the
  budget: cross-lingual transfer, which a per-language scaling law of its own share alone
  cannot express), it is linear in its parameters (least squares, no nonlinear fit to fail),
  its N(N+1)/2 parameters are fixed exactly by the {N, 2} lattice, and any convex quadratic
  ``sum_k A_k (w_k - w*_k)^2 + c`` is one (on the simplex ``w_k^2 = w_k - sum_{j!=k} w_k w_j``).
  The uniform mix is the check: its predicted damage beside the evaluated one is the model's
  error away from the lattice, and so is the recommended mix's. The result is the best
  *evaluated* mix, so a poor fit costs one wasted evaluation, not a wrong recommendation.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from polyprune.errors import InputError, cut, shorten

__all__ = [
    "OBJECTIVES",
    "DamageFn",
    "MixPoint",
    "MixResult",
    "Objective",
    "Surrogate",
    "BatchDamageFn",
    "balanced_best",
    "compositions",
    "fit_surrogate",
    "local_search",
    "optimise_mix",
    "optimise_with_surrogate",
    "parse_objective",
    "scheffe_lattice",
    "simplex_grid",
]

logger = logging.getLogger(__name__)

OBJECTIVES = ("worst", "mean", "weighted")
ObjectiveKind = Literal["worst", "mean", "weighted"]
DamageFn = Callable[[dict[str, float]], Mapping[str, float]]
# Many mixes at once: a sweep predicts any number of mixes from one pass over the model.
BatchDamageFn = Callable[[list[dict[str, float]]], Sequence[Mapping[str, float]]]
# The surrogate's lattice is as fine as keeps it to about this many points (N = 7: G = 20).
_SURROGATE_POINTS = 250_000
_MAX_RESOLUTION = 64  # with 4 halvings, shares to 1/1024: finer than any mix is measured


@dataclass(frozen=True)
class Objective:
    """What a mix is scored by: ``worst`` | ``mean`` | ``weighted`` damage over ``targets``."""

    kind: ObjectiveKind
    targets: tuple[str, ...]
    weights: tuple[float, ...] = ()  # one per target, for ``weighted``
    # Per-target affine map from damage to what is scored (``calibrated``): empty = damage.
    offsets: tuple[float, ...] = ()
    slopes: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise InputError(
                f"unknown objective {shorten(self.kind)}; allowed: worst, mean, weighted"
            )
        if not self.targets:
            raise InputError("an objective needs at least one target language")
        if self.kind == "weighted" and len(self.weights) != len(self.targets):
            raise InputError("a weighted objective needs one weight per target language")
        calibrated = len(self.offsets), len(self.slopes)
        if calibrated != (0, 0) and calibrated != (len(self.targets),) * 2:
            raise ValueError("a calibrated objective needs one offset and slope per target")

    def calibrated(self, offsets: Mapping[str, float], slopes: Mapping[str, float]) -> Objective:
        """The objective over ``offsets[t] + slopes[t] * damage[t]`` instead of the damage: with
        the fits of :func:`polyprune.eval.mixsearch.fit_calibration`, predicted log perplexity,
        which unlike damage is comparable across languages."""
        return replace(self, offsets=tuple(float(offsets[t]) for t in self.targets),
                       slopes=tuple(float(slopes[t]) for t in self.targets))  # fmt: skip

    def score_array(self, D: np.ndarray) -> np.ndarray:
        """Scores of damages ``D`` (m, targets) in ``targets`` order: (m,)."""
        if self.slopes:
            D = np.asarray(self.offsets) + np.asarray(self.slopes) * D
        if self.kind == "worst":
            return D.max(axis=1)
        if self.kind == "mean":
            return D.mean(axis=1)
        w = np.asarray(self.weights, dtype=np.float64)
        return D @ (w / w.sum())

    def __call__(self, damage: Mapping[str, float]) -> float:
        missing = [t for t in self.targets if t not in damage]
        if missing:
            raise ValueError(f"damage has no value for target {', '.join(missing)}")
        row = np.array([[float(damage[t]) for t in self.targets]])
        return float(self.score_array(row)[0])

    def __str__(self) -> str:
        if self.kind != "weighted":
            return self.kind
        pairs = zip(self.targets, self.weights, strict=True)
        return "weighted:" + ",".join(f"{t}={w:g}" for t, w in pairs)


def parse_objective(spec: str, targets: Sequence[str] | None = None) -> Objective:
    """``worst`` | ``mean`` | ``weighted:de=2,sw=1`` over ``targets`` (a weighted objective
    names each target once; without ``targets`` its languages are the targets)."""
    allowed = "allowed: worst, mean, weighted:LANG=WEIGHT,..."
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"empty objective; {allowed}")
    kind, sep, rest = spec.strip().partition(":")
    if kind in ("worst", "mean") and not sep:
        if not targets:
            raise InputError(f"objective {kind} needs target languages")
        return Objective(kind, tuple(targets))
    if kind != "weighted":
        raise InputError(f"unknown objective {shorten(spec)}; {allowed}")
    if not rest.strip():
        raise InputError(f"objective {shorten(spec)} names no weights; expected weighted:de=2,sw=1")
    weights: dict[str, float] = {}
    for part in rest.split(","):
        lang, eq, w = (s.strip() for s in part.partition("="))
        if not eq or not lang:
            raise InputError(f"objective weight {shorten(part.strip())} is not LANG=WEIGHT")
        try:
            value = float(w)
        except ValueError:
            raise InputError(f"objective weight {shorten(w)} of {lang} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise InputError(f"objective weight of {lang} must be > 0 and finite, got {shorten(w)}")
        if lang in weights:
            raise InputError(f"objective names {lang} twice")
        if targets is not None and lang not in targets:
            raise InputError(
                f"objective weights {lang}, which is not a target ({', '.join(targets)})"
            )
        weights[lang] = value
    order = tuple(targets) if targets is not None else tuple(weights)
    missing = [t for t in order if t not in weights]
    if missing:
        raise InputError(f"objective {cut(spec)} has no weight for target {', '.join(missing)}")
    return Objective("weighted", order, tuple(weights[t] for t in order))


def compositions(total: int, parts: int) -> np.ndarray:
    """All ways to write ``total`` as ``parts`` non-negative integers, (count, parts), in
    lexicographic order of the bars (stars and bars); first ones put the mass on the last part."""
    if parts < 1 or total < 0:
        raise ValueError(f"need parts >= 1 and total >= 0, got {parts}, {total}")
    if parts == 1:
        return np.array([[total]], dtype=np.int64)
    bars = np.array(list(itertools.combinations(range(total + parts - 1), parts - 1)), np.int64)
    edges = np.concatenate(
        [np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), total + parts - 1)], axis=1
    )
    return np.diff(edges, axis=1) - 1


def simplex_grid(n: int, resolution: int) -> np.ndarray:
    """The simplex lattice of resolution ``G`` over ``n`` languages: shares (count, n)."""
    return compositions(resolution, n) / resolution


def scheffe_lattice(n: int) -> np.ndarray:
    """Scheffé's {n, 2} lattice: the n vertices and the n(n-1)/2 edge midpoints, (count, n)."""
    return simplex_grid(n, 2)


@dataclass(frozen=True)
class MixPoint:
    """One mix: its shares, its damage per language and its score (lower is better);
    ``predicted``: the surrogate's damage there, where one was fitted."""

    weights: dict[str, float]
    damage: dict[str, float]
    score: float
    predicted: dict[str, float] | None = None


@dataclass
class MixResult:
    """The best evaluated mix and every evaluated one (``table``, best first)."""

    best: MixPoint
    table: list[MixPoint]
    objective: Objective
    resolution: int  # the finest lattice searched
    evaluations: int  # calls of the damage callback
    surrogate: Surrogate | None = field(default=None, repr=False)
    predicted_best: MixPoint | None = None  # the surrogate's optimum, as it predicted it


def _moves(n: int, pairs: int) -> np.ndarray:
    """Directions ``sum of `pairs` moves e_i - e_j`` (i != j), distinct and non-zero: (k, n)."""
    single = [np.eye(n, dtype=np.int64)[i] - np.eye(n, dtype=np.int64)[j]
              for i in range(n) for j in range(n) if i != j]  # fmt: skip
    if pairs == 1:
        return np.array(single, dtype=np.int64).reshape(-1, n)
    combos = {tuple(a + b) for a, b in itertools.combinations(single, 2)}
    combos -= {tuple(s) for s in single} | {(0,) * n}
    return np.array(sorted(combos), dtype=np.int64).reshape(-1, n)


def _search(
    n: int, resolution: int, refine: int, score: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, int]:
    """The best lattice point found (integer counts at the finest resolution) and that
    resolution. ``score`` maps counts (m, n) at the finest resolution to scores (m,)."""
    scale = 2**refine
    grid = compositions(resolution, n) * scale
    best = grid[int(np.argmin(score(grid)))]
    best_score = float(score(best[None])[0])
    singles, doubles = _moves(n, 1), _moves(n, 2) if n > 2 else np.zeros((0, n), np.int64)
    for level in range(1, refine + 1):
        step = 2 ** (refine - level)
        while True:
            moved = False
            for moves in (singles, doubles):
                cand = best + step * moves
                cand = cand[(cand >= 0).all(axis=1)]
                if not len(cand):
                    continue
                s = score(cand)
                i = int(np.argmin(s))
                if s[i] < best_score:
                    best, best_score, moved = cand[i], float(s[i]), True
                    break  # steepest single move first; pairs only when none improves
            if not moved:
                break
    return best, resolution * scale


def _check_langs(langs: Sequence[str]) -> tuple[str, ...]:
    langs = tuple(langs)
    if not langs or len(set(langs)) != len(langs):
        raise InputError(f"mix languages must be distinct and at least one, got {cut(str(langs))}")
    return langs


class _Memo:
    """The damage callback, called once per lattice point (keys: counts at the finest level)."""

    def __init__(self, langs: tuple[str, ...], damage: DamageFn, objective: Objective, total: int):
        self.langs, self.damage, self.objective, self.total = langs, damage, objective, total
        self.points: dict[tuple[int, ...], MixPoint] = {}

    def point(self, counts: Sequence[int]) -> MixPoint:
        key = tuple(int(c) for c in counts)
        if key not in self.points:
            weights = {lang: c / self.total for lang, c in zip(self.langs, key, strict=True)}
            damage = {k: float(v) for k, v in self.damage(dict(weights)).items()}
            self.points[key] = MixPoint(weights, damage, self.objective(damage))
        return self.points[key]

    def scores(self, counts: np.ndarray) -> np.ndarray:
        return np.array([self.point(c).score for c in counts])

    def table(self) -> list[MixPoint]:
        return sorted(self.points.values(), key=lambda p: p.score)


def balanced_best(
    points: Sequence[MixPoint], objective: Objective, tolerance: float
) -> tuple[MixPoint, list[MixPoint]]:
    """The best of ``points``; for ``worst``, among those whose score is within ``tolerance``
    of the best (near ties), the one with the lowest mean over the targets (same per-target
    map as the objective; ties then go to the lower score). Also returns the near ties.

    Why: ``worst`` sees only the binding target. On Gemma 3 270M, {de, sw}, Swahili binds for
    every mix that is mostly Swahili, and ``de:1,sw:15`` and ``sw:15,zh:1`` were predicted
    0.05% apart on Swahili, far below what a measurement resolves (Swahili perplexity moves by
    4% between 15 and 16 of its own windows), while on German they differ by 30%. Among
    predictions that close, the better mean is what a user wants."""
    if not points:
        raise ValueError("no points to choose from")
    best = min(points, key=lambda p: p.score)
    if objective.kind != "worst":
        return best, [best]
    near = [p for p in points if p.score <= best.score + tolerance]
    mean = replace(objective, kind="mean")
    return min(near, key=lambda p: (mean(p.damage), p.score)), near


def optimise_mix(
    langs: Sequence[str],
    damage: DamageFn,
    objective: Objective,
    resolution: int = 4,
    refine: int = 3,
) -> MixResult:
    """Direct search (module docstring): lattice of ``resolution``, then ``refine`` halvings
    of the step with pairwise moves. ``damage`` gets ``{lang: share}`` (all languages, zeros
    included) and returns at least the objective's targets."""
    langs = _check_langs(langs)
    if resolution < 1 or refine < 0:
        raise InputError(f"resolution must be >= 1 and refine >= 0, got {resolution}, {refine}")
    memo = _Memo(langs, damage, objective, resolution * 2**refine)
    best, finest = _search(len(langs), resolution, refine, memo.scores)
    table = memo.table()
    return MixResult(memo.point(best), table, objective, finest, len(table))


def _window_moves(
    counts: np.ndarray, receivers: np.ndarray, steps: Sequence[int], pairs: bool = False
) -> np.ndarray:
    """Every mix reached from ``counts`` (n,) by moving ``s`` windows (s in ``steps``) from a
    language that has them to another language that is in the mix or a receiver; with
    ``pairs``, by two such moves of one window each instead: (k, n), without ``counts``."""
    n = len(counts)
    allowed = (counts > 0) | receivers
    single = [(i, j) for i in range(n) for j in range(n)
              if i != j and counts[i] > 0 and allowed[j]]  # fmt: skip
    eye = np.eye(n, dtype=np.int64)
    if pairs:
        out = [counts - eye[i] + eye[j] - eye[k] + eye[m]
               for (i, j), (k, m) in itertools.combinations(single, 2)]  # fmt: skip
    else:
        out = [counts + s * (eye[j] - eye[i]) for s in steps for i, j in single]
    out = [c for c in out if (c >= 0).all() and (c != counts).any()]
    return np.unique(np.array(out, dtype=np.int64).reshape(-1, n), axis=0)


def local_search(
    langs: Sequence[str],
    damage_many: BatchDamageFn,
    objective: Objective,
    start: Mapping[str, float],
    windows: int,
    receivers: Sequence[str] = (),
    rounds: int = 4,
    steps: Sequence[int] = (1, 2),
) -> MixResult:
    """Steepest descent over the mixes of ``windows`` whole windows (module docstring).
    ``start``: shares, rounded to windows (largest remainder); ``receivers``: languages a
    window may move to although the mix has none of them (the targets). Each round is one
    ``damage_many`` call with the mixes not yet evaluated; at most ``rounds`` rounds. The
    result holds the points this search evaluated, best first."""
    from polyprune.data.mix import largest_remainder

    langs = _check_langs(langs)
    if windows < 1 or rounds < 1 or not steps or min(steps) < 1:
        raise InputError(f"need windows >= 1, rounds >= 1 and steps >= 1, got {windows}, "
                         f"{rounds}, {tuple(steps)}")  # fmt: skip
    unknown = [r for r in receivers if r not in langs]
    if unknown:
        raise InputError(
            f"receiver {', '.join(unknown)} is not a mix language ({', '.join(langs)})"
        )
    if not any(start.get(lang, 0.0) > 0 for lang in langs):
        raise InputError(f"the start of a local search has no positive share: {cut(str(start))}")
    recv = np.array([lang in receivers for lang in langs])
    points: dict[tuple[int, ...], MixPoint] = {}

    def evaluate(cands: np.ndarray) -> None:
        keys = dict.fromkeys(tuple(int(x) for x in c) for c in cands)
        todo = [k for k in keys if k not in points]
        if not todo:
            return
        shares = [{lang: c / windows for lang, c in zip(langs, key, strict=True)} for key in todo]
        for key, w, d in zip(todo, shares, damage_many([dict(w) for w in shares]), strict=True):
            dmg = {k: float(v) for k, v in d.items()}
            points[key] = MixPoint(w, dmg, objective(dmg))

    current = np.array(largest_remainder([max(start.get(lang, 0.0), 0.0) for lang in langs],
                                         windows), dtype=np.int64)  # fmt: skip
    cur_key = tuple(int(x) for x in current)
    evaluate(np.concatenate([current[None], _window_moves(current, recv, steps)]))
    pairs = False  # the last round tried pairs of moves
    for _ in range(rounds - 1):
        # ties stay put: a move must improve to be taken
        key = min(points, key=lambda k: (points[k].score, k != cur_key))
        if key == cur_key and pairs:
            break
        # where no single move improves, pairs of one-window moves: ``worst`` is a max over
        # targets and has ridges along which only a move serving two targets at once descends
        pairs = key == cur_key
        cur_key = key
        evaluate(_window_moves(np.array(key), recv, steps, pairs))
    best_key = min(points, key=lambda k: (points[k].score, k != cur_key))
    table = sorted(points.values(), key=lambda p: p.score)
    return MixResult(points[best_key], table, objective, windows, len(table))


@dataclass(frozen=True)
class Surrogate:
    """Scheffé's quadratic mixture model per target language (module docstring)."""

    langs: tuple[str, ...]  # the mix's languages: the model's variables
    targets: tuple[str, ...]
    coef: np.ndarray  # (features, targets): b_k then b_ij (i < j)

    @staticmethod
    def features(S: np.ndarray) -> np.ndarray:
        """[w_k for k] + [w_i w_j for i < j]: (m, n + n(n-1)/2) from shares S (m, n)."""
        i, j = np.triu_indices(S.shape[1], k=1)
        return np.concatenate([S, S[:, i] * S[:, j]], axis=1)

    def predict(self, S: np.ndarray) -> np.ndarray:
        """Damage of each target at shares S (m, n): (m, targets)."""
        return self.features(np.asarray(S, dtype=np.float64)) @ self.coef

    def __call__(self, weights: Mapping[str, float]) -> dict[str, float]:
        S = np.array([[weights.get(lang, 0.0) for lang in self.langs]])
        return dict(zip(self.targets, self.predict(S)[0].tolist(), strict=True))


def fit_surrogate(
    langs: Sequence[str], targets: Sequence[str], points: Sequence[MixPoint]
) -> Surrogate:
    """Least-squares fit of the quadratic mixture model to evaluated points."""
    langs, targets = tuple(langs), tuple(targets)
    nfeat = len(langs) * (len(langs) + 1) // 2
    S = np.array([[p.weights.get(lang, 0.0) for lang in langs] for p in points])
    F = Surrogate.features(S)
    if len(points) < nfeat or np.linalg.matrix_rank(F) < nfeat:
        raise InputError(
            f"the quadratic mixture model of {len(langs)} languages needs {nfeat} evaluated "
            f"mixes spanning it (e.g. the single languages and equal pairs), got {len(points)}"
        )
    Y = np.array([[p.damage[t] for t in targets] for p in points])
    coef, *_ = np.linalg.lstsq(F, Y, rcond=None)
    return Surrogate(langs, targets, coef)


def optimise_with_surrogate(
    langs: Sequence[str],
    damage: DamageFn,
    objective: Objective,
    resolution: int | None = None,
    refine: int = 4,
) -> MixResult:
    """Fit the quadratic mixture model on the {N, 2} lattice, optimise it, evaluate its optimum
    (module docstring). ``resolution``: of the surrogate's lattice (default: the finest with
    about 250,000 points, at least 2). Costs N(N+1)/2 + 2 callback evaluations."""
    langs = _check_langs(langs)
    n = len(langs)
    if resolution is None:
        resolution = 2
        while (
            resolution < _MAX_RESOLUTION and math.comb(resolution + n, n - 1) <= _SURROGATE_POINTS
        ):
            resolution += 1
    finest = resolution * 2**refine
    # Lattice points are evaluated on the finest lattice of the surrogate's search, so the
    # memo also serves the recommended mix if it lands on one of them. Lattice points at
    # 1/2 and the centroid 1/n are on it only when finest is a multiple of 2 and n.
    total = math.lcm(finest, 2, n)
    memo = _Memo(langs, damage, objective, total)
    design = [memo.point(c) for c in compositions(2, n) * (total // 2)]
    centroid = memo.point([total // n] * n)
    model = fit_surrogate(langs, objective.targets, design)
    best, _ = _search(
        n, resolution, refine, lambda C: objective.score_array(model.predict(C / finest))
    )
    predicted = model.predict((best / finest)[None])[0]
    pred_damage = dict(zip(objective.targets, predicted.tolist(), strict=True))
    predicted_best = MixPoint(
        {lang: c / finest for lang, c in zip(langs, best.tolist(), strict=True)},
        pred_damage,
        objective(pred_damage),
    )
    got = memo.point(best * (total // finest))
    table = [MixPoint(p.weights, p.damage, p.score, model(p.weights)) for p in memo.table()]
    logger.info(
        "surrogate: predicted %s = %.4g at the recommended mix, evaluated %.4g; "
        "uniform mix predicted %.4g, evaluated %.4g",
        objective, predicted_best.score, got.score,
        objective(model(centroid.weights)), centroid.score,
    )  # fmt: skip
    if table[0].score < got.score:
        logger.warning(
            "the surrogate's optimum (evaluated %.4g) is worse than an evaluated mix (%.4g): "
            "the quadratic fits this damage poorly; recommending the evaluated mix",
            got.score, table[0].score,
        )  # fmt: skip
    return MixResult(table[0], table, objective, finest, len(table), model, predicted_best)
