"""The command line end to end on tiny saved models, and every bad input -> exit code 2."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from polyprune.cli import main
from polyprune.compress.export import load_masks

MANIFEST_FIELDS = {"version", "command", "method", "settings", "calibration", "layers", "seconds"}


def cli(*args):
    try:
        return main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        return e.code


def prune_args(model, out, *extra):
    base = [
        "prune",
        "--model",
        model,
        "--method",
        "sparsegpt",
        "--sparsity",
        "0.5",
        "--calib",
        "de,en",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--out",
        out,
        "-q",
    ]
    return [*base, *extra]


def test_prune_end_to_end_writes_a_loadable_sparse_model(tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir("llama")
    out = tmp_path / "out"
    assert cli(*prune_args(model_dir, out, "--save-masks", "--true-sequential")) == 0
    assert "written to" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    manifest = json.loads((out / "polyprune.json").read_text())
    assert set(manifest) >= MANIFEST_FIELDS
    cal = manifest["calibration"]
    assert cal["counts"] == {"de": 2, "en": 2} and cal["seqlen"] == 32 and cal["seed"] == 0
    assert cal["sampling"] == "concat" and len(cal["fingerprint"]) == 16 and cal["source"]
    assert manifest["settings"]["true_sequential"] is True
    assert (
        manifest["command"].startswith("polyprune prune --model ")
        and "--save-masks" in manifest["command"]
    )
    masks = load_masks(out / "masks.safetensors")
    assert set(masks) == set(manifest["layers"])
    for name, info in manifest["layers"].items():
        W = model.get_submodule(name).weight
        assert (W == 0).float().mean().item() == pytest.approx(0.5, abs=1e-6)
        assert info["sparsity"] == pytest.approx(0.5, abs=1e-6) and "loss" in info
        assert torch.equal(masks[name], W == 0)
    assert not model.lm_head.weight.eq(0).any()
    assert (out / "tokenizer.json").is_file()


def test_same_command_same_windows_and_weights(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("qwen2")
    for name in ("a", "b"):
        assert cli(*prune_args(model_dir, tmp_path / name, "--method", "wanda")) == 0
    ma, mb = (json.loads((tmp_path / n / "polyprune.json").read_text()) for n in "ab")
    assert ma["calibration"]["fingerprint"] == mb["calibration"]["fingerprint"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_magnitude_needs_no_calibration(tiny_model_dir, tmp_path):
    out = tmp_path / "mag"
    args = ["prune", "--model", tiny_model_dir("opt"), "--method", "magnitude", "--out", out, "-q"]
    assert cli(*args) == 0
    assert json.loads((out / "polyprune.json").read_text())["calibration"] is None


def test_existing_output_is_kept_without_overwrite_and_replaced_with_it(
    tiny_model_dir, tmp_path, capsys
):
    model_dir = tiny_model_dir("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert cli(*prune_args(model_dir, out)) == 2
    assert "exists and is not empty; use --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert cli(*prune_args(model_dir, out, "--overwrite")) == 0
    assert not (out / "keep.txt").exists() and (out / "polyprune.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--calib": "de,xx"}, "unknown language 'xx'"),
        ({"--calib": "de;en"}, "bad calibration mix"),
        ({"--calib": "de:0,en"}, "must be > 0"),
        ({"--sparsity": "1.0"}, "sparsity 1.0 is outside [0, 1)"),
        ({"--sparsity": "-0.5"}, "outside [0, 1)"),
        ({"--sparsity": "half"}, "invalid float value"),
        ({"--pattern": "2:x"}, "bad pattern"),
        ({"--pattern": "4:2"}, "impossible pattern"),
        ({"--model": "/nonexistent/model"}, "does not exist"),
        ({"--model": "not-a-path-or-id"}, "does not exist"),
        ({"--seqlen": "4096"}, "seqlen 4096 is above the model's maximum positions (128)"),
        ({"--nsamples": "5000", "--seqlen": "128"}, "too little text in de"),
        ({"--method": "obs"}, "invalid choice"),
        ({"--source": "/nonexistent/dir"}, "nor an existing directory"),
        ({"--calib": None}, "needs --calib"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tiny_model_dir, tmp_path, capsys, change, message):
    args = prune_args(tiny_model_dir("llama"), tmp_path / "out")
    capsys.readouterr()  # drop what building the fixture printed
    for flag, value in change.items():
        if flag not in args:
            args += [flag, value]
            continue
        i = args.index(flag)
        if value is None:
            del args[i : i + 2]
        else:
            args[i + 1] = value
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_nm_pattern_implies_its_sparsity(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    args = ["prune", "--model", tiny_model_dir("opt"), "--method", "magnitude"]
    assert cli(*args, "--pattern", "1:4", "--out", out, "-q") == 0
    manifest = json.loads((out / "polyprune.json").read_text())
    assert manifest["settings"]["sparsity"] == 0.25
    assert manifest["achieved_sparsity"] == pytest.approx(0.25)
    assert cli(*args, "--pattern", "1:4", "--sparsity", "0.5", "--out", tmp_path / "p") == 2


def test_nm_pattern_impossible_for_layer_width(tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir("llama", hidden=66, heads=3, kv_heads=1)  # 66 % 4 != 0
    assert cli(*prune_args(model_dir, tmp_path / "o", "--pattern", "2:4", "--sparsity", "0.5")) == 2
    assert "needs input widths divisible by 4" in capsys.readouterr().err


def test_data_commands(capsys):
    assert cli("data", "ls") == 0
    out = capsys.readouterr().out
    assert "sw" in out and "heldout" in out
    assert cli("data", "show", "de,en", "--nsamples", "128") == 0
    out = capsys.readouterr().out
    assert "64" in out and "de" in out
    assert cli("data", "show", "de,zz") == 2


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "polyprune.cli",
            "prune",
            "--model",
            "demo-x",
            "--method",
            "wanda",
            "--calib",
            "de",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_python_api_prunes_a_model_object(tokenizer):
    import polyprune

    from .conftest import tiny_model

    model = tiny_model("llama")
    pruned, manifest = polyprune.prune(
        model, tokenizer=tokenizer, method="wanda", sparsity=0.3, calib="ru:1,zh:1",
        nsamples=4, seqlen=32, progress=False, offload="cpu",
    )  # fmt: skip
    assert pruned is model
    assert manifest["calibration"]["counts"] == {"ru": 2, "zh": 2}
    assert manifest["achieved_sparsity"] == pytest.approx(0.3, abs=0.01)
    assert manifest["settings"]["offload"] == "cpu"


@pytest.mark.parametrize(
    "kwargs,match",
    [({"seqlen": 4096}, "maximum positions"), ({"nsamples": 5000, "seqlen": 128}, "too little")],
)
def test_input_errors_come_before_the_weights_are_loaded(
    tiny_model_dir, monkeypatch, kwargs, match
):
    import polyprune.api
    from polyprune.errors import InputError

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(polyprune.api, "load_model", no_weights)
    with pytest.raises(InputError, match=match):
        polyprune.api.prune(tiny_model_dir("llama"), method="wanda", calib="de", **kwargs)


def test_dense_propagation_is_recorded_and_refuses_true_sequential(
    tiny_model_dir, tmp_path, capsys
):
    model_dir = tiny_model_dir("llama")
    out = tmp_path / "dense"
    assert cli(*prune_args(model_dir, out, "--propagate", "dense")) == 0
    manifest = json.loads((out / "polyprune.json").read_text())
    assert manifest["settings"]["propagate"] == "dense"
    reference = tmp_path / "compressed"
    assert cli(*prune_args(model_dir, reference)) == 0
    assert "propagate" not in json.loads((reference / "polyprune.json").read_text())["settings"]
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert cli(*prune_args(model_dir, bad, "--propagate", "dense", "--true-sequential")) == 2
    err = capsys.readouterr().err
    assert "cannot be combined with --propagate dense" in err and err.count("\n") == 1, err
    assert not bad.exists()
