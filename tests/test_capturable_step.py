"""A whole training step as one CUDA graph: the graph-safe allocator (``capturable=True``) and, on a GPU,
capture and replay of forward, penalty, backward, optimizer and allocator against the same steps run eagerly.

On a CPU the graph-safety preconditions are checked directly: the step runs the same ops in every phase,
never reads the device from the host, takes its step number from the device, and gives bitwise the same
result as the eager allocator.
"""

import copy

import pytest
import torch
import torch.nn as nn
from helpers import lambdas, lora_params, peft_llama, peft_step, regression_batch, svd_stack, token_batch
from tooling.device import ON_GPU
from torch.utils._python_dispatch import TorchDispatchMode

import adalora_fast
from adalora_fast import FastSVDLinear, RankAllocator, compute_orth_regu
from adalora_fast.cuda_graph import capture_training_step
from adalora_fast.integrations.peft import fast_allocator, sync_rank_pattern

CUDA = ON_GPU
TOTAL, TINIT, TFINAL, DELTA_T = 40, 4, 10, 3


def _stack(n_layers=3, d=16, r=4, device="cpu", dtype=torch.float32):
    return svd_stack(n_layers, d, r, b_std=0.3, device=device, dtype=dtype)


def _alloc(model, r=4, semantics="peft", tfinal=TFINAL, **kw):
    return RankAllocator(model, lora_r=r, target_rank=r // 2, init_warmup=TINIT, final_warmup=tfinal,
                         mask_interval=DELTA_T, beta1=0.85, beta2=0.85, total_step=TOTAL, semantics=semantics,
                         **kw)  # fmt: skip


def _batch(step, n=32, d=16, device="cpu", dtype=torch.float32):
    return tuple(t.to(device, dtype) for t in regression_batch(step, n, d))


# ---------------------------------------------------------------------------------------------------
# The graph-safe allocator on any device


@pytest.mark.parametrize("tfinal", [TFINAL, 0])  # tfinal 0: T itself is not a final-phase step
@pytest.mark.parametrize("semantics", ["peft", "loralib"])
def test_capturable_allocator_matches_the_eager_one_bitwise(semantics, tfinal):
    eager_model, graph_model = _stack(), _stack()
    eager = _alloc(eager_model, semantics=semantics, tfinal=tfinal)
    safe = _alloc(graph_model, semantics=semantics, tfinal=tfinal, capturable=True)
    opt_e = torch.optim.AdamW(lora_params(eager_model), lr=1e-2)
    opt_g = torch.optim.AdamW(lora_params(graph_model), lr=1e-2)
    masked_steps = 0
    for step in range(TOTAL + 4):  # past T: the last schedule row stands for every later step
        x, y = _batch(step)
        for model, opt in ((eager_model, opt_e), (graph_model, opt_g)):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        budget, threshold = eager.update_and_mask(eager_model, step)
        # The step number is the device counter's: what the host passes after the first call is not used.
        budget_t, threshold_t = safe.update_and_mask(graph_model, step if step == 0 else None)
        opt_e.zero_grad()
        opt_g.zero_grad()
        assert int(budget_t) == budget, step
        if threshold is not None:
            masked_steps += 1
            assert torch.equal(threshold_t, threshold), step
        assert all(torch.equal(a, b) for a, b in zip(lambdas(eager_model), lambdas(graph_model))), step
        assert torch.equal(safe.state.keep, eager.state.keep), step
        assert torch.equal(safe.state.exp_avg_unc, eager.state.exp_avg_unc), step
    assert masked_steps > tfinal
    assert safe.rank_pattern == eager.rank_pattern and safe.rank_pattern is not None
    assert safe.step_count() == TOTAL + 4


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# Reading a device value on the host: what a captured step must never do.
_HOST_READS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal")


def test_capturable_step_runs_the_same_ops_in_every_phase_and_never_reads_the_device():
    model = _stack()
    alloc = _alloc(model, capturable=True)
    sequences = {}
    for step in range(TOTAL + 2):  # warm-up, budgeting (masking and not), forced mask, final phase, past T
        x, y = _batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        with _OpRecorder() as rec:
            alloc.update_and_mask(model, None)
        model.zero_grad()
        sequences[step] = rec.ops
    first = sequences[0]
    assert all(ops == first for ops in sequences.values())
    assert not [op for op in first if op.startswith(_HOST_READS)]
    # and the eager allocator does differ between phases (so the check above can fail)
    eager_model = _stack()
    eager = _alloc(eager_model)
    eager_ops = []
    for step in (1, TOTAL - 1):
        nn.functional.mse_loss(eager_model(_batch(step)[0]), _batch(step)[1]).backward()
        with _OpRecorder() as rec:
            eager.update_and_mask(eager_model, step)
        eager_ops.append(rec.ops)
    assert eager_ops[0] != eager_ops[1]


def test_capturable_allocator_resumes_from_its_state_dict_or_set_step():
    def run(steps, alloc, model, opt):
        for step in steps:
            x, y = _batch(step)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            alloc.update_and_mask(model, step)
            opt.zero_grad()

    straight = _stack()
    a = _alloc(straight, capturable=True)
    opt = torch.optim.SGD(lora_params(straight), lr=0.1)
    run(range(TOTAL), a, straight, opt)

    first = _stack()
    b = _alloc(first, capturable=True)
    opt_b = torch.optim.SGD(lora_params(first), lr=0.1)
    run(range(20), b, first, opt_b)
    resumed = copy.deepcopy(first)
    c = _alloc(resumed, capturable=True)
    c.load_state_dict(b.state_dict())
    assert c.step_count() == 20
    opt_c = torch.optim.SGD(lora_params(resumed), lr=0.1)
    run(range(20, TOTAL), c, resumed, opt_c)
    assert all(torch.equal(p, q) for p, q in zip(lambdas(straight), lambdas(resumed)))
    assert c.rank_pattern == a.rank_pattern

    # A resumed step number that the counter does not know is an error, not a silent restart at 0.
    model_d = copy.deepcopy(first)
    d = _alloc(model_d, capturable=True)
    with pytest.raises(ValueError, match="device step counter is at 0 but global_step is 20"):
        d.update_and_mask(model_d, 20)
    d.set_step(20)
    nn.functional.mse_loss(model_d(_batch(20)[0]), _batch(20)[1]).backward()
    d.update_and_mask(model_d, 20)
    assert d.step_count() == 21


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"order": "paper"}, "order='reference'"),
        ({"nonfinite": "raise"}, "nonfinite='skip'"),
        ({"tb_writter": object()}, "TensorBoard"),
    ],
)
def test_capturable_rejects_what_needs_the_host_mid_step(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _alloc(_stack(), capturable=True, **kwargs)


def test_set_step_is_only_for_the_capturable_allocator():
    with pytest.raises(RuntimeError, match="capturable=True"):
        _alloc(_stack()).set_step(3)
    with pytest.raises(ValueError, match=">= 0"):
        _alloc(_stack(), capturable=True).set_step(-1)


# ---------------------------------------------------------------------------------------------------
# PEFT models: patch_peft(model, capturable=True)

PEFT_SCHEDULE = dict(total_step=TOTAL, tinit=TINIT, tfinal=TFINAL, deltaT=DELTA_T)


def test_capturable_peft_model_trains_bitwise_like_the_eager_patched_one(tmp_path):
    eager = adalora_fast.patch_peft(peft_llama(**PEFT_SCHEDULE))
    safe = adalora_fast.patch_peft(peft_llama(**PEFT_SCHEDULE), capturable=True)
    opts = [torch.optim.AdamW(lora_params(m), lr=1e-2) for m in (eager, safe)]
    for step in range(TOTAL + 4):
        ids = token_batch(step)
        losses = []
        for model, opt in zip((eager, safe), opts):
            losses.append(peft_step(model, ids, step, opt))
            opt.zero_grad()
        assert torch.equal(losses[0], losses[1]), step
        assert all(torch.equal(a, b) for a, b in zip(lambdas(eager), lambdas(safe))), step
    alloc = fast_allocator(safe.base_model)
    assert alloc.capturable and alloc.step_count() == TOTAL + 4
    assert alloc.rank_pattern == fast_allocator(eager.base_model).rank_pattern
    # rank_pattern is not written inside a graph-safe step; saving (or sync_rank_pattern) writes it.
    expected = eager.peft_config["default"].rank_pattern
    assert expected is not None and safe.peft_config["default"].rank_pattern is None
    from peft import PeftConfig

    for name, model in (("eager", eager), ("safe", safe)):
        model.save_pretrained(tmp_path / name)
    saved = [PeftConfig.from_pretrained(tmp_path / name).rank_pattern for name in ("eager", "safe")]
    assert saved[1] == saved[0] and saved[0]
    sync_rank_pattern(safe.base_model)
    assert safe.peft_config["default"].rank_pattern == expected


def test_capturable_peft_step_runs_the_same_ops_every_step_and_never_reads_the_device(monkeypatch):
    import transformers.masking_utils

    # transformers reads the device to detect packed sequences, unless it sees a stream capture (or a
    # compiler): let it see one, so that the check below covers what PEFT and adalora-fast add.
    monkeypatch.setattr(transformers.masking_utils, "is_tracing", lambda *args, **kwargs: True)
    model = adalora_fast.patch_peft(peft_llama(lora_dropout=0.1, **PEFT_SCHEDULE), capturable=True)
    sequences = []
    for step in range(TOTAL + 2):  # every phase of the schedule, and past T
        with _OpRecorder() as rec:
            peft_step(model, token_batch(step), step)
        model.zero_grad(set_to_none=True)
        sequences.append(rec.ops)
        assert not [op for op in rec.ops if op.startswith(_HOST_READS)], step
    assert all(ops == sequences[1] for ops in sequences[1:])  # (step 0 also builds the shared mask of ones)
    assert any("bernoulli" in op or "rand" in op for op in sequences[1])  # dropout ran, on the device's RNG


def test_capturable_peft_counter_starts_at_the_first_global_step():
    model = adalora_fast.patch_peft(peft_llama(**PEFT_SCHEDULE), capturable=True)
    for step in (7, 8, 9):
        peft_step(model, token_batch(step), step)
        model.zero_grad()
    assert fast_allocator(model.base_model).step_count() == 10
    # Its allocator exists now: switching it to the eager one would drop the device state.
    with pytest.raises(ValueError, match="capturable=True"):
        adalora_fast.patch_peft(model)


def test_global_patch_makes_capturable_allocators_until_unpatched():
    adalora_fast.patch_peft(capturable=True)
    try:
        model = peft_llama(**PEFT_SCHEDULE)
        peft_step(model, token_batch(0), 0)
    finally:
        adalora_fast.unpatch_peft()
    assert fast_allocator(model.base_model).capturable
    adalora_fast.patch_peft()
    try:
        later = peft_llama(**PEFT_SCHEDULE)
        peft_step(later, token_batch(0), 0)
    finally:
        adalora_fast.unpatch_peft()
    assert not fast_allocator(later.base_model).capturable


def test_capture_training_step_rejects_what_cannot_be_captured():
    model = _stack()
    with pytest.raises(ValueError, match="capturable=True"):
        capture_training_step(lambda: None, [torch.optim.AdamW(lora_params(model), lr=1e-3)])
    with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
        capture_training_step(lambda: None, [], warmup_steps=0)
    if not CUDA:
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            capture_training_step(lambda: None, [torch.optim.AdamW(lora_params(model), lr=1e-3, capturable=True)])


def test_capture_training_step_warms_up_then_captures_one_step_and_replays_it(monkeypatch):
    """The recipe's order, with torch.cuda's stream and graph calls recorded (the real capture: GPU tests below)."""
    events = []

    class FakeGraph:
        def replay(self):
            events.append("replay")

    class FakeStream:
        def wait_stream(self, other):
            events.append("wait_stream")

    class Recording:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            events.append(f"enter {self.name}")

        def __exit__(self, *exc):
            events.append(f"exit {self.name}")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: Recording("side stream"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: Recording("capture"))
    model = _stack()
    opt = torch.optim.SGD(lora_params(model), lr=0.1)
    x, y = _batch(0)

    def step():
        assert all(p.grad is None for p in lora_params(model))  # zeroed (set to None) before every step
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        events.append("step")
        return loss.detach()

    captured = capture_training_step(step, [opt], warmup_steps=2, before_warmup_step=lambda i: events.append(f"load {i}"))
    assert events == ["wait_stream", "enter side stream", "load 0", "step", "load 1", "step", "exit side stream",
                      "wait_stream", "enter capture", "step", "exit capture"]  # fmt: skip
    assert len(captured.warmup_outputs) == 2 and captured.warmup_outputs[0] is not captured.outputs
    assert captured() is captured.outputs and events[-1] == "replay"


# ---------------------------------------------------------------------------------------------------
# Capture and replay on a GPU


def _train_step(model, opt, alloc, x, y):
    loss = nn.functional.mse_loss(model(x), y) + compute_orth_regu(model, regu_weight=0.1)
    loss.backward()
    opt.step()
    alloc.update_and_mask(model, None)
    return loss.detach()


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_full_training_step_captured_as_a_cuda_graph_replays_like_eager(dtype):
    eager_model = _stack(d=64, r=8, device="cuda", dtype=dtype)
    graph_model = copy.deepcopy(eager_model)
    runs = {}
    for name, model in (("eager", eager_model), ("graph", graph_model)):
        opt = torch.optim.AdamW(lora_params(model), lr=1e-2, capturable=True)
        alloc = _alloc(model, r=8, capturable=True)
        runs[name] = (model, opt, alloc)

    model, opt, alloc = runs["eager"]
    eager_losses = []
    for step in range(TOTAL + 2):
        x, y = _batch(step, d=64, device="cuda", dtype=dtype)
        eager_losses.append(_train_step(model, opt, alloc, x, y).float().item())
        opt.zero_grad(set_to_none=True)

    model, opt, alloc = runs["graph"]
    static_x, static_y = _batch(0, d=64, device="cuda", dtype=dtype)

    def load(step):
        x, y = _batch(step, d=64, device="cuda", dtype=dtype)
        static_x.copy_(x)
        static_y.copy_(y)

    captured = capture_training_step(lambda: _train_step(model, opt, alloc, static_x, static_y), [opt],
                                     before_warmup_step=load)  # fmt: skip
    graph_losses = [loss.float().item() for loss in captured.warmup_outputs]
    for step in range(len(graph_losses), TOTAL + 2):
        load(step)
        graph_losses.append(captured().float().item())

    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=tol, atol=tol)
    assert runs["graph"][2].step_count() == TOTAL + 2
    pattern = runs["graph"][2].rank_pattern
    assert pattern is not None and pattern == runs["eager"][2].rank_pattern
    assert 0 < sum(sum(keep) for keep in pattern.values()) <= 3 * 8 // 2  # pruned to the target budget (ties prune more)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_dropout_draws_a_fresh_mask_at_every_graph_replay():
    layer = FastSVDLinear(64, 64, r=8, lora_alpha=8, lora_dropout=0.5).cuda()
    with torch.no_grad():
        layer.lora_E.fill_(1.0)
        layer.lora_B.normal_()
    x = torch.randn(32, 64, device="cuda")
    layer(x)  # warm-up (autotuning) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    outputs = []
    for _ in range(3):
        graph.replay()
        outputs.append(out.clone())
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_a_patched_peft_llama_step_captured_as_a_cuda_graph_replays_like_eager(monkeypatch):
    """The HF model, PEFT's layers on the kernels, the fast penalty and the capturable allocator in one graph."""
    import transformers.masking_utils

    # Under a capture transformers builds an explicit causal mask (its packed-sequence check would read the
    # device); the eager steps take the same attention path, so that the two runs compute the same thing.
    monkeypatch.setattr(transformers.masking_utils, "is_tracing", lambda *args, **kwargs: True)
    models = [adalora_fast.patch_peft(peft_llama(**PEFT_SCHEDULE), capturable=True).cuda() for _ in range(2)]
    opts = [torch.optim.AdamW(lora_params(m), lr=1e-2, capturable=True) for m in models]
    eager_losses = []
    for step in range(TOTAL + 2):
        eager_losses.append(peft_step(models[0], token_batch(step).cuda(), step, opts[0]).item())
        opts[0].zero_grad(set_to_none=True)

    static_ids = token_batch(0).cuda()
    calls = [0]

    def step():
        calls[0] += 1
        return peft_step(models[1], static_ids, calls[0] - 1, opts[1])

    captured = capture_training_step(step, [opts[1]], before_warmup_step=lambda i: static_ids.copy_(token_batch(i)))
    graph_losses = [loss.item() for loss in captured.warmup_outputs]
    for step_number in range(len(graph_losses), TOTAL + 2):
        static_ids.copy_(token_batch(step_number))
        graph_losses.append(captured().item())
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-6)
    allocs = [fast_allocator(m.base_model) for m in models]
    assert allocs[1].step_count() == TOTAL + 2
    assert allocs[1].rank_pattern == allocs[0].rank_pattern and allocs[0].rank_pattern is not None

