"""The compiled orthogonality-penalty op (csrc/) against the PyTorch reference.

CPU tests run everywhere (the CPU implementation is always built); CUDA tests
run where a GPU is present; the CUDA sources are compiled for sm_90/sm_80 with
the machine's nvcc wherever one is installed.
"""

import glob
import os
import shutil
import subprocess
import sysconfig
import warnings

import numpy as np
import pytest
import torch

import adalora_fast
from adalora_fast import extension
from adalora_fast.penalty import orth_penalty
from adalora_fast.reference import orth_penalty_reference
from isolated import run_isolated
from tooling.device import ON_GPU, require_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def built_extension():
    require_extension()


@pytest.fixture
def cuda_extension():
    require_extension(cuda=True)


requires_ext = pytest.mark.usefixtures("built_extension")
requires_cuda_ext = pytest.mark.usefixtures("cuda_extension")

# (rank, long side) per adapter: ranks 1..64 that differ per layer, sizes not multiples of anything, > one chunk.
SHAPES = [(1, 5), (12, 77), (4, 1100), (64, 130), (16, 513), (3, 1)]


def _factors(dtype, device="cpu", seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, L, generator=g, dtype=torch.float64).mul(scale / L**0.5) for r, L in SHAPES]
    Bs = [torch.randn(L + 3, r, generator=g, dtype=torch.float64).mul(scale / L**0.5) for r, L in SHAPES]
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in As + Bs], [True] * len(As) + [False] * len(Bs)


def _reference(factors, is_right, mode):
    ps = [f.detach().double().requires_grad_() for f in factors]
    loss = orth_penalty_reference([p for p, r in zip(ps, is_right) if r], [p for p, r in zip(ps, is_right) if not r], mode)
    loss.backward()
    return loss.detach(), [p.grad for p in ps]


def _op(factors, is_right, mode):
    for f in factors:
        f.grad = None
    loss = orth_penalty(factors, is_right, mode, backend="extension")
    loss.backward()
    return loss.detach(), [f.grad for f in factors]


TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@requires_ext
@pytest.mark.parametrize("mode", ["fro", "fro2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cpu_op_matches_reference(mode, dtype):
    factors, is_right = _factors(dtype)
    loss, grads = _op(factors, is_right, mode)
    ref_loss, ref_grads = _reference(factors, is_right, mode)
    tol = TOLERANCES[dtype]
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape
        torch.testing.assert_close(g.double(), rg, rtol=tol, atol=tol * max(1.0, rg.abs().max().item()))


@requires_ext
@pytest.mark.parametrize("mode", ["fro", "fro2"])
def test_cpu_op_gradcheck_float64(mode):
    factors = [torch.randn(3, 7, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)]
    factors = [f.requires_grad_() for f in factors]
    assert torch.autograd.gradcheck(lambda *fs: orth_penalty(fs, [True, False, True], mode, "extension"), tuple(factors))


@requires_ext
def test_non_contiguous_factors():
    base = torch.randn(40, 6, dtype=torch.float64)
    A = base.T[:, ::2].requires_grad_()  # (6, 20), strided both ways
    B = torch.randn(6, 30, dtype=torch.float64).T.requires_grad_()  # (30, 6), column-major
    assert not A.is_contiguous() and not B.is_contiguous()
    loss, grads = _op([A, B], [True, False], "fro")
    ref_loss, ref_grads = _reference([A, B], [True, False], "fro")
    torch.testing.assert_close(loss, ref_loss)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


@requires_ext
def test_zero_deviation_has_zero_gradient_in_fro_mode():
    Q, _ = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))
    A = Q.T.contiguous().requires_grad_()
    B = Q.clone().requires_grad_()
    loss, grads = _op([A, B], [True, False], "fro")
    assert loss < 1e-12 and all(torch.isfinite(g).all() for g in grads)


@requires_ext
def test_cpu_op_is_bitwise_deterministic():
    factors, is_right = _factors(torch.float32)
    a_loss, a_grads = _op(factors, is_right, "fro")
    b_loss, b_grads = _op(factors, is_right, "fro")
    assert torch.equal(a_loss, b_loss) and all(torch.equal(a, b) for a, b in zip(a_grads, b_grads))


def _ordered_sums(x, chunk=512):
    """D = XᵀX − I as the op's header defines each entry's sum: over rows in order within a chunk of 512,
    then over chunks in order (float32, numpy: one rounding per product and per addition)."""
    rows, r = x.shape
    g = np.zeros((r, r), np.float32)
    for c0 in range(0, rows, chunk):
        partial = np.zeros((r, r), np.float32)
        for row in x[c0 : c0 + chunk]:
            partial += np.outer(row, row)
        g += partial
    return g - np.eye(r, dtype=np.float32)


@requires_ext
def test_cpu_op_sums_each_entry_in_the_documented_order():
    """The CPU loops (vectorised tiles) form every sum of the Gram, the deviation's norm and the gradient in the
    order orth_penalty.h defines, bit for bit: the CUDA build's order."""
    g = torch.Generator().manual_seed(3)
    factors = [torch.randn(5, 37, generator=g), torch.randn(530, 13, generator=g) * 0.05,
               torch.randn(3, 1, generator=g), torch.randn(20, 9, generator=g).T.contiguous().T]  # fmt: skip
    is_right = [1, 0, 1, 0]
    loss, dev, sq_norms = torch.ops.adalora_fast.orth_penalty_forward(factors, is_right, "fro")
    grad_loss = torch.tensor(1.5)
    grads = torch.ops.adalora_fast.orth_penalty_backward(grad_loss, factors, is_right, dev, sq_norms, "fro")
    offset, total = 0, np.float32(0)
    for f, right, grad, sq_norm in zip(factors, is_right, grads, sq_norms):
        x = (f.T if right else f).numpy()
        d = _ordered_sums(x)
        r = d.shape[0]
        assert np.array_equal(dev[offset : offset + r * r].numpy().reshape(r, r), d)
        offset += r * r
        sq = np.float32(0)
        for e in d.ravel():
            sq = np.float32(sq + e * e)
        assert sq_norm.item() == sq
        total = np.float32(total + np.sqrt(sq))
        coef = np.float32(2) * (np.float32(1.5) / np.float32(len(factors))) / np.sqrt(sq)
        sums = np.zeros_like(x)
        for j in range(r):
            sums += x[:, j : j + 1] * d[j : j + 1, :]
        assert np.array_equal((grad.T if right else grad).numpy(), coef * sums)
    assert loss.item() == total / np.float32(len(factors))


@requires_ext
def test_eager_node_saves_through_autograd():
    """The eager call's C++ node saves its tensors as autograd's saved variables: saved-tensor hooks see each
    once, and a factor changed in place before the backward is an error, not a stale gradient."""
    factors, is_right = _factors(torch.float32)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        loss = orth_penalty(factors, is_right, "fro", backend="extension")
    assert len(packed) == len(factors) + 2
    loss.backward()
    _, grads = _op(factors, is_right, "fro")
    assert all(torch.equal(f.grad, g) for f, g in zip(factors, grads))
    loss = orth_penalty(factors, is_right, "fro", backend="extension")
    with torch.no_grad():
        factors[3].mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@requires_ext
def test_torch_compile_fullgraph_matches_eager():
    factors, is_right = _factors(torch.float32)
    eager_loss, eager_grads = _op(factors, is_right, "fro")
    compiled = torch.compile(lambda fs: orth_penalty(fs, is_right, "fro", "extension"), fullgraph=True, backend="aot_eager")
    for f in factors:
        f.grad = None
    loss = compiled(factors)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=0)
    for f, g in zip(factors, eager_grads):
        torch.testing.assert_close(f.grad, g, rtol=0, atol=0)


@requires_ext
def test_bad_inputs_raise_and_never_crash():
    """Every bad input to both ops (extension_error_cases.py; CUDA ones on a GPU) raises a clear error.

    The calls run in a child process, so that a crash on an error path (an exception that cannot cross the
    extension boundary, an out-of-bounds read before a check) fails this test with its signal instead of
    killing the test run.
    """
    results = run_isolated("import sys; sys.path.insert(0, 'tests'); import extension_error_cases as c; c.run(step, report)")
    assert results and "skipped" not in results[0], results
    wrong = [f"{r['case']}: got {r['got']}" for r in results if not r["ok"]]
    assert not wrong, "\n".join(wrong)
    assert any(r["case"] == "cpu: forward: mixed dtypes" for r in results)


def test_mixed_dtypes_are_grouped_by_the_launcher():
    a = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 3, dtype=torch.float32, requires_grad=True)
    loss = orth_penalty([a, b], [True, False], "fro2")
    expected = orth_penalty_reference([a.detach()], [b.detach().double()], "fro2")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_forced_reference_backend(monkeypatch):
    monkeypatch.setenv("ADALORA_FAST_BACKEND", "reference")
    assert adalora_fast.dispatch.penalty_backend(torch.randn(2, 2)) == "reference"
    assert adalora_fast.env_report()["orth_penalty"].startswith("reference")


@requires_ext
def test_cpu_tensors_run_the_reference_unless_the_extension_is_asked_for():
    assert adalora_fast.dispatch.penalty_backend(torch.randn(2, 2)) == "reference"
    assert adalora_fast.dispatch.penalty_backend(torch.randn(2, 2), "extension") == "extension"


def test_missing_extension_falls_back_with_one_warning_naming_the_cause(monkeypatch):
    monkeypatch.setattr(extension, "_EXTENSION", (None, ImportError("libfoo.so: cannot open shared object file")))
    extension.warn_extension_fallback.cache_clear()
    a = torch.randn(3, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss1 = orth_penalty([a.cuda() if ON_GPU else a], [True], "fro")
        orth_penalty([a.cuda() if ON_GPU else a], [True], "fro")
    messages = [str(w.message) for w in caught if "adalora_fast._C" in str(w.message)]
    assert len(messages) == 1 and "libfoo.so: cannot open shared object file" in messages[0]
    torch.testing.assert_close(loss1.cpu(), orth_penalty_reference([a], [], "fro"))
    assert "libfoo.so" in adalora_fast.env_report()["orth_penalty"]
    extension.warn_extension_fallback.cache_clear()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
@pytest.mark.skipif(extension.extension_has_cuda(), reason="the installed extension's CUDA build compiled these sources")
def test_cuda_sources_compile_for_sm90_and_sm80(tmp_path):
    """The whole build (objects with host code, both targets, and the C++ sources as the CUDA build compiles
    them) when csrc/ changed since it last passed, else each target's device code alone (tooling.compile_matrix)."""
    from torch.utils.cpp_extension import include_paths
    from tooling import compile_matrix

    choice = compile_matrix.choose("cuda")
    sources = [os.path.join(ROOT, "csrc", "cuda", f) for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")) if f.endswith(".cu")]
    assert sources
    flags = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
             *[f"-I{p}" for p in include_paths()], f"-I{os.path.join(ROOT, 'csrc')}"]  # fmt: skip
    if choice.full:  # --threads 0: the two architectures compile in parallel
        builds = [("-c --threads 0 -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=sm_80", ".o")]
        # The C++ sources with the CUDA build's macro (their CUDA branches: streams, device checks), which a CPU
        # build never compiles; nvcc hands them to the host compiler with the toolkit's headers.
        python_include = f"-I{sysconfig.get_paths()['include']}"
        host = [(src, f"-c -DADALORA_FAST_WITH_CUDA=1 {python_include}", ".o")
                for src in glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))]  # fmt: skip
    else:
        builds = [(f"-cubin -arch=sm_{sm}", f".sm_{sm}.cubin") for sm in (90, 80)]
        host = []
    jobs = []  # every build at once, each logging to a file (no pipe to fill while another is waited for)
    for src, options, suffix in [(src, *build) for src in sources for build in builds] + host:
        out = tmp_path / (os.path.basename(src) + suffix)
        with open(f"{out}.log", "w") as log:
            cmd = ["nvcc", *options.split(), *flags, src, "-o", str(out)]
            jobs.append((out, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
    for out, job in jobs:
        assert job.wait() == 0, f"{choice.why}: {open(f'{out}.log').read()[-4000:]}"
        assert out.stat().st_size > 0
    choice.record_pass()


# ---- GPU ------------------------------------------------------------------------------------------


@requires_cuda_ext
@pytest.mark.parametrize("mode", ["fro", "fro2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cuda_op_matches_cpu_op_and_reference(mode, dtype):
    cpu_factors, is_right = _factors(dtype)
    gpu_factors = [f.detach().cuda().requires_grad_() for f in cpu_factors]
    gpu_loss, gpu_grads = _op(gpu_factors, is_right, mode)
    cpu_loss, cpu_grads = _op(cpu_factors, is_right, mode)
    ref_loss, ref_grads = _reference(cpu_factors, is_right, mode)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(gpu_loss.cpu().double(), ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=tol, atol=tol)
    for g, cg, rg in zip(gpu_grads, cpu_grads, ref_grads):
        scale = max(1.0, rg.abs().max().item())
        torch.testing.assert_close(g.cpu().double(), rg, rtol=tol, atol=tol * scale)
        torch.testing.assert_close(g.cpu(), cg, rtol=tol, atol=tol * scale)


@requires_cuda_ext
def test_cuda_op_is_bitwise_deterministic():
    factors, is_right = _factors(torch.bfloat16, device="cuda")
    a_loss, a_grads = _op(factors, is_right, "fro")
    b_loss, b_grads = _op(factors, is_right, "fro")
    assert torch.equal(a_loss, b_loss) and all(torch.equal(a, b) for a, b in zip(a_grads, b_grads))


def _cuda_launches(n_layers):
    g = torch.Generator().manual_seed(0)
    factors = []
    for k in range(n_layers):
        r = 4 + k % 9
        factors += [torch.randn(r, 300 + 7 * k, generator=g), torch.randn(200 + 5 * k, r, generator=g)]
    factors = [f.cuda().requires_grad_() for f in factors]
    is_right = [True, False] * n_layers
    _op(factors, is_right, "fro")  # warm-up
    for f in factors:
        f.grad = None  # so the profiled backward assigns gradients instead of accumulating them
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        orth_penalty(factors, is_right, "fro", "extension").backward()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@requires_cuda_ext
def test_cuda_launches_do_not_grow_with_the_number_of_layers():
    assert _cuda_launches(8) == _cuda_launches(64)
