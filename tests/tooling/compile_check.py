"""Ahead-of-time compilation of every adapter kernel at every tile configuration, without a GPU.

    TRITON_INTERPRET=0 PYTHONPATH=tests python -m tooling.compile_check [--representative] [--json]

For each kernel and each config in its autotune list, builds the kernel for
sm_90 (H100) and sm_80 (A100) with ``triton.compile`` and reports the shared
memory it needs, whether its tl.dot parts use tensor cores (``wgmma`` /
``mma`` in the PTX), and its registers per thread and local-memory stack (register
spills) read from the cubin by the cuobjdump Triton ships. A kernel that only works
in the interpreter cannot pass, nor one whose every config spills.

The full matrix is every kernel × config × rank pad × dtype setup × target. ``--representative`` keeps every
kernel, dtype setup and target at the rank pad that needs the most registers and shared memory, and builds a
group's configs in autotune order only until one does not spill: each group still shows a clean choice.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from adalora_fast.kernels import interpreting
from adalora_fast.kernels import svd_adapter as sa

# Shared memory per block on each target (bytes): H100 227 KB, A100 163 KB.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}
RANK_PADS = (16, 32, 64)
# (target, dtype) setups built at every rank pad: half activations alone and over fp32 adapters (PEFT's default)
HALF_SETUPS = ((90, "bf16"), (90, "bf16/fp32"), (80, "fp16"), (80, "fp16/fp32"))
FP32_SETUP = (90, "fp32", 16)  # (target, dtype, r_pad): fp32 is built at the smallest rank pad only

# kernel -> (autotuned entry, whether it contains tl.dot, extra constexprs)
KERNELS = {
    "shrink": (sa.svd_adapter_shrink, True, {"HAS_DROPOUT": True}),
    "expand": (sa.svd_adapter_expand, True, {}),
    "grad_h": (sa.svd_adapter_grad_h, True, {"BLOCK_M": sa.GRAD_H_BLOCK_M}),
    "reduce": (sa.svd_adapter_grad_reduce, False,
               {"BLOCK_ROWS": sa.REDUCE_BLOCK_ROWS, "EMIT": True, "ACCUMULATE_B": True, "ACCUMULATE_A": True,
                "ACCUMULATE_E": True}),
    "grad_a_x": (sa.svd_adapter_grad_a_x, True, {"HAS_DROPOUT": True, "HAS_DX": True, "DX_ACCUMULATE": True}),
}

_FP32_BUFFERS = {"H_ptr", "WS_ptr", "OUT_ptr", "SCORE_ptr", "INV_SCALE_ptr"}
# Activations; every other pointer is an adapter parameter,
# its gradient or its importance state, in the parameters' dtype.
_ACTIVATIONS = {"X_ptr", "BASE_ptr", "Y_ptr", "DY_ptr", "DX_ptr"}
_TL = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
_FLOAT_SCALARS = {"scaling", "dropout_p", "keep_scale", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2"}


@dataclass
class CompileResult:
    kernel: str
    config: str
    target: int
    dtype: str  # activations' dtype; parameters' dtype after a slash where they differ ("bf16/fp32")
    r_pad: int
    shared: int
    tensor_cores: bool
    shared_ok: bool
    registers: int | None  # per thread; None where no cuobjdump is at hand
    stack_bytes: int | None  # local-memory stack per thread: register spills


def _dtypes(dtype: str) -> tuple[str, str]:
    """(activations, parameters) of a ``dtype`` label such as "bf16" or "bf16/fp32"."""
    act, _, param = dtype.partition("/")
    return act, param or act


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    act, param = _dtypes(dtype)
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "SEED_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in _FP32_BUFFERS else f"*{act if name in _ACTIVATIONS else param}"
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(name: str, config: triton.Config, target: int, dtype: str, r_pad: int) -> CompileResult:
    autotuned, has_dot, extra = KERNELS[name]
    fn = autotuned.fn
    constexprs = dict(config.kwargs, R_PAD=r_pad, **extra)
    act, param = _dtypes(dtype)
    if "UPCAST" in fn.arg_names:  # as kernels.precision.dot_settings sets them for this pair
        constexprs.update(UPCAST=False, DOT_PRECISION="ieee" if act == param == "fp32" else "tf32", ACC_DTYPE=tl.float32,
                          COMPUTE_DTYPE=_TL[param])  # fmt: skip
    elif "ACC_DTYPE" in fn.arg_names:
        constexprs["ACC_DTYPE"] = tl.float32
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", target, 32), options=options)
    ptx = compiled.asm["ptx"]
    shared = compiled.metadata.shared
    uses_tc = ("wgmma" in ptx or "mma.sync" in ptx) if has_dot else False
    registers, stack = resource_usage(compiled.asm["cubin"])
    return CompileResult(name, str(config), target, dtype, r_pad, shared, uses_tc, shared <= SHARED_MEMORY_LIMIT[target],
                         registers, stack)  # fmt: skip


def _cuobjdump() -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, stack bytes per thread) of a compiled kernel, or (None, None) without cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=False)
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", out.stdout)
    return (int(found.group(1)), int(found.group(2))) if found else (None, None)


def spilling_in_every_config(results: list[CompileResult]) -> list[tuple]:
    """(kernel, target, dtype, r_pad) groups where every config spills registers: the autotuner has no clean choice."""
    groups: dict[tuple, list[int | None]] = {}
    for r in results:
        groups.setdefault((r.kernel, r.target, r.dtype, r.r_pad), []).append(r.stack_bytes)
    return [key for key, stacks in groups.items() if None not in stacks and min(stacks) > 0]


def _compile_configs(job: tuple) -> list[CompileResult]:
    """Builds configs of one (kernel, target, dtype, r_pad) group in order; ``until_clean``: stops at the first one
    that does not spill (or, without cuobjdump, after the first)."""
    name, config_indices, target, dtype, r_pad, until_clean = job
    results = []
    for i in config_indices:
        results.append(compile_kernel(name, KERNELS[name][0].configs[i], target, dtype, r_pad))
        if until_clean and results[-1].stack_bytes in (0, None):
            break
    return results


def matrix_groups(representative: bool = False) -> list[tuple[str, int, str, int]]:
    """(kernel, target, dtype, r_pad) of the matrix: on sm_90 bf16 and bf16 activations with fp32 adapters, on
    sm_80 fp16 and fp16 over fp32, at every rank pad (the largest alone when ``representative``); fp32 on sm_90
    at r_pad 16."""
    r_pads = RANK_PADS[-1:] if representative else RANK_PADS
    setups = [(target, dtype, r_pad) for r_pad in r_pads for target, dtype in HALF_SETUPS] + [FP32_SETUP]
    return [(name, *setup) for name in KERNELS for setup in setups]


def compile_all(representative: bool = False, jobs: int | None = None) -> list[CompileResult]:
    """The matrix's builds (:func:`matrix_groups`): every config of each group, or when ``representative`` each group's
    configs up to the first that does not spill."""
    if interpreting():
        raise RuntimeError("run with TRITON_INTERPRET=0: the interpreter's config lists are not the GPU ones")
    work = []
    for name, target, dtype, r_pad in matrix_groups(representative):
        indices = range(len(KERNELS[name][0].configs))
        if representative:  # one job per group: its configs are built one after another
            work.append((name, tuple(indices), target, dtype, r_pad, True))
        else:  # one job per config: the pool balances them
            work += [(name, (i,), target, dtype, r_pad, False) for i in indices]
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        return [r for results in pool.map(_compile_configs, work) for r in results]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--representative", action="store_true",
                        help="the largest rank pad only, each group's configs up to the first without spills")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--jobs", type=int, default=None, help="compiler processes (default: one per core)")
    args = parser.parse_args(argv)
    results = compile_all(args.representative, args.jobs)
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    else:
        for r in results:
            print(f"{r.kernel:8} sm_{r.target} {r.dtype:9} r_pad={r.r_pad:<3} shared={r.shared:>6} "
                  f"tensor_cores={r.tensor_cores!s:5} registers={r.registers} stack={r.stack_bytes} {r.config}")  # fmt: skip
    spilling = spilling_in_every_config(results)
    for group in spilling:
        print(f"every config spills: {group}", file=sys.stderr)
    return 0 if all(r.shared_ok for r in results) and not spilling else 1


if __name__ == "__main__":
    sys.exit(main())
