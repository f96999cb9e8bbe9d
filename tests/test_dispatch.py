"""The dispatch point: one place picks kernels or reference, and forcing is explicit."""

import pytest
import torch
from tooling.device import ON_GPU

from adalora_fast import FastSVDLinear, dispatch, env_report


def test_reference_is_chosen_when_kernels_cannot_run():
    x = torch.randn(2, 4, dtype=torch.float64)  # float64 never runs on the kernels
    assert dispatch.triton_unavailable_reason(x) is not None
    assert dispatch.adapter_backend(x) == "reference"


def test_forcing_reference(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "reference")
    assert dispatch.adapter_backend(torch.randn(2, 4)) == "reference"


def test_forcing_triton_when_it_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    layer = FastSVDLinear(4, 3, r=2).double()
    with pytest.raises(RuntimeError, match="ADALORA_FAST_BACKEND=triton, but the Triton backend cannot run"):
        layer(torch.randn(2, 4, dtype=torch.float64))


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "cuda-magic")
    with pytest.raises(ValueError, match="not one of"):
        dispatch.adapter_backend(torch.randn(2, 4))


def test_env_report_names_this_machines_backend_for_every_op():
    report = env_report()
    for key in ("torch", "triton", "svd_adapter", "orth_penalty", "rank_allocator"):
        assert key in report
    if ON_GPU:  # the installed project has the kernels and the CUDA extension
        assert report["svd_adapter"] == "triton", report["svd_adapter"]
        assert report["orth_penalty"] == "extension (adalora_fast._C, CUDA)", report["orth_penalty"]
    else:
        assert report["svd_adapter"].startswith("reference (CPU tensors run the reference"), report["svd_adapter"]
        assert report["orth_penalty"].startswith("reference (CPU tensors run the reference"), report["orth_penalty"]


class FakeCuda:
    """Stands for a CUDA tensor in the dispatcher's decisions (no GPU here)."""

    is_cuda = True
    device = torch.device("cuda")  # (a device object needs no GPU)

    def __init__(self, dtype=torch.float32):
        self.dtype = dtype


def _fallback_warnings(caught):
    return [str(w.message) for w in caught if "SVD adapter runs its PyTorch reference" in str(w.message)]


@pytest.mark.allows_fallback
def test_cuda_inputs_warn_once_when_the_kernels_cannot_load(monkeypatch):
    import warnings

    monkeypatch.setattr(dispatch, "_ADAPTER_KERNELS", (None, ImportError("No module named 'triton'")))
    monkeypatch.setattr(dispatch, "_WARNED", set())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.adapter_backend(FakeCuda()) == "reference"
        assert dispatch.adapter_backend(FakeCuda()) == "reference"
    messages = _fallback_warnings(caught)
    assert len(messages) == 1 and "No module named 'triton'" in messages[0]


@pytest.mark.allows_fallback
def test_every_cuda_fallback_warns_once_per_distinct_reason(monkeypatch):
    import warnings

    monkeypatch.setattr(dispatch, "_WARNED", set())
    p32, p64, p16 = torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert dispatch.adapter_backend(FakeCuda(torch.float64), p64, p64, p64) == "reference"
            assert dispatch.adapter_backend(FakeCuda(), p32, p16, p32) == "reference"
    messages = _fallback_warnings(caught)
    assert len(messages) == 2
    assert "float64" in messages[0] and "different dtypes" in messages[1]


def test_mixed_dtypes_dispatch_to_the_kernels():
    """PEFT's default (fp32 adapters over a half model) runs the kernels."""
    p32 = torch.zeros(1)
    for x_dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert dispatch.triton_unavailable_reason(FakeCuda(x_dtype), p32, p32, p32) is None
        assert dispatch.adapter_backend(FakeCuda(x_dtype), p32, p32, p32) == "triton"


class cuda_autocast_state:
    """CUDA autocast's state set by hand, as ``torch.autocast("cuda")`` sets it (which a CPU build of torch
    refuses): the dispatcher reads the state, so a stand-in CUDA tensor sees it as a real one would."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.saved = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", self.dtype)

    def __exit__(self, *exc):
        torch.set_autocast_enabled("cuda", self.saved[0])
        torch.set_autocast_dtype("cuda", self.saved[1])


@pytest.mark.allows_fallback
def test_autocast_over_fp32_adapters_dispatches_to_the_kernels_and_is_keyed_by_autocasts_state(monkeypatch):
    """Under CUDA autocast an fp32 input computes in autocast's dtype, and the decision is autocast's: one made
    outside autocast is not reused inside (an autocast dtype the kernels cannot take proves it)."""
    monkeypatch.setattr(dispatch, "_WARNED", set())
    p32 = torch.zeros(1)
    x = FakeCuda(torch.float32)
    assert dispatch.adapter_backend(x, p32, p32, p32) == "triton"
    with cuda_autocast_state(torch.bfloat16):
        assert dispatch.activation_dtype(x) == torch.bfloat16
        assert dispatch.adapter_backend(x, p32, p32, p32) == "triton"
    with cuda_autocast_state(torch.float64), pytest.warns(RuntimeWarning, match="activations, not torch.float64"):
        assert dispatch.adapter_backend(x, p32, p32, p32) == "reference"
    assert dispatch.activation_dtype(x) == torch.float32
    assert dispatch.adapter_backend(x, p32, p32, p32) == "triton"


def test_the_activation_dtype_is_autocasts_on_the_inputs_device():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dispatch.activation_dtype(torch.zeros(1)) == torch.bfloat16
        assert dispatch.activation_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64  # not autocast's
    assert dispatch.activation_dtype(torch.zeros(1)) == torch.float32


@pytest.mark.automatic_dispatch
@pytest.mark.skipif(not ON_GPU, reason="CUDA autocast needs a GPU (a CPU build of torch disables it)")
def test_autocast_over_an_fp32_layer_dispatches_to_the_kernels():
    layer = FastSVDLinear(8, 4, r=2).cuda()
    x = torch.randn(3, 8, device="cuda")
    dispatch.reset_backend_calls()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert dispatch.backend_calls()["svd_adapter"] == {"triton": 1}


def test_backend_calls_count_what_ran(kernels, monkeypatch):
    layer = FastSVDLinear(8, 4, r=2).to(kernels.device)
    x = torch.randn(3, 8, device=kernels.device)
    dispatch.reset_backend_calls()
    monkeypatch.setenv(dispatch.BACKEND_ENV, "reference")
    layer(x)
    layer(x)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    layer(x)
    calls = dispatch.backend_calls()
    assert calls["svd_adapter"] == {"reference": 2, "triton": 1}
    assert env_report()["calls"] == calls  # the report shows them, and is not itself counted
    assert dispatch.backend_calls() == calls


@pytest.mark.automatic_dispatch
def test_the_cpu_reason_names_both_switches(monkeypatch):
    assert "CUDA" in dispatch._choose_adapter_backend(torch.zeros(1), ())[1]
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read per call: as a user's process without the interpreter
    reason = dispatch.triton_unavailable_reason(torch.zeros(1))
    assert "TRITON_INTERPRET=1" in reason and "ADALORA_FAST_BACKEND=triton" in reason


def test_env_module_prints_the_report():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "adalora_fast.env"], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    for key in ("torch", "triton", "svd_adapter", "orth_penalty", "calls.svd_adapter"):
        assert any(line.startswith(key + " ") for line in lines), (key, out.stdout)


def test_a_benchmark_fails_a_fast_provider_that_fell_back():
    from bench_common import check_ran_on_kernels, ran_on

    assert ran_on("adalora_fast", {"triton": 4}) == "triton"
    assert ran_on("adalora_fast_graph", {"triton": 4, "reference": 1}) == "triton+reference"
    assert ran_on("peft_lora", {}) == "peft"
    check_ran_on_kernels("adalora_fast", "triton", "cuda")
    check_ran_on_kernels("adalora_fast", "reference", "cpu")  # CPU tensors run the reference by design
    check_ran_on_kernels("peft_adalora", "peft", "cuda")
    with pytest.raises(AssertionError, match="not on the Triton kernels"):
        check_ran_on_kernels("adalora_fast", "triton+reference", "cuda")
