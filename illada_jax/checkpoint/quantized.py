"""`illada-convert quantize`: a float checkpoint -> an int8 one, streamed tensor by tensor.

The destination is an ordinary checkpoint directory whose `model_config.json`
says `quantize: "int8"` (or `"int8_head"`) and whose `params` item holds, for
every quantized weight, `{'qvalue': int8 [w.shape], 'scale': float32}`
(`illada_jax.quant.to_storage`); `load_checkpoint` restores it as int8
without re-quantizing. Each stacked weight is read, quantized and written one
layer at a time, each table a block of rows (or of vocabulary columns for an
untied head) at a time, with `quant.quantize_array` on the host CPU: the
function and device `load_checkpoint(..., quantize=...)` uses, so both give
the same bits (per-channel scales make a layer or a block of channels
independent of the rest). Memory holds a few blocks, never a tensor.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import numpy as np

from illada_jax import model as model_lib
from illada_jax import quant
from illada_jax.checkpoint import _orbax_stream, store
from illada_jax.checkpoint._destination import Destination, check_apart
from illada_jax.checkpoint._blocks import TABLE_BLOCK_BYTES, row_blocks
from illada_jax.checkpoint.errors import ConversionError
from illada_jax.config import QUANTIZE_MODES, ModelConfig


def _blocks_of(names: tuple, shape: tuple, itemsize: int) -> tuple[tuple, list]:
  """(write chunk, block indices): one layer of a stacked leaf, else blocks of the leading
  channel axis of a table (`vocab`: rows of the embedding, columns of the head)."""
  if names and names[0] == 'layers':
    rest = tuple(slice(None) for _ in shape[1:])
    return (1,) + tuple(shape[1:]), [(i,) + rest for i in range(shape[0])]
  if 'vocab' in names:
    dim = names.index('vocab')
    other = int(np.prod(shape)) // shape[dim]
    rows = 1
    while rows * 2 * other * itemsize <= TABLE_BLOCK_BYTES and rows * 2 <= shape[dim]:
      rows *= 2
    chunk = list(shape)
    chunk[dim] = rows
    index = lambda r0, r1: tuple(slice(r0, r1) if d == dim else slice(None)
                                 for d in range(len(shape)))
    return tuple(chunk), [index(r0, r1) for r0, r1 in row_blocks(shape[dim], rows)]
  return tuple(shape), [tuple(slice(None) for _ in shape)]


def _block_shape(shape, index) -> tuple:
  return tuple(1 if isinstance(i, int) else len(range(*i.indices(n)))
               for n, i in zip(shape, index))


class _Leaf:
  """One stored weight of the source and how its blocks become the destination's."""

  def __init__(self, source, names: tuple, shape: tuple, dtype, quantized: bool, leaf: str):
    self.source, self.names, self.shape, self.dtype = source, names, shape, np.dtype(dtype)
    self.quantized, self.leaf = quantized, leaf
    self.chunk, self.indices = _blocks_of(names, shape, self.dtype.itemsize)
    # Channel axes of a block: the stored axes that are not contracted (the layer axis too).
    self.channels = tuple(i for i, n in enumerate(names) if n not in quant.CONTRACTED.get(leaf, ()))
    self._scales: dict[int, np.ndarray] = {}  # block number -> scale, qvalue written first

  def _read(self, index) -> np.ndarray:
    return np.asarray(self.source[index].read().result()).astype(self.dtype)

  def _quantized(self, index):
    block = self._read(index)
    if block.ndim < len(self.shape):  # an integer layer index dropped the axis
      block = block[None]
    q = quant.quantize_array(jax.device_put(block, _host()), self.channels)
    return np.asarray(q.qvalue), np.asarray(q.scale)

  def lazy(self, part: str, on_block) -> _orbax_stream.LazyArray:
    """The destination leaf: the float copy (`part=''`), `qvalue` or `scale`."""
    if part == 'scale':
      shape = tuple(1 if i not in self.channels else n for i, n in enumerate(self.shape))
      chunk = tuple(1 if i not in self.channels else c for i, c in enumerate(self.chunk))
      dtype = np.dtype(quant.SCALE_DTYPE)
    else:
      shape, chunk = self.shape, self.chunk
      dtype = np.dtype(np.int8) if part == 'qvalue' else self.dtype

    def blocks():
      for n, index in enumerate(self.indices):
        out_index = tuple(i if k in self.channels or not isinstance(i, slice) else slice(None)
                          for k, i in enumerate(index)) if part == 'scale' else index
        if not part:
          data = self._read(index)
        elif part == 'qvalue':
          data, self._scales[n] = self._quantized(index)
        else:
          scale = self._scales.pop(n, None)
          data = scale if scale is not None else self._quantized(index)[1]
        yield _index(out_index), data.reshape(_block_shape(shape, out_index))
    return _orbax_stream.LazyArray(shape=shape, dtype=dtype, write_chunk=chunk, blocks=blocks,
                                   on_block=on_block)


def _index(index: tuple) -> tuple:
  """A block index as `LazyArray` writes it: slices only (a layer `i` is `i:i+1`)."""
  return tuple(slice(i, i + 1) if isinstance(i, int) else i for i in index)


def _host():
  return jax.local_devices(backend='cpu')[0]


def quantize_checkpoint(src_dir: str | os.PathLike, dst_dir: str | os.PathLike,
                        mode: str = 'int8', *, overwrite: bool = False,
                        on_block=None) -> ModelConfig:
  """Writes float checkpoint `src_dir` with int8 weights (`mode`) as checkpoint `dst_dir`.

  Returns the destination's `ModelConfig` (`quantize=mode`). Raises
  ConversionError (naming the directory or tensor) if `src_dir` is not a
  float checkpoint, `mode` is unknown, a stored tensor does not match
  `model_config.json`, `dst_dir` exists without `overwrite`, or it is, holds or
  is inside `src_dir`. The result is written beside `dst_dir` and swapped in
  when complete: on failure an old `dst_dir` is left as it was.
  """
  src_dir, dst_dir = os.path.abspath(src_dir), os.path.abspath(dst_dir)
  if mode not in QUANTIZE_MODES or mode == 'none':
    raise ConversionError(f'quantize mode {mode!r}: choose from {QUANTIZE_MODES[1:]}')
  try:
    store.check_not_lora(src_dir)
    cfg = store.load_config(src_dir)
  except (ValueError, FileNotFoundError) as e:
    raise ConversionError(str(e)) from None
  if cfg.quantize != 'none':
    raise ConversionError(f'{src_dir}: already holds {cfg.quantize} weights')
  check_apart(src_dir, dst_dir)
  qcfg = cfg.replace(quantize=mode, scan_layers=True)
  stored = _orbax_stream.open_stored_arrays(store.params_dir(src_dir))
  fcfg = cfg.replace(scan_layers=True)
  axes, shapes = model_lib.param_logical_axes(fcfg), model_lib.abstract_params(fcfg)
  names = set(quant.quantized_names(qcfg))

  def leaf(path, shape):
    key = '/'.join(path)
    src = stored.get(key)
    if src is None or tuple(src.shape) != tuple(shape.shape):
      got = 'missing' if src is None else f'stored {tuple(src.shape)}'
      raise ConversionError(f'{src_dir}: {key}: {got}, {store.CONFIG_FILE} needs '
                            f'{tuple(shape.shape)}')
    one = _Leaf(src, _lookup(axes, path), tuple(shape.shape), cfg.param_dtype,
                path[-1] in names, path[-1])
    if not one.quantized:
      return one.lazy('', on_block)
    return {'qvalue': one.lazy('qvalue', on_block), 'scale': one.lazy('scale', on_block)}

  tree = _walk(shapes, leaf)
  with Destination(dst_dir, overwrite) as tmp:  # written beside, swapped in when complete
    _orbax_stream.save_streaming(store.params_dir(tmp), tree)
    store.write_config(tmp, qcfg.replace(scan_layers=cfg.scan_layers))
    store.copy_tokenizer_files(src_dir, tmp)
    for extra in (store.SOURCE_FILE,):
      if os.path.isfile(os.path.join(src_dir, extra)):
        shutil.copy2(os.path.join(src_dir, extra), tmp)
  return qcfg.replace(scan_layers=cfg.scan_layers)


def _lookup(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _walk(tree, fn, path=()):
  return {k: _walk(v, fn, path + (k,)) if isinstance(v, dict) else fn(path + (k,), v)
          for k, v in tree.items()}
