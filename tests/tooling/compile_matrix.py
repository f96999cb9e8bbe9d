"""Which matrix the ahead-of-time compile tests build: the full one when what it compiles changed, else a subset.

The full matrices (every Triton kernel × tile config × rank pad × dtype setup for sm_90 and sm_80; the CUDA
sources' objects, host code included, for both) take minutes of a small machine, and their outcome depends
only on the sources they compile and the compiler. So ``full_matrix_passed/<matrix>.sha256``, committed
beside this file, holds the hash of those inputs at which the full matrix last passed. A run whose inputs
hash to anything else (an edited kernel or CUDA source, another Triton, torch or nvcc) builds the full
matrix and, when it passes, rewrites that file, to be committed with the change; a clean clone of a
commit whose file is current builds the representative subset. ``ADALORA_FAST_FULL_COMPILE_MATRIX=1``
builds the full matrix whatever the hash.

    triton  kernels/*.py, tests/tooling/compile_check.py (the matrix itself), the installed Triton
    cuda    csrc/**, the installed torch (its headers), nvcc's version
"""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAMPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "full_matrix_passed")
FULL_MATRIX_SWITCH = "ADALORA_FAST_FULL_COMPILE_MATRIX"


def _triton_toolchain() -> str:
    import triton

    return f"triton {triton.__version__}"


def _cuda_toolchain() -> str:
    import torch

    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    return f"torch {torch.__version__}\nnvcc {nvcc.strip().splitlines()[-1]}"


# matrix -> (its source files, relative to the repository root; what compiles them)
INPUTS = {
    "triton": (("kernels/*.py", "tests/tooling/compile_check.py"), _triton_toolchain),
    "cuda": (("csrc/**/*",), _cuda_toolchain),
}


def inputs_hash(matrix: str) -> str:
    patterns, toolchain = INPUTS[matrix]
    files = {
        os.path.relpath(path, ROOT)
        for pattern in patterns
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True)
        if os.path.isfile(path) and "__pycache__" not in path
    }
    h = hashlib.sha256()
    for rel in sorted(files):
        with open(os.path.join(ROOT, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + f.read() + b"\0")
    h.update(toolchain().encode())
    return h.hexdigest()


def stamp_path(matrix: str) -> str:
    return os.path.join(STAMPS, f"{matrix}.sha256")


@dataclass(frozen=True)
class MatrixChoice:
    matrix: str
    full: bool
    inputs: str  # the inputs' hash, taken before the build: what a passing full build records
    why: str

    def record_pass(self) -> None:
        """After a passing build: when it was the full matrix, the stamp now names its inputs."""
        if self.full:
            os.makedirs(STAMPS, exist_ok=True)
            with open(stamp_path(self.matrix), "w") as f:
                f.write(self.inputs + "\n")


def choose(matrix: str) -> MatrixChoice:
    digest = inputs_hash(matrix)
    if os.environ.get(FULL_MATRIX_SWITCH) == "1":
        return MatrixChoice(matrix, True, digest, f"{FULL_MATRIX_SWITCH}=1")
    try:
        with open(stamp_path(matrix)) as f:
            passed = f.read().strip()
    except FileNotFoundError:
        passed = None
    if passed != digest:
        return MatrixChoice(matrix, True, digest, f"its inputs changed since the full matrix last passed ({matrix})")
    return MatrixChoice(matrix, False, digest, "its inputs are the ones the full matrix last passed with")
