"""setup.py's build configuration: the CUDA architectures it builds for."""

import importlib.util
import os
import shutil
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("adalora_fast_setup", os.path.join(ROOT, "setup.py"))
setup_py = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup_py)  # defines the helpers; setup() runs only as __main__


def _fake_torch(capabilities):
    cuda = types.SimpleNamespace(
        is_available=lambda: bool(capabilities),
        device_count=lambda: len(capabilities),
        get_device_capability=lambda i: capabilities[i],
    )
    return types.SimpleNamespace(cuda=cuda)


@pytest.fixture
def fake_nvcc(tmp_path):
    def make(archs):
        path = tmp_path / "nvcc"
        path.write_text("#!/bin/sh\n" + "".join(f"echo compute_{a}\n" for a in archs))
        path.chmod(0o755)
        return str(path)

    return make


def test_visible_gpus_decide(monkeypatch, fake_nvcc):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    nvcc = fake_nvcc([80, 90, 100])
    assert setup_py.cuda_arch_list(_fake_torch([(9, 0)]), nvcc) == "9.0"
    assert setup_py.cuda_arch_list(_fake_torch([(9, 0), (8, 0), (9, 0)]), nvcc) == "8.0;9.0"


def test_without_a_gpu_every_supported_arch_this_nvcc_knows(monkeypatch, fake_nvcc):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert setup_py.cuda_arch_list(_fake_torch([]), fake_nvcc([75, 80, 86, 90])) == "8.0;8.6;9.0+PTX"
    everything = ";".join(setup_py.SUPPORTED_ARCHS) + "+PTX"
    assert setup_py.cuda_arch_list(_fake_torch([]), "/nonexistent/nvcc") == everything


def test_the_environment_overrides(monkeypatch, fake_nvcc):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")
    assert setup_py.cuda_arch_list(_fake_torch([(9, 0)]), fake_nvcc([90])) == "8.9"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_the_installed_nvcc_lists_its_architectures():
    archs = setup_py._nvcc_archs(shutil.which("nvcc"))
    assert archs and "9.0" in archs
