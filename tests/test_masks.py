import pytest
import torch

from polyprune.compress.masks import Pattern, pack_mask, row_prune_count, unpack_mask
from polyprune.errors import InputError
from polyprune.kernels.topk_mask import kth_smallest, nm_mask, row_topk_mask, smallest_k_mask


def test_pattern_parses_unstructured_and_nm():
    assert Pattern.parse("unstructured") == Pattern()
    assert Pattern.parse("2:4") == Pattern(2, 4)
    assert Pattern.parse("4:8").sparsity == 0.5


@pytest.mark.parametrize("bad", ["2:x", "24", "2-4", ":4", "a:b"])
def test_malformed_pattern_is_input_error(bad):
    with pytest.raises(InputError, match="bad pattern"):
        Pattern.parse(bad)


@pytest.mark.parametrize("bad", ["4:2", "0:4", "4:4", "1:1"])
def test_impossible_pattern_is_input_error(bad):
    with pytest.raises(InputError, match="impossible pattern"):
        Pattern.parse(bad)


def test_pattern_width_check_names_the_layer():
    with pytest.raises(InputError, match="layers.3.mlp has 66"):
        Pattern(2, 4).check_width(66, "layers.3.mlp")


def test_row_prune_count_is_exact_floor_for_decimal_sparsities():
    assert row_prune_count(100, 0.29) == 29  # 100 * 0.29 == 28.999999999999996 in floats
    assert row_prune_count(7, 0.5) == 3
    assert row_prune_count(10, 0.0) == 0


def test_row_topk_breaks_ties_by_column():
    score = torch.tensor([[1.0, 1.0, 1.0, 0.5]])
    assert row_topk_mask(score, 2).tolist() == [[True, False, False, True]]


def test_nm_mask_has_n_in_every_group():
    score = torch.randn(5, 24)
    mask = nm_mask(score, 2, 4)
    assert (mask.reshape(5, 6, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 33)])
def test_mask_pack_roundtrip(shape):
    mask = torch.rand(shape) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, shape), mask)


@pytest.mark.parametrize("shape,k", [((6, 40), 13), ((3, 5, 8), 4), ((1, 1), 1), ((4, 9), 0)])
def test_smallest_k_equals_a_stable_sort_even_with_many_ties(shape, k):
    score = torch.randint(0, 4, shape).float()  # mostly ties
    idx = torch.sort(score, dim=-1, stable=True)[1][..., :k]
    expected = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)
    assert torch.equal(smallest_k_mask(score, k), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,k", [((1, 5000), 2500), ((37, 64), 1), ((5, 3, 16), 16), ((9, 33), 17)]
)
def test_kth_smallest_equals_torch_kthvalue(dtype, shape, k):
    """The CPU path (NumPy's selection) against ``torch.kthvalue``: ties, signed zeros, NaN
    (sorts last in both) and non-contiguous input included."""
    g = torch.Generator().manual_seed(k)
    score = torch.randint(-3, 4, shape, generator=g).to(dtype) * 0.5  # many ties, some -0.0
    score = torch.where(
        torch.rand(shape, generator=g) < 0.5, score, torch.randn(shape, generator=g).to(dtype)
    )
    score.view(-1)[::7] = float("nan")
    score.view(-1)[1::11] = -0.0
    for s in (score, score.transpose(0, -1).contiguous().transpose(0, -1)):
        got = kth_smallest(s, k)
        want = torch.kthvalue(s, k, dim=-1, keepdim=True).values
        assert got.dtype == s.dtype and got.shape == want.shape
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    # and the masks built on it: a stable sort's first k
    s = score.nan_to_num(9.0)
    idx = torch.sort(s, dim=-1, stable=True)[1][..., :k]
    expected = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    assert torch.equal(smallest_k_mask(s, k), expected)


def test_kth_smallest_takes_the_numpy_path_on_the_cpu(monkeypatch):
    """The comparison above would pass if every call fell back to ``torch.kthvalue``: here that
    fallback fails, so only the NumPy selection can answer (CPU, float32 and bf16)."""
    import polyprune.kernels.topk_mask as tm

    def no_torch(*a, **k):
        raise AssertionError("torch.kthvalue called on the CPU path")

    monkeypatch.setattr(tm.torch, "kthvalue", no_torch)
    score = torch.tensor([[3.0, 1.0, 2.0, 0.5], [0.0, -1.0, 4.0, 2.0]])
    for dtype in (torch.float32, torch.bfloat16):
        assert kth_smallest(score.to(dtype), 2).tolist() == [[1.0], [0.0]]
    with pytest.raises(AssertionError, match="torch.kthvalue"):  # integers still go to torch
        kth_smallest(score.long(), 2)
