"""Small integer helpers shared by the kernels and the checkpoint I/O."""

from __future__ import annotations


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= `n` (both non-negative ints)."""
  return -(-n // multiple) * multiple
