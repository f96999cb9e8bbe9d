"""pytest plugin of scripts/gpu_check.sh: results that survive a timeout, and what each test ran on.

Loaded with ``-p gpu_check_plugin`` (scripts/ on PYTHONPATH); writes one JSON line per event to the file
named by ``GPU_CHECK_RESULTS``, flushed as it happens, so a stage stopped by its time limit (or a crash)
still leaves every result so far for scripts/gpu_summary.py:

* ``{"kind": "test", "nodeid", "outcome", "when", "duration", "message", "calls"}`` for every failed phase
  and every call phase (the controller's view under pytest-xdist, crashed workers included);
* ``{"kind": "bench", "nodeid", "group", "params", "median_s", "extra_info", "calls"}`` after every benchmark.

``calls`` is what ran during the test's call phase: :func:`adalora_fast.dispatch.backend_calls` per op and
backend, and the Triton launches (:func:`adalora_fast.kernels.launch.launch_counts`), e.g.
``{"svd_adapter": {"triton": 1540}, "orth_penalty": {"extension": 11}, "kernel_launches": {"direct": 4620}}``.
A benchmark also gets it in its ``extra_info`` (so in the pytest-benchmark JSON too).
"""

from __future__ import annotations

import collections
import json
import os
import sys

import pytest

_PATH = os.environ.get("GPU_CHECK_RESULTS")
_IS_XDIST_WORKER = False
_CALLS = "gpu_check_calls"  # the user property that carries a test's calls from an xdist worker


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


class _Counters:
    """The package's own counters (calls per op and backend, Triton launches) since the session began, read from
    the modules already imported (none imported: nothing ran, and the plugin imports nothing a test did not).
    Tests and benchmarks reset them (``dispatch.reset_backend_calls()``, ``launch.reset_counts()``): each reset
    is wrapped to bank what it clears first, so a test's calls are the difference of two readings."""

    def __init__(self):
        self.banked = collections.defaultdict(collections.Counter)

    def _bank_resets(self, module, reset_name: str, read) -> None:
        reset = getattr(module, reset_name)
        if getattr(reset, "banks_counts", False):
            return

        def banking_reset(*args, **kwargs):
            for name, counts in read().items():
                self.banked[name].update(counts)
            return reset(*args, **kwargs)

        banking_reset.banks_counts = True
        setattr(module, reset_name, banking_reset)

    def read(self) -> dict[str, dict[str, int]]:
        current = {}
        dispatch = sys.modules.get("adalora_fast.dispatch")
        if dispatch is not None:
            self._bank_resets(dispatch, "reset_backend_calls", dispatch.backend_calls)
            current.update(dispatch.backend_calls())
        launch = sys.modules.get("adalora_fast.kernels.launch")
        if launch is not None:
            launches = launch.launch_counts
            self._bank_resets(launch, "reset_counts", lambda: {"kernel_launches": launches()})
            current["kernel_launches"] = launches()
        totals = collections.defaultdict(collections.Counter, {k: collections.Counter(v) for k, v in self.banked.items()})
        for name, counts in current.items():
            totals[name].update(counts)
        return {name: dict(counts) for name, counts in totals.items()}


_COUNTERS = _Counters()


def calls_between(before: dict, after: dict) -> dict[str, dict[str, int]]:
    """What ran between two readings of the counters, the zero counts left out. A counter that went down anyway
    started again in between (its module reloaded): its counts since then are what is known to have run."""
    ran = {}
    for name, now in after.items():
        then = before.get(name, {})
        if any(now.get(key, 0) < n for key, n in then.items()):
            then = {}
        counts = {key: n - then.get(key, 0) for key, n in now.items() if n > then.get(key, 0)}
        if counts:
            ran[name] = counts
    return ran


def pytest_runtest_logreport(report):
    if _IS_XDIST_WORKER:
        return  # under pytest-xdist the controller writes every result (a crashed worker's included)
    if report.when == "call" or report.outcome != "passed":
        outcome = report.outcome
        if report.when != "call" and outcome == "failed":
            outcome = "error"
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        record = {"kind": "test", "nodeid": report.nodeid, "outcome": outcome, "when": report.when,
                  "duration": round(report.duration, 3), "message": _first_line(report)}  # fmt: skip
        calls = next((value for key, value in report.user_properties if key == _CALLS), None)
        if calls:
            record["calls"] = calls
        _write(record)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    before = _COUNTERS.read()
    yield
    calls = calls_between(before, _COUNTERS.read())
    # (user properties travel with the report from an xdist worker to the controller)
    item.user_properties.append((_CALLS, calls))
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if bench is None:
        return
    try:
        bench.extra_info["calls"] = calls
        stats = getattr(getattr(bench, "stats", None), "stats", None)
        median = getattr(stats, "median", None)
    except Exception:  # noqa: BLE001 - a disabled benchmark has no stats; the record says so
        median = None
    params = getattr(getattr(item, "callspec", None), "params", {})
    _write({"kind": "bench", "nodeid": item.nodeid, "group": getattr(bench, "group", None),
            "params": dict(params), "median_s": median, "extra_info": dict(getattr(bench, "extra_info", {})),
            "calls": calls})  # fmt: skip
