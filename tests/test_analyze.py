"""LAPE groups and selection against the reference code's steps, the per-language lockstep
pass against plain forwards, and ``polyprune analyze`` end to end on the demo model."""

import json
import math

import numpy as np
import pytest
import torch

from polyprune.analysis.hidden import lockstep_block_outputs
from polyprune.analysis.lape import (
    LapeCounter,
    box_stats,
    lape_entropy,
    neuron_groups,
    select_language_neurons,
)
from polyprune.cli import main

from .conftest import tiny_model


def cli(*args):
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


# --- LAPE groups and selection -------------------------------------------------------------


def test_neuron_groups_sort_by_dense_lape_and_leave_out_neurons_that_never_fire():
    lape = torch.tensor([[0.5, math.nan, 0.1, 0.9], [0.3, 0.2, math.nan, 0.7]])
    groups = neuron_groups(lape, percent=50)  # 6 firing neurons -> 2 groups of 3
    assert [g.tolist() for g in groups] == [[2, 5, 4], [0, 7, 3]]  # flat indices, by LAPE
    sizes = [len(g) for g in neuron_groups(torch.rand(3, 100), percent=2)]
    assert len(sizes) == 50 and sum(sizes) == 300 and set(sizes) == {6}


def test_box_stats_match_matplotlib():
    from matplotlib.cbook import boxplot_stats

    x = torch.cat([torch.randn(200, generator=torch.Generator().manual_seed(0)),
                   torch.tensor([8.0, -9.0, math.nan])])  # fmt: skip
    ours = box_stats(x)
    ref = boxplot_stats(x[~x.isnan()].numpy())[0]
    for k in ("whislo", "q1", "med", "q3", "whishi", "mean"):
        assert ours[k] == pytest.approx(float(ref[k]), abs=1e-6), k
    assert ours["n"] == 202 and box_stats(torch.tensor([math.nan]))["n"] == 0


def reference_selection(probs_lin, top_rate, filter_rate, bar_ratio):
    """Tang et al.'s identify.py, restated: probs (layers, width, L)."""
    n = probs_lin.sum(-1, keepdim=True)
    normed = probs_lin / n
    normed[torch.isnan(normed)] = 0
    logp = torch.where(normed > 0, normed.log(), 0)
    entropy = -torch.sum(normed * logp, dim=-1)
    flat = probs_lin.flatten()
    top_prob = flat.kthvalue(round(len(flat) * filter_rate)).values.item()
    top_position = (probs_lin > top_prob).sum(dim=-1)
    entropy[top_position == 0] = torch.inf
    k = round(entropy.numel() * top_rate)
    _, index = entropy.flatten().topk(k, largest=False)
    bar = flat.kthvalue(round(len(flat) * bar_ratio)).values.item()
    selected = probs_lin.reshape(-1, probs_lin.shape[-1])[index]
    return index, selected > bar


def test_language_neuron_selection_equals_the_reference_steps():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(4, 3, 250, generator=g, dtype=torch.float64) ** 4  # (layers, L, width)
    probs[1, :, 7] = 0.0  # never fires
    probs[2, :, 9] = 0.0
    probs[2, 1, 9] = 0.99  # one language only, strongly: LAPE 0
    sel = select_language_neurons(probs, top_rate=0.02, filter_rate=0.9, activation_bar_ratio=0.9)
    idx, langs = reference_selection(probs.permute(0, 2, 1).clone(), 0.02, 0.9, 0.9)
    assert set(sel.selected.tolist()) == set(idx.tolist())
    assert 2 * 250 + 9 in sel.selected.tolist() and 250 + 7 not in sel.selected.tolist()
    order = {n: i for i, n in enumerate(idx.tolist())}
    for n, row in zip(sel.selected.tolist(), sel.languages, strict=True):
        assert torch.equal(row, langs[order[n]])
    assert sel.per_language()[1] >= {2 * 250 + 9}


def test_selection_rates_are_checked():
    with pytest.raises(ValueError, match="top_rate 1.5"):
        select_language_neurons(torch.rand(1, 2, 10), top_rate=1.5)


# --- lockstep pass, one language per segment -------------------------------------------------


def test_lockstep_lape_counts_equal_counts_over_plain_forwards():
    model = tiny_model("llama", layers=2).eval()
    ids = torch.randint(2, 300, (7, 12), generator=torch.Generator().manual_seed(1))
    segments = [slice(0, 3), slice(3, 7)]  # two languages; batch 2 must not straddle them
    seen = []
    with LapeCounter(model, n_langs=2) as lockstep:

        def on_batch(name, seg, rows):
            seen.append(seg)
            lockstep.lang = seg

        for _ in lockstep_block_outputs({"m": model}, ids, segments, 2, on_batch=on_batch,
                                        progress=False):  # fmt: skip
            pass
    with LapeCounter(model, n_langs=2) as plain, torch.no_grad():
        for lang, seg in enumerate(segments):
            plain.lang = lang
            model(ids[seg], use_cache=False)
    assert torch.equal(lockstep.counts, plain.counts)
    torch.testing.assert_close(lockstep.magnitude, plain.magnitude)
    assert lockstep.tokens.tolist() == [36, 48]
    assert seen == [0, 0, 1, 1] * 2  # batches (0-2, 2-3), (3-5, 5-7) per layer
    assert torch.equal(lape_entropy(lockstep.counts[0], lockstep.tokens), plain.entropy()[0])


# --- polyprune analyze end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three Wanda runs of the demo model: de (seeds 0 and 1) and ar, with masks."""
    from polyprune import prune

    root = tmp_path_factory.mktemp("runs")
    out = {}
    for mix, seed in (("de", 0), ("de", 1), ("ar", 0)):
        path = root / f"wanda-{mix}-{seed}"
        prune("demo", method="wanda", sparsity=0.5, calib=mix, seed=seed, nsamples=8,
              seqlen=64, out=path, save_masks=True, progress=False)  # fmt: skip
        out[(mix, seed)] = path
    return out


def test_analyze_writes_real_pngs_report_and_metrics(runs, tmp_path, capsys):
    from PIL import Image

    from polyprune.analysis.iou import intersect_seeds, mask_iou
    from polyprune.compress.export import load_masks

    report = tmp_path / "report"
    dirs = [runs[("de", 0)], runs[("de", 1)], runs[("ar", 0)]]
    args = ["analyze", "--dense", "demo", "--compressed", *dirs, "--langs", "ar,de,sw",
            "--nsamples", "2", "--seqlen", "64", "--out", report, "-q"]  # fmt: skip
    assert cli(*args) == 0
    assert "written to" in capsys.readouterr().out
    names = {p.name for p in report.iterdir()}
    pngs = {"snr.png", "error.png", "lsar.png", "lape-boxes.png", "lape-groups.png",
            "lape-neurons.png", "iou-wanda-unstructured-0.50.png",
            "iou-layers-wanda-unstructured-0.50.png"}  # fmt: skip
    assert names == pngs | {"report.md", "metrics.json"}
    for name in pngs:
        img = np.asarray(Image.open(report / name).convert("L"))
        assert min(img.shape) >= 300 and img.std() > 5, name  # a real, non-blank picture
    # 3 evaluation languages + "all": one row of 4 panels, 4.2 x 3.2 inches each at 110 dpi
    assert Image.open(report / "snr.png").size == (1848, 352)
    md = (report / "report.md").read_text()
    assert all(f"]({p})" in md for p in pngs)
    m = json.loads((report / "metrics.json").read_text())
    assert m["metrics"] == ["snr", "error", "iou", "lsar", "lape"]
    assert [r["label"] for r in m["runs"]] == ["de s0", "de s1", "ar"]
    assert m["eval_text"]["windows"] == {"ar": 2, "de": 2, "sw": 2}
    snr = m["snr"]["ar"]
    assert len(snr["layers"]["sw"]) == 6 and set(snr["model"]) == {"ar", "de", "sw", "all"}
    assert all(0 < v < 100 for v in snr["layers"]["all"])
    assert len(m["lsar"]["runs"]["ar"]["specific"]) == 6 and m["lsar"]["rank"] == 2
    assert len(m["lape"]["groups"]) == 50 and set(m["lape"]["models"]) == {
        "dense",
        "de s0",
        "de s1",
        "ar",
    }
    # IoU streamed per Linear equals IoU of the whole masks loaded at once
    de = intersect_seeds([load_masks(runs[("de", s)] / "masks.safetensors") for s in (0, 1)])
    ar = load_masks(runs[("ar", 0)] / "masks.safetensors")
    iou = m["iou"]["wanda unstructured 0.50"]
    assert iou["mixes"] == ["de", "ar"]
    assert iou["matrices"]["all"]["all"][0][1] == pytest.approx(mask_iou(de, ar)["all"])
    for sub, v in mask_iou(de, ar, "sublayer").items():
        assert iou["matrices"]["sublayer"][sub][0][1] == pytest.approx(v)
    seeds = [load_masks(runs[("de", s)] / "masks.safetensors") for s in (0, 1)]
    assert iou["seed_iou"]["de"]["all"]["all"] == pytest.approx(mask_iou(*seeds)["all"])
    assert oct(report.stat().st_mode & 0o777) == oct(0o755 & ~current_umask())


def current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_analyze_of_one_metric_writes_only_its_figure(runs, tmp_path):
    report = tmp_path / "r"
    assert cli("analyze", "--dense", "demo", "--compressed", runs[("ar", 0)], "--langs",
               "de,en", "--metrics", "snr", "--nsamples", "1", "--seqlen", "32", "--out",
               report, "-q") == 0  # fmt: skip
    assert {p.name for p in report.iterdir()} == {"snr.png", "report.md", "metrics.json"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--metrics", "snr,bogus"], "unknown metric 'bogus'"),
        (["--langs", "de,xx"], "xx"),
        (["--lsar-rank", "5"], "--lsar-rank 5 must be in [1, 1]"),
        (["--lape-top-rate", "2"], "--lape-top-rate 2.0 must be in (0, 1)"),
        (["--seqlen", "100000"], "above the model's maximum positions"),
    ],
)
def test_analyze_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys, extra, message):
    args = {"--dense": "demo", "--langs": "de,en", "--out": tmp_path / "r", "--nsamples": "1"}
    for k, v in zip(extra[::2], extra[1::2], strict=True):
        args[k] = v
    flat = [x for kv in args.items() for x in kv]
    assert cli("analyze", "--compressed", runs[("ar", 0)], *flat, "-q") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_analyze_refuses_runs_it_cannot_use(runs, tmp_path, tiny_model_dir, capsys):
    base = ["analyze", "--dense", "demo", "--langs", "de,en", "--out", tmp_path / "r", "-q"]
    assert cli(*base, "--compressed", tmp_path) == 2
    assert "is not a polyprune output" in capsys.readouterr().err
    other = tmp_path / "other"  # a run of another model
    from polyprune import prune

    prune(tiny_model_dir("llama"), method="magnitude", out=other, progress=False)
    assert cli(*base, "--compressed", other) == 2
    assert "has hidden_size 64, the dense model 256" in capsys.readouterr().err
    nomask = tmp_path / "nomask"
    prune("demo", method="magnitude", out=nomask, progress=False)
    assert cli(*base, "--compressed", nomask, runs[("ar", 0)], "--metrics", "iou") == 2
    assert "prune with --save-masks" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("x")
    assert cli(*base, "--compressed", runs[("ar", 0)]) == 2
    assert "use --overwrite" in capsys.readouterr().err
    assert (tmp_path / "r" / "keep.txt").exists()


def test_lsar_prompt_means_leave_special_tokens_out(tokenizer):
    from polyprune.analysis.analyze import AnalysisConfig, _run_pass, _token_mask
    from polyprune.analysis.metric import PassContext, get_metric

    model = tiny_model("llama", layers=2).eval()
    ids = torch.randint(2, 300, (4, 10), generator=torch.Generator().manual_seed(2))
    ids[0, 3] = ids[2, 0] = ids[3, 9] = tokenizer.eos_token_id  # EOS joins documents
    keep = _token_mask(ids, tokenizer)
    assert keep.sum().item() == 37 and keep[0, 3] == 0
    cfg = AnalysisConfig(langs=("de", "en"), batch_size=3, progress=False)
    ctx = PassContext(cfg, [], segments=[slice(0, 2), slice(2, 4)], keep=keep)
    means = _run_pass({"dense": model}, ids, ctx, [get_metric("lsar")])["lsar"]
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple)
                                                                 else o))
             for b in model.model.layers]  # fmt: skip
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    for layer, h in enumerate(outs):
        special = ids == tokenizer.eos_token_id
        expected = torch.stack([h[i][~special[i]].mean(0) for i in range(4)])
        torch.testing.assert_close(means["dense"][layer], expected, atol=1e-5, rtol=1e-5)


# --- the metric registry ---------------------------------------------------------------------


def test_registry_names_are_what_analyze_metrics_accepts(capsys):
    """Every registered metric is accepted by ``--metrics`` (and offered in its help), an
    unregistered name is refused, and each name maps to a metric object of that name."""
    from polyprune.analysis.analyze import METRICS, AnalysisConfig
    from polyprune.analysis.metric import get_metric, metric_names
    from polyprune.errors import InputError

    names = metric_names()
    assert names == METRICS == ("snr", "error", "iou", "lsar", "lape", "profile")
    for name in names:
        assert get_metric(name).name == name
        assert AnalysisConfig(langs=("de", "en"), metrics=(name,)).metrics == (name,)
    with pytest.raises(InputError, match="unknown metric 'bogus'"):
        AnalysisConfig(langs=("de", "en"), metrics=("bogus",))
    assert cli("analyze", "--help") == 0
    assert f"subset of {','.join(names)} " in " ".join(capsys.readouterr().out.split())


def test_matrix_analyses_are_the_registry_metrics_with_a_row():
    from polyprune.analysis.metric import get_metric, metric_names
    from polyprune.eval.matrix import ANALYSES

    assert ANALYSES == {"snr": "snr_db", "error": "pruning_error"}
    assert all(get_metric(n).row_metric == r for n, r in ANALYSES.items())
    assert set(ANALYSES) < set(metric_names())
