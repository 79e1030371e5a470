"""GPTQ and RTN against independent references written here, on small layers."""

import pytest
import torch

from polyprune.compress.gptq import gptq_quantize, rtn
from polyprune.compress.quant import QuantConfig, to_int
from polyprune.compress.solver import PruneConfig
from polyprune.compress.sparsegpt import sparsegpt_prune
from polyprune.errors import InputError

from .test_solvers import correlated_inputs, hessian


def ref_params(x, bits, sym):
    """GPTQ's min-max grid for the rows of x, written out plainly."""
    maxq = 2**bits - 1
    scales, zeros = [], []
    for row in x.double():
        lo, hi = min(row.min().item(), 0.0), max(row.max().item(), 0.0)
        if sym:
            hi = max(abs(lo), hi)
            lo = -hi if lo < 0 else lo
        if lo == 0 and hi == 0:
            lo, hi = -1.0, 1.0
        scale = float(torch.tensor(max((hi - lo) / maxq, 2.0**-14)).half())  # stored as fp16
        scales.append(scale)
        zeros.append((maxq + 1) / 2 if sym else round(-lo / scale))
    return torch.tensor(scales, dtype=torch.float64), torch.tensor(zeros, dtype=torch.float64)


def ref_quant(w, scale, zero, maxq):
    return scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)


def reference_gptq(W, H, bits, group, sym, act_order, static=False, blocksize=128, percdamp=0.01):
    """GPTQ without lazy batching, in float64: every column's error goes to all later columns
    at once. Group grids come from the weights as they stood at the start of the column's
    128-block (what the reference code reads), or from the original weights (static)."""
    W = W.clone().double()
    H = H.clone().double()
    rows, cols = W.shape
    maxq = 2**bits - 1
    g = cols if group == -1 else group
    chan = ref_params(W, bits, sym)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static_grids = [ref_params(W[:, c : c + g], bits, sym) for c in range(0, cols, g)]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H)).T
    Q = torch.zeros_like(W)
    grid = chan
    block_start = W.clone()
    for j in range(cols):
        if j % blocksize == 0:
            block_start = W.clone()
        if group != -1:
            if static:
                grid = static_grids[int(perm[j]) // g]
            elif j % g == 0:
                grid = ref_params(block_start[:, j : j + g], bits, sym)
        q = ref_quant(W[:, j], *grid, maxq)
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= err.unsqueeze(1) * U[j, j:].unsqueeze(0)
        Q[:, j] = q
    return Q[:, torch.argsort(perm)].float()


CASES = [
    (4, -1, True, False, False),
    (4, 16, True, False, False),
    (4, 16, False, True, False),
    (3, 32, False, False, False),
    (3, 16, True, True, True),
    (2, 64, False, True, False),
    (8, 16, False, False, False),
]


@pytest.mark.parametrize("bits,group,sym,act_order,static", CASES)
def test_gptq_equals_straightforward_reference(bits, group, sym, act_order, static):
    torch.manual_seed(0)
    W = torch.randn(24, 64)
    H = hessian(correlated_inputs(2048, 64))
    cfg = QuantConfig(bits, group, sym, act_order, static, blocksize=32)
    res = gptq_quantize(W, H, cfg)
    ref = reference_gptq(W, H, bits, group, sym, act_order, static, blocksize=32)
    rel = (res.weight - ref).norm() / ref.norm()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("bits,group,sym,act_order,static", CASES)
def test_every_weight_lies_on_its_group_grid(bits, group, sym, act_order, static):
    torch.manual_seed(1)
    W = torch.randn(16, 64)
    H = hessian(correlated_inputs(1024, 64))
    res = gptq_quantize(W, H, QuantConfig(bits, group, sym, act_order, static, blocksize=32))
    qt = res.quant
    q = to_int(res.weight, qt)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    scale = qt.scales[qt.g_idx.long()].t()
    zero = qt.zeros[qt.g_idx.long()].t()
    torch.testing.assert_close(res.weight, scale * (q - zero), rtol=0, atol=1e-6)
    groups = 1 if group == -1 else 64 // group
    assert qt.scales.shape == (groups, 16) and qt.g_idx.shape == (64,)
    assert torch.bincount(qt.g_idx.long()).tolist() == [64 // groups] * groups


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_reconstruction_error_below_rtn(bits):
    torch.manual_seed(2)
    X = correlated_inputs(4096, 128)
    W = torch.randn(64, 128)
    cfg = QuantConfig(bits, 32, sym=False)

    def err(Wq):
        return ((X @ W.T - X @ Wq.T) ** 2).sum().item()

    assert err(gptq_quantize(W, hessian(X), cfg).weight) < err(rtn(W, cfg).weight)


def test_act_order_g_idx_follows_the_processing_order():
    torch.manual_seed(3)
    X = correlated_inputs(512, 32)
    H = hessian(X)
    res = gptq_quantize(torch.randn(4, 32), H, QuantConfig(4, 8, act_order=True, blocksize=8))
    perm = torch.argsort(torch.diag(H), descending=True)
    assert res.quant.g_idx[perm].tolist() == [j // 8 for j in range(32)]


def test_joint_sparsegpt_4bit_is_sparse_and_on_the_grid():
    torch.manual_seed(4)
    W = torch.randn(16, 64)
    H = hessian(correlated_inputs(1024, 64))
    quant = QuantConfig(4, 16, sym=False)
    res = sparsegpt_prune(W, H, PruneConfig(0.5, blocksize=32), quant=quant)
    zeros_per_block = (res.weight == 0).reshape(16, 2, 32).sum((0, 2))
    assert (zeros_per_block >= 16 * 32 // 2).all()
    assert torch.equal(res.weight[res.mask], torch.zeros(int(res.mask.sum())))
    q = to_int(res.weight, res.quant)
    scale = res.quant.scales[res.quant.g_idx.long()].t()
    zero = res.quant.zeros[res.quant.g_idx.long()].t()
    torch.testing.assert_close(res.weight, scale * (q - zero), rtol=0, atol=1e-6)
    assert int(res.mask.sum()) == 16 * 64 // 2


@pytest.mark.parametrize(
    "kwargs,match",
    [({"bits": 5}, "bits 5"), ({"group_size": 0}, "group size 0"), ({"percdamp": -1}, "percdamp")],
)
def test_bad_quant_config_is_input_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        QuantConfig(**kwargs)


def test_group_size_must_divide_the_width():
    with pytest.raises(InputError, match="does not divide the input width 100"):
        QuantConfig(4, 128).check_width(100, "layers.0.mlp.down_proj")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K,N", [(96, 160), (32, 32), (480, 224)])
def test_pack_unpack_round_trip_and_gptq_shapes(bits, K, N):
    from polyprune.compress.export import pack_linear
    from polyprune.gptq_format import unpack_cols, unpack_rows

    torch.manual_seed(bits)
    W = torch.randn(N, K)
    groups = K // 32
    res = gptq_quantize(W, hessian(correlated_inputs(256, K)), QuantConfig(bits, 32, sym=False))
    q = to_int(res.weight, res.quant)
    for v2 in (False, True):
        if not v2 and (res.quant.zeros == 0).any():
            continue  # v1 cannot hold a zero point of 0 (the writer switches to v2)
        t = pack_linear(res.weight, res.quant, torch.randn(N), v2=v2)
        assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (K * bits // 32, N)
        assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (groups, N * bits // 32)
        assert t["scales"].dtype == torch.float16 and t["scales"].shape == (groups, N)
        assert t["g_idx"].dtype == torch.int32 and t["g_idx"].shape == (K,)
        assert t["bias"].dtype == torch.float16
        assert torch.equal(unpack_rows(t["qweight"], bits), q.t())
        stored = unpack_cols(t["qzeros"], bits) + (0 if v2 else 1)
        assert torch.equal(stored, torch.round(res.quant.zeros).to(torch.int32))


def test_4bit_symmetric_zeros_pack_to_the_known_word():
    from polyprune.gptq_format import pack_cols

    zeros = torch.full((1, 8), 8, dtype=torch.int32)  # sym 4-bit zero point, stored as 7 (v1)
    assert pack_cols(zeros - 1, 4).item() == 0x77777777


def test_3bit_layout_matches_gptq_word_boundaries():
    from polyprune.gptq_format import pack_cols

    vals = torch.zeros(1, 32, dtype=torch.int32)
    vals[0, 10] = 0b101  # straddles words 0 and 1
    vals[0, 21] = 0b110  # straddles words 1 and 2
    w = pack_cols(vals, 3)[0].to(torch.int64) & 0xFFFFFFFF
    assert w[0] == 0b01 << 30 and w[1] == (1 | (0 << 31)) and w[2] == 0b11
