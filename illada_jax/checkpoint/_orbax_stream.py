"""Orbax PyTree items written leaf by leaf and read slice by slice (private).

The one module that relies on Orbax beyond `StandardCheckpointer`, and why:

* Writing. A stacked 8B parameter is 3.8 GB; Orbax's public save takes
  whole arrays. Its public extension point for other leaf types, a
  `type_handlers.TypeHandler` registered for `LazyArray`, lets a leaf write
  its blocks into the TensorStore array Orbax itself specifies
  (`type_handlers.get_json_tspec_write`: the same directory, and the same
  `_METADATA` entry as a numpy leaf, because the handler extends
  `NumpyHandler` and reports its type string). Orbax keeps ownership of the
  format: nothing here writes an Orbax metadata file. We only choose the
  zarr3 chunking (`_zarr3_metadata`) and may fill the shard files directly
  (`_zarr3.RawZarr3`, the published zarr v3 sharding format).
* Reading one layer at a time for orbax-to-hf: Orbax restores whole
  arrays, so each leaf is opened as a TensorStore array with the spec Orbax
  would use (`type_handlers.get_json_tspec_read`); `TreeMetadata.use_zarr3`
  tells which zarr version the item holds.

This depends on the `TypeHandler.serialize` contract and `ParamInfo` fields
of orbax-checkpoint 0.12.8 (setup.py pins it). tests/test_orbax_stream.py
pins the behaviour relied on: a streamed item has the same tree metadata as
a stock numpy save and restores with `StandardCheckpointer`, and the read
path gives the same slices for streamed, stock OCDBT and zarr v2 items.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import dataclasses
import math
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import type_handlers as oth

from illada_jax.checkpoint import _rawio, _zarr3

# Inner (read) chunks of at most this size: a sharded restore reads whole
# inner chunks, so they bound the read amplification and the decode buffer,
# and the converter has a few of them in flight per thread (at 16 MB, the
# first touch of that memory cost the 2-core VM several CPU seconds).
READ_CHUNK_BYTES = 4 << 20
# Writes kept in flight per leaf: overlaps reading the next block with
# TensorStore encoding the previous ones, and bounds the memory they hold.
MAX_INFLIGHT_WRITES = 3



@dataclasses.dataclass
class LazyArray:
  """An array leaf produced block by block at save time.

  `blocks()` yields `(index, data)` pairs that tile the array exactly once;
  every block must be one outer chunk of `write_chunk` (the array's
  leading blocks in C order). `data` may be any dtype castable to `dtype`
  and any strides (e.g. a transposed view), or `Pieces` of `read_chunk`.
  """
  shape: tuple[int, ...]
  dtype: np.dtype
  write_chunk: tuple[int, ...]
  blocks: Callable[[], Any]
  read_chunk: tuple[int, ...] | None = None  # defaults to a <= READ_CHUNK_BYTES divisor
  on_block: Callable[[int], None] | None = None  # called with the bytes of each written block

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * np.dtype(self.dtype).itemsize


def default_read_chunk(write_chunk: tuple[int, ...], itemsize: int,
                       prefer: tuple[int, ...] | None = None,
                       split_dim: int | None = None) -> tuple[int, ...]:
  """A divisor of `write_chunk` of at most READ_CHUNK_BYTES.

  Starts from `gcd(prefer, write_chunk)` per dim (e.g. a device's shard shape
  on the target mesh), then halves `split_dim` while it is even, then the
  leading even dimension, until small enough; zarr3 sharding needs inner
  chunks that divide the outer chunk. The converter passes the dimension
  along which the Hugging Face tensor's rows lie, so that every inner chunk
  is one block of rows, converted and written (or read) on its own
  (`Pieces`); splitting the leading dimension instead keeps inner chunks
  contiguous slabs of the outer chunk.
  """
  chunk = list(write_chunk)
  if prefer is not None:
    chunk = [math.gcd(c, p) for c, p in zip(chunk, prefer)]
  while math.prod(chunk) * itemsize > READ_CHUNK_BYTES:
    even = [i for i, c in enumerate(chunk) if c % 2 == 0]
    if not even:
      break
    chunk[split_dim if split_dim in even else even[0]] //= 2
  return tuple(chunk)


@dataclasses.dataclass
class Pieces:
  """A block given as its inner chunks (`chunk` shape), in C order of the inner grid.

  Chunks that start past the array's edge are not given; one cut by the
  edge is given cut. `pieces` is consumed once.
  """
  shape: tuple[int, ...]  # of the block
  chunk: tuple[int, ...]
  pieces: Iterator[np.ndarray]

  def grid(self) -> Iterator[tuple[slice, ...]]:
    """The block-relative region of each given piece, in order."""
    counts = [-(-n // c) for n, c in zip(self.shape, self.chunk)]
    for k in np.ndindex(*counts):
      yield tuple(slice(j * c, min(n, (j + 1) * c)) for j, c, n in zip(k, self.chunk, self.shape))

  def assemble(self, dtype) -> np.ndarray:
    """The whole block (for writers that need it at once)."""
    out = np.empty(self.shape, dtype)
    for region, piece in zip(self.grid(), self.pieces):
      out[region] = piece
    return out


def _zarr3_metadata(leaf: LazyArray) -> dict[str, Any]:
  itemsize = np.dtype(leaf.dtype).itemsize
  read_chunk = leaf.read_chunk or default_read_chunk(leaf.write_chunk, itemsize)
  return {
      'shape': list(leaf.shape),
      'chunk_grid': {'name': 'regular', 'configuration': {'chunk_shape': list(leaf.write_chunk)}},
      'codecs': [{
          'name': 'sharding_indexed',
          'configuration': {
              'chunk_shape': list(read_chunk),
              'codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}}],
              'index_codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}},
                               {'name': 'crc32c'}],
              'index_location': 'end',
          },
      }],
  }


class _LazyArrayHandler(oth.NumpyHandler):
  """Saves `LazyArray` leaves; on disk they are ordinary numpy-array leaves."""

  def __init__(self, context: ts.Context):
    super().__init__()
    self._context = context

  def typestr(self) -> str:
    return 'np.ndarray'

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.SaveArgs()] * len(values)
    return [ocp.future.CommitFutureAwaitingContractedSignals(
        self._write_all(values, infos, args), name='lazy_array_handler')]

  async def _write_all(self, values, infos, args):
    try:
      for leaf, info, arg in zip(values, infos, args):
        await info.await_path_creation()
        if info.use_zarr3 is not True or info.is_ocdbt_checkpoint:
          raise ValueError('streaming save needs use_zarr3=True, use_ocdbt=False')
        spec = oth.get_json_tspec_write(
            info, use_ocdbt=False, global_shape=leaf.shape, local_shape=leaf.shape,
            dtype=np.dtype(leaf.dtype), arg=arg)
        spec['metadata'] = _zarr3_metadata(leaf)
        array = await ts.open(ts.Spec(spec), create=True, open=True, context=self._context)
        await _write_blocks(array, leaf)
    finally:
      _rawio.wait_closed()  # every shard file written before Orbax finalizes the item


async def _write_blocks(array: ts.TensorStore, leaf: LazyArray):
  inflight: collections.deque = collections.deque()
  dtype = np.dtype(leaf.dtype)
  # The shard files of the layout `_zarr3_metadata` asks for are written
  # directly with O_DIRECT, not through TensorStore's buffered file writes.
  raw = _zarr3.RawZarr3.open(array)
  for index, data in leaf.blocks():
    if isinstance(data, Pieces):
      if raw is not None and raw.write_pieces(index, data.shape, data.pieces):
        if leaf.on_block is not None:
          leaf.on_block(math.prod(data.shape) * dtype.itemsize)
        await asyncio.sleep(0)
        continue
      data = data.assemble(dtype)
    if data.dtype != dtype:
      data = data.astype(dtype)
    if raw is not None and raw.write(index, data):
      if leaf.on_block is not None:
        leaf.on_block(data.nbytes)
      await asyncio.sleep(0)
      continue
    # Yield between blocks so TensorStore's callbacks run while we read.
    inflight.append((array[index].write(data), data.nbytes))
    while len(inflight) >= MAX_INFLIGHT_WRITES:
      await _finish(inflight.popleft(), leaf)
    await asyncio.sleep(0)
  while inflight:
    await _finish(inflight.popleft(), leaf)


async def _finish(pending, leaf: LazyArray):
  write, nbytes = pending
  await write
  if leaf.on_block is not None:
    leaf.on_block(nbytes)


def save_streaming(item_dir: str | os.PathLike, tree) -> None:
  """Saves a pytree of `LazyArray` as an Orbax PyTree item at new directory `item_dir`."""
  # One fsync per file at the end instead of one per chunk: the kernel then
  # writes back while we read (2-layer 8B shapes, 2 GB, idle machine: 18.8 s
  # -> 10.6 s; no difference measured at 15 GB on a loaded one).
  context = ts.Context({'file_io_sync': False})
  registry = oth.create_type_handler_registry((LazyArray, _LazyArrayHandler(context)))
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True,
                                        type_handler_registry=registry)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(os.path.abspath(item_dir), args=ocp.args.PyTreeSave(tree))
  fsync_tree(item_dir)


def fsync_tree(root: str | os.PathLike) -> None:
  """Flushes every file under `root` (and the directories) to disk.

  On Linux one `syncfs` of the filesystem: fsyncing the ~800 files and
  directories of an 8B item one by one took 3.2 s here, each a journal
  commit of its own.
  """
  if _syncfs(root):
    return
  for d, _, files in os.walk(root):
    for name in files + ['.']:
      fd = os.open(os.path.join(d, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)


def _syncfs(path) -> bool:
  """`syncfs(2)` of the filesystem holding `path`; False where it is not available."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    syncfs = libc.syncfs
  except (OSError, AttributeError):
    return False
  fd = os.open(path, os.O_RDONLY)
  try:
    return syncfs(fd) == 0
  finally:
    os.close(fd)


# -- streaming read ---------------------------------------------------------------

def stored_arrays(item_dir: str | os.PathLike) -> dict[str, Any]:
  """`{'layers/attn/q_proj': ArrayMetadata, ...}` of an Orbax PyTree item (no data read)."""
  flat = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(_tree_metadata(item_dir).tree)[0]:
    flat['/'.join(str(getattr(k, 'key', k)) for k in keys)] = leaf
  return flat


def _tree_metadata(item_dir: str | os.PathLike):
  return ocp.PyTreeCheckpointer().metadata(os.path.abspath(item_dir)).item_metadata


def open_stored_arrays(item_dir: str | os.PathLike) -> dict[str, ts.TensorStore]:
  """`{'layers/attn/q_proj': TensorStore, ...}` of an Orbax PyTree item, opened for slice reads.

  Works on any Orbax PyTree item (OCDBT or not, zarr v2 or v3), so
  checkpoints written by training can be exported block by block too.
  """
  item = os.path.abspath(item_dir)
  use_zarr3 = bool(_tree_metadata(item).use_zarr3)
  use_ocdbt = bool(oth.is_ocdbt_checkpoint(item))
  ctx = oth.get_ts_context(use_ocdbt=use_ocdbt)
  out = {}
  for name, meta in stored_arrays(item).items():
    info = oth.ParamInfo(name=meta.name, parent_dir=meta.directory, use_zarr3=use_zarr3,
                         ts_context=ctx)
    spec = oth.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
    out[name] = ts.open(ts.Spec(spec), open=True, read=True, context=ctx).result()
  return out
