"""The mix optimiser (compress/mixopt.py) on planted problems with a known optimum."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize

from polyprune.compress.mixopt import (
    MixPoint,
    Objective,
    compositions,
    fit_surrogate,
    optimise_mix,
    optimise_with_surrogate,
    parse_objective,
    scheffe_lattice,
    simplex_grid,
)
from polyprune.errors import InputError

PAPER = ("ar", "de", "en", "es", "ru", "sw", "zh")


class Planted:
    """damage_l(w) = sum_k A_lk (w_k - m_lk)^2 + c_l for each target l, counting calls."""

    def __init__(self, langs, A, m, c):
        self.langs = tuple(langs)
        self.A, self.m, self.c = (np.asarray(a, dtype=np.float64) for a in (A, m, c))
        self.targets = tuple(f"t{i}" for i in range(len(self.c)))
        self.calls = 0

    def values(self, w: np.ndarray) -> np.ndarray:
        return (self.A * (w[None, :] - self.m) ** 2).sum(axis=1) + self.c

    def __call__(self, weights: dict[str, float]) -> dict[str, float]:
        self.calls += 1
        assert math.isclose(sum(weights.values()), 1.0, rel_tol=1e-12)
        w = np.array([weights[lang] for lang in self.langs])
        return dict(zip(self.targets, self.values(w).tolist(), strict=True))


def reference_optimum(problem: Planted, kind: str) -> np.ndarray:
    """An independent solution by SLSQP: mean directly, worst as min t s.t. t >= damage_l."""
    n = len(problem.langs)
    w0 = np.full(n, 1 / n)
    simplex = {"type": "eq", "fun": lambda x: x[:n].sum() - 1}
    if kind == "mean":
        res = minimize(lambda w: problem.values(w).mean(), w0, method="SLSQP",
                       bounds=[(0, 1)] * n, constraints=[simplex],
                       options={"ftol": 1e-14})  # fmt: skip
        return res.x
    x0 = np.append(w0, problem.values(w0).max())
    cons = [simplex, {"type": "ineq", "fun": lambda x: x[n] - problem.values(x[:n])}]
    res = minimize(lambda x: x[n], x0, method="SLSQP", bounds=[(0, 1)] * n + [(None, None)],
                   constraints=cons, options={"ftol": 1e-14, "maxiter": 500})  # fmt: skip
    return res.x[:n]


def shares(point: MixPoint, langs) -> np.ndarray:
    return np.array([point.weights[lang] for lang in langs])


def shared_minimiser_problem() -> Planted:
    langs = ("de", "en", "sw", "zh")
    m = np.array([0.37, 0.08, 0.31, 0.24])
    return Planted(langs, [[1.0, 2.0, 0.5, 1.5], [2.0, 0.7, 1.2, 1.0]], [m, m], [0.1, 0.3])


def conflicting_problem(langs) -> Planted:
    """Two targets pulling toward different mixes: the optimum is a compromise, inside."""
    rng = np.random.default_rng(3)
    n = len(langs)
    A = rng.uniform(0.5, 2.0, (2, n))
    m = np.stack([rng.dirichlet(np.ones(n)) for _ in range(2)])
    return Planted(langs, A, m, [0.2, 0.25])


def test_compositions_are_all_ways_to_split_the_total():
    got = compositions(4, 3)
    assert len(got) == math.comb(6, 2) == len({tuple(r) for r in got.tolist()})
    assert (got.sum(axis=1) == 4).all() and (got >= 0).all()
    assert simplex_grid(7, 2).shape == (28, 7)  # the 7 singles and the 21 equal pairs
    assert np.allclose(scheffe_lattice(3).sum(axis=1), 1)


@pytest.mark.parametrize("kind", ["worst", "mean"])
def test_optimiser_finds_a_planted_optimum(kind):
    problem = shared_minimiser_problem()
    res = optimise_mix(problem.langs, problem, Objective(kind, problem.targets), 4, 3)
    assert res.resolution == 32
    # the minimiser of every target, hence of both objectives, within a step of the lattice
    assert np.abs(shares(res.best, problem.langs) - problem.m[0]).max() <= 1 / 32
    assert res.evaluations == problem.calls == len(res.table)
    assert res.table[0] is res.best and res.best.score == min(p.score for p in res.table)


@pytest.mark.parametrize("kind", ["worst", "mean"])
def test_optimiser_finds_the_compromise_of_conflicting_targets(kind):
    problem = conflicting_problem(("de", "en", "sw", "zh"))
    res = optimise_mix(problem.langs, problem, Objective(kind, problem.targets), 4, 4)
    ref = reference_optimum(problem, kind)
    assert np.abs(shares(res.best, problem.langs) - ref).max() <= 2 / res.resolution
    objective = Objective(kind, problem.targets)
    best_ref = objective(dict(zip(problem.targets, problem.values(ref), strict=True)))
    assert res.best.score <= best_ref + 1e-3


@pytest.mark.parametrize("kind", ["worst", "mean"])
def test_surrogate_optimiser_finds_the_optimum_from_the_scheffe_lattice(kind):
    problem = conflicting_problem(PAPER)
    res = optimise_with_surrogate(PAPER, problem, Objective(kind, problem.targets))
    # 28 lattice mixes, the uniform check and the recommended mix
    assert problem.calls == res.evaluations == 30
    ref = reference_optimum(problem, kind)
    assert np.abs(shares(res.best, PAPER) - ref).max() <= 2 / res.resolution
    # the planted damage is a quadratic: the fit is exact at every evaluated point
    for p in res.table:
        for t in problem.targets:
            assert p.predicted[t] == pytest.approx(p.damage[t], rel=1e-9)


def test_surrogate_needs_enough_points_to_fit():
    problem = shared_minimiser_problem()
    few = [MixPoint({"de": 1.0}, problem({"de": 1.0, "en": 0, "sw": 0, "zh": 0}), 0.0)]
    with pytest.raises(InputError, match="needs 10 evaluated mixes"):
        fit_surrogate(problem.langs, problem.targets, few)


def test_objectives_score_damage_as_named():
    damage = {"de": 1.0, "sw": 3.0, "en": 100.0}
    assert parse_objective("worst", ["de", "sw"])(damage) == 3.0
    assert parse_objective("mean", ["de", "sw"])(damage) == 2.0
    weighted = parse_objective("weighted:de=3, sw=1", ["de", "sw"])
    assert weighted(damage) == pytest.approx(1.5)
    assert str(weighted) == "weighted:de=3,sw=1"
    assert parse_objective("weighted:sw=1,de=1").targets == ("sw", "de")


@pytest.mark.parametrize(
    "spec,match",
    [("", "empty objective"), ("best", "unknown objective 'best'"),
     ("worst", "needs target languages"), ("weighted:", "names no weights"),
     ("weighted:de", "'de' is not LANG=WEIGHT"),
     ("weighted:de=x,sw=1", "'x' of de is not a number"),
     ("weighted:de=-1,sw=1", "weight of de must be > 0"), ("weighted:de=1,de=2", "names de twice"),
     ("weighted:de=1,fr=1", "fr, which is not a target"),
     ("weighted:de=1", "no weight for target sw")],
)  # fmt: skip
def test_bad_objective_is_a_one_line_input_error(spec, match):
    targets = None if spec == "worst" else ["de", "sw"]
    with pytest.raises(InputError, match=match) as err:
        parse_objective(spec, targets)
    assert "\n" not in str(err.value)
