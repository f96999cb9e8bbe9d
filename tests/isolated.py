"""Run code that may crash the interpreter (native extension error paths) in a child process.

A SIGSEGV or SIGABRT in the child fails the one test that asked for it, naming the signal, the last step
the child announced and the tail of its output (the child runs with faulthandler on, so a crash prints the
Python stack, and with TORCH_SHOW_CPP_STACKTRACES=1, so a C++ error carries its own).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = "@@step "
RESULT = "@@result "


def _signal_name(returncode: int) -> str:
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"signal {-returncode}"


def _native_backtrace(cmd: list, env: dict, timeout: float) -> str:
    """The C/C++ stack of a crash: the child again, under gdb when this machine has it (else nothing)."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return ""
    batch = [gdb, "-q", "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40", "--args", *cmd]
    try:
        out = subprocess.run(batch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "\n--- gdb: timed out ---"
    frames = [line[:300] for line in out.stdout.splitlines() if line.startswith("#") or "signal" in line.lower()]
    return "\n--- native backtrace (gdb) ---\n" + "\n".join(frames[-60:])


def run_isolated(code: str, timeout: float = 300) -> list:
    """Run ``code`` in a fresh interpreter; return the objects it reported with ``report(obj)``.

    The child sees two helpers: ``step(name)`` announces what it is about to do (flushed, so that a crash
    names it) and ``report(obj)`` sends a JSON-serialisable result back. Any abnormal end of the child, a
    signal, a non-zero exit or a timeout, raises AssertionError with the details.
    """
    prelude = (
        "import json, sys\n"
        f"def step(name): print({STEP!r} + str(name), flush=True)\n"
        f"def report(obj): print({RESULT!r} + json.dumps(obj), flush=True)\n"
    )
    env = dict(os.environ, PYTHONFAULTHANDLER="1", TORCH_SHOW_CPP_STACKTRACES="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", prelude + code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the child process did not finish in {timeout} s:\n{exc.stdout or ''}") from None
    steps = [line[len(STEP):] for line in proc.stdout.splitlines() if line.startswith(STEP)]
    if proc.returncode != 0:
        last = steps[-1] if steps else "(before the first step)"
        native = _native_backtrace([sys.executable, "-c", prelude + code], env, timeout) if proc.returncode < 0 else ""
        raise AssertionError(
            f"the child process ended with {_signal_name(proc.returncode)} during: {last}\n"
            f"--- stdout (tail) ---\n{proc.stdout[-3000:]}\n--- stderr (tail) ---\n{proc.stderr[-6000:]}{native}"
        )
    return [json.loads(line[len(RESULT):]) for line in proc.stdout.splitlines() if line.startswith(RESULT)]
