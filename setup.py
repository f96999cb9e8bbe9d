"""Build and install adalora-fast.

The Triton kernels live in the top-level ``kernels/`` folder but install as
``adalora_fast.kernels`` (a top-level ``kernels`` module would shadow the
Hugging Face ``kernels`` package that transformers imports).

C++/CUDA sources in ``csrc/`` are compiled ahead of time into
``adalora_fast._C`` with torch's BuildExtension (ninja, parallel jobs).
Nothing is compiled at import time. The build is driven by pyproject.toml
(setuptools' PEP 517 backend); install with
``pip install --no-build-isolation -e .`` so that it uses the installed torch.

Environment:

* ``ADALORA_FAST_BUILD_EXT=0``: no extension (the library runs its PyTorch
  reference paths).
* ``FORCE_CUDA=1`` / ``FORCE_CUDA=0``: build / skip the CUDA part; by default
  it is built when torch has CUDA and nvcc is found.
* ``TORCH_CUDA_ARCH_LIST``: the GPU architectures. When unset, the visible
  GPUs' architectures; with no GPU visible, every supported one
  (``SUPPORTED_ARCHS`` that this nvcc knows, PTX for the newest).
* ``MAX_JOBS``: parallel compile jobs (default: every core).
"""

import glob
import os
import re
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Ampere and newer: the library's kernels use bf16 and need sm_80.
SUPPORTED_ARCHS = ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0")


def _read_version():
    scope = {}
    with open(os.path.join(ROOT, "adalora_fast", "version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _nvcc_archs(nvcc):
    """The sm_XY architectures this nvcc compiles for, as "X.Y" (None when it cannot say)."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = {f"{m[:-1]}.{m[-1]}" for m in re.findall(r"compute_(\d+)", out)}
    return archs or None


def cuda_arch_list(torch, nvcc):
    """TORCH_CUDA_ARCH_LIST for this build: the visible GPUs' architectures, or every supported one."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    known = _nvcc_archs(nvcc)
    archs = [a for a in SUPPORTED_ARCHS if known is None or a in known] or list(SUPPORTED_ARCHS[:1])
    return ";".join(archs) + "+PTX"


def _triton_cuda_include() -> list[str]:
    """Triton's bundled CUDA headers (their cuda.h), found without importing Triton, or nothing."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return []
    include = os.path.join(list(spec.submodule_search_locations)[0], "backends", "nvidia", "include")
    return [include] if os.path.exists(os.path.join(include, "cuda.h")) else []


def _extensions():
    """The csrc/ extension, or nothing when there is nothing (or nothing allowed) to build."""
    if os.environ.get("ADALORA_FAST_BUILD_EXT", "1") == "0":
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpp_sources:
        return [], {}

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force_cuda = os.environ.get("FORCE_CUDA", "")
    use_cuda = bool(cu_sources) and (
        force_cuda == "1" or (force_cuda != "0" and torch.version.cuda is not None and CUDA_HOME is not None)
    )
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    # Only the extension's own symbols stay visible (PyInit__C): no inline C++ symbol of ours can interpose on,
    # or be interposed by, another library's copy in the process.
    cxx_flags = ["-O3", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else "nvcc"
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(torch, nvcc)
        print(f"adalora-fast: CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        ext = CUDAExtension(
            "adalora_fast._C",
            cpp_sources + cu_sources,
            include_dirs=include_dirs,
            define_macros=[("ADALORA_FAST_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                # --threads 0: one host thread per target architecture.
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "--threads", "0",
                         "-Xcompiler", "-fvisibility=hidden", "-Xcompiler", "-fvisibility-inlines-hidden"],
            },
        )  # fmt: skip
    else:
        # csrc/svd_linear_program.cpp takes the CUDA driver's types from cuda.h (the driver itself is found at run
        # time): here from Triton's copy, when Triton is installed (a CUDA build has the toolkit's)
        include_dirs += _triton_cuda_include()
        ext = CppExtension("adalora_fast._C", cpp_sources, include_dirs=include_dirs, extra_compile_args=cxx_flags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # (setuptools runs this file as __main__; tests import its helpers)
    ext_modules, cmdclass = _extensions()
    setup(
        name="adalora-fast",
        version=_read_version(),
        description="Fused kernels that make AdaLoRA cost what LoRA costs",
        long_description=open(os.path.join(ROOT, "README.md")).read(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=["adalora_fast", "adalora_fast.reference", "adalora_fast.integrations", "adalora_fast.kernels"],
        package_dir={"adalora_fast.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'"],
        extras_require={
            "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "peft>=0.14", "transformers>=4.45"],
            "peft": ["peft>=0.14", "transformers>=4.45"],
        },
        license="Apache-2.0",
    )
