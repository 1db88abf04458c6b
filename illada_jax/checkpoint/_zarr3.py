"""zarr3 shard files read and written directly, with O_DIRECT (private).

`RawZarr3` reads and writes the data files of an uncompressed, sharded zarr3
array (the layout `_orbax_stream.save_streaming` asks TensorStore to create),
so neither side of a conversion goes through TensorStore's buffered file
I/O. Only the shard files' bytes are written here, in the zarr v3
`sharding_indexed` format (a published spec, checked in tests against
TensorStore reading them back); every metadata file, the array's `zarr.json`
and Orbax's tree metadata, is written by Orbax and TensorStore themselves.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Iterator

import numpy as np

from illada_jax.checkpoint._rawio import BufferPool, DirectFile, pread_aligned


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    table.append(c)
  return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as zarr3's `crc32c` codec appends to shard indexes."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


class RawZarr3:
  """Direct I/O on the shard files of an uncompressed, sharded zarr3 array on local disk.

  That is the layout `_orbax_stream.save_streaming` creates. A shard file (one
  outer chunk) is its inner chunks' raw little-endian bytes in C order of
  the inner grid, then an index of (offset, nbytes) uint64 pairs and the
  index's CRC-32C. TensorStore's buffered file I/O ran at 0.77 GB/s on a
  3.9 GB checkpoint here, against 2.3 GB/s for O_DIRECT reads (and over
  3 GB/s for O_DIRECT writes), and bounded both conversions. `open` returns
  None for any other layout (OCDBT, compression, zarr v2, ...), and `read`
  returns None for anything unusual (a missing chunk, a failed check): the
  caller then uses TensorStore.
  """

  def __init__(self, directory: str, shape, dtype, chunk, inner):
    self.dir, self.shape, self.dtype = directory, tuple(shape), np.dtype(dtype)
    self.chunk, self.inner = tuple(chunk), tuple(inner)
    self.grid = tuple(c // i for c, i in zip(self.chunk, self.inner))  # inner chunks per shard
    self.index_bytes = 16 * math.prod(self.grid) + 4
    self._indexes: dict[tuple[int, ...], tuple[np.ndarray, int]] = {}  # shard -> checked index

  @classmethod
  def open(cls, store) -> RawZarr3 | None:
    try:
      spec = store.spec(minimal_spec=False).to_json()
    except Exception:  # noqa: BLE001 - any store we cannot describe is read by TensorStore
      return None
    kv, meta = spec.get('kvstore', {}), spec.get('metadata', {})
    little = {'name': 'bytes', 'configuration': {'endian': 'little'}}
    codecs = meta.get('codecs', [])
    if (sys.byteorder != 'little' or spec.get('driver') != 'zarr3' or kv.get('driver') != 'file'
        or len(codecs) != 1
        or meta.get('chunk_key_encoding') not in (
            {'name': 'default'}, {'name': 'default', 'configuration': {'separator': '/'}})
        or meta.get('chunk_grid', {}).get('name') != 'regular'
        or meta.get('data_type') not in ('bfloat16', 'float16', 'float32')):
      return None
    shard = codecs[0].get('configuration', {})
    if (codecs[0].get('name') != 'sharding_indexed' or shard.get('codecs') != [little]
        or shard.get('index_codecs') != [little, {'name': 'crc32c'}]
        or shard.get('index_location', 'end') != 'end'):
      return None
    shape, chunk = meta['shape'], meta['chunk_grid']['configuration']['chunk_shape']
    inner = shard['chunk_shape']
    if (list(store.shape) != list(shape) or any(store.domain.origin)
        or any(c % i for c, i in zip(chunk, inner))):
      return None
    return cls(kv['path'], shape, store.dtype.numpy_dtype, chunk, inner)

  def _region(self, index):
    """(lo, hi, kept dims, shard coordinates) of `index` if it lies within one shard."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > len(self.shape):
      return None
    lo, hi, keep = [], [], []
    for d, n in enumerate(self.shape):
      x = index[d] if d < len(index) else slice(None)
      if isinstance(x, (int, np.integer)) and 0 <= x < n:
        lo.append(int(x))
        hi.append(int(x) + 1)
        keep.append(False)
      elif isinstance(x, slice):
        start, stop, step = x.indices(n)
        if step != 1 or stop <= start:
          return None
        lo.append(start)
        hi.append(stop)
        keep.append(True)
      else:
        return None
    shard = [a // c for a, c in zip(lo, self.chunk)]
    if any(b > (s + 1) * c for b, s, c in zip(hi, shard, self.chunk)):
      return None
    return lo, hi, keep, shard

  def _path(self, shard) -> str:
    return os.path.join(self.dir, 'c', *map(str, shard))

  def write(self, index, data: np.ndarray) -> bool:
    """Writes `array[index] = data`, where `index` is exactly one shard; False if it is not."""
    shape = self._shard_shape(index)
    if shape is None:
      return False
    data = np.asarray(data, self.dtype).reshape(shape)
    return self.write_pieces(index, shape, (data[region] for region in self._pieces(shape)))

  def write_pieces(self, index, shape, pieces: Iterator[np.ndarray]) -> bool:
    """Writes one shard from its inner chunks in C order of the inner grid; False if `index`
    is not exactly one shard of `shape` (then `pieces` is untouched).

    Chunks past the array's edge are not given (they stay missing and read as
    the fill value); one cut by the edge is given cut and padded here.
    """
    if self._shard_shape(index) != tuple(shape):
      return False
    shard = self._region(index)[3]
    table = np.full(self.grid + (2,), np.iinfo(np.uint64).max, '<u8')  # all ones: missing
    inner_nbytes = math.prod(self.inner) * self.dtype.itemsize
    path = self._path(shard)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Neither fsynced nor waited for here: with one shard file per layer
    # tensor the writer drained ~300 times; `save_streaming` waits for all
    # files and flushes the item once at the end.
    with DirectFile(path, 1 << 20, sync=False, close_later=True) as f:
      offset = 0
      for region in self._pieces(shape):
        part = np.asarray(next(pieces), self.dtype)
        cut = tuple(r.stop - r.start for r in region)
        if part.shape != cut:
          raise ValueError(f'{path}: chunk {region} given as {part.shape}')
        if cut != self.inner:  # at the edge: zarr stores whole chunks
          padded = np.zeros(self.inner, self.dtype)
          padded[tuple(slice(0, n) for n in cut)] = part
          part = padded
        f.write_array(part)
        table[tuple(r.start // i for r, i in zip(region, self.inner))] = (offset, inner_nbytes)
        offset += inner_nbytes
      index_bytes = table.tobytes()
      f.write(index_bytes + crc32c(index_bytes).to_bytes(4, 'little'))
    return True

  def _shard_shape(self, index) -> tuple[int, ...] | None:
    """The shape of `array[index]` if `index` is exactly one shard, else None."""
    region = self._region(index)
    if region is None:
      return None
    lo, hi, _, shard = region
    if any(a != s * c or b != min(self.shape[d], a + c)
           for d, (a, b, s, c) in enumerate(zip(lo, hi, shard, self.chunk))):
      return None
    return tuple(b - a for a, b in zip(lo, hi))

  def _pieces(self, shape) -> Iterator[tuple[slice, ...]]:
    """Shard-relative regions of the inner chunks that hold data, in C order of the grid."""
    counts = [-(-n // i) for n, i in zip(shape, self.inner)]
    for k in np.ndindex(*counts):
      yield tuple(slice(j * i, min(n, (j + 1) * i)) for j, i, n in zip(k, self.inner, shape))

  def read(self, index, pool: BufferPool) -> np.ndarray | None:
    """`array[index]` (ints and unit-step slices) if it lies within one shard, else None."""
    region = self._region(index)
    if region is None:
      return None
    lo, hi, keep, shard = region
    try:
      fd = os.open(self._path(shard), os.O_RDONLY | getattr(os, 'O_DIRECT', 0))
    except OSError:
      return None
    try:
      index_table = self._indexes.get(tuple(shard)) or self._index(fd, pool)
      if index_table is None:
        return None
      self._indexes[tuple(shard)] = index_table  # a converter reads a shard a chunk at a time
      out = (self._read_slabs(fd, index_table, shard, lo, hi, pool)
             if tuple(b - a for a, b in zip(lo, hi)) != self.inner
             else self._read_one_chunk(fd, index_table, shard, lo, pool))
      if out is None:
        out = pool.empty(tuple(b - a for a, b in zip(lo, hi)), self.dtype)
        if not self._copy_region(fd, index_table, shard, lo, hi, out, pool):
          return None
    except OSError:
      return None
    finally:
      os.close(fd)
    return out.reshape(tuple(n for n, k in zip(out.shape, keep) if k))

  def _index(self, fd, pool) -> tuple[np.ndarray, int] | None:
    """(the shard's (offset, nbytes) table over the inner grid, where the data ends), if valid."""
    data_end = os.fstat(fd).st_size - self.index_bytes
    if data_end < 0:
      return None
    raw = pread_aligned(fd, data_end, self.index_bytes, pool)
    if raw is None or crc32c(raw[:-4].tobytes()) != int.from_bytes(raw[-4:].tobytes(), 'little'):
      return None
    return raw[:-4].view('<u8').reshape(self.grid + (2,)).copy(), data_end  # not the pool's

  def _read_slabs(self, fd, index_table, shard, lo, hi, pool) -> np.ndarray | None:
    """A whole shard whose inner chunks are consecutive slabs, in one read and no copy; else None.

    That is the layout `_orbax_stream.default_read_chunk` picks: the inner
    chunks split one dimension, every dimension before it has extent 1 and
    every one after it is whole, and the chunks are stored in order. Only
    the split dimension may end early (at the array's edge): its padding
    then lies after the data.
    """
    table, data_end = index_table
    split = next((d for d, (i, c) in enumerate(zip(self.inner, self.chunk)) if i != c), 0)
    base = [s * c for s, c in zip(shard, self.chunk)]
    extent = [b - a for a, b in zip(lo, hi)]
    if (lo != base or any(c != 1 for c in self.chunk[:split])
        or self.inner[split + 1:] != self.chunk[split + 1:]
        or any(e != c for e, c in zip(extent[split + 1:], self.chunk[split + 1:]))
        or extent[split] != min(self.chunk[split], self.shape[split] - base[split])):
      return None
    inner_nbytes = math.prod(self.inner) * self.dtype.itemsize
    used = -(-extent[split] // self.inner[split])  # inner chunks that hold data
    rows = table.reshape(-1, 2)[:used]
    if not np.array_equal(rows[:, 0], np.arange(used) * inner_nbytes) or np.any(
        rows[:, 1] != inner_nbytes) or used * inner_nbytes > data_end:
      return None
    data = pread_aligned(fd, 0, math.prod(extent) * self.dtype.itemsize, pool)
    return None if data is None else data.view(self.dtype).reshape(extent)

  def _read_one_chunk(self, fd, index_table, shard, lo, pool) -> np.ndarray | None:
    """The inner chunk starting at `lo` (a whole one) in one read and no copy, else None."""
    table, data_end = index_table
    base = [s * c for s, c in zip(shard, self.chunk)]
    k, rem = zip(*(divmod(a - b, i) for a, b, i in zip(lo, base, self.inner)))
    offset, nbytes = (int(v) for v in table[k])
    if any(rem) or nbytes != math.prod(self.inner) * self.dtype.itemsize or (
        offset + nbytes > data_end):
      return None
    data = pread_aligned(fd, offset, nbytes, pool)
    return None if data is None else data.view(self.dtype).reshape(self.inner)

  def _copy_region(self, fd, index_table, shard, lo, hi, out, pool) -> bool:
    table, data_end = index_table
    inner_nbytes = math.prod(self.inner) * self.dtype.itemsize
    base = [s * c for s, c in zip(shard, self.chunk)]
    first = [(a - b0) // i for a, b0, i in zip(lo, base, self.inner)]
    last = [(b - 1 - b0) // i for b, b0, i in zip(hi, base, self.inner)]
    for k in np.ndindex(*(l - f + 1 for f, l in zip(first, last))):
      k = tuple(f + j for f, j in zip(first, k))
      offset, nbytes = (int(v) for v in table[k])
      if nbytes != inner_nbytes or offset + nbytes > data_end:
        return False  # missing (all ones) or inconsistent
      chunk = pread_aligned(fd, offset, nbytes, pool)
      if chunk is None:
        return False
      chunk = chunk.view(self.dtype).reshape(self.inner)
      c0 = [b0 + kk * i for b0, kk, i in zip(base, k, self.inner)]  # array coords of the chunk
      a = [max(x, y) for x, y in zip(lo, c0)]
      b = [min(x, y + i) for x, y, i in zip(hi, c0, self.inner)]
      out[tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))] = (
          chunk[tuple(slice(x - c, y - c) for x, y, c in zip(a, b, c0))])
    return True
