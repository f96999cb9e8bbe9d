"""FastSVDLinear on the reference path against PEFT's SVDLinear, and loralib's API contract."""

import inspect

import pytest
import torch
import torch.nn as nn

from adalora_fast import FastSVDLinear, convert_linear_layers, mark_only_lora_as_trainable
from helpers import twin_layers
from tooling.device import DEVICE


def _grads(layer, names):
    return [dict(layer.named_parameters())[n].grad for n in names]


@pytest.mark.parametrize("shape_x,in_f,out_f,r", [((7, 16), 16, 9, 12), ((2, 5, 33), 33, 20, 1), ((4, 13), 13, 13, 4)])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_every_gradient_match_peft(shape_x, in_f, out_f, r, dropout, bias):
    ours, theirs = twin_layers(in_f, out_f, r, lora_alpha=8, lora_dropout=dropout, bias=bias)
    theirs.get_base_layer().weight.requires_grad_(False)
    x1 = torch.randn(shape_x, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(*shape_x[:-1], out_f)

    torch.manual_seed(123)
    y1 = ours(x1)
    torch.manual_seed(123)  # the same dropout draw on both paths
    y2 = theirs(x2)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()

    assert torch.equal(y1, y2)
    assert torch.equal(x1.grad, x2.grad)
    for ours_name, peft_name in [("lora_A", "lora_A.default"), ("lora_E", "lora_E.default"), ("lora_B", "lora_B.default")]:
        assert torch.equal(_grads(ours, [ours_name])[0], _grads(theirs, [peft_name])[0]), ours_name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_output_keeps_base_dtype_like_peft(dtype):
    ours, theirs = twin_layers(24, 10, 12, dtype=dtype)
    x = torch.randn(5, 24, dtype=dtype)
    y1, y2 = ours(x), theirs(x)
    assert y1.dtype == dtype
    assert torch.equal(y1, y2)


def test_constructor_matches_loralib_svdlinear():
    sig = inspect.signature(FastSVDLinear.__init__)
    defaults = {k: v.default for k, v in sig.parameters.items() if v.default is not inspect.Parameter.empty}
    assert defaults == dict(r=0, lora_alpha=1, lora_dropout=0.0, fan_in_fan_out=False, merge_weights=True)
    assert list(sig.parameters)[:8] == [
        "self", "in_features", "out_features", "r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "merge_weights",
    ]  # fmt: skip
    layer = FastSVDLinear(20, 7, r=5, lora_alpha=16, bias=False, dtype=torch.float64)
    assert isinstance(layer, nn.Linear)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"weight": (7, 20), "lora_A": (5, 20), "lora_E": (5, 1), "lora_B": (7, 5), "ranknum": (1,)}
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert not layer.weight.requires_grad and not layer.ranknum.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_E.requires_grad and layer.lora_B.requires_grad
    assert float(layer.ranknum) == 5.0 and layer.scaling == 16
    assert FastSVDLinear(4, 4, r=3, lora_alpha=0).scaling == 3.0  # alpha <= 0 falls back to r


def test_initialisation_follows_the_references():
    torch.manual_seed(0)
    layer = FastSVDLinear(512, 384, r=12)
    assert torch.count_nonzero(layer.lora_E) == 0  # ΔW = 0 at start
    for p in (layer.lora_A, layer.lora_B):
        assert abs(p.mean().item()) < 2e-3 and abs(p.std().item() - 0.02) < 1e-3
    x = torch.randn(3, 512)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_state_dict_has_exactly_loralib_keys_and_round_trips():
    a = FastSVDLinear(10, 6, r=3, lora_alpha=4)
    assert set(a.state_dict()) == {"weight", "bias", "lora_A", "lora_E", "lora_B", "ranknum"}
    with torch.no_grad():
        a.lora_E.normal_()
    b = FastSVDLinear(10, 6, r=3, lora_alpha=4)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(4, 10)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_eval_merges_and_train_unmerges(fan_in_fan_out):
    torch.manual_seed(1)
    layer = FastSVDLinear(12, 8, r=4, lora_alpha=8, fan_in_fan_out=fan_in_fan_out).double()
    assert layer.weight.shape == ((12, 8) if fan_in_fan_out else (8, 12))
    with torch.no_grad():
        layer.lora_E.normal_()
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 12, dtype=torch.float64)
    y_train = layer(x)
    layer.eval()
    assert layer.merged and not torch.equal(layer.weight, w0)
    torch.testing.assert_close(layer(x), y_train)
    layer.train()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0)
    # A parent's eval() (which calls train(False) on children) merges too.
    parent = nn.Sequential(layer).eval()
    assert layer.merged
    torch.testing.assert_close(parent(x), y_train)


def test_merge_weights_false_never_merges():
    layer = FastSVDLinear(6, 6, r=2, merge_weights=False)
    w0 = layer.weight.detach().clone()
    layer.eval()
    assert not layer.merged and torch.equal(layer.weight, w0)


def test_all_triplets_masked_is_the_frozen_layer():
    layer = FastSVDLinear(9, 5, r=4)
    with torch.no_grad():
        layer.lora_E.normal_()
    layer.triplet_mask.zero_()
    x = torch.randn(3, 9)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_non_contiguous_and_3d_inputs():
    layer = FastSVDLinear(8, 5, r=3).double()
    with torch.no_grad():
        layer.lora_E.normal_()
    x = torch.randn(4, 6, 8, dtype=torch.float64).transpose(0, 1)
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), layer(x.contiguous()))
    assert layer(x).shape == (6, 4, 5)


def test_convert_and_mark_only_lora_trainable():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(2, 8)
    y0 = model(x)
    names = convert_linear_layers(model, r=3, lora_alpha=4)
    assert names == ["0", "2"] and all(isinstance(model[i], FastSVDLinear) for i in (0, 2))
    torch.testing.assert_close(model(x), y0)  # Λ = 0: the adapted model starts as the base model
    mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.lora_{k}" for i in (0, 2) for k in "AEB"}


def test_torch_compile_fullgraph_matches_eager():
    model = nn.Sequential(FastSVDLinear(16, 16, r=4, lora_alpha=4), nn.ReLU(), FastSVDLinear(16, 8, r=4, lora_alpha=4))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_E.normal_()
    x = torch.randn(5, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    y_eager = model(x)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    for g, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0)


@pytest.mark.parametrize("x_dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("merged", [False, True])
def test_an_input_of_another_dtype_is_a_clear_error(x_dtype, merged):
    """F.linear's rule, in the library's words: the input has the base weight's dtype, or autocast casts both."""
    layer = FastSVDLinear(8, 4, r=2)
    layer.train(not merged)
    with pytest.raises(TypeError, match=rf"base weight is torch.float32 but its input is {x_dtype}.*torch.autocast"):
        layer(torch.randn(3, 8, dtype=x_dtype))


def test_fp32_layer_under_autocast_takes_half_inputs_like_f_linear(backend):
    layer = FastSVDLinear(8, 4, r=2, lora_alpha=2).to(DEVICE)
    with torch.no_grad():
        layer.lora_E.normal_()
    x = torch.randn(3, 8, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = layer(x)
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == expected.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.lora_A.grad.dtype == torch.float32
