"""``--dtype auto``: 16-bit forward passes where the CPU multiplies 16-bit fast, fp32 statistics
and solvers whatever the forward dtype, and the fp32 reference one flag away."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open

from polyprune import api
from polyprune.compress.stats import InputStats
from polyprune.errors import InputError
from polyprune.eval.perplexity import perplexity
from polyprune.models import (
    FAST_DTYPES_ENV,
    fast_cpu_dtypes,
    fast_dtypes_from_flags,
    load_model,
    resolve_dtype,
)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def test_fast_dtypes_come_from_the_cpu_feature_flags():
    assert fast_dtypes_from_flags({"avx2", "avx512f"}) == frozenset()
    assert fast_dtypes_from_flags({"avx512f", "avx512_bf16"}) == {BF16}
    assert fast_dtypes_from_flags({"amx_bf16", "amx_fp16"}) == {BF16, FP16}
    assert fast_dtypes_from_flags({"avx512_fp16"}) == {FP16}


def test_auto_runs_a_bf16_checkpoint_in_bf16_on_a_cpu_with_fast_bf16(monkeypatch):
    monkeypatch.setenv(FAST_DTYPES_ENV, "bfloat16")
    assert resolve_dtype("auto", "cpu", BF16) == BF16
    # bf16 being fast says nothing of fp16, and fp16 weights do not fit bf16's mantissa.
    assert resolve_dtype("auto", "cpu", FP16) == FP32
    assert resolve_dtype("auto", "cpu", FP32) == FP32
    assert resolve_dtype("auto", "cpu", None) == FP32


def test_auto_falls_back_to_fp32_without_fast_bf16_and_says_why(monkeypatch, caplog):
    monkeypatch.setenv(FAST_DTYPES_ENV, "none")
    with caplog.at_level(logging.INFO, logger="polyprune.models"):
        assert resolve_dtype("auto", "cpu", BF16) == FP32
    assert "no fast bfloat16 matmul (no avx512_bf16 or amx_bf16)" in caplog.text


def test_explicit_dtypes_and_gpus_ignore_the_cpu_detection(monkeypatch):
    monkeypatch.setenv(FAST_DTYPES_ENV, "bfloat16")
    assert resolve_dtype("float32", "cpu", BF16) == FP32
    assert resolve_dtype("bfloat16", "cpu", FP32) == BF16
    monkeypatch.setenv(FAST_DTYPES_ENV, "none")
    assert resolve_dtype("auto", "cuda", BF16) == BF16
    assert resolve_dtype("auto", "cuda", None) == "auto"  # transformers reads it from the config
    with pytest.raises(InputError, match="unknown dtype 'fp8'; allowed: auto, float32"):
        resolve_dtype("fp8", "cpu", BF16)


def test_a_bad_override_of_the_detection_names_the_value(monkeypatch):
    monkeypatch.setenv(FAST_DTYPES_ENV, "bf16")
    with pytest.raises(InputError, match=r"POLYPRUNE_FAST_CPU_DTYPES='bf16': allowed are none"):
        fast_cpu_dtypes()


def test_statistics_of_bf16_activations_accumulate_in_fp32():
    torch.manual_seed(0)
    X = torch.randn(300, 24).to(BF16)
    stats = {kind: InputStats(kind, 24) for kind in ("hessian", "colsq")}
    for s in stats.values():
        s.update(X[:100])
        s.update(X[100:])
    Xf = X.float()  # the exact values of the bf16 activations, in fp32
    assert stats["hessian"].H.dtype == FP32
    torch.testing.assert_close(stats["hessian"].H, 2 / 300 * Xf.T @ Xf, rtol=1e-5, atol=1e-6)
    assert stats["colsq"].colsq.dtype == FP32
    torch.testing.assert_close(stats["colsq"].colsq, Xf.pow(2).mean(0), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The bf16 demo model pruned with SparseGPT at ``auto`` on a CPU said to have fast bf16, and
    at float32 (the reference), from the same windows."""
    base = tmp_path_factory.mktemp("dtype")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAST_DTYPES_ENV, "bfloat16")
        for dtype in ("auto", "float32"):
            out = base / dtype
            api.prune("demo", "sparsegpt", 0.5, calib="de,en", nsamples=8, seqlen=128,
                      dtype=dtype, out=out, save_masks=True, progress=False)  # fmt: skip
            runs[dtype] = out
    return runs


def _masks(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "masks.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_auto_on_fast_bf16_forwards_in_bf16_and_writes_the_checkpoint_dtype(demo_runs):
    for dtype, run_as in (("auto", "bfloat16"), ("float32", "float32")):
        manifest = json.loads((demo_runs[dtype] / "polyprune.json").read_text())
        assert manifest["settings"]["dtype"] == run_as
        with safe_open(str(demo_runs[dtype] / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118


def test_bf16_forwards_choose_nearly_the_fp32_masks_and_perplexity(demo_runs, monkeypatch):
    masks = {d: _masks(p) for d, p in demo_runs.items()}
    agree = [(masks["auto"][k] == masks["float32"][k]).float().mean() for k in masks["auto"]]
    # Rounding of the activations moves some weights across the pruning threshold, no more
    # (a broken path agrees at about 0.5, the share of a random mask). down_proj, fed by GeGLU
    # products, moves most, and how much depends on the CPU's bf16 matmul: above 0.9 with
    # avx512_bf16, 0.898 on an AMD EPYC without AVX-512 (emulated bf16), whose perplexities
    # still agree to 3e-4.
    assert min(agree) > 0.85, min(agree)
    ppl = {}
    for dtype, path in demo_runs.items():
        loaded = load_model(path, dtype="float32")
        res = perplexity(loaded.model, loaded.tokenizer, ["de", "en"], seqlen=128,
                         max_tokens=2048, progress=False)  # fmt: skip
        ppl[dtype] = {lang: r.ppl for lang, r in res.items()}
    for lang in ("de", "en"):
        assert ppl["auto"][lang] == pytest.approx(ppl["float32"][lang], rel=0.02), ppl
