"""Layout changes between PyTorch `[out, in]` tensors and parameter slices, bit-exact.

`to_param` / `from_param` apply the `kind`s of `hf_names`; `transpose2d` is
the one expensive step of both, done on two threads as 16-byte words.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np

from illada_jax.checkpoint import _rawio
from illada_jax.config import ModelConfig


def row_axis(kind: str, cfg: ModelConfig) -> tuple[int, int]:
  """(dim, HF rows per step): where consecutive HF rows lie in a parameter slice (one layer).

  HF rows `[r0, r1)` of a tensor are the slice `[r0 // step, r1 // step)`
  along `dim` of its parameter slice, whole along every other dim, so a
  block of rows (a contiguous range of the file) converts on its own.
  """
  return {'copy': (0, 1), 'qkv': (1, cfg.head_dim), 'o': (2, 1), 'linear': (1, 1),
          'head': (1, 1)}[kind]


def to_param(kind: str, a: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """HF tensor (one layer, or a block of its rows) -> parameter slice, C-contiguous.

  TensorStore copies a strided (transposed) view element by element, which
  was the largest CPU cost of hf-to-orbax; a contiguous block is a memcpy.
  """
  if kind == 'copy':
    return a
  t = transpose2d(a)
  if kind == 'qkv':
    return t.reshape(a.shape[1], a.shape[0] // cfg.head_dim, cfg.head_dim)
  if kind == 'o':
    return t.reshape(a.shape[1] // cfg.head_dim, cfg.head_dim, a.shape[0])
  return t  # 'linear', 'head'


def from_param(kind: str, p: np.ndarray) -> np.ndarray:
  """Inverse of `to_param`: parameter slice -> contiguous HF tensor (or block of rows)."""
  if kind == 'qkv':
    return transpose2d(p.reshape(p.shape[0], -1))
  if kind == 'o':
    return transpose2d(p.reshape(-1, p.shape[-1]))
  if kind in ('linear', 'head'):
    return transpose2d(p)
  return np.ascontiguousarray(p)


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_WORD = np.dtype(np.complex128)  # any 16-byte dtype that numpy copies as raw bytes
_TRANSPOSE_THREADS = 2
_transpose_pool: concurrent.futures.ThreadPoolExecutor | None = None


def transpose2d(a: np.ndarray, pool: _rawio.BufferPool | None = _rawio.POOL) -> np.ndarray:
  """`a.T` as a new C-contiguous array (from `pool`), copied bit-exactly on two threads.

  numpy moves one element per iteration of its strided copy loop, so a
  2-byte transpose runs at ~1.2 GB/s however it is tiled. Here each block of
  `g = 16 / itemsize` consecutive rows is first interleaved (contiguous
  reads) so that the `g` values of one column form one 16-byte word; those
  words are then transposed in strips of 8 (full cache lines written): g
  times fewer elements. [14336, 4096] bfloat16: 0.037 s on two threads,
  against 0.054 s for 16-row strips of single elements and 0.47 s for
  numpy's `.T` copy.
  """
  rows, cols = a.shape
  out = pool.empty((cols, rows), a.dtype) if pool is not None else np.empty((cols, rows), a.dtype)
  if a.size == 0:
    return out
  u = _UINT.get(a.dtype.itemsize)
  if u is None or a.dtype.kind == 'O':
    out[...] = a.T
    return out
  src, dst = a.view(u), out.view(u)  # copies of raw bits: bit-exact for any float
  g = 16 // a.dtype.itemsize
  packed = rows - rows % g
  block = 32 * g  # rows interleaved at a time: the scratch stays in the cache
  if packed:
    words = dst[:, :packed].view(_WORD)  # [cols, packed / g]

    def work(r_begin, r_end):
      # From the pool: a fresh scratch (up to 7 MB) per call was faulted in
      # again each time, most of the converter's system time.
      scratch = (pool.empty((block // g, cols, g), u) if pool is not None
                 else np.empty((block // g, cols, g), u))
      for r0 in range(r_begin, r_end, block):
        n = (min(r_end, r0 + block) - r0) // g
        rows_gC = src[r0:r0 + n * g]
        for j in range(g):
          scratch[:n, :, j] = rows_gC[j::g]
        w = scratch[:n].view(_WORD).reshape(n, cols)
        k0 = r0 // g
        for k in range(0, n, 8):
          words[:, k0 + k:k0 + min(n, k + 8)] = w[k:k + 8].T

    if a.nbytes < (2 << 20) or packed < 2 * block:
      work(0, packed)
    else:
      global _transpose_pool
      if _transpose_pool is None:
        _transpose_pool = concurrent.futures.ThreadPoolExecutor(
            _TRANSPOSE_THREADS, thread_name_prefix='transpose2d')
      step = -(-packed // (_TRANSPOSE_THREADS * block)) * block
      futures = [_transpose_pool.submit(work, r0, min(packed, r0 + step))
                 for r0 in range(step, packed, step)]
      work(0, min(packed, step))
      for f in futures:
        f.result()
  if packed < rows:
    dst[:, packed:] = src[packed:].T
  return out
