"""Loading the compiled ``adalora_fast._C`` extension (built ahead of time by setup.py from csrc/).

Nothing is compiled here. If the extension is missing or fails to load, the
ops that use it fall back to their PyTorch reference; the first such fallback
warns once with the original error, and :func:`adalora_fast.env_report` shows it.
"""

from __future__ import annotations

import functools
import warnings


def _try_import():
    try:
        from . import _C

        return _C, None
    except Exception as exc:  # ImportError, or an OSError from a library that does not link
        return None, exc


# Tried once, at import: a plain module global (rather than a cache decorator) so torch.compile reads it as a constant.
_EXTENSION = _try_import()


def load_extension():
    """(module, None) when ``adalora_fast._C`` loaded, else (None, the exception)."""
    return _EXTENSION


def extension_error() -> Exception | None:
    return load_extension()[1]


def extension_has_cuda() -> bool:
    module, _ = load_extension()
    return module is not None and module.built_with_cuda()


@functools.lru_cache(maxsize=None)
def warn_extension_fallback(op: str) -> None:
    """Once per op: say that it runs its reference because the extension did not load, and why."""
    err = extension_error()
    warnings.warn(
        f"adalora_fast: {op} runs its PyTorch reference because the C++/CUDA extension adalora_fast._C "
        f"did not load ({type(err).__name__}: {err}). Reinstall with `pip install --no-build-isolation -e .` "
        "to build it.",
        RuntimeWarning,
        stacklevel=3,
    )
