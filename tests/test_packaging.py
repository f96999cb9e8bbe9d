"""The package installs as designed: kernels/ ships as adalora_fast.kernels, never as a top-level ``kernels``."""

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_import_as_a_subpackage_from_anywhere(tmp_path):
    code = (
        "import importlib.util, adalora_fast.kernels as k, os;"
        "print(os.path.realpath(k.__file__));"
        "s = importlib.util.find_spec('kernels');"
        "print(s.origin if s else None)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    kernels_file, top_level = out.stdout.split()
    assert kernels_file == os.path.realpath(os.path.join(ROOT, "kernels", "__init__.py")) or "site-packages" in kernels_file
    assert top_level == "None" or not os.path.realpath(top_level).startswith(os.path.realpath(ROOT))


def test_wheel_layout(tmp_path):
    env = dict(os.environ, ADALORA_FAST_BUILD_EXT="0")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert "adalora_fast/kernels/__init__.py" in names
    assert "adalora_fast/reference/allocator.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    top = {n.split("/")[0] for n in names}
    assert top == {"adalora_fast", *(t for t in top if t.endswith(".dist-info"))}
