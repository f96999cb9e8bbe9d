"""pytest plugin of scripts/gpu_check.sh: results that survive a timeout, and the backend each test ran on.

Loaded with ``-p gpu_check_plugin`` (scripts/ on PYTHONPATH); writes one JSON line per event to the file
named by ``GPU_CHECK_RESULTS``, flushed as it happens, so a stage stopped by its time limit (or a crash)
still leaves every result so far for scripts/gpu_summary.py:

* ``{"kind": "test", "nodeid", "outcome", "when", "duration", "message"}`` for every failed phase and every
  call phase (the controller's view under pytest-xdist, crashed workers included);
* ``{"kind": "bench", "nodeid", "group", "params", "median_s", "extra_info"}`` after every benchmark;
* in each benchmark's ``extra_info`` (so in the pytest-benchmark JSON too), the backends the adapter and the
  penalty dispatched to during that test, e.g. ``{"adapter": {"triton": 1540}, "penalty": {"extension": 11}}``.
"""

from __future__ import annotations

import collections
import json
import os

import pytest

_PATH = os.environ.get("GPU_CHECK_RESULTS")
_IS_XDIST_WORKER = False


def pytest_configure(config):
    global _IS_XDIST_WORKER
    # (config, not the environment: a pytest started from inside an xdist worker inherits its variables)
    _IS_XDIST_WORKER = hasattr(config, "workerinput")


def _write(record: dict) -> None:
    if not _PATH:
        return
    with open(_PATH, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def _first_line(report) -> str:
    if report.longrepr is None:
        return ""
    text = getattr(report.longrepr, "reprcrash", None)
    text = text.message if text is not None else str(report.longrepr)
    return " ".join(text.strip().splitlines()[:3])[:400]


def pytest_runtest_logreport(report):
    if _IS_XDIST_WORKER:
        return  # under pytest-xdist the controller writes every result (a crashed worker's included)
    if report.when == "call" or report.outcome != "passed":
        outcome = report.outcome
        if report.when != "call" and outcome == "failed":
            outcome = "error"
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        _write({"kind": "test", "nodeid": report.nodeid, "outcome": outcome, "when": report.when,
                "duration": round(report.duration, 3), "message": _first_line(report)})  # fmt: skip


class _BackendCounter:
    """Counts what adalora_fast.dispatch decides while a test runs (both deciders are module attributes)."""

    def __init__(self):
        self.counts = {"adapter": collections.Counter(), "penalty": collections.Counter()}
        self._saved = None

    def __enter__(self):
        try:
            from adalora_fast import dispatch
        except Exception:  # noqa: BLE001 - the package failed to import: the test reports that itself
            return self
        self._saved = (dispatch, dispatch.adapter_backend, dispatch.penalty_backend)
        adapter, penalty = dispatch.adapter_backend, dispatch.penalty_backend

        def counted_adapter(*args, **kwargs):
            backend = adapter(*args, **kwargs)
            self.counts["adapter"][backend] += 1
            return backend

        def counted_penalty(*args, **kwargs):
            backend = penalty(*args, **kwargs)
            self.counts["penalty"][backend] += 1
            return backend

        dispatch.adapter_backend, dispatch.penalty_backend = counted_adapter, counted_penalty
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            dispatch, adapter, penalty = self._saved
            dispatch.adapter_backend, dispatch.penalty_backend = adapter, penalty
        return False

    def summary(self) -> dict:
        return {k: dict(v) for k, v in self.counts.items() if v}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    bench = getattr(item, "funcargs", {}).get("benchmark")
    with _BackendCounter() as counter:
        yield
    if bench is None:
        return
    backends = counter.summary()
    try:
        bench.extra_info["backends"] = backends
        stats = getattr(getattr(bench, "stats", None), "stats", None)
        median = getattr(stats, "median", None)
    except Exception:  # noqa: BLE001 - a disabled benchmark has no stats; the record says so
        median = None
    params = getattr(getattr(item, "callspec", None), "params", {})
    _write({"kind": "bench", "nodeid": item.nodeid, "group": getattr(bench, "group", None),
            "params": {k: v for k, v in params.items()}, "median_s": median,
            "extra_info": dict(getattr(bench, "extra_info", {}))})  # fmt: skip
