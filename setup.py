"""Build and install adalora-fast.

The Triton kernels live in the top-level ``kernels/`` folder but install as
``adalora_fast.kernels`` (a top-level ``kernels`` module would shadow the
Hugging Face ``kernels`` package that transformers imports).

C++/CUDA sources in ``csrc/`` are compiled ahead of time into
``adalora_fast._C`` with torch's BuildExtension (ninja). Nothing is compiled
at import time. The CUDA part is built when torch has CUDA and nvcc is found,
or when ``FORCE_CUDA=1``; set ``ADALORA_FAST_BUILD_EXT=0`` to skip the
extension entirely (the library then runs its PyTorch reference paths).
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _read_version():
    scope = {}
    with open(os.path.join(ROOT, "adalora_fast", "version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


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

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    use_cuda = bool(cu_sources) and (force_cuda or (torch.version.cuda is not None and CUDA_HOME is not None))
    cxx_flags = ["-O3"]  # the C++ standard is the one torch's BuildExtension picks for its headers
    include_dirs = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        # Without a visible GPU, BuildExtension would ask the driver for the arch; default to A100 + H100.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        ext = CUDAExtension(
            "adalora_fast._C",
            cpp_sources + cu_sources,
            include_dirs=include_dirs,
            define_macros=[("ADALORA_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        )
    else:
        ext = CppExtension("adalora_fast._C", cpp_sources, include_dirs=include_dirs, extra_compile_args=cxx_flags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


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
        "test": ["pytest", "pytest-benchmark", "hypothesis", "peft>=0.14", "transformers>=4.45"],
        "peft": ["peft>=0.14", "transformers>=4.45"],
    },
    license="Apache-2.0",
)
