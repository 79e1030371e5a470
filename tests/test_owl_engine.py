"""OWL through the engine, the API and the CLI on tiny models: per-block sparsities equal an
independent computation from the same statistics (plain hooks on the dense model, the
reference's formula), the global sparsity is exact, per-language outlier ratios, the manifest,
and one-line refusals."""

import copy
import json

import pytest
import torch

from polyprune.compress.engine import EngineConfig, compress_model
from polyprune.compress.profiles import OwlParams, exact_sparsities, pruned_count
from polyprune.compress.solver import PruneConfig
from polyprune.models import find_blocks, get_weight, linear_layers

from .conftest import tiny_model
from .test_cli import cli, prune_args
from .test_engine import windows
from .test_profiles import reference_check_outlier_mean, reference_owl

LANGS = ["de"] * 4 + ["en"] * 4


def dense_inputs(model, ids):
    """Each block's Linear inputs on the dense model, (N, T, cols) per Linear (plain hooks)."""
    _, blocks = find_blocks(model)
    seen: dict = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, k=(b, n): seen.setdefault(k, []).append(a[0]))
        for b, blk in enumerate(blocks)
        for n, m in linear_layers(blk).items()
    ]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return [
        ([get_weight(m) for m in linear_layers(blk).values()],
         [seen[(b, n)][0] for n in linear_layers(blk)])
        for b, blk in enumerate(blocks)
    ]  # fmt: skip


def owl_run(model, method, ids, sparsity=0.7, lmbda=0.08, langs=LANGS, **kw):
    cfg = EngineConfig(method, PruneConfig(sparsity), batch_size=3, progress=False,
                       profile="owl", owl=OwlParams(5, lmbda), **kw)  # fmt: skip
    return compress_model(model, ids, cfg, langs)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_block_sparsities_are_the_references_on_the_dense_statistics(method):
    model = tiny_model("llama", layers=4)
    ids = windows(n=8, t=24)
    blocks = dense_inputs(copy.deepcopy(model), ids)
    ref_ratios, ref_sparsity = reference_owl(blocks, 5, 0.08, 0.7)
    report = owl_run(model, method, ids)
    prof = report.profile
    assert len(set(ref_ratios)) > 1
    torch.testing.assert_close(prof["outlier_ratio"], [r / 100 for r in ref_ratios])
    torch.testing.assert_close(prof["sparsity"], [float(s) for s in ref_sparsity], rtol=0,
                               atol=1e-9)  # fmt: skip
    assert prof["blocks"] == [f"model.layers.{b}" for b in range(4)]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_global_sparsity_is_exact_and_blocks_run_at_their_solver_sparsity(method):
    model = tiny_model("llama", layers=4)
    report = owl_run(model, method, windows(n=8, t=24))
    solver = report.profile["solver_sparsity"]
    blocksize = 128 if method == "sparsegpt" else None
    shapes = [(r.shape, int(r.name.split(".")[2])) for r in report.layers]
    for r in report.layers:  # every Linear pruned as its block's solver sparsity says
        rows, cols = r.shape
        b = int(r.name.split(".")[2])
        assert round(r.sparsity * rows * cols) == pruned_count(rows, cols, solver[b], blocksize)
    zeros = sum(round(r.sparsity * r.shape[0] * r.shape[1]) for r in report.layers)
    total = sum(r.shape[0] * r.shape[1] for r in report.layers)
    # an independent count correction from the profile's own sparsities gives the same
    counts = [
        lambda s, b=b: sum(pruned_count(*sh, s, blocksize) for sh, bb in shapes if bb == b)
        for b in range(4)
    ]
    sizes = [sum(sh[0] * sh[1] for sh, bb in shapes if bb == b) for b in range(4)]
    assert exact_sparsities(report.profile["sparsity"], counts, sizes) == solver
    # the largest jump of the last block's count: every Linear's at once, by its rows (Wanda)
    # or by one weight per column block (SparseGPT)
    last = [sh for sh, b in shapes if b == 3]
    step = sum(r if blocksize is None else -(-c // blocksize) for r, c in last)
    half_step = step / 2
    assert abs(zeros - round(0.7 * total)) <= half_step
    assert report.overall_sparsity() == pytest.approx(0.7, abs=half_step / total)


def test_owl_records_the_outlier_ratios_of_each_language():
    model = tiny_model("llama", layers=3)
    ids = windows(n=8, t=24)
    blocks = dense_inputs(copy.deepcopy(model), ids)
    report = owl_run(model, "wanda", ids)
    by_lang = report.profile["outlier_ratio_by_language"]
    assert list(by_lang) == ["de", "en"]
    for lang, rows in (("de", slice(0, 4)), ("en", slice(4, 8))):
        for b, (Ws, Xs) in enumerate(blocks):
            colsq = [(X[rows].reshape(-1, X.shape[-1]).float() ** 2).mean(0) for X in Xs]
            scores = torch.cat([(W.abs() * c.sqrt()).flatten() for W, c in zip(Ws, colsq,
                                strict=True)])  # fmt: skip
            expect = reference_check_outlier_mean(scores, 5) / 100
            assert by_lang[lang][b] * scores.numel() == pytest.approx(
                expect * scores.numel(), abs=1.5
            )
    assert by_lang["de"] != by_lang["en"]


def test_owl_without_languages_records_only_the_pooled_ratios():
    report = owl_run(tiny_model("llama"), "wanda", windows(n=6), langs=None)
    assert report.profile["outlier_ratio_by_language"] == {}
    assert len(report.profile["outlier_ratio"]) == 2


def test_uniform_profile_is_the_engine_as_before():
    a, b = tiny_model("llama"), tiny_model("llama")
    ids = windows()
    cfg = EngineConfig("wanda", PruneConfig(0.6), batch_size=3, progress=False)
    ra = compress_model(a, ids, cfg)
    rb = compress_model(b, ids, EngineConfig("wanda", PruneConfig(0.6), batch_size=3,
                                             progress=False, profile="uniform"))  # fmt: skip
    assert ra.profile is None and rb.profile is None
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_prune_with_owl_writes_the_profile_into_the_manifest(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama", layers=3)
    out = tmp_path / "owl"
    args = ["--method", "wanda", "--sparsity", "0.6", "--sparsity-profile", "owl",
            "--owl-m", "4", "--owl-lambda", "0.05"]  # fmt: skip
    base = prune_args(model_dir, out)
    i = base.index("--method")
    assert cli(*base[:i], *args, *base[i + 4 :]) == 0
    m = json.loads((out / "polyprune.json").read_text())
    s = m["settings"]
    assert (s["sparsity_profile"], s["owl_m"], s["owl_lambda"]) == ("owl", 4.0, 0.05)
    prof = m["profile"]
    assert prof["name"] == "owl" and prof["target"] == 0.6 and len(prof["sparsity"]) == 3
    assert list(prof["outlier_ratio_by_language"]) == ["de", "en"]
    uniform = tmp_path / "uniform"
    assert cli(*prune_args(model_dir, uniform)) == 0
    m = json.loads((uniform / "polyprune.json").read_text())
    assert "profile" not in m and "sparsity_profile" not in m["settings"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "magnitude"], "--sparsity-profile owl works with wanda and sparsegpt"),
        (["--pattern", "2:4"], "--sparsity-profile owl needs unstructured sparsity"),
        (["--owl-m", "0"], "--owl-m must be a finite number > 0, got 0"),
        (["--sparsity", "0.9"], "--owl-lambda 0.08 is too large for sparsity 0.9"),
    ],
)
def test_cli_refuses_owl_where_it_cannot_apply_in_one_line(
    tiny_model_dir, tmp_path, capsys, extra, message
):
    args = prune_args(tiny_model_dir("llama"), tmp_path / "out", "--sparsity-profile", "owl")
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    if "--pattern" in extra:
        args[args.index("--sparsity") + 1] = "0.5"
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_owl_streamed_equals_owl_in_memory(tiny_model_dir, tmp_path, family):
    """The streamed path reads each block twice (first pass, then pruning) and frees it in
    between (BlockIO.unload), with the same result as the model in memory. Gemma 3 has a
    non-persistent buffer outside the blocks (embed_scale) that the second capture needs."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir(family, layers=3)
    outs = {}
    for flag in ("--stream", "--no-stream"):
        outs[flag] = tmp_path / flag.strip("-")
        args = prune_args(model_dir, outs[flag], "--sparsity-profile", "owl", flag)
        assert cli(*args) == 0
    streamed, in_memory = (AutoModelForCausalLM.from_pretrained(outs[f]).state_dict() for f in outs)
    for name, t in in_memory.items():
        assert torch.equal(streamed[name], t), name
    profiles = [json.loads((o / "polyprune.json").read_text())["profile"] for o in outs.values()]
    assert profiles[0] == profiles[1]


def test_analyze_draws_the_per_block_sparsities_of_runs_with_a_profile(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from polyprune import prune

    runs = []
    for profile, mix in (("owl", "de,sw"), ("owl", "en"), ("uniform", "en")):
        runs.append(tmp_path / f"{profile}-{mix}")
        prune("demo", method="wanda", sparsity=0.7, calib=mix, nsamples=8, seqlen=64,
              out=runs[-1], progress=False, sparsity_profile=profile)  # fmt: skip
    report = tmp_path / "report"
    assert cli("analyze", "--dense", "demo", "--compressed", *runs, "--langs", "de,en",
               "--metrics", "profile", "--nsamples", "1", "--seqlen", "32", "--out", report,
               "-q") == 0  # fmt: skip
    assert {p.name for p in report.iterdir()} == {"profile.png", "report.md", "metrics.json"}
    img = np.asarray(Image.open(report / "profile.png").convert("L"))
    assert min(img.shape) >= 300 and img.std() > 5
    m = json.loads((report / "metrics.json").read_text())["profile"]
    owl = "wanda unstructured 0.70 owl / "  # the profile is part of a run's setting
    assert set(m) == {owl + "de,sw", owl + "en"}  # the uniform run has no profile
    for label, p in m.items():
        run = runs[["de,sw", "en"].index(label.removeprefix(owl))]
        manifest = json.loads((run / "polyprune.json").read_text())
        assert p["sparsity"] == manifest["profile"]["sparsity"]
        assert len(p["achieved"]) == len(p["blocks"]) == 6
        np.testing.assert_allclose(p["achieved"], p["solver_sparsity"], atol=0.01)
    assert list(m[owl + "de,sw"]["outlier_ratio_by_language"]) == ["de", "sw"]
    assert "## Layer-wise sparsity profiles" in (report / "report.md").read_text()


def test_matrix_profiles_are_a_dimension_of_the_pruning_cells(tmp_path):
    from polyprune.eval.matrix import expand, load_config

    from .test_matrix import write_config

    base = load_config(write_config(tmp_path, "base", methods=["magnitude", "wanda"]))
    cfg = load_config(write_config(tmp_path, methods=["magnitude", "wanda", "gptq"],
                                   profiles=["uniform", "owl"], sparsities=[0.6]))  # fmt: skip
    labels = [c.label for c in expand(cfg)]
    # magnitude: uniform only (owl does not apply); wanda: both; gptq: no profile at all
    assert "demo/magnitude/0.6" in labels and "demo/magnitude/0.6-owl" not in labels
    assert sum(lab.startswith("demo/wanda/0.6-owl/") for lab in labels) == 4
    assert sum(lab.startswith("demo/wanda/0.6/") for lab in labels) == 4
    assert all("owl" not in lab for lab in labels if "gptq" in lab)
    # a config without profiles keeps its cells' ids (stores and outputs stay reusable)
    assert [c.cell_id for c in expand(base)] == [
        c.cell_id for c in expand(load_config(write_config(
            tmp_path, "again", methods=["magnitude", "wanda"], profiles=["uniform"])))
    ]  # fmt: skip
    owl = next(c for c in expand(cfg) if c.profile == "owl")
    assert owl.compress_config()["profile"] == "owl" and owl.level == "0.6-owl"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"profiles": ["steep"]}, "unknown sparsity profile 'steep'"),
        ({"profiles": ["owl"], "methods": ["magnitude"]}, "profile owl applies to none"),
        ({"profiles": ["owl"], "sparsities": [0.9]}, "--owl-lambda 0.08 is too large"),
        ({"profiles": ["owl"], "owl_m": -1}, "--owl-m must be a finite number > 0"),
    ],
)
def test_matrix_refuses_profiles_that_cannot_apply(tmp_path, capsys, changes, message):
    from .test_matrix import write_config

    assert cli("matrix", write_config(tmp_path, **changes), "-q") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
