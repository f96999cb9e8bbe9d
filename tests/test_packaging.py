"""The package installs as designed.

* kernels/ ships as adalora_fast.kernels, never as a top-level ``kernels``, and the wheel holds the library
  alone (no test tooling, tests or benchmarks);
* ``pip install --no-build-isolation [-e] .`` needs no network once the build requirements are installed,
  with pip 24.0 and with the newest pip, and a current setuptools (setuptools >= 80 turned the legacy
  ``setup.py develop`` path into a second, isolated pip run that downloads setuptools; pyproject.toml keeps
  pip on the PEP 517/660 path).

The offline installs run with ``ADALORA_FAST_BUILD_EXT=0``: the extension's compile (minutes on a small
machine) changes nothing in the path pip takes, and it is built by scripts/install.sh on every test run
and by scripts/gpu_check.sh on a GPU. The venvs see the packages of the Python the suite runs in (a venv, a
conda env or a plain installation: tests/tooling/venvs.py) only so that the installed package can be imported
(it imports torch); pip, setuptools and wheel inside them are their own.
"""

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from tooling import venvs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_IGNORED = {"build", "dist", ".git", "__pycache__", ".pytest_cache", ".benchmarks", ".hypothesis", "gpu-results"}


def _copy_source(dest):
    """The checkout without build outputs, so that builds here never race with (or dirty) the real one."""

    def ignore(_dir, names):
        return [n for n in names if n in _IGNORED or n.endswith((".so", ".egg-info", ".pyc"))]

    shutil.copytree(ROOT, dest, ignore=ignore)
    return str(dest)


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
    src = _copy_source(tmp_path / "src")
    env = dict(os.environ, ADALORA_FAST_BUILD_EXT="0")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), src],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert "adalora_fast/kernels/__init__.py" in names
    assert "adalora_fast/reference/allocator.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    top = {n.split("/")[0] for n in names}
    assert top == {"adalora_fast", *(t for t in top if t.endswith(".dist-info"))}
    # The library alone: its modules are the checkout's adalora_fast/ and kernels/, no test tooling among them.
    def modules(folder):
        return {os.path.relpath(p, src) for p in glob.glob(os.path.join(src, folder, "**", "*.py"), recursive=True)}

    library = modules("adalora_fast") | {os.path.join("adalora_fast", m) for m in modules("kernels")}
    assert {n for n in names if n.endswith(".py")} == library
    for tool in ("fake_driver", "compile_check", "compile_matrix", "tooling", "conftest", "test_", "bench_"):
        assert not any(tool in n for n in names), tool


def test_pyproject_declares_the_build_system():
    tomllib = pytest.importorskip("tomllib")

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        build = tomllib.load(f)["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip() for r in build["requires"]}
    assert {"setuptools", "torch"} <= names


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """pip 24.0, the newest pip, the newest setuptools and wheel (and its dependency), downloaded once; skips
    where no package index is reachable."""
    d = tmp_path_factory.mktemp("wheelhouse")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "-d", str(d)]
    for spec in (["--no-deps", "pip==24.0"], ["pip", "setuptools", "wheel"]):  # (wheel needs packaging)
        got = subprocess.run(cmd + spec, capture_output=True, text=True, timeout=300)
        if got.returncode != 0:
            pytest.skip(f"no package index reachable to fetch {spec}: {got.stderr[-500:]}")
    return d


def _offline_env():
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS="",
               PIP_DISABLE_PIP_VERSION_CHECK="1", ADALORA_FAST_BUILD_EXT="0")  # fmt: skip
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PYTHONPATH"):
        env.pop(name, None)
    return env


def _venv(tmp_path, wheelhouse, pip_version):
    """A venv that sees this Python's packages (for torch) with its own pip ``pip_version``, setuptools and wheel."""
    python = venvs.create(tmp_path / "venv")
    pip_wheels = sorted(wheelhouse.glob("pip-*.whl"))
    wanted = "pip==24.0" if pip_version == "24.0" else "pip"
    # Bootstrap: run pip from its own wheel to install pip, setuptools and wheel from the wheelhouse only.
    subprocess.run(
        [python, str(pip_wheels[-1] / "pip"), "install", "-q", "--no-index", "--find-links", str(wheelhouse),
         "--ignore-installed", wanted, "setuptools", "wheel"],
        check=True, env=_offline_env(), capture_output=True,
    )  # fmt: skip
    return python


def _import_from(python, cwd):
    """adalora_fast's and its kernels' files, and pip's version, as ``python`` imports them; torch must come
    from the suite's Python, pip and setuptools from the venv (found, not imported: importing pip first makes
    setuptools' distutils shim step aside)."""
    code = (
        "import importlib.metadata as m, importlib.util as u, adalora_fast, adalora_fast.kernels as k;"
        "print(adalora_fast.__file__, k.__file__, m.version('pip'), *(u.find_spec(n).origin for n in ('torch', 'pip', 'setuptools')))"
    )
    out = subprocess.run([python, "-c", code], cwd=cwd, env=_offline_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    pkg, kernels, pip_version, torch_file, pip_file, setuptools_file = out.stdout.split()
    assert any(torch_file.startswith(d + os.sep) for d in venvs.site_dirs()), torch_file
    own = venvs.purelib(python) + os.sep
    assert pip_file.startswith(own) and setuptools_file.startswith(own), (pip_file, setuptools_file)
    return pkg, kernels, pip_version


def _python_says(python, code):
    out = subprocess.run([python, "-c", code], env=_offline_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def _module(folder, name, where):
    with open(os.path.join(folder, f"{name}.py"), "w") as f:
        f.write(f"WHERE = {where!r}\n")


@pytest.mark.parametrize("kind", ["plain installation", "venv", "venv over its base's packages"])
def test_a_venv_made_from_each_kind_of_python_sees_its_packages(tmp_path, kind):
    """What the offline installs rely on, from each kind of Python the suite may run in: a conda env or another
    plain installation (sys.prefix == sys.base_prefix, its packages in its prefix), a venv (its packages in its
    own site-packages, which --system-site-packages would not show a venv made from it), and a venv that also
    sees its base's packages. The new venv's own packages (its pip and setuptools) come first."""
    if kind == "plain installation":
        outer = venvs.plain_installation(str(tmp_path / "outer"))
    else:
        flags = ["--system-site-packages"] if kind == "venv over its base's packages" else []
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", *flags, str(tmp_path / "outer")], check=True)
        outer = str(tmp_path / "outer" / "bin" / "python")
    prefix, base_prefix = _python_says(outer, "import sys; print(sys.prefix, sys.base_prefix)")
    assert prefix == str(tmp_path / "outer") and (prefix == base_prefix) == (kind == "plain installation")
    outer_site = venvs.purelib(outer)
    _module(outer_site, "outer_only", "outer")
    _module(outer_site, "shadowed", "outer")

    inner = venvs.create(tmp_path / "inner", outer)
    _module(venvs.purelib(inner), "shadowed", "inner")
    code = "import outer_only, shadowed, sys; print(outer_only.__file__, shadowed.WHERE, *sys.path)"
    outer_only, shadowed, *inner_path = _python_says(inner, code)
    assert outer_only == os.path.join(outer_site, "outer_only.py") and shadowed == "inner"
    assert set(venvs.site_dirs(outer)) <= set(inner_path)  # for a venv over its base: the base's too
    if kind != "plain installation":  # the way that misses a venv's packages
        subprocess.run([outer, "-m", "venv", "--without-pip", "--system-site-packages", str(tmp_path / "old")], check=True)
        old = subprocess.run([str(tmp_path / "old" / "bin" / "python"), "-c", "import outer_only"], env=_offline_env(),
                             capture_output=True, text=True)  # fmt: skip
        assert "No module named 'outer_only'" in old.stderr


@pytest.mark.parametrize("pip_version", ["24.0", "newest"])
def test_offline_install_editable_and_wheel(tmp_path, wheelhouse, pip_version):
    src = _copy_source(tmp_path / "src")
    python = _venv(tmp_path, wheelhouse, pip_version)
    env = _offline_env()
    pip = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]

    got = subprocess.run(pip + ["-e", src], env=env, capture_output=True, text=True)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-4000:]
    pkg, kernels, pip_installed = _import_from(python, tmp_path)
    assert pkg == os.path.join(src, "adalora_fast", "__init__.py")
    assert kernels == os.path.join(src, "kernels", "__init__.py")
    assert pip_version == "newest" or pip_installed == "24.0"

    got = subprocess.run(pip + [src], env=env, capture_output=True, text=True)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-4000:]
    pkg, kernels, _ = _import_from(python, tmp_path)
    site = os.path.join(str(tmp_path / "venv"), "lib")
    assert pkg.startswith(site) and kernels.startswith(site) and kernels.endswith("adalora_fast/kernels/__init__.py")


def test_without_pyproject_the_offline_editable_install_fails(tmp_path, wheelhouse):
    """The defect pyproject.toml fixes, reproduced: pip 24.0 + wheel + setuptools >= 80, no pyproject.toml."""
    src = _copy_source(tmp_path / "src")
    os.remove(os.path.join(src, "pyproject.toml"))
    python = _venv(tmp_path, wheelhouse, "24.0")
    setuptools_major = int(_setuptools_version(python).split(".")[0])
    if setuptools_major < 80:
        pytest.skip(f"setuptools {setuptools_major} still runs setup.py develop itself")
    got = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", src],
        env=_offline_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert got.returncode != 0, "the legacy editable install succeeded offline; the guard above proves less"
    assert "develop" in got.stdout + got.stderr


def _setuptools_version(python):
    return subprocess.run(
        [python, "-c", "import setuptools; print(setuptools.__version__)"], capture_output=True, text=True, check=True
    ).stdout.strip()
