"""Small helpers: integer rounding (kernels, checkpoint I/O), per-user default paths."""

from __future__ import annotations


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= `n` (both non-negative ints)."""
  return -(-n // multiple) * multiple


def user_tmp(name: str) -> str:
  """`<temp dir>/<name>-<user>`: a default output path no other user of the machine shares."""
  import getpass
  import os
  import tempfile
  try:
    user = getpass.getuser()
  except (KeyError, OSError):  # no login name (some containers): the uid still separates users
    user = str(os.getuid())
  return os.path.join(tempfile.gettempdir(), f'{name}-{user}')
