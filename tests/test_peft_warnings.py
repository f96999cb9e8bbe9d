"""The warnings PEFT prints when an AdaLoRA adapter is saved and loaded are PEFT's own: the patched path writes
the same adapter (same rank_pattern keys, same shapes) and gets the same warnings as stock PEFT.

Two of them look alarming and are harmless for AdaLoRA (see the README's PEFT section):

* loading: "The following rank_pattern keys did not match any targeted module and were ignored". PEFT's
  generic check reads ``rank_pattern`` as LoRA's {module-name pattern: rank}; AdaLoRA's is
  {``<module>.lora_E``: [kept?] × init_r}, whose keys name parameters, not modules, so none matches. AdaLoRA's
  own loader resizes every module by it all the same.
* saving: "LoRA tensor(s) have invalid shape ... (0, in)". A module whose triplets were all pruned is saved with
  rank 0; the check is meant for ZeRO-3 / FSDP shards that were not gathered.
"""

import contextlib
import os
import re
import warnings

import pytest
import torch
from helpers import peft_llama, peft_step, tiny_llama, token_batch

import adalora_fast

pytest.importorskip("peft")


@contextlib.contextmanager
def _peft_warnings():
    """The messages of every warning raised from PEFT's or adalora-fast's code inside the block."""
    import peft

    roots = tuple(os.path.dirname(m.__file__) for m in (peft, adalora_fast))
    messages = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
    messages += [str(w.message) for w in caught if w.filename.startswith(roots)]


def _trained_and_saved(patched: bool, folder):
    """A tiny Llama trained into its final phase with a budget that prunes whole modules, then saved."""
    model = peft_llama(init_r=6, target_r=1, tinit=5, tfinal=10, deltaT=2, total_step=60)
    if patched:
        adalora_fast.patch_peft(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(60):
        peft_step(model, token_batch(step), step, opt)
        opt.zero_grad()
    with _peft_warnings() as saving:
        model.save_pretrained(folder)
    return model, saving


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{"stock" | "fast": (model, folder, the warnings saving it raised)}."""
    out = {}
    for name in ("stock", "fast"):
        folder = tmp_path_factory.mktemp(name)
        model, saving = _trained_and_saved(name == "fast", folder)
        out[name] = (model, folder, saving)
    return out


def _load(folder, load_patched: bool):
    from peft import PeftModel

    if load_patched:
        adalora_fast.patch_peft()
    try:
        with _peft_warnings() as loading:
            loaded = PeftModel.from_pretrained(tiny_llama(), folder)
    finally:
        if load_patched:
            adalora_fast.unpatch_peft()
    return loaded, loading


def _ranks(model):
    return [m.lora_A["default"].shape[0] for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def test_saving_warns_exactly_as_stock_peft(saved):
    (stock, _, stock_saving), (fast, _, fast_saving) = saved["stock"], saved["fast"]
    pattern = fast.peft_config["default"].rank_pattern
    assert pattern == stock.peft_config["default"].rank_pattern  # same masks, same keys
    assert any(not any(keep) for keep in pattern.values())  # a module pruned to rank 0: what PEFT's check flags
    assert fast_saving == stock_saving
    # the installed PEFT flags the rank-0 modules' lora_A / lora_B (what the README says it prints), nothing else
    invalid = [message for message in fast_saving if "invalid shape" in message]
    assert invalid, f"PEFT no longer warns on saving a rank-0 module; the README says it does: {fast_saving}"
    assert all(":(0, " in message or ", 0)" in message for message in invalid), invalid


@pytest.mark.parametrize("load_patched", [False, True], ids=["stock_loader", "patched_loader"])
def test_loading_warns_exactly_as_stock_peft_and_resizes(saved, load_patched):
    stock_loaded, stock_loading = _load(saved["stock"][1], load_patched)
    fast_loaded, fast_loading = _load(saved["fast"][1], load_patched)
    pattern = saved["fast"][0].peft_config["default"].rank_pattern
    assert _ranks(fast_loaded) == _ranks(stock_loaded) == [sum(keep) for keep in pattern.values()]  # resized
    assert fast_loading == stock_loading
    # What the installed PEFT says, on either path, is about AdaLoRA's own rank_pattern format: the keys it
    # calls unmatched are the lora_E names the adapter was just resized by (the README's first warning).
    unmatched = [message for message in fast_loading if "rank_pattern keys did not match" in message]
    assert unmatched, f"PEFT no longer warns on loading; the README says it does: {fast_loading}"
    assert all(k.endswith(".lora_E") for k in pattern)
    for message in unmatched:
        assert all(f"'{key}'" in message for key in pattern), message


def test_the_installed_peft_is_the_one_that_warns(saved):
    """Stock PEFT alone, no adalora-fast in the loop: its save and load of a rank-0 module raise these warnings
    (or none, on a PEFT that no longer does)."""
    stock_saving = saved["stock"][2]
    _, stock_loading = _load(saved["stock"][1], load_patched=False)
    if not stock_saving and not stock_loading:
        pytest.skip("the installed PEFT raises neither warning")
    # the filters the README gives silence exactly these (warnings.filterwarnings matches from the start)
    readme_filters = ("The following rank_pattern keys did not match", r"Adapter .* LoRA tensor\(s\) have invalid shape")
    for message in stock_saving + stock_loading:
        assert any(re.match(f, message) for f in readme_filters), message
