"""Bad input gets a clear error that names the problem."""

import pytest
import torch
import torch.nn as nn

from adalora_fast import FastSVDLinear, RankAllocator
from adalora_fast.reference import BudgetSchedule


def _model():
    return nn.Sequential(FastSVDLinear(6, 6, r=4), FastSVDLinear(6, 2, r=4))


def _alloc(model, **kw):
    args = dict(lora_r=4, target_rank=2, init_warmup=2, final_warmup=3, mask_interval=2, beta1=0.85, beta2=0.85)
    args.update(kw)
    return RankAllocator(model, **args)


@pytest.mark.parametrize("target_rank", [4, 5])
def test_target_rank_not_below_initial_rank(target_rank):
    with pytest.raises(ValueError, match="target_rank .* must be < .*lora_r"):
        _alloc(_model(), target_rank=target_rank, total_step=20)


def test_target_total_rank_not_below_initial_budget():
    with pytest.raises(ValueError, match="target budget .* must be smaller"):
        _alloc(_model(), target_total_rank=8, total_step=20)


@pytest.mark.parametrize("total", [5, 4, 0])
def test_total_step_must_leave_a_budgeting_phase(total):
    with pytest.raises(ValueError, match="total_step .* must be > tinit \\+ tfinal"):
        _alloc(_model(), total_step=total)
    alloc = _alloc(_model())
    with pytest.raises(ValueError, match="total_step"):
        alloc.set_total_step(total)


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5])
def test_betas_must_be_in_open_unit_interval(beta):
    with pytest.raises(ValueError, match="beta1 must be in \\(0, 1\\)"):
        _alloc(_model(), beta1=beta, total_step=20)
    with pytest.raises(ValueError, match="beta2 must be in \\(0, 1\\)"):
        _alloc(_model(), beta2=beta, total_step=20)


def test_mask_interval_must_be_positive():
    with pytest.raises(ValueError, match="deltaT"):
        _alloc(_model(), mask_interval=0, total_step=20)


def test_allocator_before_total_step_is_set():
    model = _model()
    with pytest.raises(RuntimeError, match="total_step is not set"):
        _alloc(model).update_and_mask(model, 0)


def test_allocator_with_no_gradient_names_the_parameter():
    model = _model()
    alloc = _alloc(model, total_step=20)
    with pytest.raises(RuntimeError, match=r"0\.lora_A has no gradient.*after backward\(\)"):
        alloc.update_and_mask(model, 0)


def test_allocator_on_a_model_without_adapters():
    with pytest.raises(ValueError, match="no AdaLoRA adapters"):
        _alloc(nn.Sequential(nn.Linear(3, 3)), total_step=20)


def test_schedule_rejects_negative_phases():
    with pytest.raises(ValueError, match="tinit and tfinal"):
        BudgetSchedule(init_bgt=8, target_bgt=4, tinit=-1, tfinal=0, total_step=10, deltaT=1)


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 5), (5,)])
def test_input_feature_size_mismatch(shape):
    layer = FastSVDLinear(6, 4, r=2)
    with pytest.raises(ValueError, match=r"last dimension is in_features=6"):
        layer(torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_input(dtype):
    layer = FastSVDLinear(6, 4, r=2)
    with pytest.raises(TypeError, match="floating-point input"):
        layer(torch.zeros(3, 6, dtype=dtype))


def test_non_tensor_input():
    with pytest.raises(TypeError, match="torch.Tensor"):
        FastSVDLinear(6, 4, r=2)([[0.0] * 6])


@pytest.mark.parametrize("r", [0, -1, 2.0])
def test_rank_must_be_a_positive_int(r):
    with pytest.raises(ValueError, match="r >= 1"):
        FastSVDLinear(6, 4, r=r)


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_dropout_range(p):
    with pytest.raises(ValueError, match="lora_dropout"):
        FastSVDLinear(6, 4, r=2, lora_dropout=p)


def test_unknown_semantics():
    with pytest.raises(ValueError, match="semantics"):
        _alloc(_model(), semantics="paper", total_step=20)


def test_input_on_another_device_than_the_layer():
    layer = FastSVDLinear(6, 4, r=2)
    with pytest.raises(ValueError, match="the input is on meta but the layer's weights are on cpu"):
        layer(torch.empty(3, 6, device="meta"))


def test_allocator_reports_gradients_kept_outside_param_grad():
    # DeepSpeed ZeRO keeps gradients in its own buffers: param.grad is empty when the allocator runs.
    model = _model()
    alloc = _alloc(model, total_step=20)
    model(torch.randn(3, 6)).sum().backward()
    model[1].lora_B.grad = None
    with pytest.raises(RuntimeError, match=r"1\.lora_B has no gradient"):
        alloc.update_and_mask(model, 0)
