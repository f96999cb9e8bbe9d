"""QLoRA: PEFT's AdaLoRA over a bitsandbytes 4-bit or 8-bit base runs adalora-fast's kernels once patched, with
stock PEFT's outputs, output dtypes, gradients and masks, keeps no fp32 copy of the activations for its
backward, and gives gradient checkpointing's gradients unchanged.

The models are a two-layer Llama (hidden 64) loaded through ``from_pretrained(quantization_config=...)`` as a
QLoRA user loads theirs, on ``DEVICE`` (bitsandbytes' CPU backend without a GPU).
"""

import pytest
import torch
from helpers import lora_params, random_singular_values, saved_activation_bytes, token_batch
from tooling.device import BF16, DEVICE, F32, ON_GPU, TOL, assert_close_to_scale

import adalora_fast
from adalora_fast import dispatch

if ON_GPU:  # the GPU machine's Python may lack it; the CPU install (requirements-test.txt) always has it
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed in this GPU machine's Python")
import bitsandbytes  # noqa: E402,F401

TARGETS = ["q_proj", "v_proj"]
HIDDEN = 64  # bitsandbytes' CPU 4-bit path packs the weight in blocks of 64 inputs: no layer may be narrower


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def quantized_llama(checkpoint, bits: int, dtype=BF16):
    """The checkpoint's weights loaded in ``bits`` bits (nf4 with ``dtype`` compute, or LLM.int8())
    and prepared for k-bit training, as PEFT's QLoRA recipe does."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    model = LlamaForCausalLM.from_pretrained(checkpoint, quantization_config=quant, dtype=dtype,
                                             device_map={"": DEVICE})  # fmt: skip
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def qlora_adalora(checkpoint, bits: int, seed=0, dtype=BF16, **kw):
    """Stock PEFT AdaLoRA over a quantized :func:`quantized_llama` (random Λ, so the adapters are active)."""
    from peft import AdaLoraConfig, get_peft_model

    args = dict(init_r=6, target_r=3, tinit=2, tfinal=2, deltaT=2, total_step=10, lora_alpha=8, lora_dropout=0.0,
                target_modules=TARGETS, orth_reg_weight=0.5, task_type="CAUSAL_LM")  # fmt: skip
    args.update(kw)
    torch.manual_seed(seed)
    return random_singular_values(get_peft_model(quantized_llama(checkpoint, bits, dtype), AdaLoraConfig(**args)), std=0.5)


def adapted_layers(model):
    from peft.tuners.adalora import AdaLoraLayer

    return [m for m in model.modules() if isinstance(m, AdaLoraLayer)]


PEFT_CLASS = {4: "SVDLinear4bit", 8: "SVDLinear8bitLt"}


@pytest.fixture(scope="module")
def twin_layers(checkpoint):
    """bits -> (stock PEFT's first adapted layer, the patched twin's), made once per module (the layer tests
    only read the layers and clear the gradients they make)."""
    made = {}

    def layers(bits):
        if bits not in made:
            stock, fast = qlora_adalora(checkpoint, bits), qlora_adalora(checkpoint, bits)
            adalora_fast.patch_peft(fast)
            made[bits] = (stock, fast, adapted_layers(stock)[0], adapted_layers(fast)[0])
        return made[bits][2:]

    return layers


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("x_dtype", [BF16, F32], ids=["bf16 x", "fp32 x"])
@pytest.mark.parametrize("autocast", [None, BF16], ids=["no autocast", "bf16 autocast"])
def test_a_quantized_layer_runs_the_kernels_as_stock_peft_computes_it(kernels, twin_layers, bits, x_dtype, autocast):
    theirs, ours = twin_layers(bits)
    assert type(theirs).__name__ == PEFT_CLASS[bits] and type(ours).__name__ == "FastPeft" + PEFT_CLASS[bits]
    x = torch.randn(2, 5, HIDDEN, device=DEVICE, dtype=x_dtype)
    results = {}
    for name, layer in (("stock", theirs), ("fast", ours)):
        xi = x.clone().requires_grad_()
        dispatch.reset_backend_calls()
        with torch.autocast(DEVICE, dtype=autocast or BF16, enabled=autocast is not None):
            y = layer(xi)
        calls = dispatch.backend_calls()["svd_adapter"]
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, y.dtype))
        params = (layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"])
        results[name] = (y, xi.grad, [p.grad for p in params], calls)
        for p in params:
            p.grad = None
    (y_s, dx_s, grads_s, calls_s), (y_f, dx_f, grads_f, calls_f) = results["stock"], results["fast"]
    assert calls_s == {} and calls_f == {"triton": 1}  # stock PEFT's own forward, then the kernels
    assert y_f.dtype == y_s.dtype and dx_f.dtype == dx_s.dtype == x_dtype
    out_tol, grad_tol = TOL[(x_dtype, F32, autocast)]
    assert_close_to_scale(y_f, y_s, out_tol, "y")
    assert_close_to_scale(dx_f, dx_s, out_tol, "dx")
    for name, g_f, g_s in zip(("dA", "dE", "dB"), grads_f, grads_s):
        assert g_f.dtype == g_s.dtype == F32
        assert_close_to_scale(g_f, g_s, grad_tol, name)


def masks(model):
    """Which triplets each adapter keeps (its Λ's nonzero entries)."""
    return [(p != 0).flatten().tolist() for n, p in model.named_parameters() if "lora_E" in n]


@pytest.mark.parametrize("bits", [4, 8])
def test_a_patched_qlora_model_trains_through_budgeting_with_stock_peft_masks(kernels, checkpoint, bits):
    """Warm-up, budgeting and the final phase (total_step 10): the same masks at every step, the same losses.
    fp32 compute: bf16 (the layer test's) rounds the adapter's term where stock PEFT rounds it differently, by
    2^-8, enough to swap two near-tied triplet scores."""
    models = {"stock": qlora_adalora(checkpoint, bits, dtype=F32), "fast": qlora_adalora(checkpoint, bits, dtype=F32)}
    adalora_fast.patch_peft(models["fast"])
    opts = {k: torch.optim.AdamW(lora_params(m), lr=2e-2) for k, m in models.items()}
    losses = {k: [] for k in models}
    dispatch.reset_backend_calls()
    for step in range(10):
        ids = token_batch(step, batch=2, seq=8).to(DEVICE)
        for name, model in models.items():
            loss = model(input_ids=ids, labels=ids).loss  # the orthogonality penalty included
            loss.backward()
            opts[name].step()
            model.base_model.update_and_allocate(step)
            opts[name].zero_grad()
            losses[name].append(loss.item())
        assert masks(models["fast"]) == masks(models["stock"]), f"step {step}"
    assert dispatch.backend_calls()["svd_adapter"] == {"triton": 10 * 2 * len(TARGETS)}
    kept = sum(map(sum, masks(models["fast"])))
    assert kept == 3 * 2 * len(TARGETS), "the budget reached target_r"
    torch.testing.assert_close(torch.tensor(losses["fast"]), torch.tensor(losses["stock"]), rtol=2e-3, atol=0)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_keeps_the_gradients_of_a_quantized_base(kernels, checkpoint, reentrant):
    """Dropout 0.1 included: the recomputed forward draws the same dropout as the first one."""
    grads = []
    for checkpointing in (False, True):
        model = qlora_adalora(checkpoint, 4, lora_dropout=0.1)
        adalora_fast.patch_peft(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        torch.manual_seed(3)
        ids = token_batch(0, batch=2, seq=8).to(DEVICE)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append([p.grad.clone() for p in lora_params(model)])
    for i, (plain, checkpointed) in enumerate(zip(*grads, strict=True)):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0, msg=f"gradient {i}")


def _saved_bytes_per_layer(layer, x) -> int:
    """Activation bytes one training forward of ``layer`` on ``x`` keeps for its backward (its own
    parameters and buffers excluded; the base layer's saves counted, the same base in every case)."""
    owned = list(layer.parameters()) + list(layer.buffers())
    return saved_activation_bytes(lambda: layer(x), exclude=owned)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_fast_layer_keeps_no_fp32_copy_of_the_input_for_its_backward(kernels, checkpoint, bits):
    """bf16 activations over fp32 adapters (PEFT's default): stock PEFT's AdaLoRA and LoRA layers save an fp32
    copy of x; the fast layer saves x as it came, and H (tokens × 16 fp32) beside it."""
    from peft import LoraConfig, get_peft_model

    x = torch.randn(64, HIDDEN, device=DEVICE, dtype=BF16, requires_grad=True)
    stock, fast = qlora_adalora(checkpoint, bits), qlora_adalora(checkpoint, bits)
    adalora_fast.patch_peft(fast)
    lora = get_peft_model(quantized_llama(checkpoint, bits), LoraConfig(r=8, target_modules=TARGETS, lora_dropout=0.0))
    per_layer = {name: _saved_bytes_per_layer(adapted_layers(m)[0] if name != "lora" else _first_lora_layer(m), x)
                 for name, m in (("stock", stock), ("fast", fast), ("lora", lora))}  # fmt: skip
    fp32_copy = x.numel() * 4
    base = _saved_bytes_per_layer(adapted_layers(stock)[0].get_base_layer(), x)
    assert per_layer["stock"] >= base + fp32_copy and per_layer["lora"] >= base + fp32_copy, per_layer
    assert per_layer["fast"] <= base + x.numel() * x.element_size() + 64 * 16 * 4, per_layer
    assert per_layer["fast"] < per_layer["lora"] < per_layer["stock"], per_layer


def _first_lora_layer(model):
    from peft.tuners.lora import LoraLayer

    return next(m for m in model.modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_and_unload_on_a_quantized_base_says_why_it_cannot(checkpoint, bits):
    stock, fast = qlora_adalora(checkpoint, bits), qlora_adalora(checkpoint, bits)
    adalora_fast.patch_peft(fast)
    with pytest.raises(NotImplementedError):  # stock PEFT: a bare NotImplementedError
        stock.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot merge an adapter into this base layer"):
        fast.merge_and_unload()
