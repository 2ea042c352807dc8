"""Integer arithmetic on sizes: padding shapes to multiples and counting blocks."""

from __future__ import annotations


def ceil_div(n: int, d: int) -> int:
    """The number of blocks of `d` that hold `n` (n >= 0, d > 0)."""
    return -(-n // d)


def round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple`."""
    return ceil_div(n, multiple) * multiple
