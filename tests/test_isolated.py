"""The child-process harness (tests/isolated.py) turns a crash into one failing test that names it."""

import pytest

from isolated import run_isolated


def test_results_come_back():
    assert run_isolated("step('one'); report({'x': 1}); report([2])", timeout=60) == [{"x": 1}, [2]]


def test_a_crash_fails_with_its_signal_and_the_step_it_was_in():
    with pytest.raises(AssertionError, match=r"signal SIGSEGV during: reading address 0"):
        run_isolated("import ctypes\nstep('reading address 0')\nctypes.string_at(0)", timeout=60)


def test_an_error_exit_is_reported():
    with pytest.raises(AssertionError, match=r"exit status 3 during: \(before the first step\)"):
        run_isolated("raise SystemExit(3)", timeout=60)
