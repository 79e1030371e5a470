"""Gemma 3: a tiny random Gemma3 (GeGLU MLP, sliding and full attention layers) for the logic,
and the real Gemma 3 270M for pruning, LAPE, streaming and ``polyprune analyze`` end to end
(8 windows of 128 tokens, two languages: small enough for two CPU cores)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from polyprune.analysis.lape import LapeCounter, gated_mlps

from .conftest import VOCAB, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU, written out (not the model's act_fn)."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def tiny_gemma(layers: int = 3, seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"][:layers],
        max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        hidden_activation="gelu_pytorch_tanh",
    )  # fmt: skip
    return Gemma3ForCausalLM(cfg).eval()


def hand_counts(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: tokens with gelu_tanh(gate) > 0 and sum |gelu_tanh(gate) * up|, from hooks
    on gate_proj and up_proj of a plain forward."""
    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for part in ("gate_proj", "up_proj"):
            handles.append(getattr(layer.mlp, part).register_forward_hook(
                lambda m, a, o, key=(i, part): seen.__setitem__(key, o)))  # fmt: skip
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    counts, mags = [], []
    for i in range(len(model.model.layers)):
        gate, up = seen[(i, "gate_proj")], seen[(i, "up_proj")]
        act = gelu_tanh(gate)
        counts.append((act > 0).reshape(-1, act.shape[-1]).sum(0))
        mags.append((act * up).abs().reshape(-1, act.shape[-1]).sum(0))
    return counts, mags


# --- tiny random Gemma3: the logic without the real model --------------------------------------


def test_gated_mlps_accept_gemma_geglu_and_refuse_an_ungated_mlp():
    model = tiny_gemma()
    mlps = gated_mlps(model)
    assert [type(m).__name__ for m in mlps] == ["Gemma3MLP"] * 3
    with pytest.raises(ValueError, match="no gated MLP"):
        gated_mlps(tiny_model("gpt2"))


def test_lape_counts_gelu_gate_activity_on_tiny_gemma():
    model = tiny_gemma()
    batches = {0: torch.randint(2, VOCAB, (3, 16)), 1: torch.randint(2, VOCAB, (2, 16))}
    with LapeCounter(model, n_langs=2) as counter, torch.no_grad():
        for lang, ids in batches.items():
            counter.lang = lang
            model(ids, use_cache=False)
    for lang, ids in batches.items():
        counts, mags = hand_counts(model, ids)
        for layer in range(3):
            assert torch.equal(counter.counts[layer, lang], counts[layer])
            torch.testing.assert_close(counter.magnitude[layer, lang], mags[layer])
    # GELU, unlike ReLU, is negative for negative inputs: a neuron is active on act > 0 only
    assert 0 < counter.counts.sum() < counter.tokens.sum() * 3 * 128
    assert counter.tokens.tolist() == [48, 32]
