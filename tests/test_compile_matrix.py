"""tooling.compile_matrix: the full compile matrix is chosen exactly when its inputs differ from the ones it last
passed with (or when asked for), and only a passing full build moves the stamp."""

import pytest
import triton
from tooling import compile_matrix


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A checkout with the triton matrix's inputs and no stamp yet."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "svd_adapter.py").write_text("BLOCK = 64\n")
    (tmp_path / "tests" / "tooling").mkdir(parents=True)
    (tmp_path / "tests" / "tooling" / "compile_check.py").write_text("RANK_PADS = (16, 32, 64)\n")
    monkeypatch.setattr(compile_matrix, "ROOT", str(tmp_path))
    monkeypatch.setattr(compile_matrix, "STAMPS", str(tmp_path / "stamps"))
    monkeypatch.delenv(compile_matrix.FULL_MATRIX_SWITCH, raising=False)
    return tmp_path


def test_the_full_matrix_runs_until_it_passes(checkout):
    first = compile_matrix.choose("triton")
    assert first.full  # no stamp: nothing is known to have passed
    assert compile_matrix.choose("triton").full  # a failed (unrecorded) full build changes nothing
    first.record_pass()
    subset = compile_matrix.choose("triton")
    assert not subset.full and subset.inputs == first.inputs
    subset.record_pass()  # a passing subset records nothing
    assert open(compile_matrix.stamp_path("triton")).read().strip() == first.inputs


@pytest.mark.parametrize("change", ["kernel edited", "kernel added", "matrix edited", "another Triton", "switch"])
def test_any_change_of_its_inputs_runs_the_full_matrix(checkout, monkeypatch, change):
    compile_matrix.choose("triton").record_pass()
    if change == "kernel edited":
        (checkout / "kernels" / "svd_adapter.py").write_text("BLOCK = 128\n")
    elif change == "kernel added":
        (checkout / "kernels" / "utils.py").write_text("")
    elif change == "matrix edited":
        (checkout / "tests" / "tooling" / "compile_check.py").write_text("RANK_PADS = (64,)\n")
    elif change == "another Triton":
        monkeypatch.setattr(triton, "__version__", triton.__version__ + ".post1")
    else:
        monkeypatch.setenv(compile_matrix.FULL_MATRIX_SWITCH, "1")
    again = compile_matrix.choose("triton")
    assert again.full, change
    again.record_pass()
    assert not compile_matrix.choose("triton").full or change == "switch"


def test_files_outside_the_inputs_do_not_count(checkout):
    compile_matrix.choose("triton").record_pass()
    (checkout / "kernels" / "__pycache__").mkdir()
    (checkout / "kernels" / "__pycache__" / "svd_adapter.cpython-311.pyc").write_bytes(b"\0")
    (checkout / "kernels" / "notes.txt").write_text("not a source")
    assert not compile_matrix.choose("triton").full
