"""Venvs for the packaging tests that see the packages of the Python the suite runs in, whatever kind it is.

``python -m venv --system-site-packages`` shows a new venv its *base* installation's site-packages. Run from a
plain installation (a conda env, pyenv, the system Python: sys.prefix == sys.base_prefix) that is where the
packages are; run from inside a venv it is not: the outer venv's own site-packages, where its torch is, stays
invisible. So the venv is made isolated, and a .pth file in its site-packages lists the site directories the
outer interpreter imports from (:func:`site_dirs`: its own prefix's, its base's when it is a venv that includes
them, the user site). They follow the venv's own site-packages on sys.path, so its pip, setuptools and
wheel are its own; and as plain path entries their .pth files do not run, so an editable install of this
checkout in the outer environment does not leak in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

_SITE_DIRS = (
    "import json, site, sys;"
    "dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else []);"
    "print(json.dumps([d for d in dict.fromkeys(dirs) if d in sys.path]))"
)


def site_dirs(python: str = sys.executable) -> list[str]:
    """The site directories ``python`` imports its packages from, in its order (only those on its sys.path)."""
    out = subprocess.run([python, "-c", _SITE_DIRS], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def purelib(python: str) -> str:
    """``python``'s own site-packages."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def create(path: str, outer_python: str = sys.executable) -> str:
    """A venv at ``path`` without pip whose packages are its own, then ``outer_python``'s; returns its python."""
    subprocess.run([outer_python, "-m", "venv", "--without-pip", str(path)], check=True)
    python = os.path.join(str(path), "bin", "python")
    with open(os.path.join(purelib(python), "outer-environment.pth"), "w") as f:
        f.write("".join(d + "\n" for d in site_dirs(outer_python)))
    return python


def plain_installation(prefix: str) -> str:
    """A Python installation at ``prefix`` that is not a venv, laid out as a conda env is: this interpreter's
    base executable copied to prefix/bin, its standard library linked entry by entry, its site-packages its
    own (empty). Returns its python; the caller checks that it reports ``prefix`` as sys.prefix and
    sys.base_prefix, which depends on how the installation finds itself."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = sysconfig.get_paths()["stdlib"]  # the base installation's, also from inside a venv
    lib = os.path.join(prefix, "lib", version)
    os.makedirs(lib)
    for name in os.listdir(stdlib):
        if name not in ("site-packages", "dist-packages", "__pycache__"):
            os.symlink(os.path.join(stdlib, name), os.path.join(lib, name))
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    for name in os.listdir(libdir) if os.path.isdir(libdir) else ():
        if name.startswith("libpython"):  # for an executable that finds libpython relative to itself
            os.symlink(os.path.join(libdir, name), os.path.join(prefix, "lib", name))
    os.makedirs(os.path.join(prefix, "bin"))
    python = os.path.join(prefix, "bin", version)
    with open(os.path.realpath(getattr(sys, "_base_executable", sys.executable)), "rb") as src, open(python, "wb") as dst:
        dst.write(src.read())  # a copy, not a link: the installation is found from the executable's own folder
    os.chmod(python, 0o755)
    os.makedirs(purelib(python))
    return python
