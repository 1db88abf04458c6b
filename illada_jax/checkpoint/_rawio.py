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
* `in_background` runs a producer (reading, transposing) one or two items
  ahead of its consumer (writing), so the two halves overlap on two cores.
"""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import math
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
  """An uninitialised uint8 array of `nbytes` starting on a 4 KiB page boundary."""
  raw = np.empty(nbytes + ALIGN, np.uint8)
  start = -raw.ctypes.data % ALIGN
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

