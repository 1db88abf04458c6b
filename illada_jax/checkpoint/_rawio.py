"""Page-aligned scratch memory and page-cache-free file I/O for the converter (private).

On the machines this was measured on, the kernel's part of buffered I/O cost
more than everything else a conversion does: every fresh page of a new 100 MB
array or of the page cache is faulted in and zeroed, and every byte is copied
once more into or out of the cache. Here:

* `BufferPool` hands the same few buffer sizes out again instead of
  allocating (one set per layer tensor shape);
* `pread_aligned` and `DirectFile` read and write with `O_DIRECT` through
  page-aligned buffers, falling back to buffered I/O where the filesystem
  refuses it;
* `RawZarr3` reads and writes the data files of an uncompressed, sharded
  zarr3 array (the layout `_orbax_stream.save_streaming` asks TensorStore to
  create) directly, so neither side of a conversion goes through
  TensorStore's buffered file I/O. Only the shard files' bytes are written
  here, in the zarr v3 `sharding_indexed` format (a published spec, checked
  in tests against TensorStore reading them back); every metadata file, the
  array's `zarr.json` and Orbax's tree metadata, is written by Orbax and
  TensorStore themselves;
* `in_background` runs a producer (reading, transposing) one or two items
  ahead of its consumer (writing), so the two halves overlap on two cores.
"""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import math
import mmap
import os
import queue
import sys
import threading
from typing import Any, Iterable, Iterator

import numpy as np

from illada_jax.util import round_up

ALIGN = 4096  # O_DIRECT alignment of buffers, file offsets and sizes
READ_CALL_BYTES = 1 << 30  # Linux reads at most ~2 GiB per call
ZERO_COPY_BYTES = 1 << 20  # DirectFile writes at least this much straight from the caller's array
HUGE_PAGE = 2 << 20


class BufferPool:
  """Scratch arrays recycled by size once nothing but the pool refers to them.

  A fresh 100 MB numpy array is a fresh mmap: the kernel faults in and
  zeroes every page on first write, which was a third of hf-to-orbax's CPU
  time. Conversion allocates the same few sizes once per layer (the read
  buffer and transpose output of q/k/v/o and the MLP matrices, the table
  row blocks, the write staging buffers), so buffers are kept per byte size
  and handed out again when their reference count shows that every view of
  them has been dropped (whoever still reads or writes one holds a view).
  Small arrays come from the heap anyway.
  """

  MIN_BYTES = 1 << 20

  def __init__(self, per_size: int = 16):
    self.per_size = per_size
    self._free: dict[int, list[np.ndarray]] = {}
    self._lock = threading.Lock()

  def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array of `shape` and `dtype`."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < self.MIN_BYTES:
      return np.empty(shape, dtype)
    with self._lock:
      owned = self._free.setdefault(nbytes, [])
      # Every view of a buffer refers to the allocation that owns its memory
      # (numpy collapses view chains), so that is idle when its only
      # referrers are the pooled view's `.base` and getrefcount's argument.
      buf = next((b for b in owned if sys.getrefcount(b.base) == 2), None)
      if buf is None:
        buf = aligned_empty(nbytes)  # usable for O_DIRECT I/O
        if len(owned) < self.per_size:
          owned.append(buf)
    return buf.view(dtype).reshape(shape)


POOL = BufferPool()


def pread_aligned(fd: int, offset: int, nbytes: int, pool: BufferPool) -> np.ndarray | None:
  """Bytes `[offset, offset + nbytes)` of `fd` (uint8), or None if the file ends first.

  Reads the enclosing span of whole 4 KiB blocks into a page-aligned buffer,
  as `O_DIRECT` requires, and returns a view of the bytes asked for.
  """
  lo = offset - offset % ALIGN
  span = round_up(offset + nbytes - lo, ALIGN)
  size = round_up(nbytes, ALIGN) + ALIGN  # one size per nbytes: reusable by the pool
  buf = aligned_scratch(size, pool)
  done = 0
  while done < span:
    got = os.preadv(fd, [buf[done:min(span, done + READ_CALL_BYTES)]], lo + done)
    if not got:
      break
    done += got
  if done < offset + nbytes - lo:
    return None
  return buf[offset - lo:offset - lo + nbytes]


def aligned_empty(nbytes: int) -> np.ndarray:
  """An uninitialised uint8 array of `nbytes` starting on a 4 KiB page boundary.

  Large ones are their own anonymous mapping with transparent huge pages
  requested: the first touch of a fresh 117 MB buffer cost 0.31 s CPU in
  4 KiB page faults on the 2-core VM, 0.02-0.04 s with huge pages (its THP
  mode is `madvise`).
  """
  if nbytes < HUGE_PAGE:
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes]
  m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
  if hasattr(mmap, 'MADV_HUGEPAGE'):
    try:
      m.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP: ordinary pages
      pass
  raw = np.frombuffer(m, np.uint8)
  start = -raw.ctypes.data % HUGE_PAGE
  return raw[start:start + nbytes]


def aligned_scratch(nbytes: int, pool: BufferPool) -> np.ndarray:
  """A page-aligned uint8 buffer: from `pool` if large enough to be pooled."""
  return pool.empty((nbytes,), np.uint8) if nbytes >= pool.MIN_BYTES else aligned_empty(nbytes)


class DirectFile:
  """A new file written sequentially through `O_DIRECT` in aligned blocks, fsynced on close.

  Buffered writes of a 15 GB checkpoint cost more kernel time here than
  anything else in orbax-to-hf (copying into fresh page-cache pages, then
  write-back): `dd` of 3.9 GB with `sync` took 16 s buffered and 4 s with
  `oflag=direct` on this machine. Page-aligned arrays (the pool's buffers)
  are written straight from their memory; other bytes are gathered in a
  page-aligned staging buffer. Either way the write runs on a background
  thread while the caller produces the next bytes; the last partial block
  is padded to the alignment and the file truncated to its true size. With
  `sync=False` the caller flushes the file itself; with `close_later=True`
  leaving the `with` block does not wait for the last writes (the next
  file's start overlaps them), and `wait_closed()` waits for all. Where the filesystem refuses
  `O_DIRECT` (tmpfs), it writes normally.
  """

  def __init__(self, path: str, buffer_bytes: int = 16 << 20, sync: bool = True,
               close_later: bool = False):
    self.sync = sync  # fsync on close; off where the caller flushes many files at once
    self.close_later = close_later  # finish on the writer thread; see `wait_closed`
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, 'O_CLOEXEC', 0)
    self.direct = hasattr(os, 'O_DIRECT')
    try:
      self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o666)
    except OSError:
      self.direct = False
      self.fd = os.open(path, flags, 0o666)
    self.bufs = [aligned_scratch(buffer_bytes, POOL) for _ in range(2)]
    self.buf = self.bufs[0]
    self.fill = self.size = 0
    self.offset = 0  # where `buf` goes in the file
    self.pending: concurrent.futures.Future | None = None  # the other buffer's write

  def write(self, data) -> None:
    """Appends the bytes of `data` (bytes or a flat uint8 array).

    While the staging buffer is empty, whole 4 KiB blocks of a page-aligned
    `data` are written straight from it, without a copy; `data` must then
    stay unchanged until the next write or the end of the `with` block.
    """
    data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    done = 0
    while done < len(data):
      if self.fill == 0 and self.direct and (data.ctypes.data + done) % ALIGN == 0:
        n = (len(data) - done) // ALIGN * ALIGN
        if n >= ZERO_COPY_BYTES:
          self._wait()
          self.pending = _writer().submit(_pwrite_all, self.fd, data[done:done + n], self.offset)
          self.offset += n
          self.size += n
          done += n
          continue
      n = min(len(data) - done, len(self.buf) - self.fill)
      self.buf[self.fill:self.fill + n] = data[done:done + n]
      self._filled(n)
      done += n

  def write_array(self, a: np.ndarray) -> None:
    """Appends `a`'s bytes in C order; a strided `a` is copied once, into the staging buffer.

    Strided arrays go in as slabs of whole leading rows, as many as the
    buffer has room for; a row that straddles the buffer's end is written
    the same way one dimension down.
    """
    if a.flags.c_contiguous:
      self.write(a.reshape(-1).view(np.uint8))
      return
    row_nbytes = a.nbytes // a.shape[0] if a.shape[0] else 0
    i = 0
    while i < a.shape[0]:
      n = min(a.shape[0] - i, (len(self.buf) - self.fill) // row_nbytes)
      if n == 0:
        self.write_array(a[i, ...])
        i += 1
        continue
      nbytes = n * row_nbytes
      self.buf[self.fill:self.fill + nbytes].view(a.dtype).reshape((n,) + a.shape[1:])[...] = (
          a[i:i + n])
      self._filled(nbytes)
      i += n

  def _filled(self, nbytes: int) -> None:
    """Counts `nbytes` just copied into `buf` at `fill`; a full buffer starts its write."""
    self.fill += nbytes
    self.size += nbytes
    if self.fill == len(self.buf):
      self._flush(self.fill)

  def _flush(self, nbytes: int) -> None:
    """Starts writing `buf[:nbytes]` and switches to the other buffer once that one is free."""
    self._wait()
    self.pending = _writer().submit(_pwrite_all, self.fd, self.buf[:nbytes], self.offset)
    self.offset += nbytes
    self.bufs.reverse()
    self.buf = self.bufs[0]
    self.fill = 0

  def _wait(self) -> None:
    if self.pending is not None:
      pending, self.pending = self.pending, None
      pending.result()

  def __enter__(self) -> 'DirectFile':
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None and self.close_later:
      # The writer thread runs tasks in order: this one after the pending write.
      _CLOSING[:] = [f for f in _CLOSING if not f.done() or f.exception() is not None]
      _CLOSING.append(_writer().submit(self._finish))
      return
    try:
      if exc_type is None:
        self._finish()
    finally:
      try:
        if self.pending is not None:
          concurrent.futures.wait([self.pending])
      finally:
        if self.fd >= 0:
          os.close(self.fd)

  def _finish(self) -> None:
    """Writes the tail, truncates the block padding, fsyncs (if asked) and closes."""
    try:
      self._wait()
      tail = self.fill
      if self.direct and tail % ALIGN:
        padded = tail + (-tail % ALIGN)
        self.buf[tail:padded] = 0
        _pwrite_all(self.fd, self.buf[:padded], self.offset)
        os.ftruncate(self.fd, self.size)
      elif tail:
        _pwrite_all(self.fd, self.buf[:tail], self.offset)
      if self.sync:
        os.fsync(self.fd)
    finally:
      os.close(self.fd)
      self.fd = -1
      # Back to the pool now, not when this object goes: a finished file
      # that still held its buffers made the pool allocate fresh ones.
      self.bufs = self.buf = self.pending = None


# Files whose `close_later` finish is queued on the writer thread.
_CLOSING: list[concurrent.futures.Future] = []


def wait_closed() -> None:
  """Waits until every `DirectFile(close_later=True)` is written and closed; re-raises errors."""
  while _CLOSING:
    _CLOSING.pop(0).result()


_writer_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _writer() -> concurrent.futures.ThreadPoolExecutor:
  global _writer_pool
  if _writer_pool is None:
    _writer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='direct_write')
  return _writer_pool


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
  view = memoryview(data)
  while view.nbytes:
    try:
      n = os.pwrite(fd, view, offset)
    except OSError as e:
      # Some filesystems accept O_DIRECT at open and refuse it on write.
      if e.errno == errno.EINVAL and _drop_direct(fd):
        continue
      raise
    view, offset = view[n:], offset + n


def _drop_direct(fd: int) -> bool:
  """Clears O_DIRECT on `fd`; False if it was not set."""
  flags = fcntl.fcntl(fd, fcntl.F_GETFL)
  if not flags & getattr(os, 'O_DIRECT', 0):
    return False
  fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
  return True


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


def in_background(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
  """Iterates `items` in a worker thread, at most `depth` ahead; re-raises its errors."""
  q: queue.Queue = queue.Queue(depth)
  stop = threading.Event()
  done = object()

  def produce():
    try:
      for item in items:
        while not stop.is_set():
          try:
            q.put((item, None), timeout=0.1)
            break
          except queue.Full:
            pass
        if stop.is_set():
          return
      q.put((done, None))
    except BaseException as e:  # handed to the consumer
      q.put((done, e))

  worker = threading.Thread(target=produce, daemon=True)
  worker.start()
  try:
    while True:
      item, error = q.get()
      if error is not None:
        raise error
      if item is done:
        return
      yield item
  finally:
    stop.set()

