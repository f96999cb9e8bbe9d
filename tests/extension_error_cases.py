"""Bad inputs to the compiled penalty ops, run by test_orth_penalty_op.py in a child process (tests/isolated.py).

Every case must end in a Python exception (RuntimeError, NotImplementedError, …) whose message matches, never
in a crash; ``ok`` cases are unusual but valid inputs that must simply run. On a GPU the CUDA cases run too,
and a final valid launch and synchronize check that no error path left the device in a bad state.
"""

from __future__ import annotations

import re

import torch


def _cases(device: str):
    F = torch.ops.adalora_fast.orth_penalty_forward
    B = torch.ops.adalora_fast.orth_penalty_backward
    kw = {"device": device}
    a = torch.randn(2, 5, **kw)
    b64 = torch.randn(5, 2, dtype=torch.float64, **kw)
    _, dev, sq = F([a], [1], "fro")
    one = torch.ones((), **kw)
    cases = [
        ("forward: mixed dtypes", lambda: F([a, b64], [1, 0], "fro"), "call once per dtype"),
        ("forward: unknown mode", lambda: F([a], [1], "l1"), "mode must be 'fro' or 'fro2'"),
        ("forward: empty mode", lambda: F([a], [1], ""), "mode must be 'fro' or 'fro2'"),
        ("forward: 1-D factor", lambda: F([torch.randn(3, **kw)], [1], "fro"), "must be 2-D"),
        ("forward: 3-D factor", lambda: F([torch.randn(2, 3, 4, **kw)], [1], "fro"), "must be 2-D"),
        ("forward: 0-D factor", lambda: F([torch.randn((), **kw)], [1], "fro"), "must be 2-D"),
        ("forward: no factors", lambda: F([], [], "fro"), "no lora_A / lora_B|no tensor arguments"),
        ("forward: fewer flags", lambda: F([a, a], [1], "fro"), "2 factors but 1 is_right"),
        ("forward: more flags", lambda: F([a], [1, 0], "fro"), "1 factors but 2 is_right"),
        ("forward: int64 factor", lambda: F([torch.ones(2, 5, dtype=torch.int64, **kw)], [1], "fro"), "floating point"),
        ("forward: bool factor", lambda: F([torch.ones(2, 5, dtype=torch.bool, **kw)], [1], "fro"), "floating point"),
        ("forward: complex factor", lambda: F([torch.ones(2, 5, dtype=torch.complex64, **kw)], [1], "fro"), "floating point"),
        ("forward: int then float", lambda: F([torch.ones(2, 5, dtype=torch.int32, **kw), a], [1, 1], "fro"), "floating point|once per dtype"),
        ("forward: sparse factor", lambda: F([a.to_sparse()], [1], "fro"), "Sparse|strided"),
        ("backward: deviation too short", lambda: B(one, [a], [1], dev[:-1], sq, "fro"), "do not match"),
        ("backward: sq_norms too long", lambda: B(one, [a], [1], dev, torch.cat([sq, sq]), "fro"), "do not match"),
        ("backward: grad_loss of 2 elements", lambda: B(torch.ones(2, **kw), [a], [1], dev, sq, "fro"), "one element"),
        ("backward: empty grad_loss", lambda: B(torch.ones(0, **kw), [a], [1], dev, sq, "fro"), "one element"),
        ("backward: mixed dtypes", lambda: B(one, [a, b64], [1, 0], dev, sq, "fro"), "call once per dtype"),
        ("backward: unknown mode", lambda: B(one, [a], [1], dev, sq, "l2"), "mode must be 'fro' or 'fro2'"),
        ("backward: no factors", lambda: B(one, [], [], dev, sq, "fro"), "no lora_A / lora_B"),
        ("backward: fewer flags", lambda: B(one, [a, a], [1], dev, sq, "fro"), "2 factors but 1 is_right"),
        ("backward: integer deviation", lambda: B(one, [a], [1], dev.long(), sq, "fro"), "floating point"),
        ("ok: zero-rank factor", lambda: F([torch.randn(0, 5, **kw)], [1], "fro"), None),
        ("ok: zero-length factor", lambda: F([torch.randn(3, 0, **kw)], [1], "fro2"), None),
        ("ok: flags other than 0 and 1", lambda: F([a, a.t()], [7, 0], "fro"), None),
        ("ok: expanded (stride 0) factor", lambda: F([torch.randn(1, 5, **kw).expand(3, 5)], [1], "fro"), None),
    ]
    if device == "cuda":
        cpu = torch.randn(5, 2)
        cases += [
            ("cuda: factor 1 on the CPU", lambda: F([a, cpu], [1, 0], "fro"), "is on cpu but factor 0 is on cuda"),
            ("cuda: factor 0 on the CPU", lambda: F([cpu, a], [0, 1], "fro"), "is on cuda.* but factor 0 is on cpu"),
            ("cuda: deviation on the CPU", lambda: B(one, [a], [1], dev.cpu(), sq, "fro"), "deviation is on cpu but the factors are on cuda"),
            ("cuda: sq_norms on the CPU", lambda: B(one, [a], [1], dev, sq.cpu(), "fro"), "sq_norms is on cpu but the factors are on cuda"),
            ("cuda: grad_loss on the CPU", lambda: B(one.cpu(), [a], [1], dev, sq, "fro"), "grad_loss is on cpu but the factors are on cuda"),
            ("cuda: no factors (backward)", lambda: B(one, [], [], dev, sq, "fro"), "no lora_A / lora_B"),
            ("cuda: factor 0 on the CPU (backward)", lambda: B(one, [cpu, a], [0, 1], dev, sq, "fro"), "is on cuda.* but factor 0 is on cpu"),
        ]
    return cases


def run(step, report) -> None:
    import adalora_fast  # noqa: F401  (loads adalora_fast._C: the ops and their Python parts)
    from adalora_fast import extension

    module, err = extension.load_extension()
    if module is None:
        report({"skipped": f"adalora_fast._C did not load: {err}"})
        return
    devices = ["cpu"]
    if torch.cuda.is_available() and module.built_with_cuda():
        devices.append("cuda")
    for device in devices:
        for name, call, pattern in _cases(device):
            step(f"{device}: {name}")
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - any Python exception is the right outcome; its text is checked
                message = f"{type(exc).__name__}: {exc}"
                ok = pattern is not None and re.search(pattern, str(exc)) is not None
                report({"case": f"{device}: {name}", "ok": ok, "got": message.splitlines()[0][:300]})
            else:
                report({"case": f"{device}: {name}", "ok": pattern is None, "got": "no exception"})
        if device == "cuda":
            step("cuda: a valid call after the errors, synchronized")
            loss, _, _ = torch.ops.adalora_fast.orth_penalty_forward([torch.randn(3, 40, device="cuda")], [1], "fro")
            torch.cuda.synchronize()
            report({"case": "cuda: valid call after the errors", "ok": bool(torch.isfinite(loss).item()), "got": "ran"})
