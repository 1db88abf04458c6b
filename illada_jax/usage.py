"""User mistakes: `UsageError` and the checks every command line runs before anything heavy.

A `UsageError` is something the user can fix (a flag, a field, a file, a
line); the CLIs print its one-line message and exit 2, before a model is
loaded or a program compiled. Anything else is an internal error and keeps
its traceback. Checks only read small files (`model_config.json`) and stat
paths, so they take milliseconds.
"""

from __future__ import annotations

import math
import os

from illada_jax import util
from illada_jax.config import ModelConfig


class UsageError(ValueError):
  """A user mistake; the message is one line naming the flag, field, file or line."""

  def __init__(self, message: str):
    super().__init__(' '.join(str(message).split('\n')))


def readable_file(what: str, path: str) -> str:
  """`path` if it is a readable file; UsageError naming `what` otherwise."""
  if not path:
    raise UsageError(f'{what}: no file given')
  if not os.path.exists(path):
    raise UsageError(f'{what} {path}: no such file')
  if os.path.isdir(path):
    raise UsageError(f'{what} {path}: is a directory, expected a file')
  if not os.access(path, os.R_OK):
    raise UsageError(f'{what} {path}: not readable')
  return path


def readable_path(what: str, path: str) -> str:
  """`path` if it exists (file or directory) and is readable."""
  if not os.path.exists(path):
    raise UsageError(f'{what} {path}: no such file or directory')
  if not os.access(path, os.R_OK):
    raise UsageError(f'{what} {path}: not readable')
  return path


def _existing_ancestor(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def writable_file(what: str, path: str) -> str:
  """`path` if it can be created or appended to (its directory may still be missing)."""
  if os.path.isdir(path):
    raise UsageError(f'{what} {path}: is a directory, expected a file')
  if os.path.exists(path):
    if not os.access(path, os.W_OK):
      raise UsageError(f'{what} {path}: not writable')
    return path
  return writable_dir(what, os.path.dirname(os.path.abspath(path)), path)


def writable_dir(what: str, path: str, shown: str | None = None) -> str:
  """`path` if it is, or can be created as, a writable directory."""
  shown = shown or path
  anc = _existing_ancestor(path)
  if not os.path.isdir(anc):
    raise UsageError(f'{what} {shown}: {anc} is a file, not a directory')
  if not os.access(anc, os.W_OK | os.X_OK):
    raise UsageError(f'{what} {shown}: {anc} is not writable')
  return path


def checkpoint_dir(what: str, path: str) -> ModelConfig:
  """The `ModelConfig` of checkpoint directory `path`, read without loading weights.

  Raises UsageError if it is missing, has no readable `model_config.json`,
  no `params` item, or is a LoRA step directory (adapters only).
  """
  from illada_jax.checkpoint import store
  if not os.path.isdir(path):
    raise UsageError(f'{what} {path}: no such directory' if not os.path.exists(path) else
                     f'{what} {path}: not a directory')
  try:
    cfg = store.load_config(path)
  except FileNotFoundError:
    raise UsageError(f'{what} {path}: not a checkpoint directory (no {store.CONFIG_FILE})'
                     ) from None
  except (ValueError, TypeError, KeyError, OSError) as e:
    raise UsageError(f'{what} {path}: damaged {store.CONFIG_FILE} ({e})') from None
  try:
    store.check_not_lora(path)
  except ValueError as e:
    raise UsageError(f'{what} {e}') from None
  if not os.path.isdir(store.params_dir(path)):
    raise UsageError(f'{what} {path}: no {store.PARAMS_ITEM}/ item (damaged checkpoint)')
  return cfg


def positive(what: str, value, allow_none: bool = False):
  """`value` if it is a positive integer (or None when allowed)."""
  if value is None and allow_none:
    return value
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise UsageError(f'{what}: must be a positive integer, got {value!r}')
  return value


def int_list(what: str, text: str | None) -> list[int] | None:
  """'64,256,1024' -> [64, 256, 1024] (positive); None for None or ''."""
  if not text:
    return None
  try:
    values = [int(t) for t in text.split(',')]
  except ValueError:
    raise UsageError(f'{what} {text}: expected positive integers separated by commas') from None
  if any(v <= 0 for v in values):
    raise UsageError(f'{what} {text}: expected positive integers separated by commas')
  return values


def mesh_fits(what: str, spec: str | None, devices: int) -> dict[str, int] | None:
  """The mesh axis sizes of `spec` on `devices` devices; UsageError if it does not fit."""
  if not spec:
    return None
  from illada_jax import sharding
  try:
    sizes = sharding.parse_mesh_shape(spec)
  except ValueError as e:
    raise UsageError(f'{what} {spec}: {e}') from None
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    raise UsageError(f'{what} {spec}: sizes must be positive (one axis may be -1)')
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if devices % known:
      raise UsageError(f'{what} {spec}: {devices} devices are not divisible by {known}')
    sizes[fill[0]] = devices // known
  if math.prod(sizes.values()) != devices:
    raise UsageError(f'{what} {spec}: needs {math.prod(sizes.values())} devices, '
                     f'this process has {devices}')
  return sizes


def apart(what: str, dst: str, inputs: dict[str, str]) -> None:
  """UsageError if `dst` is, contains or is inside any input (real paths).

  `inputs` maps a name for the message (a flag) to its path.
  """
  for name, src in inputs.items():
    why = util.overlap(src, dst, name) if src else None
    if why is not None:
      raise UsageError(f'{what} {dst}: the destination {why}; write it elsewhere')


def generation_fits(cfg: ModelConfig, options) -> None:
  """UsageError if no prompt can run under `options` (SamplingOptions) on model `cfg`.

  Fixed length needs `gen_length` plus at least one prompt token within `max_len`;
  variable length needs one whole block (its `gen_length` is then capped in whole
  blocks at the model's window: `Engine.options_for`).
  """
  if options.variable_length:
    if options.block_length >= cfg.max_len:
      raise UsageError(f'--block-length {options.block_length}: variable length needs a whole '
                       f'block and a prompt within the model\'s max_len {cfg.max_len}')
  elif options.gen_length >= cfg.max_len:
    raise UsageError(f'--gen-length {options.gen_length}: leaves no room for a prompt within '
                     f'the model\'s max_len {cfg.max_len} (or use --variable-length, which '
                     'caps it at the window)')
