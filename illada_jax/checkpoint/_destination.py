"""(private) Where a command writes a directory: never over its input, never half-written.

`Destination(dst, overwrite)` hands out a temporary sibling `.NAME.tmp-PID-XXXX`
of `dst`; when the `with` block succeeds the result replaces `dst` (the old
one is kept until then: write beside, then swap), and on any exception (an
interrupt raised as one included) the temporary directory is removed. A rerun
first removes the temporary siblings that dead processes left for the same
destination, and puts back an old result a kill caught mid-swap.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile

from illada_jax import util
from illada_jax.checkpoint.errors import ConversionError


def check_apart(src_dir: str | os.PathLike, dst_dir: str | os.PathLike,
                what: str = 'source directory') -> None:
  """Raises ConversionError if the destination is the input, inside it, or holds it.

  Real paths are compared, so a symlink or `..` cannot hide the overlap;
  with `--overwrite` the destination would otherwise replace the input.
  """
  why = util.overlap(src_dir, dst_dir, what, shown=os.path.realpath(src_dir))
  if why is None:
    return
  raise ConversionError(f'{dst_dir}: the destination {why}; write it elsewhere')


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale(dst: str) -> list[str]:
  """Removes temporary siblings of `dst` whose process is gone; returns their paths.

  An `.old` sibling (the previous result, moved aside mid-swap) is moved back
  when `dst` is missing, else removed.
  """
  parent, name = os.path.split(os.path.abspath(dst))
  pattern = re.compile(re.escape(f'.{name}.tmp-') + r'(\d+)-[^/]*$')
  removed = []
  for path in sorted(glob.glob(os.path.join(glob.escape(parent), f'.{glob.escape(name)}.tmp-*'))):
    m = pattern.match(os.path.basename(path))
    if m is None or _alive(int(m.group(1))) and int(m.group(1)) != os.getpid():
      continue
    if path.endswith('.old') and not os.path.lexists(dst):
      os.rename(path, dst)
      continue
    _remove(path)
    removed.append(path)
  return removed


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


class Destination:
  """A temporary sibling of `dst`: renamed onto it if the `with` block succeeds, else removed."""

  def __init__(self, dst: str | os.PathLike, overwrite: bool):
    self.dst = os.path.abspath(dst)
    if os.path.lexists(self.dst) and not overwrite:
      raise ConversionError(f'{self.dst}: destination exists (pass --overwrite to replace it)')
    parent = os.path.dirname(self.dst)
    if not os.path.isdir(parent):
      raise ConversionError(f'{parent}: parent directory of the destination does not exist')
    if not os.access(parent, os.W_OK | os.X_OK):
      raise ConversionError(f'{parent}: parent directory of the destination is not writable')
    remove_stale(self.dst)
    self.tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(self.dst)}.tmp-{os.getpid()}-',
                                dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp's 0700 is not what a checkpoint wants

  def __enter__(self) -> str:
    return self.tmp

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
      return False
    if os.path.lexists(self.dst):
      old = self.tmp + '.old'
      os.rename(self.dst, old)
      os.rename(self.tmp, self.dst)
      _remove(old)
    else:
      os.rename(self.tmp, self.dst)
    return False
