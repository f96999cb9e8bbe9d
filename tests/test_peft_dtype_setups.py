"""The setups people train in run on the kernels: PEFT's defaults (fp32 adapters over a half-precision
model) and an fp32 model under ``torch.autocast``; they train and match stock PEFT in the same setup.

The models run on ``DEVICE`` with the ``kernels`` fixture: on a GPU, or on a CPU in Triton's interpreter. bf16
models run there too: over fp32 adapters the kernels' products are fp32, which the interpreter computes right.
"""

import pytest
import torch
from helpers import LLAMA_TARGETS, lora_params, peft_llama, saved_activation_bytes, tiny_llama, token_batch
from tooling.device import DEVICE, ON_GPU

import adalora_fast
from adalora_fast import dispatch

STEPS = 3
TOKEN_BATCH = 2  # sequences per step: 32 tokens, two row blocks of the interpreter's tiles


def _train_side_by_side(stock, fast, autocast=None, steps=STEPS, sync=True):
    """AdamW steps of both models on the same batches; (losses, adapter gradients) per model per step. Both
    models' rank allocators update every step.

    ``sync``: the fast model computes each step from stock's adapter weights (copied before the step): what is
    compared is each step's computation, not two trajectories that Adam's normalised updates pull apart from
    rounding-level differences (:func:`_assert_own_trajectory_tracks_stock` checks the trajectory by its losses).

    Under fp16 autocast the loss is scaled by 2^10 before the backward, as a GradScaler does (fp16
    activation gradients underflow otherwise); Adam's update does not depend on the scale."""
    loss_scale = 2.0**10 if autocast == torch.float16 else 1.0
    out = {"stock": ([], []), "fast": ([], [])}
    models = {"stock": stock, "fast": fast}
    opts = {k: torch.optim.AdamW(lora_params(m), lr=1e-2) for k, m in models.items()}
    for step in range(steps):
        ids = token_batch(step, batch=TOKEN_BATCH).to(DEVICE)
        if sync:
            with torch.no_grad():
                for p_fast, p_stock in zip(lora_params(fast), lora_params(stock), strict=True):
                    p_fast.copy_(p_stock)
        for name, model in models.items():
            with torch.autocast(DEVICE, dtype=autocast, enabled=autocast is not None):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss * loss_scale).backward()
            out[name][0].append(loss.detach().float())
            out[name][1].append([p.grad.clone() for p in lora_params(model)])
            opts[name].step()
            model.base_model.update_and_allocate(step)
            opts[name].zero_grad()
    return out


def _assert_tracks_stock(out, loss_rtol, grad_tol):
    (loss_s, grads_s), (loss_f, grads_f) = out["stock"], out["fast"]
    torch.testing.assert_close(torch.stack(loss_f), torch.stack(loss_s), rtol=loss_rtol, atol=0)
    for step, (gs, gf) in enumerate(zip(grads_s, grads_f)):
        for i, (a, b) in enumerate(zip(gf, gs)):
            assert a.dtype == b.dtype == torch.float32, (step, i)  # adapter gradients in the adapters' dtype
            scale = max(b.abs().max().item(), 1e-6)
            torch.testing.assert_close(a, b, rtol=grad_tol, atol=grad_tol * scale, msg=f"step {step}, grad {i}")


def _models(dtype=None, **kw):
    """(stock PEFT, patched) twins of the tiny Llama on DEVICE; ``dtype``: the base model's."""
    return peft_llama(dtype=dtype, **kw).to(DEVICE), adalora_fast.patch_peft(peft_llama(dtype=dtype, **kw)).to(DEVICE)


def _assert_own_trajectory_tracks_stock(loss_rtol, dtype=None, autocast=None):
    """The fast model trained by its own optimizer: its losses track stock PEFT's, and fall."""
    out = _train_side_by_side(*_models(dtype), autocast=autocast, sync=False)
    torch.testing.assert_close(torch.stack(out["fast"][0]), torch.stack(out["stock"][0]), rtol=loss_rtol, atol=0)
    assert out["fast"][0][-1] < out["fast"][0][0]


@pytest.mark.parametrize("dtype,loss_rtol,grad_tol", [(torch.float16, 2e-3, 1e-2), (torch.bfloat16, 1e-2, 6e-2)],
                         ids=["fp16", "bf16"])  # fmt: skip
def test_peft_defaults_half_model_fp32_adapters_run_the_kernels_and_match_stock(kernels, dtype, loss_rtol, grad_tol):
    """Tolerances: the half model's own rounding (the adapters' gradients pass through half-precision
    activations and their gradients, rounded at other points than PEFT's chain of matmuls)."""
    stock, fast = _models(dtype)
    layer = fast.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == dtype and layer.lora_A["default"].dtype == torch.float32
    dispatch.reset_backend_calls()
    out = _train_side_by_side(stock, fast)
    calls = dispatch.backend_calls()["svd_adapter"]
    assert calls == {"triton": STEPS * len(LLAMA_TARGETS) * 2}, calls  # every adapted layer, every step
    _assert_tracks_stock(out, loss_rtol, grad_tol)
    if dtype == torch.float16:  # (one dtype per setup trains by its own optimizer: the steps are compared in all)
        _assert_own_trajectory_tracks_stock(loss_rtol, dtype=dtype)


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_model_under_autocast_runs_the_kernels_and_matches_stock(kernels, autocast):
    """As the Trainer with bf16=True / fp16=True trains an fp32 model. Stock PEFT's adapter matmuls run in
    autocast's dtype there, the kernels' in fp32 over the half activations: the tolerance is the half one."""
    stock, fast = _models()
    dispatch.reset_backend_calls()
    out = _train_side_by_side(stock, fast, autocast=autocast)
    assert dispatch.backend_calls()["svd_adapter"] == {"triton": STEPS * len(LLAMA_TARGETS) * 2}
    _assert_tracks_stock(out, 1e-2, 6e-2 if autocast == torch.bfloat16 else 5e-3)
    if autocast == torch.bfloat16:
        _assert_own_trajectory_tracks_stock(1e-2, autocast=autocast)
    with torch.autocast(DEVICE, dtype=autocast):  # the output dtype is F.linear's under autocast
        layer = fast.base_model.model.model.layers[0].mlp.up_proj
        assert layer(torch.randn(3, 32, device=DEVICE)).dtype == autocast


def test_peft_default_setup_saves_less_for_the_backward_than_peft_lora(kernels):
    """bf16 model, fp32 adapters (both PEFTs' defaults), dropout 0.1: LoRA keeps an fp32 copy of every adapted
    input and a dropped one; the patched layers keep x (the base GEMM's own) and N × r_pad fp32."""
    from peft import LoraConfig, get_peft_model

    ids = token_batch(0, batch=4, seq=32).to(DEVICE)
    lora = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS,
                                                                      lora_dropout=0.1, task_type="CAUSAL_LM")).to(DEVICE)  # fmt: skip
    fast = adalora_fast.patch_peft(peft_llama(init_r=12, target_r=8, lora_dropout=0.1, dtype=torch.bfloat16)).to(DEVICE)
    saved = {
        name: saved_activation_bytes(lambda m=m: m(input_ids=ids, labels=ids, use_cache=False).loss.backward(),
                                     list(m.parameters()) + list(m.buffers()))
        for name, m in (("lora", lora), ("fast", fast))
    }  # fmt: skip
    assert saved["fast"] < saved["lora"], saved
    # One patched layer: x (bf16, the base GEMM's) and one 128 × 16 fp32 tile, nothing else (PEFT's layers
    # have no triplet mask: they share one cached mask of ones, not an activation).
    from adalora_fast.kernels.svd_adapter_op import _ONES

    layer = fast.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(128, 32, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    exclude = list(layer.parameters()) + list(_ONES.values())
    assert saved_activation_bytes(lambda: layer(x), exclude) == x.numel() * 2 + 128 * 16 * 4


@pytest.mark.automatic_dispatch
@pytest.mark.skipif(not ON_GPU, reason="the bf16 kernels run on a GPU")
@pytest.mark.parametrize("setup", ["bf16_model_fp32_adapters", "fp32_model_bf16_autocast"])
def test_on_gpu_the_default_setups_track_stock_peft_for_100_steps(setup):
    """The GPU twin of the tests above, with no backend forced: the dispatcher itself must pick the kernels."""
    dtype, autocast = (torch.bfloat16, None) if setup.startswith("bf16") else (None, torch.bfloat16)
    stock, fast = peft_llama(dtype=dtype).cuda(), adalora_fast.patch_peft(peft_llama(dtype=dtype)).cuda()
    dispatch.reset_backend_calls()
    losses = {"stock": [], "fast": []}
    opts = {"stock": torch.optim.AdamW(lora_params(stock), lr=1e-2), "fast": torch.optim.AdamW(lora_params(fast), lr=1e-2)}
    for step in range(100):
        ids = token_batch(step).cuda()
        for name, model in (("stock", stock), ("fast", fast)):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast is not None):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opts[name].step()
            model.base_model.update_and_allocate(step)
            opts[name].zero_grad()
            losses[name].append(loss.float().item())
    assert dispatch.backend_calls()["svd_adapter"] == {"triton": 100 * len(LLAMA_TARGETS) * 2}
    torch.testing.assert_close(torch.tensor(losses["fast"]), torch.tensor(losses["stock"]), rtol=2e-2, atol=0)
    assert losses["fast"][-1] < losses["fast"][0]
