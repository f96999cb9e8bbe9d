"""The dispatch point: one place picks kernels or reference, and forcing is explicit."""

import pytest
import torch

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


def test_env_report_names_a_backend_for_every_op():
    report = env_report()
    for key in ("torch", "triton", "svd_adapter", "orth_penalty", "rank_allocator"):
        assert key in report
    assert report["svd_adapter"].split()[0] in ("reference", "triton")


def test_cuda_inputs_warn_once_when_the_kernels_cannot_load(monkeypatch):
    import warnings

    monkeypatch.setattr(dispatch, "_ADAPTER_KERNELS", (None, ImportError("No module named 'triton'")))
    monkeypatch.setattr(dispatch, "_ADAPTER_FALLBACK_WARNED", False)

    class FakeCuda:
        is_cuda = True
        device = torch.device("cpu")
        dtype = torch.float32

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.adapter_backend(FakeCuda()) == "reference"
        assert dispatch.adapter_backend(FakeCuda()) == "reference"
    messages = [str(w.message) for w in caught if "SVD adapter runs its PyTorch reference" in str(w.message)]
    assert len(messages) == 1 and "No module named 'triton'" in messages[0]
