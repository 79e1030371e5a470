"""SNR, pruning error and mask IoU against hand-computed values; hidden states in lockstep
against plain forward hooks."""

import copy
import math

import pytest
import torch

from polyprune.analysis.hidden import compare_hidden_states
from polyprune.analysis.iou import intersect_seeds, mask_iou, seed_iou, sublayer_type
from polyprune.analysis.snr import SNR_CAP_DB, LayerErrorStats, model_snr, snr_db
from polyprune.models import find_blocks

from .conftest import tiny_model


def stats_of(h, h2):
    s = LayerErrorStats()
    for a, b in zip(h.split(100), h2.split(100), strict=True):  # streamed in chunks
        s.update(a, b)
    return s


def test_identical_states_give_the_capped_snr():
    h = torch.randn(500, 32)
    assert stats_of(h, h.clone()).snr_db == SNR_CAP_DB


def test_zero_states_give_0_db():
    h = torch.randn(500, 32)
    assert stats_of(h, torch.zeros_like(h)).snr_db == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("sigma", [0.01, 0.1, 0.5])
def test_known_noise_power_gives_the_expected_snr(sigma):
    torch.manual_seed(0)
    h = torch.randn(20000, 64)  # unit power per coordinate
    h2 = h + sigma * torch.randn_like(h)
    assert stats_of(h, h2).snr_db == pytest.approx(10 * math.log10(1 / sigma**2), abs=0.1)


def test_pruning_error_is_mse_in_units_of_the_mean_token_norm():
    torch.manual_seed(1)
    h = torch.randn(300, 16) * 3
    h2 = h + 0.2 * torch.randn_like(h)
    c = h.norm(dim=1).mean()
    expected = ((h - h2) ** 2).sum() / (300 * 16) / c**2
    assert stats_of(h, h2).pruning_error == pytest.approx(expected.item(), rel=1e-4)


def test_model_snr_is_the_mean_over_layers():
    a, b = LayerErrorStats(100.0, 1.0, 1.0, 1, 1), LayerErrorStats(10.0, 1.0, 1.0, 1, 1)
    assert model_snr([a, b]) == pytest.approx(15.0)
    assert snr_db(1.0, 0.0) == SNR_CAP_DB and snr_db(0.0, 1.0) == -SNR_CAP_DB


def m(*bits):
    return torch.tensor(bits, dtype=torch.bool)


Q, D = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"


def test_seed_intersection_is_applied_first():
    s1 = {Q: m(1, 1, 0, 0), D: m(1, 0, 1, 0)}
    s2 = {Q: m(1, 0, 1, 0), D: m(1, 0, 1, 1)}
    both = intersect_seeds([s1, s2])
    assert torch.equal(both[Q], m(1, 0, 0, 0)) and torch.equal(both[D], m(1, 0, 1, 0))


def test_iou_on_hand_built_masks():
    de = intersect_seeds(
        [{Q: m(1, 1, 0, 0), D: m(1, 1, 1, 0)}, {Q: m(1, 1, 1, 0), D: m(1, 1, 1, 0)}]
    )
    sw = {Q: m(0, 1, 1, 0), D: m(1, 1, 0, 1)}
    # de: Q 1100, D 1110; sw: Q 0110, D 1101
    # Q: inter 1, union 3; D: inter 2, union 4; all: 3 / 7
    assert mask_iou(de, sw, "sublayer") == {"q": pytest.approx(1 / 3), "down": pytest.approx(0.5)}
    assert mask_iou(de, sw, "layer") == {"0": pytest.approx(1 / 3), "1": pytest.approx(0.5)}
    assert mask_iou(de, sw)["all"] == pytest.approx(3 / 7)
    assert mask_iou(de, de)["all"] == 1.0


def test_seed_iou_is_the_mean_over_seed_pairs():
    a, b, c = {Q: m(1, 1, 0, 0)}, {Q: m(1, 0, 1, 0)}, {Q: m(1, 1, 0, 0)}
    # ab: 1/3, ac: 1, bc: 1/3
    assert seed_iou([a, b, c])["all"] == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert sublayer_type("x.mlp.gate_proj") == "gate" and sublayer_type("x.attn.c_attn") == "c_attn"


def block_outputs(model, ids):
    outs = []
    hooks = [
        b.register_forward_hook(lambda mod, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for b in find_blocks(model)[1]
    ]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return outs


def test_lockstep_hidden_states_equal_plain_hooks():
    dense = tiny_model("llama", layers=3).eval()
    pruned = copy.deepcopy(dense)
    for p in find_blocks(pruned)[1][1].parameters():  # perturb layer 1 only
        p.data.mul_(0.9)
    ids = torch.randint(2, 300, (5, 24), generator=torch.Generator().manual_seed(0))
    stats = compare_hidden_states(dense, {"p": pruned}, ids, batch_size=2, progress=False)["p"]
    h, h2 = block_outputs(dense, ids), block_outputs(pruned, ids)
    assert stats[0].snr_db == SNR_CAP_DB  # layer 0 untouched
    for layer in (1, 2):
        sig = (h[layer].double() ** 2).sum().item()
        err = ((h[layer].double() - h2[layer].double()) ** 2).sum().item()
        assert stats[layer].tokens == 5 * 24
        assert stats[layer].snr_db == pytest.approx(10 * math.log10(sig / err), abs=1e-3)


def planted(d=64, L=7, r=6, seed=0, noise=1e-3):
    """Shared part + a planted rank-r language signal + noise: M (d, L) and the planted basis."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(d, 1, generator=g) * 5
    basis, _ = torch.linalg.qr(torch.randn(d, r, generator=g))  # planted orthonormal (d, r)
    coeff = torch.randn(r, L, generator=g) * 3
    coeff = coeff - coeff.mean(1, keepdim=True)  # language signal averages out
    M = shared + basis @ coeff + noise * torch.randn(d, L, generator=g)
    return M, basis


def principal_angles_deg(A, B):
    cos = torch.linalg.svdvals(A.t().double() @ B.double()).clamp(max=1.0)
    return torch.rad2deg(torch.arccos(cos))


def test_lsar_recovers_the_planted_language_subspace():
    from polyprune.analysis.lsar import lsar_subspace

    M, basis = planted()
    Ms = lsar_subspace(M)  # r = L - 1 = 6
    assert Ms.shape == (64, 6)
    torch.testing.assert_close(Ms.t() @ Ms, torch.eye(6), atol=1e-5, rtol=0)
    assert principal_angles_deg(Ms, basis).max() < 1.0


def test_lsar_agnostic_projection_removes_the_planted_signal():
    from polyprune.analysis.lsar import lsar_subspace, projected_change

    M, basis = planted()
    Ms = lsar_subspace(M)
    signal = basis @ torch.randn(6, 20)  # (d, prompts) purely language-specific changes
    agnostic = signal - Ms @ (Ms.t() @ signal)
    assert agnostic.norm() / signal.norm() < 0.02
    spec, agn = projected_change(Ms, torch.zeros(20, 64), signal.t())
    assert agn < 0.02 * spec
    shared_dir = torch.randn(64, 1)
    shared_dir -= basis @ (basis.t() @ shared_dir)  # orthogonal to the language signal
    spec, agn = projected_change(Ms, torch.zeros(5, 64), shared_dir.t().repeat(5, 1))
    assert spec < 0.02 * agn


def test_lsar_rank_is_checked():
    from polyprune.analysis.lsar import lsar_subspace

    with pytest.raises(ValueError, match="rank 9"):
        lsar_subspace(torch.randn(16, 7), rank=9)


def test_lsar_equals_a_plain_reimplementation_of_the_reference_steps():
    import numpy as np

    from polyprune.analysis.lsar import lsar_subspace

    g = torch.Generator().manual_seed(5)
    M = (torch.randn(20, 5, generator=g) + 3).double().numpy()  # no planted structure
    r = 3
    mu = M.mean(1, keepdims=True)
    U, S, Vt = np.linalg.svd(M - mu, full_matrices=False)
    M_fit = mu + U[:, :r] @ np.diag(S[:r]) @ Vt[:r]
    v = np.linalg.pinv(M_fit).T @ np.ones((5, 1))
    mu2 = v / (v**2).sum()
    U2 = np.linalg.svd(M_fit - mu2 @ np.ones((1, 5)), full_matrices=False)[0][:, :r]
    Ms = lsar_subspace(torch.from_numpy(M), rank=r).double().numpy()
    np.testing.assert_allclose(Ms @ Ms.T, U2 @ U2.T, atol=1e-5)  # same subspace


def test_lape_entropy_on_a_hand_computed_table():
    from polyprune.analysis.lape import lape_entropy

    tokens = torch.tensor([10, 10, 20])
    counts = torch.tensor(
        [[5, 0, 0, 2],  # columns: even, never fires, one language only, uneven
         [5, 0, 4, 0],
         [10, 0, 0, 8]]
    )  # fmt: skip
    ent = lape_entropy(counts, tokens)
    assert ent[0].item() == pytest.approx(math.log(3))  # p = .5 .5 .5
    assert math.isnan(ent[1].item())
    assert ent[2].item() == 0.0
    q = [1 / 3, 2 / 3]  # p = .2, 0, .4
    assert ent[3].item() == pytest.approx(-sum(x * math.log(x) for x in q))


def test_lape_counting_through_hooks_equals_counting_by_hand():
    from polyprune.analysis.lape import LapeCounter

    model = tiny_model("llama", layers=2).eval()
    batches = {0: torch.randint(2, 300, (3, 16)), 1: torch.randint(2, 300, (2, 16))}
    with LapeCounter(model, n_langs=2) as counter, torch.no_grad():
        for lang, ids in batches.items():
            counter.lang = lang
            model(ids, use_cache=False)
    for layer, mlp in enumerate(model.model.layers):
        mlp = mlp.mlp
        for lang, ids in batches.items():
            seen = {}
            h1 = mlp.gate_proj.register_forward_hook(lambda m, a, o, s=seen: s.__setitem__("g", o))
            h2 = mlp.down_proj.register_forward_pre_hook(
                lambda m, a, s=seen: s.__setitem__("A", a[0])
            )
            with torch.no_grad():
                model(ids, use_cache=False)
            h1.remove()
            h2.remove()
            active = (torch.nn.functional.silu(seen["g"]) > 0).reshape(-1, 128).sum(0)
            magnitude = seen["A"].abs().reshape(-1, 128).sum(0)
            assert torch.equal(counter.counts[layer, lang], active)
            torch.testing.assert_close(counter.magnitude[layer, lang], magnitude)
    assert counter.tokens.tolist() == [48, 32]
    assert counter.entropy().shape == (2, 128)


def test_lape_leaves_out_the_tokens_keep_excludes():
    """analyze counts ordinary tokens only: BOS (position 0 here) must not enter any count."""
    from polyprune.analysis.lape import LapeCounter

    model = tiny_model("llama", layers=2).eval()
    ids = torch.randint(2, 300, (3, 16))
    keep = torch.ones(3, 16, dtype=torch.bool)
    keep[:, 0] = False
    with LapeCounter(model, n_langs=1) as counter, torch.no_grad():
        counter.keep = keep.reshape(-1)
        model(ids, use_cache=False)
    mlp = model.model.layers[1].mlp
    seen = {}
    h1 = mlp.gate_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("g", o))
    h2 = mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("A", a[0]))
    with torch.no_grad():
        model(ids, use_cache=False)
    h1.remove()
    h2.remove()
    active = (torch.nn.functional.silu(seen["g"][:, 1:]) > 0).reshape(-1, 128).sum(0)
    magnitude = seen["A"][:, 1:].abs().reshape(-1, 128).sum(0)
    assert torch.equal(counter.counts[1, 0], active)
    torch.testing.assert_close(counter.magnitude[1, 0], magnitude)
    assert counter.tokens.tolist() == [45]
