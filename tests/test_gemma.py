"""Gemma 3: a tiny random Gemma3 (GeGLU MLP, sliding and full attention layers) for the logic,
and the real Gemma 3 270M for pruning, LAPE, streaming and ``polyprune analyze`` end to end
(8 windows of 128 tokens, two languages: small enough for two CPU cores)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from polyprune.analysis.lape import LapeCounter, gated_mlps
from polyprune.data.windows import window_bos

from .conftest import VOCAB, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CALIB = dict(nsamples=8, seqlen=128, progress=False, save_masks=True)
LANGS = "de,sw"


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


def test_probe_groups_linears_by_shared_input_on_tiny_gemma():
    from polyprune.compress.capture import capture_block_inputs
    from polyprune.compress.passes import probe_groups

    model = tiny_gemma()
    blocks = model.model.layers
    inputs = capture_block_inputs(model, blocks, torch.randint(2, VOCAB, (2, 12)), "cpu", 2,
                                  progress=False)  # fmt: skip
    groups = probe_groups(blocks[0], inputs, 2, "cpu")
    assert [[name for name, _ in g] for g in groups] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]  # q_norm / k_norm are RMSNorms, not Linears: never grouped or pruned


def test_cut_windows_put_bos_before_seqlen_minus_one_stream_tokens():
    from polyprune.data.windows import cut_windows

    stream = torch.arange(10, 20)
    assert cut_windows(stream, 4, None).tolist() == [[10, 11, 12, 13], [14, 15, 16, 17]]
    assert cut_windows(stream, 4, 2).tolist() == [[2, 10, 11, 12], [2, 13, 14, 15],
                                                  [2, 16, 17, 18]]  # fmt: skip
    assert cut_windows(stream, 4, 2, limit=1).tolist() == [[2, 10, 11, 12]]
    assert cut_windows(stream[:2], 4, 2).shape == (0, 4)


def test_window_bos_only_for_tokenizers_that_add_one(tokenizer):
    from polyprune.models import load_tokenizer

    assert window_bos(tokenizer) is None  # the tiny BPE has a BOS token but does not add it
    assert window_bos(load_tokenizer("demo")) is None


def test_perplexity_with_bos_predicts_every_stream_token():
    from polyprune.eval.perplexity import stream_perplexity

    model = tiny_gemma()
    stream = torch.randint(2, VOCAB, (50,), generator=torch.Generator().manual_seed(0))
    ppl, tokens, windows = stream_perplexity(model, stream, 16, bos=0)
    assert (tokens, windows) == (50, 4)  # 3 x (BOS + 15) and BOS + the last 5
    x = torch.cat([torch.tensor([0]), stream[:15]]).unsqueeze(0)
    with torch.no_grad():
        logits = model(x, use_cache=False).logits
    first = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
    assert stream_perplexity(model, stream[:15], 16, bos=0)[0] == pytest.approx(
        math.exp(first.item() / 15), rel=1e-5
    )


# --- the real Gemma 3 270M --------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_runs(gemma_dir, tmp_path_factory):
    """Wanda on de (in memory and streamed), Wanda on sw, SparseGPT on de; all with masks."""
    from polyprune import prune

    root = tmp_path_factory.mktemp("gemma-runs")
    specs = {
        "wanda-de": dict(method="wanda", calib="de", stream=False),
        "wanda-de-stream": dict(method="wanda", calib="de", stream=True),
        "wanda-sw": dict(method="wanda", calib="sw", stream=False),
        "sparsegpt-de": dict(method="sparsegpt", calib="de", stream=False),
    }
    for name, kw in specs.items():
        prune(str(gemma_dir), sparsity=0.5, out=root / name, **kw, **CALIB)
    return {name: root / name for name in specs}


def block_linears(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items()
            if k.startswith("model.layers.") and k.endswith("_proj.weight")}  # fmt: skip


def test_wanda_on_gemma_prunes_exactly_half_of_every_row(gemma_runs):
    linears = block_linears(load_file(str(gemma_runs["wanda-de"] / "model.safetensors")))
    assert len(linears) == 18 * 7
    for name, W in linears.items():
        zeros = (W == 0).sum(1)
        assert torch.equal(zeros, torch.full_like(zeros, W.shape[1] // 2)), name


def test_sparsegpt_on_gemma_prunes_exactly_half_of_every_linear(gemma_runs):
    linears = block_linears(load_file(str(gemma_runs["sparsegpt-de"] / "model.safetensors")))
    assert len(linears) == 18 * 7
    for name, W in linears.items():
        assert int((W == 0).sum()) == W.numel() // 2, name


@pytest.mark.parametrize("run", ["wanda-de", "sparsegpt-de"])
def test_pruned_gemma_loads_with_a_finite_heldout_perplexity(gemma_runs, gemma_dir, run):
    from polyprune.eval.perplexity import perplexity
    from polyprune.models import load_model

    loaded = load_model(str(gemma_runs[run]))
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # still tied
    res = perplexity(loaded.model, loaded.tokenizer, ["de"], seqlen=128, max_tokens=4 * 127,
                     progress=False)["de"]  # fmt: skip
    assert res.tokens == 4 * 127 and math.isfinite(res.ppl) and 1 < res.ppl < 1e4


def test_streamed_gemma_equals_in_memory_gemma(gemma_runs):
    a = load_file(str(gemma_runs["wanda-de"] / "model.safetensors"))
    b = load_file(str(gemma_runs["wanda-de-stream"] / "model.safetensors"))
    assert set(a) == set(b) and "lm_head.weight" not in a  # tied: the embedding only
    for name, t in a.items():
        assert t.dtype == b[name].dtype == torch.bfloat16, name
        assert torch.equal(t, b[name]), name
    ma = load_file(str(gemma_runs["wanda-de"] / "masks.safetensors"))
    mb = load_file(str(gemma_runs["wanda-de-stream"] / "masks.safetensors"))
    assert set(ma) == set(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_gemma_windows_start_with_bos(gemma_dir):
    from polyprune.analysis.analyze import heldout_windows
    from polyprune.data.mix import build_calibration_set
    from polyprune.models import load_tokenizer

    tok = load_tokenizer(str(gemma_dir))
    ids, segments, counts = heldout_windows(tok, ("de", "sw"), "bundled", 2, 16)
    assert ids.shape == (4, 16) and (ids[:, 0] == tok.bos_token_id).all()
    assert (ids[:, 1:] != tok.bos_token_id).all()
    calib = build_calibration_set("de", tok, nsamples=3, seqlen=16, use_cache=False)
    assert (calib.input_ids[:, 0] == tok.bos_token_id).all()
    assert (calib.input_ids[:, 1:] != tok.bos_token_id).all()


def test_lockstep_lape_on_gemma_equals_plain_forwards(gemma_dir):
    """Each block runs with its own arguments: with block 0's, the full-attention layers (5, 11,
    17) would get the sliding layers' rotary embeddings and every count from layer 5 on would
    differ (1300-1700 of 2048 neurons per layer did)."""
    from polyprune.analysis.analyze import heldout_windows
    from polyprune.analysis.hidden import lockstep_block_outputs
    from polyprune.models import load_model

    loaded = load_model(str(gemma_dir))
    model = loaded.model
    ids, segments, _ = heldout_windows(loaded.tokenizer, ("de", "sw"), "bundled", 4, 128)
    with LapeCounter(model, n_langs=2) as lockstep:

        def on_batch(name, seg, rows):
            lockstep.lang = seg

        for _ in lockstep_block_outputs({"m": model}, ids, segments, 4, on_batch=on_batch,
                                        progress=False):  # fmt: skip
            pass
    for lang, seg in enumerate(segments):
        counts, mags = hand_counts(model, ids[seg])
        for layer in range(18):
            assert torch.equal(lockstep.counts[layer, lang], counts[layer]), layer
            torch.testing.assert_close(lockstep.magnitude[layer, lang], mags[layer])


def test_analyze_on_gemma_produces_every_metric(gemma_runs, gemma_dir, tmp_path):
    from PIL import Image

    from polyprune.cli import main

    report = tmp_path / "report"
    dirs = [gemma_runs["wanda-de"], gemma_runs["wanda-sw"]]
    args = ["analyze", "--dense", gemma_dir, "--compressed", *dirs, "--langs", LANGS,
            "--nsamples", "4", "--seqlen", "128", "--out", report, "-q"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    m = json.loads((report / "metrics.json").read_text())
    assert m["metrics"] == ["snr", "error", "iou", "lsar", "lape"]
    for run in ("de", "sw"):
        snr = m["snr"][run]
        assert len(snr["layers"]["all"]) == 18
        assert all(0 < v < 100 for lang in ("de", "sw", "all") for v in snr["layers"][lang])
        assert all(v is not None and v > 0 for v in m["error"][run]["layers"]["all"])
        assert len(m["lsar"]["runs"][run]["specific"]) == 18
    iou = m["iou"]["wanda unstructured 0.50"]["matrices"]
    assert set(iou["sublayer"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert all(0 < mat[0][1] < 1 for mat in iou["sublayer"].values())
    assert m["lape"]["neurons"] == 18 * 2048 and len(m["lape"]["groups"]) == 50
    for png in report.glob("*.png"):
        img = np.asarray(Image.open(png).convert("L"))
        assert min(img.shape) >= 300 and img.std() > 5, png.name
