"""PEFT on adalora-fast: the patched path reproduces stock PEFT AdaLoRA and stays compatible with it."""

import pytest
import torch
from helpers import (LLAMA_TARGETS, allocator_flat_state, peft_llama, saved_activation_bytes, tiny_llama, token_batch,
                     train_with_trainer)
from tooling.device import DEVICE, ON_GPU

import adalora_fast
from adalora_fast import dispatch
from adalora_fast.integrations.peft import fast_allocator, fast_layer_class


def _pattern(model):
    alloc = fast_allocator(model.base_model)
    return alloc.rank_pattern if alloc is not None else model.peft_config["default"].rank_pattern


@pytest.fixture
def global_patch():
    adalora_fast.patch_peft()
    yield
    adalora_fast.unpatch_peft()


def test_patched_llama_reproduces_stock_peft_for_200_steps():
    stock, fast = peft_llama(), peft_llama()
    adalora_fast.patch_peft(fast)
    assert sum(type(m) is fast_layer_class() for m in fast.modules()) == 14
    opt_s = torch.optim.AdamW([p for p in stock.parameters() if p.requires_grad], lr=1e-2)
    opt_f = torch.optim.AdamW([p for p in fast.parameters() if p.requires_grad], lr=1e-2)
    masked = 0
    for step in range(200):
        ids = token_batch(step)
        loss_s = stock(input_ids=ids, labels=ids).loss
        loss_f = fast(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(loss_f, loss_s, rtol=1e-5, atol=0, msg=f"loss at step {step}")
        loss_s.backward()
        loss_f.backward()
        for opt, model in ((opt_s, stock), (opt_f, fast)):
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
        assert _pattern(fast) == _pattern(stock), f"rank_pattern at step {step}"
        masked += _pattern(stock) is not None
    assert masked > 150 and sum(sum(v) for v in _pattern(fast).values()) <= 3 * 14


def test_patched_llama_on_the_kernel_path_matches_stock_peft(kernels):
    """PEFT's layers have no triplet mask: the kernels get a shared mask of ones (interpreter on a CPU)."""
    stock = peft_llama(lora_dropout=0.0).to(DEVICE)
    fast = adalora_fast.patch_peft(peft_llama(lora_dropout=0.0)).to(DEVICE)
    dispatch.reset_backend_calls()
    for step in range(3):
        ids = token_batch(step).to(DEVICE)
        loss_s, loss_f = stock(input_ids=ids, labels=ids).loss, fast(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(loss_f, loss_s, rtol=1e-5, atol=1e-6)
        loss_s.backward()
        loss_f.backward()
        for (name, p), q in zip(stock.named_parameters(), fast.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        stock.zero_grad()
        fast.zero_grad()
    assert dispatch.backend_calls()["svd_adapter"] == {"triton": 3 * len(LLAMA_TARGETS) * 2}


def test_patched_llama_saves_less_for_the_backward_than_peft_lora_at_dropout_0_1(kernels):
    """The activation side of the memory headline: LoRA keeps a dropped copy of every adapted input, the
    kernels keep x (shared with the base layer) and one N × r_pad fp32 tile, even at init_r 12 vs LoRA's 8."""
    from peft import LoraConfig, get_peft_model

    ids = token_batch(0, batch=4, seq=32).to(DEVICE)
    lora = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, lora_dropout=0.1,
                                                   task_type="CAUSAL_LM")).to(DEVICE)  # fmt: skip
    stock = peft_llama(init_r=12, target_r=8, lora_dropout=0.1).to(DEVICE)
    fast = adalora_fast.patch_peft(peft_llama(init_r=12, target_r=8, lora_dropout=0.1)).to(DEVICE)
    saved = {
        name: saved_activation_bytes(lambda m=m: m(input_ids=ids, labels=ids, use_cache=False).loss.backward(),
                                     list(m.parameters()) + list(m.buffers()))
        for name, m in (("lora", lora), ("stock", stock), ("fast", fast))
    }  # fmt: skip
    assert saved["fast"] < saved["lora"] < saved["stock"], saved


@pytest.mark.automatic_dispatch
@pytest.mark.skipif(not ON_GPU, reason="the bf16 kernel path runs on a GPU")
def test_bf16_on_gpu_tracks_stock_peft_for_200_steps():
    """Tolerance: every loss within 2% of stock PEFT's (bf16 keeps ~3 significant digits, and the fused
    kernels round at other points than PEFT's chain of matmuls); the final rank_pattern identical."""
    stock, fast = peft_llama().to("cuda", torch.bfloat16), peft_llama().to("cuda", torch.bfloat16)
    adalora_fast.patch_peft(fast)
    dispatch.reset_backend_calls()
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (stock, fast)]
    losses = {"stock": [], "fast": []}
    for step in range(200):
        ids = token_batch(step).cuda()
        for name, model, opt in (("stock", stock, opts[0]), ("fast", fast, opts[1])):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
            losses[name].append(loss.float().item())
    # what the model's own calls ran: the kernels, every adapted layer, every step (none fell back)
    assert dispatch.backend_calls()["svd_adapter"] == {"triton": 200 * len(LLAMA_TARGETS) * 2}
    torch.testing.assert_close(torch.tensor(losses["fast"]), torch.tensor(losses["stock"]), rtol=2e-2, atol=0)
    assert losses["fast"][-1] < losses["fast"][0]
    assert _pattern(fast) == _pattern(stock) and _pattern(fast) is not None


def test_penalty_is_added_when_task_type_is_none():

    stock = peft_llama(task_type=None)
    fast = adalora_fast.patch_peft(peft_llama(task_type=None))
    ids = token_batch(0)
    plain = stock(input_ids=ids, labels=ids).loss  # PEFT's bug: no penalty without a task_type
    with_penalty = fast(input_ids=ids, labels=ids).loss
    from adalora_fast import compute_orth_regu

    expected = plain + compute_orth_regu(fast.base_model.model, 0.5, adapter_name="default")
    torch.testing.assert_close(with_penalty, expected, rtol=1e-6, atol=1e-6)
    assert with_penalty > plain


def test_global_patch_and_unpatch(global_patch):
    from peft.tuners.adalora import AdaLoraModel, SVDLinear

    model = peft_llama()
    assert all(type(m) is fast_layer_class() for m in model.modules() if isinstance(m, SVDLinear))
    assert AdaLoraModel.update_and_allocate.__name__ == "fast_update_and_allocate"
    adalora_fast.unpatch_peft()
    assert AdaLoraModel.update_and_allocate.__name__ == "update_and_allocate"
    assert all(type(m) is SVDLinear for m in peft_llama().modules() if isinstance(m, SVDLinear))
    adalora_fast.patch_peft()  # the fixture unpatches again


def _train(model, steps, start=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(start, start + steps):
        ids = token_batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()


@pytest.mark.parametrize("direction", ["fast_to_stock", "stock_to_fast"])
def test_save_pretrained_and_from_pretrained_both_ways(direction, tmp_path):
    from peft import PeftModel

    trained = peft_llama(total_step=60, tinit=5, tfinal=10, deltaT=2)
    if direction == "fast_to_stock":
        adalora_fast.patch_peft(trained)
    _train(trained, 60)  # ends in the final phase: the saved adapter is resized by rank_pattern
    trained.save_pretrained(tmp_path)
    if direction == "stock_to_fast":
        adalora_fast.patch_peft()
    try:
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
        if direction == "stock_to_fast":
            assert any(type(m) is fast_layer_class() for m in loaded.modules())
    finally:
        adalora_fast.unpatch_peft()
    ranks = [m.lora_A["default"].shape[0] for m in loaded.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert sum(ranks) == sum(sum(v) for v in trained.peft_config["default"].rank_pattern.values()) <= 3 * 14
    trained.eval()
    loaded.eval()
    ids = token_batch(999)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_matches_stock():
    stock, fast = peft_llama(), peft_llama()
    adalora_fast.patch_peft(fast)
    ids = token_batch(3)
    with torch.no_grad():
        expected = stock(input_ids=ids).logits
        torch.testing.assert_close(fast(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
        merged = fast.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_converting_a_model_mid_training_keeps_its_masks_and_scores():
    stock, converted = peft_llama(total_step=80, tinit=5, tfinal=20, deltaT=3), peft_llama(total_step=80, tinit=5, tfinal=20, deltaT=3)
    _train(stock, 30)
    _train(converted, 30)
    adalora_fast.patch_peft(converted)
    assert _pattern(converted) == stock.peft_config["default"].rank_pattern
    opt_s = torch.optim.AdamW([p for p in stock.parameters() if p.requires_grad], lr=1e-2)
    opt_c = torch.optim.AdamW([p for p in converted.parameters() if p.requires_grad], lr=1e-2)
    for step in range(30, 36):
        for model, opt in ((stock, opt_s), (converted, opt_c)):
            ids = token_batch(step)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
        assert _pattern(converted) == _pattern(stock), step


def test_a_model_patched_then_moved_trains_where_it_now_is():
    """The allocator is made at the first update_and_allocate, where the adapters are then (here: cast to
    fp64; on a GPU the same holds for patch_peft(model).cuda()); moving it later is a clear error."""
    model = adalora_fast.patch_peft(peft_llama(total_step=20, tinit=2, tfinal=4, deltaT=2)).to(torch.float64)
    for step in range(3):
        ids = token_batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        model.base_model.update_and_allocate(step)
        model.zero_grad()
    assert fast_allocator(model.base_model).state.dtype == torch.float64
    model.to(torch.float32)
    with pytest.raises(RuntimeError, match="before its first update_and_allocate"):
        model.base_model.update_and_allocate(3)


def test_trainer_callback_allocates_once_per_optimizer_step(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from adalora_fast.integrations.trainer import AdaLoraCallback

    class Ids(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            ids = token_batch(i)[0]
            return {"input_ids": ids, "labels": ids}

    model = adalora_fast.patch_peft(peft_llama(total_step=8, tinit=1, tfinal=2, deltaT=1))
    calls = []
    original = model.base_model.update_and_allocate
    model.base_model.update_and_allocate = lambda step: (calls.append(step), original(step))[1]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=8, learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=Ids(), callbacks=[AdaLoraCallback()]).train()
    assert calls == list(range(8))
    assert model.peft_config["default"].rank_pattern is not None  # the final pattern was written at T − tfinal


def test_trainer_resumed_from_a_checkpoint_continues_the_allocator_exactly(tmp_path):
    """AdaLoraCallback saves the allocator's state in each checkpoint and restores it on resume: the resumed
    run's masks and EMAs are the uninterrupted run's; a checkpoint without this rank's state is refused."""
    import os
    import shutil

    def model():  # warm-up 0-1, budgeting 2-6 (a mask every step), the final phase 7-9
        return adalora_fast.patch_peft(peft_llama(total_step=10, tinit=2, tfinal=3, deltaT=1))

    whole, patterns = train_with_trainer(model(), tmp_path, steps=10, lr=0.5)
    resumed, resumed_patterns = train_with_trainer(model(), tmp_path, steps=10, lr=0.5,
                                                   resume=str(tmp_path / "checkpoint-5"))  # fmt: skip
    assert resumed_patterns == patterns[5:] and patterns[5] is not None
    for key, value in allocator_flat_state(whole).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(allocator_flat_state(resumed)[key], value), key
    # A checkpoint that holds another rank's state only: this rank would start afresh, apart from the others.
    shutil.copytree(tmp_path / "checkpoint-5", tmp_path / "other" / "checkpoint-5")
    os.rename(tmp_path / "other" / "checkpoint-5" / "adalora_fast_allocator-rank0.pt",
              tmp_path / "other" / "checkpoint-5" / "adalora_fast_allocator-rank1.pt")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="not adalora_fast_allocator-rank0.pt"):
        train_with_trainer(model(), tmp_path / "other", steps=10, lr=0.5, resume=str(tmp_path / "other" / "checkpoint-5"))


def test_dropout_and_bf16_models_match_stock():
    stock, fast = peft_llama(lora_dropout=0.1), peft_llama(lora_dropout=0.1)
    adalora_fast.patch_peft(fast)
    ids = token_batch(5)
    torch.manual_seed(7)
    loss_s = stock(input_ids=ids, labels=ids).loss
    torch.manual_seed(7)  # the same dropout draw: on a CPU the patched layer runs the reference path
    loss_f = fast(input_ids=ids, labels=ids).loss
    assert torch.equal(loss_f, loss_s)
    stock16, fast16 = peft_llama().to(torch.bfloat16), adalora_fast.patch_peft(peft_llama()).to(torch.bfloat16)
    stock16.eval()
    fast16.eval()
    with torch.no_grad():
        assert torch.equal(fast16(input_ids=ids).logits, stock16(input_ids=ids).logits)


def test_inference_mode_and_a_second_adapter(tmp_path):
    from peft import AdaLoraConfig, PeftModel

    trained = peft_llama(total_step=40, tinit=4, tfinal=8, deltaT=2)
    _train(trained, 40)
    trained.save_pretrained(tmp_path)
    frozen = adalora_fast.patch_peft(PeftModel.from_pretrained(tiny_llama(), tmp_path))  # inference mode
    ids = token_batch(11)
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids, labels=ids)
        got = frozen(input_ids=ids, labels=ids)  # has a loss, but no trainable adapter: no penalty, no error
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if "lora_" in n)
    # A second adapter (inference mode, as PEFT requires): the active one drives the fast layer.
    cfg = AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=LLAMA_TARGETS, inference_mode=True, task_type="CAUSAL_LM")
    frozen.add_adapter("other", cfg)
    with torch.no_grad():
        torch.testing.assert_close(frozen(input_ids=ids).logits, expected.logits, rtol=1e-5, atol=1e-5)
        frozen.set_adapter("other")
        other = frozen(input_ids=ids).logits
    assert not torch.allclose(other, expected.logits)
