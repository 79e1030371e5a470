"""`polyprune quantize` and joint `prune --bits` end to end, and the GPTQ checkpoint on disk."""

import json

import pytest
import torch
from safetensors import safe_open

from polyprune.models import load_model

from .test_cli import cli


def quant_args(model, out, *extra):
    return ["quantize", "--model", model, "--method", "gptq", "--bits", "4", "--group-size",
            "32", "--calib", "de,en", "--nsamples", "4", "--seqlen", "32", "--out", out, "-q",
            *extra]  # fmt: skip


def test_gptq_checkpoint_loads_back_to_the_dense_format_weights(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    for fmt in ("gptq", "dense"):
        assert cli(*quant_args(model_dir, tmp_path / fmt, "--format", fmt, "--act-order")) == 0
    packed = load_model(tmp_path / "gptq", tokenizer=False).model
    dense = load_model(tmp_path / "dense", tokenizer=False).model
    for (name, p), q in zip(packed.named_parameters(), dense.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_gptq_checkpoint_has_the_standard_layout(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    assert cli(*quant_args(tiny_model_dir("llama"), out, "--bits", "3", "--asym")) == 0
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 3 and qc["group_size"] == 32
    assert qc["sym"] is False and qc["desc_act"] is False
    assert qc["checkpoint_format"] in ("gptq", "gptq_v2")
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    name = "model.layers.0.mlp.down_proj"  # in 128, out 64
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f"{name}.weight" not in keys
        assert f.get_tensor(f"{name}.qweight").shape == (128 * 3 // 32, 64)
        assert f.get_tensor(f"{name}.qweight").dtype == torch.int32
        assert f.get_tensor(f"{name}.qzeros").shape == (128 // 32, 64 * 3 // 32)
        assert f.get_tensor(f"{name}.scales").dtype == torch.float16
        assert f.get_tensor(f"{name}.g_idx").tolist() == [i // 32 for i in range(128)]
        assert "model.embed_tokens.weight" in keys
        assert ("lm_head.weight" in keys) == (not config["tie_word_embeddings"])
    manifest = json.loads((out / "polyprune.json").read_text())
    assert manifest["quantization"]["bits"] == 3 and manifest["quantization"]["act_order"] is False
    assert all("loss" in v for v in manifest["layers"].values())


def test_rtn_needs_no_calibration(tiny_model_dir, tmp_path):
    args = ["quantize", "--model", tiny_model_dir("opt"), "--method", "rtn", "--bits", "8",
            "--group-size", "-1", "--out", tmp_path / "r", "-q"]  # fmt: skip
    assert cli(*args) == 0
    manifest = json.loads((tmp_path / "r" / "polyprune.json").read_text())
    assert manifest["calibration"] is None and manifest["quantization"]["group_size"] == -1


def test_joint_sparsegpt_4bit_through_the_cli(tiny_model_dir, tmp_path):
    out = tmp_path / "sq"
    args = ["prune", "--model", tiny_model_dir("llama"), "--method", "sparsegpt", "--bits", "4",
            "--group-size", "32", "--calib", "de", "--nsamples", "4", "--seqlen", "32",
            "--format", "gptq", "--out", out, "-q"]  # fmt: skip
    assert cli(*args) == 0
    model = load_model(out, tokenizer=False).model
    manifest = json.loads((out / "polyprune.json").read_text())
    assert manifest["quantization"]["bits"] == 4
    for name in manifest["layers"]:
        W = model.get_submodule(name).weight
        assert (W == 0).float().mean().item() >= 0.5  # pruned half, plus weights rounded to 0


@pytest.mark.parametrize(
    "change,message",
    [
        (["--bits", "5"], "bits 5 not supported; allowed: 2, 3, 4, 8"),
        (["--group-size", "48"], "group size 48 does not divide the input width 64"),
        (["--format", "awq"], "invalid choice: 'awq'"),
        (["--group-size", "0"], "group size 0 must be -1"),
    ],
)
def test_bad_quantize_input_is_one_line_and_exit_code_2(
    tiny_model_dir, tmp_path, capsys, change, message
):
    args = quant_args(tiny_model_dir("llama"), tmp_path / "out") + change
    capsys.readouterr()
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_gptq_packing_width_is_checked_before_work(tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir("llama", hidden=48, heads=3, kv_heads=1)  # 48 % 32 != 0
    capsys.readouterr()
    assert cli(*quant_args(model_dir, tmp_path / "o", "--bits", "3", "--group-size", "16")) == 2
    assert "packs 3-bit weights of widths divisible by 32" in capsys.readouterr().err


def test_bits_with_wanda_is_refused(tiny_model_dir, tmp_path, capsys):
    args = ["prune", "--model", tiny_model_dir("llama"), "--method", "wanda", "--bits", "4",
            "--calib", "de", "--out", tmp_path / "o"]  # fmt: skip
    assert cli(*args) == 2
    assert "--bits works with sparsegpt" in capsys.readouterr().err
