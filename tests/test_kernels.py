import pytest
import torch

from polyprune.kernels.hessian import hessian_update_reference, hessian_update_upper, symmetrize


@pytest.mark.parametrize("d", [1, 7, 255, 256, 257, 600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_upper_triangle_hessian_equals_the_full_update(d, dtype):
    torch.manual_seed(0)
    H, H_ref = torch.zeros(d, d), torch.zeros(d, d)
    n = 0
    for b in (5, 64, 1):  # uneven batches, running mean
        X = torch.randn(b, d).to(dtype)
        hessian_update_upper(H, n, X)
        hessian_update_reference(H_ref, n, X)
        n += b
    torch.testing.assert_close(symmetrize(H), H_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(symmetrize(H), symmetrize(H).t())


def test_hessian_update_checks_shapes():
    with pytest.raises(ValueError, match="expected X"):
        hessian_update_upper(torch.zeros(4, 4), 0, torch.zeros(3, 5))
