"""orbax-to-hf: the Hugging Face tensors of a stored checkpoint, read block by block."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import math

import numpy as np
import tensorstore as ts

from illada_jax.checkpoint import _rawio, _zarr3
from illada_jax.checkpoint._blocks import param_blocks
from illada_jax.checkpoint._transpose import from_param, row_axis
from illada_jax.checkpoint.hf_names import head_name, layout
from illada_jax.checkpoint.safetensors_io import OutTensor
from illada_jax.config import ModelConfig


def out_tensors(cfg: ModelConfig, arrays, tied_head: bool) -> list[OutTensor]:
  """The HF tensors of a stored checkpoint, in layer order, each read block by block.

  Where the stored inner chunks are blocks of HF rows (as `hf_to_orbax`
  writes them), a tensor is read, transposed and written one inner chunk at
  a time; otherwise one layer (or table row block) at a time.
  """
  maps = {m.key: m for m in layout(cfg)}
  raws = {key: _zarr3.RawZarr3.open(array) for key, array in arrays.items()}
  plan: list[tuple[str, tuple]] = []  # every read, in the order the chunks below ask for them
  read = _ReadAhead(arrays, raws, plan)
  itemsize = {key: np.dtype(a.dtype.numpy_dtype).itemsize for key, a in arrays.items()}

  def tensor(name, m, block):
    """OutTensor `name`: the HF rows of `block` (a `Block` of `m`), read a few at a time."""
    dim = row_axis(m.kind, cfg)[0] + (1 if m.stacked else 0)
    raw, extent = raws[m.key], block.shape[dim]
    units = extent
    if raw is not None and raw.chunk[dim] == chunks[m.key][dim] and all(
        i == c for d, (i, c) in enumerate(zip(raw.inner, raw.chunk)) if d != dim):
      units = raw.inner[dim]  # one inner chunk per read
    start = _start(block.index, len(block.shape))
    base = start[dim][0] if start[dim] else 0
    reads = []
    for u0 in range(0, extent, units):
      index = list(start)
      index[dim] = (base + u0, base + min(extent, u0 + units))
      if m.stacked:
        index[0] = start[0][0]  # an int: the layer axis is dropped
      reads.append((m.key, tuple(index)))
    plan.extend(reads)
    return OutTensor(name, np.dtype(arrays[m.key].dtype.numpy_dtype), m.hf_shape,
                     lambda: (from_param(m.kind, read(*r)) for r in reads))

  chunks, blocks = {}, {}
  for m in maps.values():
    chunks[m.key], _, blocks[m.key] = param_blocks(m, cfg, itemsize[m.key])
  out = []
  e = maps['embedder/embedding']
  out += _tensors_of(tensor, e.hf_name(), e, blocks[e.key])
  for i in range(cfg.num_layers):
    out += [tensor(m.hf_name(i), m, blocks[m.key][i]) for m in maps.values() if m.stacked]
  fn = maps['final_norm/scale']
  out += _tensors_of(tensor, fn.hf_name(), fn, blocks[fn.key])
  if 'lm_head' in maps:
    m = maps['lm_head']
    out += _tensors_of(tensor, m.hf_name(), m, blocks[m.key])
  elif tied_head:
    out += _tensors_of(tensor, head_name(cfg), e, blocks[e.key])
  return out


def _tensors_of(tensor, name, m, blocks) -> list[OutTensor]:
  """One OutTensor `name` from all `blocks` of a parameter (a table's row blocks, or one)."""
  parts = [tensor(name, m, b) for b in blocks]
  if len(parts) == 1:
    return parts
  return [dataclasses.replace(parts[0], chunks=lambda: itertools.chain.from_iterable(
      p.chunks() for p in parts))]


def _start(index, ndim: int) -> list:
  """A block's index as a list of (start, stop) pairs (None: the whole dim) over `ndim` dims."""
  index = index if isinstance(index, tuple) else (index,)
  out = []
  for d in range(ndim):
    x = index[d] if d < len(index) else slice(None)
    if isinstance(x, int):
      out.append((x, x + 1))
    else:
      out.append((x.start or 0, x.stop) if x.stop is not None else None)
  return out


class _ReadAhead:
  """Reads `arrays[key][index]` in the order of `plan`, reads of the next `ahead_bytes` started.

  `index` is a tuple of ints and (start, stop) pairs (None: the whole dim).
  Overlaps reading the next block (directly from the shard files, or
  through TensorStore for layouts `_zarr3.RawZarr3` does not take) with
  transposing and writing this one.
  """

  def __init__(self, arrays, raws, plan: list[tuple[str, tuple]], ahead_bytes: int = 48 << 20):
    self.arrays, self.raws, self.plan, self.ahead_bytes = arrays, raws, plan, ahead_bytes
    self.next = 0
    self.started: dict[int, concurrent.futures.Future] = {}
    self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='read_ahead')

  def __call__(self, key: str, index: tuple) -> np.ndarray:
    n = self.next
    if n >= len(self.plan) or self.plan[n] != (key, index):
      raise RuntimeError(f'read {key}{index} out of plan order')
    pending = self.started.pop(n, None) or self._start(n)
    self.next = n + 1
    k, ahead = self.next, 0
    while k < len(self.plan) and (k == self.next or ahead < self.ahead_bytes):
      if k not in self.started:
        self.started[k] = self._start(k)
      ahead += self._nbytes(k)
      k += 1
    return pending.result()

  def _nbytes(self, n: int) -> int:
    key, index = self.plan[n]
    array = self.arrays[key]
    extents = [1 if isinstance(x, int) else n if x is None else x[1] - x[0]
               for x, n in zip(index + (None,) * (array.rank - len(index)), array.shape)]
    return math.prod(extents) * np.dtype(array.dtype.numpy_dtype).itemsize

  def _start(self, n: int) -> concurrent.futures.Future:
    key, index = self.plan[n]
    index = tuple(x if isinstance(x, int) else slice(None) if x is None else slice(*x)
                  for x in index)
    return self.executor.submit(self._read, key, index)

  def _read(self, key: str, index) -> np.ndarray:
    raw = self.raws[key]
    out = raw.read(index, _rawio.POOL) if raw is not None else None
    if out is None:  # into a pooled buffer, not one TensorStore allocates
      view = self.arrays[key][index]
      out = _rawio.POOL.empty(tuple(view.shape), view.dtype.numpy_dtype)
      ts.array(out, copy=False, write=True).write(view).result()
    return out
