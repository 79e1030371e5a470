"""The engine on tiny models of four families, checked against references computed here."""

import copy

import pytest
import torch

from polyprune.compress.engine import EngineConfig, compress_model
from polyprune.compress.masks import Pattern
from polyprune.compress.solver import PruneConfig
from polyprune.compress.sparsegpt import sparsegpt_prune
from polyprune.compress.wanda import wanda_prune
from polyprune.models import find_blocks, get_weight, linear_layers

from .conftest import VOCAB, tiny_model

FAMILIES = ["llama", "qwen2", "opt", "gpt2"]


def windows(n=6, t=24, seed=0):
    return torch.randint(2, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def run(model, method, ids, **kw):
    prune = PruneConfig(kw.pop("sparsity", 0.5), kw.pop("pattern", Pattern()))
    cfg = EngineConfig(method, prune, batch_size=kw.pop("batch_size", 4), progress=False, **kw)
    return compress_model(model, ids, cfg)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_block_linear_is_pruned_and_nothing_else(family, method):
    model = tiny_model(family)
    before = {n: p.clone() for n, p in model.named_parameters()}
    report = run(model, method, windows())
    prefix, blocks = find_blocks(model)
    names = {f"{prefix}.{b}.{n}" for b, blk in enumerate(blocks) for n in linear_layers(blk)}
    assert {r.name for r in report.layers} == names
    for r in report.layers:
        assert r.sparsity == pytest.approx(0.5, abs=1e-6), r.name
    for name, p in model.named_parameters():
        if not any(name.startswith(n) for n in names):  # embeddings, norms, lm_head, biases
            assert torch.equal(p, before[name]), name


def test_llama_groups_share_inputs_in_call_order():
    from polyprune.compress.capture import capture_block_inputs
    from polyprune.compress.passes import probe_groups

    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, windows(), "cpu", 4, progress=False)
    groups = [[n for n, _ in g] for g in probe_groups(blocks[0], inputs, 4, "cpu")]
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def linear_inputs(model, block_index, ids):
    """Inputs of each Linear of one block when ``model`` runs on ``ids`` (plain hooks)."""
    model.eval()
    _, blocks = find_blocks(model)
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0]))
        for n, m in linear_layers(blocks[block_index]).items()
    ]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for n, xs in seen.items()}


def test_engine_runs_in_eval_mode_and_restores_the_mode():
    model = tiny_model("gpt2")  # dropout 0.1: calibration in train mode would be random
    model.train()
    a = copy.deepcopy(model)
    run(model, "wanda", windows())
    run(a, "wanda", windows())
    assert model.training
    for p, q in zip(model.parameters(), a.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_wanda_block1_uses_inputs_from_the_pruned_block0(family):
    """Block 1 must be calibrated on what the *pruned* block 0 outputs (not the dense one)."""
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    ids = windows()
    run(model, "wanda", ids)
    # In the pruned model, block 1's Linear inputs come from pruned block 0 and, in one-pass
    # mode, from block 1's dense weights: rebuild that mix and compare masks.
    hybrid = copy.deepcopy(dense)
    _, hb = find_blocks(hybrid)
    _, pb = find_blocks(model)
    hb[0].load_state_dict(pb[0].state_dict())
    X = linear_inputs(hybrid, 1, ids)
    for name, mod in linear_layers(pb[1]).items():
        W_dense = get_weight(linear_layers(find_blocks(dense)[1][1])[name])
        ref = wanda_prune(W_dense, (X[name].float() ** 2).mean(0), PruneConfig(0.5))
        assert torch.equal(get_weight(mod) == 0, ref.mask), name


def test_true_sequential_calibrates_o_proj_on_pruned_qkv():
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    ids = windows()
    run(model, "sparsegpt", ids, true_sequential=True)
    _, pb = find_blocks(model)
    _, db = find_blocks(dense)
    # q/k/v pruned, o dense: the o_proj input is the attention output of the pruned q/k/v.
    hybrid = copy.deepcopy(dense)
    _, hb = find_blocks(hybrid)
    for n in ("q_proj", "k_proj", "v_proj"):
        getattr(hb[0].self_attn, n).weight.data.copy_(getattr(pb[0].self_attn, n).weight)
    X = linear_inputs(hybrid, 0, ids)["self_attn.o_proj"]
    H = 2.0 / X.shape[0] * X.T.float() @ X.float()
    ref = sparsegpt_prune(db[0].self_attn.o_proj.weight.data, H, PruneConfig(0.5))
    torch.testing.assert_close(pb[0].self_attn.o_proj.weight.data, ref.weight, rtol=1e-4, atol=1e-5)


def test_one_pass_calibrates_o_proj_on_the_dense_block():
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    ids = windows()
    run(model, "sparsegpt", ids, true_sequential=False)
    X = linear_inputs(dense, 0, ids)["self_attn.o_proj"]
    H = 2.0 / X.shape[0] * X.T.float() @ X.float()
    ref = sparsegpt_prune(
        find_blocks(dense)[1][0].self_attn.o_proj.weight.data, H, PruneConfig(0.5)
    )
    got = find_blocks(model)[1][0].self_attn.o_proj.weight.data
    torch.testing.assert_close(got, ref.weight, rtol=1e-4, atol=1e-5)


def test_batch_size_does_not_change_the_result():
    ids = windows(n=7)
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    run(a, "sparsegpt", ids, batch_size=7)
    run(b, "sparsegpt", ids, batch_size=3)  # batches of 3, 3, 1
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_nm_pattern_through_the_engine():
    model = tiny_model("opt")
    run(model, "wanda", windows(), sparsity=0.0, pattern=Pattern(2, 4))
    for _, blk in enumerate(find_blocks(model)[1]):
        for name, mod in linear_layers(blk).items():
            W = get_weight(mod)
            zeros = (W == 0).reshape(W.shape[0], -1, 4).sum(-1)
            assert (zeros == 2).all(), name


def test_masks_are_kept_when_asked():
    model = tiny_model("llama")
    report = run(model, "wanda", windows(), keep_masks=True)
    from polyprune.compress.masks import unpack_mask

    name = report.layers[0].name
    packed, shape = report.masks[name]
    W = get_weight(model.get_submodule(name))
    assert torch.equal(unpack_mask(packed, shape), W == 0)


def tiny_gemma3(seed: int = 0):
    """Two layer types with their own masks (window 8 < 32 tokens) and rotary tables."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=128,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", ["gemma3", "llama", "gpt2", "opt"])
def test_blocks_run_on_captured_inputs_reproduce_the_models_hidden_states(family):
    """Each block gets its own captured arguments (Gemma 3: sliding vs full masks and rotary
    tables); block 0's arguments for every block would fail this on gemma3."""
    from polyprune.compress.capture import block_output, capture_block_inputs

    model = tiny_gemma3() if family == "gemma3" else tiny_model(family).eval()
    _, blocks = find_blocks(model)
    ids = torch.randint(2, VOCAB, (6, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    inputs = capture_block_inputs(model, blocks, ids, "cpu", 4, progress=False)
    assert torch.equal(inputs.hidden, ref[0])
    h = inputs.hidden
    for b, block in enumerate(blocks[:-1]):  # the last hidden state is after the final norm
        inputs.block = b
        with torch.no_grad():
            h = torch.cat([block_output(block(h[sl], *a, **k)) for sl, a, k in inputs.batches(4)])
        torch.testing.assert_close(h, ref[b + 1], rtol=1e-5, atol=1e-5)
    assert "forward" not in blocks[0].__dict__  # the identity stand-in is gone


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dense_propagation_calibrates_every_block_on_the_dense_model(family):
    """--propagate dense: every block's statistics come from the dense model's own hidden
    states (plain hooks on the untouched model here), so block 1's masks are those of Wanda on
    the dense block 0's outputs, and differ from the sequential (compressed) scheme's."""
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    ids = windows()
    run(model, "wanda", ids, propagate="dense")
    _, pb = find_blocks(model)
    _, db = find_blocks(dense)
    for b in range(len(db)):
        X = linear_inputs(dense, b, ids)
        for name, mod in linear_layers(pb[b]).items():
            W_dense = get_weight(linear_layers(db[b])[name])
            ref = wanda_prune(W_dense, (X[name].float() ** 2).mean(0), PruneConfig(0.5))
            assert torch.equal(get_weight(mod) == 0, ref.mask), (b, name)
    sequential = copy.deepcopy(dense)
    run(sequential, "wanda", ids)
    _, sb = find_blocks(sequential)
    assert any(
        not torch.equal(get_weight(m) == 0, get_weight(linear_layers(pb[1])[n]) == 0)
        for n, m in linear_layers(sb[1]).items()
    )


def test_dense_propagation_runs_each_block_once_per_batch():
    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    calls = {"dense": 0, "compressed": 0}
    for propagate in calls:
        m = copy.deepcopy(model)
        _, bl = find_blocks(m)
        hook = bl[1].register_forward_pre_hook(
            lambda *a, p=propagate: calls.__setitem__(p, calls[p] + 1)
        )
        run(m, "sparsegpt", windows(n=8), batch_size=4, propagate=propagate)
        hook.remove()
    # 2 batches; the capture calls every block once per batch (to record its arguments), then
    # dense: one pass (statistics and outputs), compressed: statistics, then outputs
    assert calls == {"dense": 2 + 2, "compressed": 2 + 4}


def test_dense_propagation_refuses_true_sequential_and_unknown_values():
    from polyprune.errors import InputError

    with pytest.raises(InputError, match="true-sequential"):
        EngineConfig("wanda", propagate="dense", true_sequential=True)
    with pytest.raises(
        InputError, match="unknown propagation 'sideways'; allowed: compressed, dense"
    ):
        EngineConfig("wanda", propagate="sideways")
