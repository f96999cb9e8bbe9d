"""The orthogonality penalty against PEFT's AdaLoraModel.forward and loralib's compute_orth_regu."""

import types

import pytest
import torch
import torch.nn as nn

from adalora_fast import FastSVDLinear, compute_orth_regu
from adalora_fast.discovery import find_orth_matrices
from adalora_fast.reference import orth_penalty_reference, orth_penalty_sum
from helpers import TinyMLP, peft_config


class _WithLoss(nn.Module):
    """A model whose output carries a ``loss``, so AdaLoraModel.forward adds its penalty."""

    def __init__(self):
        super().__init__()
        self.mlp = TinyMLP()

    def forward(self, x):
        return types.SimpleNamespace(loss=self.mlp(x).sum() * 0.0)


def test_penalty_equals_peft_adalora_model_loss_term(monkeypatch):
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_WithLoss(), peft_config(target_modules=["fc1", "fc2"], orth_reg_weight=0.7))
    inner = model.base_model.model
    peft_term = model.base_model(torch.randn(2, 16)).loss  # AdaLoraModel.forward: 0 + w * mean ‖G − I‖
    mats = [(p, right) for _, p, right in find_orth_matrices(inner, "default")]
    assert len(mats) == 4
    ours = 0.7 * (orth_penalty_sum(mats) / len(mats))
    assert torch.equal(peft_term, ours)
    # The whole-model penalty, on the compiled op and on the reference path (bitwise PEFT there).
    torch.testing.assert_close(compute_orth_regu(inner, 0.7, adapter_name="default"), peft_term, rtol=1e-6, atol=0)
    monkeypatch.setenv("ADALORA_FAST_BACKEND", "reference")
    assert torch.equal(compute_orth_regu(inner, 0.7, adapter_name="default"), peft_term)
    monkeypatch.delenv("ADALORA_FAST_BACKEND")

    grads_peft = torch.autograd.grad(peft_term, [p for p, _ in mats])
    grads_ours = torch.autograd.grad(compute_orth_regu(inner, 0.7, adapter_name="default"), [p for p, _ in mats])
    for a, b in zip(grads_peft, grads_ours):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_compute_orth_regu_is_loralib_formula():
    torch.manual_seed(0)
    model = nn.Sequential(FastSVDLinear(10, 7, r=3), FastSVDLinear(7, 5, r=6))
    w = 0.1
    expected, n = 0.0, 0
    for name, p in model.named_parameters():  # loralib's loop, written out
        if "lora_A" in name or "lora_B" in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            expected += torch.norm(cov - torch.eye(*cov.shape), p="fro")
            n += 1
    torch.testing.assert_close(compute_orth_regu(model, w), w * expected / n, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["fro", "fro2"])
def test_penalty_modes_closed_form_and_gradcheck(mode):
    torch.manual_seed(0)
    As = [torch.randn(r, d, dtype=torch.float64, requires_grad=True) for r, d in [(1, 5), (12, 7), (4, 4)]]
    Bs = [torch.randn(d, r, dtype=torch.float64, requires_grad=True) for r, d in [(1, 3), (12, 9), (4, 6)]]
    got = orth_penalty_reference(As, Bs, mode)
    terms = [torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0], dtype=a.dtype)) for a in As]
    terms += [torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1], dtype=b.dtype)) for b in Bs]
    expected = sum(t**2 if mode == "fro2" else t for t in terms) / 6
    torch.testing.assert_close(got, expected)
    assert torch.autograd.gradcheck(lambda *ps: orth_penalty_reference(ps[:3], ps[3:], mode), (*As, *Bs))


def test_fro2_gradient_is_four_p_times_deviation():
    P = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    orth_penalty_reference([], [P], "fro2").backward()
    torch.testing.assert_close(P.grad, 4 * P.detach() @ (P.detach().T @ P.detach() - torch.eye(4, dtype=P.dtype)))


def test_orthonormal_factors_have_zero_penalty():
    Q, _ = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))
    assert orth_penalty_reference([Q.T.contiguous()], [Q], "fro") < 1e-12


def test_penalty_rejects_bad_input():
    with pytest.raises(ValueError, match="mode"):
        orth_penalty_reference([torch.eye(2)], [], "l1")
    with pytest.raises(ValueError, match="no AdaLoRA adapters"):
        compute_orth_regu(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="regu_weight"):
        compute_orth_regu(FastSVDLinear(3, 3, r=1), -1.0)
