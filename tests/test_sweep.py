"""``polyprune sweep`` and ``mix optimise``: entries against the runs they stand for, the
statistics of weighted entries against concatenated windows, predicted damage, bad input."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import polyprune.compress.engine as engine_mod
import polyprune.compress.sweep as sweep_mod
from polyprune.api import prune
from polyprune.cli import main
from polyprune.compress.capture import batch_slices
from polyprune.compress.damage import statistic_matrix
from polyprune.data.mix import CalibrationMix
from polyprune.errors import InputError
from polyprune.eval.mixsearch import (
    NEAR_TIE,
    Candidate,
    OptimiseReport,
    fit_calibration,
    measured_verdict,
    optimise,
    to_mix,
)
from polyprune.eval.sweep import grid_mixes, mix_dirname, parse_mixes, plan_sweep, sweep

SMALL = {"nsamples": 6, "seqlen": 32, "batch_size": 4, "progress": False}


def cli(*args):
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def tensors(path):
    return load_file(str(path / "model.safetensors"))


def test_batches_never_straddle_segments():
    got = [(s.start, s.stop) for s in batch_slices(9, 4, (6, 3))]
    assert got == [(0, 4), (4, 6), (6, 9)]
    assert [(s.start, s.stop) for s in batch_slices(5, 2)] == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(ValueError):
        batch_slices(5, 2, (2, 2))


def test_exact_pools_give_each_mix_its_runs_counts():
    mixes = parse_mixes("de;de,en;sw:3,en:1")
    pools, plans = plan_sweep(mixes, 8)
    assert sorted(p.key for p in pools) == ["de/4", "de/8", "en/2", "en/4", "sw/6"]
    shares = {p.name: p.shares for p in plans}
    assert shares == {"de": {"de/8": 1.0}, "de+en": {"de/4": 0.5, "en/4": 0.5},
                      "sw3+en1": {"sw/6": 0.75, "en/2": 0.25}}  # fmt: skip
    # a language's pools are consecutive (fed one after the other)
    langs = [p.lang for p in pools]
    assert langs == sorted(langs, key=langs.index)
    shared, splans = plan_sweep(mixes, 8, "shared")
    assert sorted(p.key for p in shared) == ["de/8", "en/8", "sw/8"]
    assert splans[2].shares == {"sw/8": 0.75, "en/8": 0.25}


def test_grid_and_names():
    grid = grid_mixes(["de", "en"], 2)
    assert sorted(mix_dirname(m) for m in grid) == ["de", "de+en", "en"]
    assert mix_dirname(CalibrationMix(("sw", "en"), (3.0, 1.0))) == "sw3+en1"
    assert str(to_mix({"de": 0.7, "sw": 0.3}, 10)) == "de:7,sw:3"


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_single_language_entry_is_the_dense_propagation_run_bit_for_bit(
    tiny_model_dir, tmp_path, method
):
    model = tiny_model_dir("llama")
    out = tmp_path / "sweep"
    sweep(model, method, parse_mixes("de;en;de,en"), out=out, **SMALL)
    for lang in ("de", "en"):
        run = tmp_path / f"run-{lang}"
        prune(model, method=method, calib=lang, propagate="dense", out=run, stream=True, **SMALL)
        a, b = tensors(run), tensors(out / lang)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), lang
        m = json.loads((out / lang / "polyprune.json").read_text())
        r = json.loads((run / "polyprune.json").read_text())
        assert m["calibration"]["fingerprint"] == r["calibration"]["fingerprint"]
        assert m["settings"]["propagate"] == "dense"
        assert m["settings"]["sweep"]["equals"].startswith(f"polyprune prune --calib {lang} ")
    # and the entries differ from each other: the test can fail
    assert not torch.equal(tensors(out / "de")["model.layers.0.mlp.down_proj.weight"],
                           tensors(out / "en")["model.layers.0.mlp.down_proj.weight"])  # fmt: skip


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_weighted_entry_statistics_equal_the_runs_over_concatenated_windows(
    tiny_model_dir, tmp_path, monkeypatch, method
):
    """The statistic each Linear group is solved from: the sweep's weighted sum of per-pool
    statistics against the run over the concatenated windows (batches cut elsewhere: equal to
    fp32 rounding, 1e-5 relative)."""
    model = tiny_model_dir("llama")
    seen: dict[str, list[torch.Tensor]] = {"sweep": [], "run": []}

    def spy(where):
        real = engine_mod.solve_group

        def wrapped(group, st, *a, **k):
            seen[where].append(statistic_matrix(st).clone())
            return real(group, st, *a, **k)

        return wrapped

    monkeypatch.setattr(sweep_mod, "solve_group", spy("sweep"))
    sweep(model, method, parse_mixes("de:2,en:1"), out=tmp_path / "s", **SMALL)
    monkeypatch.setattr(engine_mod, "solve_group", spy("run"))
    prune(model, method=method, calib="de:2,en:1", propagate="dense", out=tmp_path / "r",
          stream=True, **SMALL)  # fmt: skip
    assert len(seen["sweep"]) == len(seen["run"]) > 0
    for s, r in zip(seen["sweep"], seen["run"], strict=True):
        assert torch.allclose(s, r, rtol=1e-5, atol=1e-6 * float(r.abs().max()))
    # the statistics differ from one language's alone
    seen["sweep"].clear()
    monkeypatch.setattr(sweep_mod, "solve_group", spy("sweep"))
    sweep(model, method, parse_mixes("de"), out=tmp_path / "s1", **SMALL)
    assert not torch.allclose(seen["sweep"][0], seen["run"][0], rtol=1e-3)


def test_predicted_damage_is_zero_unpruned_and_grows_with_sparsity(tiny_model_dir):
    model = tiny_model_dir("llama")
    damage = {}
    for s in (0.0, 0.3, 0.6):
        res = sweep(model, "sparsegpt", parse_mixes("de;en"), sparsity=s, predict=True,
                    write=False, **SMALL)  # fmt: skip
        damage[s] = res.predicted
    for mix in ("de", "en"):
        for lang in ("de", "en"):
            assert damage[0.0][mix][lang] == 0.0
            assert 0 < damage[0.3][mix][lang] < damage[0.6][mix][lang] < 1
    # calibrating on a language predicts less damage on it than calibrating on the other
    assert damage[0.6]["de"]["de"] < damage[0.6]["en"]["de"]
    assert damage[0.6]["en"]["en"] < damage[0.6]["de"]["en"]


def test_damage_combination_is_chosen_recorded_and_checked(tiny_model_dir, tmp_path):
    """``damage_combine`` picks how the per-Linear terms (kept in the result) become one number
    per language, the same terms either way, and sweep.json says which."""
    from polyprune.compress.damage import combine

    model = tiny_model_dir("llama")
    got, terms = {}, {}
    for how in ("block", "linear"):
        res = sweep(model, "wanda", parse_mixes("de;en"), predict=True, damage_combine=how,
                    out=tmp_path / how, write=False, **SMALL)  # fmt: skip
        got[how], terms[how] = res.predicted, res.terms
        for name in res.entries:
            # 2 layers x 7 Linears x 2 languages
            assert len(res.terms[name]) == 2 * 7 * 2
            assert res.predicted[name] == combine(res.terms[name], how)
        assert json.loads((tmp_path / how / "sweep.json").read_text())["damage_combine"] == how
    assert terms["block"] == terms["linear"]
    assert got["block"] != got["linear"]
    with pytest.raises(
        InputError, match="unknown damage combination 'mean'; allowed: block, linear"
    ):
        sweep(model, "wanda", parse_mixes("de"), predict=True, damage_combine="mean",
              write=False, **SMALL)  # fmt: skip


def test_sweep_command_writes_models_tables_and_heatmap(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("llama")
    out = tmp_path / "out"
    rc = cli("sweep", "--model", model, "--method", "wanda", "--langs", "de,en",
             "--all-single", "--uniform", "--grid", "3", "--predict", "--nsamples", "4",
             "--seqlen", "32", "--out", out, "-q")  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["de", "en", "de+en", "predicted_damage.csv", "predicted_damage.md",
         "predicted_damage.png", "sweep.json"])  # fmt: skip
    info = json.loads((out / "sweep.json").read_text())
    # the grid's mixes are predicted, not written: de2+en1 and de1+en2
    assert set(info["predicted_damage"]) == {"de", "en", "de+en", "de2+en1", "de1+en2"}
    assert not info["mixes"]["de2+en1"]["written"]
    rows = (out / "predicted_damage.csv").read_text().splitlines()
    assert len(rows) == 1 + 5
    assert "written to" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mixes", "de;;en"], "bad --mixes"),
        (["--mixes", "de,xx"], "xx"),
        (["--all-single"], "--all-single needs --langs"),
        (["--langs", "de,en", "--grid", "2"], "--grid mixes are predicted, not written"),
        (["--mixes", "de", "--no-write"], "--no-write writes nothing"),
        (["--mixes", "de;de"], "given twice"),
        (["--mixes", "de", "--nsamples", "0"], "nsamples"),
        (["--mixes", "de,en", "--nsamples", "1"], "no sample"),
        (["--mixes", "de", "--predict", "--damage-combine", "max"], "unknown damage combination"),
        (["--mixes", "de", "--damage-combine", "linear"], "add --predict"),
    ],
)
def test_bad_sweep_input_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, extra, message):
    model = tiny_model_dir("llama")
    capsys.readouterr()  # the fixture's own output (it writes the model on first use)
    rc = cli("sweep", "--model", model, "--method", "wanda", "--seqlen", "32",
             "--out", tmp_path / "o", *extra)  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_sweep_refuses_a_data_free_method(tiny_model_dir, tmp_path, capsys):
    rc = cli("sweep", "--model", tiny_model_dir("llama"), "--method", "magnitude",
             "--mixes", "de", "--out", tmp_path / "o")  # fmt: skip
    assert rc == 2 and "magnitude" in capsys.readouterr().err


@pytest.mark.parametrize("calibrate", [False, True])
def test_optimise_recommends_a_mix_no_worse_than_single_and_uniform(tiny_model_dir, tmp_path,
                                                                    calibrate):  # fmt: skip
    """On the predicted objective the recommended mix is the best evaluated one, so never worse
    than the best single language or the uniform mix; --verify measures all three. Calibrated,
    the objective is predicted log perplexity from a fit on measured anchors."""
    model = tiny_model_dir("llama")
    rep = optimise(model, "sparsegpt", ["de", "en", "sw"], ["de", "sw"], "worst", verify=True,
                   calibrate=calibrate, ppl_tokens=256, ppl_seqlen=32, out=tmp_path / "opt",
                   **SMALL)  # fmt: skip
    roles = {c.role: c for c in rep.candidates}
    assert set(roles) == {"recommended", "best single", "uniform"}
    rec = roles["recommended"]
    # near ties of ``worst`` (within NEAR_TIE of the best prediction) go to the best mean
    tol = NEAR_TIE if calibrate else NEAR_TIE * min(e["score"] for e in rep.evaluated)
    assert rec.score <= roles["best single"].score + tol
    assert rec.score <= roles["uniform"].score + tol
    for c in rep.candidates:
        assert set(c.measured) == {"de", "en", "sw"}
        assert all(math.isfinite(v) and v > 1 for v in c.measured.values())
    assert set(rep.dense) == {"de", "en", "sw"}
    # the search: 7 design mixes, the surrogate's optimum (unless it is one of them), then the
    # local search over whole windows (6 here) from the best; the recommendation is the best
    # of all evaluated
    assert rep.searched["design"] == 7 and rep.searched["surrogate optimum"] in (0, 1)
    assert rep.searched["local search"] >= 1
    assert len(rep.evaluated) == sum(rep.searched.values())
    best = min(e["score"] for e in rep.evaluated)
    assert best <= rec.score <= best + tol
    assert rec.mix in rep.near_ties
    on_windows = [
        e
        for e in rep.evaluated
        if all(abs(v * 6 - round(v * 6)) < 1e-9 for v in e["shares"].values())
    ]
    assert len(on_windows) >= rep.searched["local search"]
    out = tmp_path / "opt"
    assert (out / "optimise.md").is_file() and (out / "optimise.json").is_file()
    # the verdict ranks every mix measured on both targets by its measured worst perplexity
    v = rep.verdict
    assert {c.mix for c in rep.candidates} <= set(v.measured)
    for c in rep.candidates:
        assert v.measured[c.mix] == pytest.approx(max(c.measured["de"], c.measured["sw"]))
    assert v.measured[v.best] == min(v.measured.values())
    assert v.searched == rec.mix
    assert f"**Use {v.best}**" in (out / "optimise.md").read_text()
    assert json.loads((out / "optimise.json").read_text())["verdict"]["best"] == v.best
    if not calibrate:
        assert rep.calibration is None
        assert rec.score == pytest.approx(max(rec.predicted[t] for t in ("de", "sw")))
        assert (out / "models" / "sweep.json").is_file()
        return
    cal = rep.calibration
    # anchors: each target alone and the uniform mix, pruned and measured on the targets
    assert [a["mix"] for a in cal.anchors] == ["de", "sw", "de,en,sw"]
    assert {a["mix"] for a in cal.anchors} <= set(v.measured)  # measured on the targets
    assert (out / "anchors" / "sweep.json").is_file()
    assert cal.dense == {t: rep.dense[t] for t in ("de", "sw")}
    anchored = {a["mix"]: a for a in cal.anchors}
    for c in rep.candidates:  # --verify reuses an anchor's model: not pruned a second time
        if c.mix in anchored:
            assert c.measured["de"] == anchored[c.mix]["measured"]["de"]
            assert not (out / "models" / mix_dirname(CalibrationMix.parse(c.mix))).exists()
    assert any(c.mix in anchored for c in rep.candidates)  # the uniform mix at least
    for c in rep.candidates:
        want = {t: math.log(cal.dense[t]) + cal.offset[t] + cal.slope[t] * c.predicted[t]
                for t in ("de", "sw")}  # fmt: skip
        assert c.score == pytest.approx(max(want.values()))
        assert c.predicted_ppl == pytest.approx({t: math.exp(v) for t, v in want.items()})
    assert "Calibration" in (out / "optimise.md").read_text()


def _report(objective: str, mixes: list[tuple[str, str]]) -> OptimiseReport:
    cands = [Candidate(role, mix, {}, 0.0) for role, mix in mixes]
    return OptimiseReport(objective, ["de", "sw"], ["de", "en", "sw"], cands, [], {})


@pytest.mark.parametrize(
    ("objective", "measured", "best"),
    [
        # worst: the search's mix loses to an anchor measured on the targets only
        (
            "worst",
            {
                "de:1,sw:3": {"de": 90, "sw": 191.4},
                "sw": {"de": 100, "sw": 191.2},
                "de,en,sw": {"de": 80, "sw": 220},
            },
            "sw",
        ),
        # worst: the search's mix measured best
        (
            "worst",
            {"de:1,sw:3": {"de": 90, "sw": 150}, "sw": {"de": 100, "sw": 191.2}},
            "de:1,sw:3",
        ),
        # a tie goes to the search's mix
        ("worst", {"sw": {"de": 100, "sw": 150}, "de:1,sw:3": {"de": 90, "sw": 150}}, "de:1,sw:3"),
        # mean: geometric mean over the targets (sqrt(50*200) = 100 < sqrt(90*120) = 103.9)
        ("mean", {"de:1,sw:3": {"de": 90, "sw": 120}, "sw": {"de": 50, "sw": 200}}, "sw"),
        # weighted: de counts 3x: 50^.75 * 200^.25 = 70.7 < 90^.75 * 60^.25 = 81.3
        (
            "weighted:de=3,sw=1",
            {"de:1,sw:3": {"de": 90, "sw": 60}, "sw": {"de": 50, "sw": 200}},
            "sw",
        ),
        # a mix without every target, and the dense model, are not ranked
        (
            "worst",
            {"de:1,sw:3": {"de": 90, "sw": 150}, "sw": {"sw": 10}, "dense": {"de": 20, "sw": 40}},
            "de:1,sw:3",
        ),
    ],
)
def test_measured_verdict_names_the_best_measured_mix(objective, measured, best):
    rep = _report(objective, [("recommended", "de:1,sw:3"), ("best single", "sw")])
    v = measured_verdict(rep, measured)
    assert v.best == best
    assert v.searched == "de:1,sw:3"
    assert v.best_role == {"de:1,sw:3": "recommended", "sw": "best single"}[best]
    ranked = {m for m, p in measured.items() if m != "dense" and {"de", "sw"} <= set(p)}
    assert set(v.measured) == ranked
    if best != "de:1,sw:3":
        assert v.margin > 0
        assert f"**Use {best}** (best single)" in v.markdown()
    else:
        assert v.margin == 0


def test_measured_verdict_names_an_anchor_that_is_no_candidate():
    rep = _report("worst", [("recommended", "de:1,sw:3"), ("uniform", "de,en,sw")])
    v = measured_verdict(
        rep,
        {
            "de:1,sw:3": {"de": 90, "sw": 191.4},
            "de,en,sw": {"de": 80, "sw": 220},
            "sw": {"de": 100, "sw": 191.2},
        },
    )
    assert (v.best, v.best_role) == ("sw", "anchor")
    assert v.margin == pytest.approx(191.4 / 191.2 - 1)


def test_optimise_predicts_every_target_for_a_mix_that_leaves_one_out(tiny_model_dir,
                                                                       monkeypatch):  # fmt: skip
    """The surrogate's optimum may leave a target language out of the mix (all of sw's budget
    to en and sw); its one-mix sweep must still predict the damage on that target."""
    import polyprune.eval.mixsearch as ms

    real, asked = ms.optimise_with_surrogate, []

    def spy(langs, damage, objective):
        asked.append(damage({"de": 0.0, "en": 0.75, "sw": 0.25}))
        return real(langs, damage, objective)

    monkeypatch.setattr(ms, "optimise_with_surrogate", spy)
    optimise(tiny_model_dir("llama"), "wanda", ["de", "en", "sw"], ["de", "sw"], "worst",
             calibrate=False, **SMALL)  # fmt: skip
    assert set(asked[0]) == {"de", "sw"} and all(v > 0 for v in asked[0].values())


def test_calibration_fit_recovers_planted_lines():
    """log(ppl / dense) = a + b * damage per language, least squares over the anchors; a
    slope that is not positive falls back to the line through the origin, then to flat."""
    dense = {"de": 20.0, "sw": 60.0, "zh": 50.0, "ar": 30.0, "es": 25.0}
    line = {"de": (-2.0, 150.0), "sw": (-0.5, 80.0)}
    dmg = [{"de": 0.018, "sw": 0.024, "zh": 0.02, "ar": 0.02, "es": 0.02},
           {"de": 0.022, "sw": 0.019, "zh": 0.03, "ar": 0.02, "es": 0.03},
           {"de": 0.020, "sw": 0.021, "zh": 0.025, "ar": 0.02, "es": 0.025}]  # fmt: skip
    anchors = []
    for i, d in enumerate(dmg):
        ppl = {t: dense[t] * math.exp(a + b * d[t]) for t, (a, b) in line.items()}
        ppl["zh"] = dense["zh"] * math.exp([0.9, 0.5, 0.7][i])  # falls as damage grows
        ppl["ar"] = dense["ar"] * math.exp([0.9, 0.5, 0.7][i])  # damage constant
        ppl["es"] = dense["es"] * math.exp([-0.1, -0.2, -0.15][i])  # better than dense
        anchors.append((f"m{i}", d, ppl))
    cal = fit_calibration(dense, anchors)
    for t, (a, b) in line.items():
        assert cal.fit[t] == "affine"
        assert cal.offset[t] == pytest.approx(a, abs=1e-9)
        assert cal.slope[t] == pytest.approx(b, rel=1e-9)
        assert cal.rms[t] == pytest.approx(0.0, abs=1e-9)
    x, y = np.array([0.02, 0.03, 0.025]), np.array([0.9, 0.5, 0.7])
    assert cal.fit["zh"] == "through origin" and cal.offset["zh"] == 0.0
    assert cal.slope["zh"] == pytest.approx(x @ y / (x @ x))
    assert cal.fit["ar"] == "through origin"  # one damage for all anchors: no affine fit
    assert cal.slope["ar"] == pytest.approx(0.7 / 0.02)
    assert cal.fit["es"] == "flat" and cal.slope["es"] == 0.0
    assert cal.offset["es"] == pytest.approx(-0.15)
    # predicted perplexity of a new damage follows the fitted line
    got = cal.ppl({"de": 0.021, "sw": 0.02, "zh": 0.02, "ar": 0.02, "es": 0.02})
    assert got["de"] == pytest.approx(20.0 * math.exp(-2.0 + 150.0 * 0.021))
    assert got["sw"] == pytest.approx(60.0 * math.exp(-0.5 + 80.0 * 0.02))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--langs", "de", "--target", "de"], "at least two candidate languages"),
        (["--langs", "de,en", "--target", "de", "--objective", "best"], "unknown objective"),
        (["--langs", "de,en", "--target", "de", "--objective", "weighted:sw=1"], "sw"),
        (["--langs", "de,xx", "--target", "de"], "xx"),
        (["--langs", "de,en", "--target", "de", "--local-rounds", "-1"], "--local-rounds"),
        (["--langs", "de,en", "--target", "de", "--damage-combine", "max"], "max"),
    ],
)
def test_bad_optimise_input_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, extra,
                                                   message):  # fmt: skip
    model = tiny_model_dir("llama")
    capsys.readouterr()  # the fixture's own output
    rc = cli("mix", "optimise", "--model", model, "--method", "wanda",
             "--seqlen", "32", "--out", tmp_path / "o", *extra)  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
