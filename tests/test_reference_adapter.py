"""The reference adapter function: gradcheck in float64, masking, merging."""

import pytest
import torch

from adalora_fast.reference import (
    apply_dropout_mask,
    svd_adapter_reference,
    svd_delta_weight_reference,
    svd_linear_reference,
)


def _inputs(shape_x, r, out_f, dtype=torch.float64):
    in_f = shape_x[-1]
    x = torch.randn(*shape_x, dtype=dtype, requires_grad=True)
    A = torch.randn(r, in_f, dtype=dtype, requires_grad=True)
    E = torch.randn(r, 1, dtype=dtype, requires_grad=True)
    B = torch.randn(out_f, r, dtype=dtype, requires_grad=True)
    mask = (torch.rand(r, dtype=dtype) > 0.3).to(dtype).requires_grad_()
    return x, A, E, B, mask


@pytest.mark.parametrize("shape_x,r,out_f", [((5, 7), 1, 3), ((4, 9), 12, 6), ((2, 3, 5), 4, 7)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_gradcheck_reference_adapter(shape_x, r, out_f, dropout_p):
    x, A, E, B, mask = _inputs(shape_x, r, out_f)
    keep = torch.rand(shape_x) > dropout_p  # a fixed dropout mask, the same in every evaluation
    ranknum = torch.tensor([float(r)], dtype=torch.float64)

    def f(x, A, E, B, mask):
        return svd_adapter_reference(apply_dropout_mask(x, keep, dropout_p), A, E, B, mask, 8.0, ranknum)

    assert torch.autograd.gradcheck(f, (x, A, E, B, mask))
    assert torch.autograd.gradgradcheck(f, (x, A, E, B, mask))


def test_adapter_matches_closed_form():
    x, A, E, B, mask = _inputs((6, 10), 5, 4)
    ranknum = torch.tensor([5.0], dtype=torch.float64)
    s = 16.0 / (5.0 + 1e-5)
    expected = s * x @ A.T @ torch.diag((E.view(-1) * mask)) @ B.T
    torch.testing.assert_close(svd_adapter_reference(x, A, E, B, mask, 16.0, ranknum), expected)


def test_all_triplets_masked_gives_base_output_and_no_adapter_gradient():
    x, A, E, B, _ = _inputs((6, 10), 4, 3)
    mask = torch.zeros(4, dtype=torch.float64)
    W = torch.randn(3, 10, dtype=torch.float64)
    y = svd_linear_reference(x, W, None, A, E, B, mask, 8.0, torch.tensor([4.0], dtype=torch.float64))
    torch.testing.assert_close(y, x @ W.T, rtol=0, atol=0)
    y.sum().backward()
    for g in (A.grad, E.grad, B.grad):
        assert torch.count_nonzero(g) == 0


def test_masked_triplet_gets_no_gradient_but_others_do():
    x, A, E, B, _ = _inputs((6, 10), 4, 3)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    svd_adapter_reference(x, A, E, B, mask, 8.0, torch.tensor([4.0], dtype=torch.float64)).sum().backward()
    assert torch.count_nonzero(A.grad[1]) == 0 and torch.count_nonzero(B.grad[:, 1]) == 0 and E.grad[1] == 0
    assert torch.count_nonzero(A.grad[0]) > 0 and E.grad[0] != 0


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_delta_equals_adapter_output(fan_in_fan_out):
    x, A, E, B, mask = _inputs((6, 10), 4, 3)
    ranknum = torch.tensor([4.0], dtype=torch.float64)
    dW = svd_delta_weight_reference(A, E, B, mask, 8.0, ranknum, fan_in_fan_out)
    assert dW.shape == ((10, 3) if fan_in_fan_out else (3, 10))
    W = dW.T if fan_in_fan_out else dW
    torch.testing.assert_close(x @ W.T, svd_adapter_reference(x, A, E, B, mask, 8.0, ranknum))


def test_dropout_mask_formula_matches_f_dropout():
    x = torch.randn(64, 32)
    torch.manual_seed(3)
    y = torch.nn.functional.dropout(x, 0.3, True)
    keep = y != 0
    torch.testing.assert_close(apply_dropout_mask(x, keep, 0.3), y)
