"""Small helpers: integer rounding (kernels, checkpoint I/O), per-user default paths, path
overlap."""

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


def overlap(src: str, dst: str, name: str, shown: str | None = None) -> str | None:
  """How destination `dst` overlaps input `src` (called `name`), by real paths (a symlink or
  `..` cannot hide it): 'is the NAME', 'is inside the NAME SHOWN' or 'contains the NAME
  SHOWN' (`shown`: how to print `src`, default as given); None when they are apart."""
  import os
  s, d = os.path.realpath(src), os.path.realpath(dst)
  if s == d:
    return f'is the {name}'
  common = os.path.commonpath([s, d])
  how = 'is inside' if common == s else 'contains' if common == d else None
  return None if how is None else f'{how} the {name} {src if shown is None else shown}'
