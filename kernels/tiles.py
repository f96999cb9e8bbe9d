"""Tile math the kernel families share: launch grids, the rank's register-tile width, autotune config lists."""

from __future__ import annotations

import triton

from . import interpreting


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for launch grids. Plain Python: ``triton.cdiv`` costs microseconds per host call in recent
    Triton (a constexpr function), and a layer's forward and backward make about ten of these calls."""
    return -(-a // b)


def rank_pad(r: int) -> int:
    """The rank's register-tile width: a power of two >= 16 (tl.dot needs 16), padding masked."""
    return max(16, 1 << (max(int(r), 1) - 1).bit_length())


def tile_configs(names: tuple[str, ...], rows: list[tuple], interpreter_row: tuple) -> list[triton.Config]:
    """Autotune configs from rows of ``(*tile sizes named by names, num_warps, num_stages)``.

    A curated list on a GPU; under the interpreter only ``interpreter_row`` (nothing to tune there,
    and small tiles keep it fast).
    """

    def config(row):
        return triton.Config(dict(zip(names, row[: len(names)])), num_warps=row[-2], num_stages=row[-1])

    return [config(interpreter_row)] if interpreting() else [config(row) for row in rows]
