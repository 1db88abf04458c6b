"""Hugging Face safetensors <-> checkpoint directory conversion, streaming, both families.

`hf_to_orbax` reads a Hugging Face directory (`config.json`, one
`model.safetensors` or shards with `model.safetensors.index.json`, tokenizer
files) of the iLLaDA (Llama names) or LLaDA (OLMo names) layout and writes a
checkpoint directory (`store`); `orbax_to_hf` goes back. Either way memory
holds a few tensors, never the model:

* safetensors are read one tensor (or one row block of a [V, D] table) at a
  time (`safetensors_io`), renamed and re-laid out by `hf_names` and
  `_transpose`, and written leaf by leaf into the Orbax item
  (`_orbax_stream.save_streaming`: each layer's tensor becomes one slice of
  its stacked leaf);
* going back, stored arrays are read slice by slice and streamed into
  safetensors shards whose headers are computed before any data.

Every input problem raises `ConversionError` naming the file and tensor,
before anything is written where possible; output goes to a temporary
sibling directory renamed into place at the end and removed on failure.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np
import tensorstore as ts
from tqdm.auto import tqdm

from illada_jax import sharding as sharding_lib
from illada_jax.checkpoint import _orbax_stream, _rawio, store
from illada_jax.checkpoint._transpose import from_param, to_param
from illada_jax.checkpoint.errors import ConversionError
from illada_jax.checkpoint.hf_names import embedding_name, head_name, layout
from illada_jax.checkpoint.safetensors_io import (ST_DTYPES, HFSource, OutTensor, parse_size,
                                                  read_tensor, write_safetensors)
from illada_jax.config import ModelConfig

# Row blocks of the [V, D] tables: bounded memory, aligned outer chunks.
_TABLE_BLOCK_BYTES = 64 << 20


def _table_rows(row_bytes: int, rows: int) -> int:
  """Rows per block of a [rows, ...] table: a power of two within _TABLE_BLOCK_BYTES."""
  r = 1
  while r * 2 * row_bytes <= _TABLE_BLOCK_BYTES and r * 2 <= rows:
    r *= 2
  return r


def _blocks(rows: int, block: int) -> Iterator[tuple[int, int]]:
  for r0 in range(0, rows, block):
    yield r0, min(rows, r0 + block)


# -- HF -> Orbax -------------------------------------------------------------------

def _check_source(src: HFSource, cfg: ModelConfig) -> bool:
  """Checks names, dtypes and shapes against `cfg`; returns whether a tied head is stored."""
  maps = layout(cfg)
  want = {}
  for m in maps:
    for i in (range(cfg.num_layers) if m.stacked else [None]):
      want[m.hf_name(i)] = m.hf_shape
  head = head_name(cfg)
  tied_head = cfg.tie_embeddings and head in src.entries
  if tied_head:
    want[head] = (cfg.vocab_size, cfg.d_model)
  what = (f'config.json: {cfg.family} layout, {cfg.num_layers} layers, '
          f'{"tied" if cfg.tie_embeddings else "untied"} head')
  missing = [n for n in want if n not in src.entries]
  if missing:
    raise ConversionError(f'{src.dir}: tensor {missing[0]} is missing ({len(missing)} missing '
                          f'in all; {what})')
  for name, entry in src.entries.items():
    if name not in want:
      raise ConversionError(f'{entry.file}: unexpected tensor {name} (not a parameter of the '
                            f'{what})')
  for name, shape in want.items():
    entry = src.entries[name]
    if entry.dtype not in ST_DTYPES:
      raise ConversionError(f'{entry.file}: tensor {name}: unsupported dtype {entry.dtype} '
                            f'(supported: {", ".join(ST_DTYPES)})')
    if entry.shape != tuple(shape):
      raise ConversionError(f'{entry.file}: tensor {name} has shape {list(entry.shape)}, '
                            f'expected {list(shape)} from {what}')
  if tied_head:
    _check_tied(src, cfg, head, embedding_name(cfg))
  return tied_head


def _check_tied(src: HFSource, cfg: ModelConfig, head: str, embed: str):
  h, e = src.entries[head], src.entries[embed]
  block = _table_rows(cfg.d_model * 4, cfg.vocab_size)
  for rows in _blocks(cfg.vocab_size, block):
    a, b = read_tensor(h, rows), read_tensor(e, rows)
    if a.dtype != b.dtype or not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
      raise ConversionError(
          f'{h.file}: tensor {head} differs from {embed}, but config.json ties the head to '
          'the embedding; set tie_word_embeddings (weight_tying) to false to keep both')


def _read_chunk_prefs(cfg: ModelConfig, mesh_shape) -> dict[str, tuple[int, ...]] | None:
  """Per-parameter shard shape on a mesh of `mesh_shape` (no devices needed)."""
  if mesh_shape is None:
    return None
  sizes = sharding_lib.parse_mesh_shape(mesh_shape)
  if any(s < 1 for s in sizes.values()):
    raise ConversionError(f'--mesh {mesh_shape}: give every axis a positive size')
  from illada_jax import model as model_lib  # jax tracing; only needed here
  import jax
  axes = model_lib.param_logical_axes(cfg)
  out = {}
  for keys, names in jax.tree_util.tree_flatten_with_path(
      axes, is_leaf=lambda x: isinstance(x, tuple))[0]:
    spec = sharding_lib.logical_to_spec(names)
    key = '/'.join(str(k.key) for k in keys)
    m = next(m for m in layout(cfg) if m.key == key)
    shard = []
    for dim, ax in zip(m.shape(cfg), tuple(spec) + (None,) * len(names)):
      ways = math.prod(sizes[a] for a in ((ax,) if isinstance(ax, str) else (ax or ())))
      shard.append(dim // ways if dim % ways == 0 else dim)
    out[key] = tuple(shard)
  return out


def _lazy_tree(src: HFSource, cfg: ModelConfig, prefs, progress) -> dict[str, Any]:
  dtype = np.dtype(cfg.param_dtype)
  tree: dict[str, Any] = {}
  for m in layout(cfg):
    shape = m.shape(cfg)
    if m.stacked:
      write_chunk = (1,) + shape[1:]

      def blocks(m=m):
        for i in range(cfg.num_layers):
          p = to_param(m.kind, read_tensor(src.entries[m.hf_name(i)], pool=_rawio.POOL), cfg)
          progress.tensor_done()
          yield i, p
    elif m.kind in ('copy', 'head') and len(shape) == 2:
      rows = _table_rows(cfg.d_model * dtype.itemsize, cfg.vocab_size)
      write_chunk = (rows, shape[1]) if m.kind == 'copy' else (shape[0], rows)

      def blocks(m=m, rows=rows):
        entry = src.entries[m.hf_name()]
        for r0, r1 in _blocks(cfg.vocab_size, rows):
          a = read_tensor(entry, (r0, r1), pool=_rawio.POOL)
          index = slice(r0, r1) if m.kind == 'copy' else (slice(None), slice(r0, r1))
          yield index, to_param(m.kind, a, cfg)
        progress.tensor_done()
    else:
      write_chunk = shape

      def blocks(m=m):
        a = read_tensor(src.entries[m.hf_name()])
        progress.tensor_done()
        yield (), to_param(m.kind, a, cfg)
    read_chunk = _orbax_stream.default_read_chunk(write_chunk, dtype.itemsize,
                                                  None if prefs is None else prefs[m.key])
    # Blocks are read and transposed in a worker thread, one or two ahead of
    # TensorStore writing the previous ones: the two halves overlap.
    ahead = lambda blocks=blocks: _rawio.in_background(blocks())
    leaf = _orbax_stream.LazyArray(shape, dtype, write_chunk, ahead, read_chunk=read_chunk,
                                   on_block=progress.add_bytes)
    node = tree
    for k in m.path[:-1]:
      node = node.setdefault(k, {})
    node[m.path[-1]] = leaf
  return tree


class _Progress:
  """tqdm over bytes written, with tensors done in the postfix (thread-safe enough)."""

  def __init__(self, total_bytes: int, total_tensors: int, desc: str, enabled: bool):
    self.bar = tqdm(total=total_bytes, unit='B', unit_scale=True, unit_divisor=1024,
                    desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.1)
    self.tensors, self.total_tensors = 0, total_tensors

  def tensor_done(self):
    self.tensors += 1
    self.bar.set_postfix_str(f'{self.tensors}/{self.total_tensors} tensors', refresh=False)

  def add_bytes(self, n: int):
    self.bar.update(n)

  def close(self):
    self.bar.close()


class _Destination:
  """A temporary sibling of `dst`: renamed onto it if the `with` block succeeds, else removed."""

  def __init__(self, dst: str | os.PathLike, overwrite: bool):
    self.dst = os.path.abspath(dst)
    if os.path.lexists(self.dst) and not overwrite:
      raise ConversionError(f'{self.dst}: destination exists (pass --overwrite to replace it)')
    parent = os.path.dirname(self.dst)
    if not os.path.isdir(parent):
      raise ConversionError(f'{parent}: parent directory of the destination does not exist')
    self.tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(self.dst)}.tmp-', dir=parent)
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
      if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
      else:
        os.remove(old)
    else:
      os.rename(self.tmp, self.dst)
    return False


def hf_to_orbax(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, *,
                dtype: str = 'bfloat16', mesh: str | None = None, overwrite: bool = False,
                progress: bool = True) -> ModelConfig:
  """Converts a Hugging Face directory of either family to a checkpoint directory.

  `dtype` is the stored parameter dtype (`cfg.param_dtype`). `mesh`
  ('data=1,fsdp=8,tensor=1') picks inner chunks that match one device's
  shard on that mesh, so restoring there reads no more than it needs.
  Returns the model config. Raises ConversionError on any bad input.
  """
  if dtype not in ('bfloat16', 'float32', 'float16'):
    raise ConversionError(f'--dtype {dtype}: expected bfloat16, float32 or float16')
  src = HFSource(src_dir)
  cfg = src.config(param_dtype=dtype)
  try:
    prefs = _read_chunk_prefs(cfg, mesh)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  tied_head = _check_source(src, cfg)
  maps = layout(cfg)
  itemsize = np.dtype(dtype).itemsize
  total_bytes = sum(math.prod(m.shape(cfg)) for m in maps) * itemsize
  total_tensors = sum(cfg.num_layers if m.stacked else 1 for m in maps)
  with _Destination(dst_dir, overwrite) as tmp:
    bar = _Progress(total_bytes, total_tensors, 'hf-to-orbax', progress)
    try:
      _orbax_stream.save_streaming(store.params_dir(tmp), _lazy_tree(src, cfg, prefs, bar))
    except ConversionError:
      raise
    except Exception as e:  # Orbax re-raises from its worker thread with context lost
      raise ConversionError(f'{src.dir}: writing {dst_dir} failed: {e!r}') from e
    finally:
      bar.close()
    store.write_config(tmp, cfg)
    dtypes = sorted({src.entries[m.hf_name(0 if m.stacked else None)].dtype for m in maps})
    store.write_json(os.path.join(tmp, store.SOURCE_FILE), {
        'family': cfg.family, 'tied_head_stored': tied_head, 'source_dtypes': dtypes,
        'source_dir': src.dir})
    store.copy_tokenizer_files(src.dir, tmp)
  return cfg


# -- Orbax -> HF -------------------------------------------------------------------

def _out_tensors(cfg: ModelConfig, arrays, tied_head: bool) -> list[OutTensor]:
  """The HF tensors of a stored checkpoint, in layer order, each read slice by slice."""
  maps = {m.key: m for m in layout(cfg)}
  layer_reads = [(m.key, i) for i in range(cfg.num_layers) for m in maps.values() if m.stacked]
  read = _ReadAhead(arrays, layer_reads)

  def table(key, kind):
    rows = _table_rows(cfg.d_model * 4, cfg.vocab_size)

    def chunks():
      for r0, r1 in _blocks(cfg.vocab_size, rows):
        index = slice(r0, r1) if kind == 'copy' else (slice(None), slice(r0, r1))
        yield from_param(kind, read(key, index))
    return chunks

  def one(m, i):
    return lambda: [from_param(m.kind, read(m.key, () if i is None else i))]

  dtype = lambda key: np.dtype(arrays[key].dtype.numpy_dtype)
  e = maps['embedder/embedding']
  out = [OutTensor(e.hf_name(), dtype(e.key), e.hf_shape, table(e.key, 'copy'))]
  for i in range(cfg.num_layers):
    out += [OutTensor(m.hf_name(i), dtype(m.key), m.hf_shape, one(m, i))
            for m in maps.values() if m.stacked]
  fn = maps['final_norm/scale']
  out.append(OutTensor(fn.hf_name(), dtype(fn.key), fn.hf_shape, one(fn, None)))
  if 'lm_head' in maps:
    m = maps['lm_head']
    out.append(OutTensor(m.hf_name(), dtype(m.key), m.hf_shape, table(m.key, 'head')))
  elif tied_head:
    out.append(OutTensor(head_name(cfg), dtype(e.key), e.hf_shape, table(e.key, 'copy')))
  return out


class _ReadAhead:
  """Reads `arrays[key][index]`; after a read listed in `order`, starts the next one.

  Overlaps reading the next layer tensor (directly from the shard files, or
  through TensorStore for layouts `_rawio.RawZarr3` does not take) with
  transposing and writing this one, holding at most one tensor extra.
  """

  def __init__(self, arrays, order: list[tuple[str, int]]):
    self.arrays, self.order = arrays, order
    self.position = {k: n for n, k in enumerate(order)}
    self.started: dict[tuple[str, int], Any] = {}
    self.raw = {key: _rawio.RawZarr3.open(array) for key, array in arrays.items()}
    self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='read_ahead')

  def __call__(self, key: str, index) -> np.ndarray:
    k = (key, index) if isinstance(index, int) else None
    pending = self.started.pop(k, None) if k else None
    pending = pending or self._start(key, index)
    n = self.position.get(k) if k else None
    if n is not None and n + 1 < len(self.order):
      nk, ni = self.order[n + 1]
      if (nk, ni) not in self.started:
        self.started[(nk, ni)] = self._start(nk, ni)
    return pending.result()

  def _start(self, key: str, index) -> concurrent.futures.Future:
    return self.executor.submit(self._read, key, index)

  def _read(self, key: str, index) -> np.ndarray:
    raw = self.raw[key]
    out = raw.read(index, _rawio.POOL) if raw is not None else None
    if out is None:  # into a pooled buffer, not one TensorStore allocates
      view = self.arrays[key][index]
      out = _rawio.POOL.empty(tuple(view.shape), view.dtype.numpy_dtype)
      ts.array(out, copy=False, write=True).write(view).result()
    return out


def orbax_to_hf(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, *,
                shard_size: str | int = '5GB', overwrite: bool = False,
                progress: bool = True) -> ModelConfig:
  """Converts a checkpoint directory back to a Hugging Face directory of its family.

  Writes `config.json` (`cfg.to_hf()`), safetensors shards of at most
  `shard_size`, `model.safetensors.index.json` and the tokenizer files. A
  tied head is written only if the converted source had one
  (`hf_source.json`). Raises ConversionError on any bad input.
  """
  src = os.path.abspath(src_dir)
  shard_bytes = parse_size(shard_size)
  try:
    cfg = store.load_config(src)
    arrays = _orbax_stream.open_stored_arrays(store.params_dir(src))
  except (OSError, ValueError) as e:
    raise ConversionError(f'{src}: not a readable checkpoint ({e})') from None
  maps = layout(cfg)
  for m in maps:
    if m.key not in arrays:
      raise ConversionError(f'{src}: parameter {m.key} is missing')
    if tuple(arrays[m.key].shape) != m.shape(cfg):
      raise ConversionError(f'{src}: parameter {m.key} has shape {list(arrays[m.key].shape)}, '
                            f'{store.CONFIG_FILE} implies {list(m.shape(cfg))}')
  extra = sorted(set(arrays) - {m.key for m in maps})
  if extra:
    raise ConversionError(f'{src}: unexpected parameter {extra[0]}')
  source = {}
  source_path = os.path.join(src, store.SOURCE_FILE)
  if os.path.isfile(source_path):
    with open(source_path) as f:
      source = json.load(f)
  tensors = _out_tensors(cfg, arrays, bool(source.get('tied_head_stored', False)))
  stored_dtype = str(np.dtype(arrays['embedder/embedding'].dtype.numpy_dtype))
  with _Destination(dst_dir, overwrite) as tmp:
    bar = _Progress(sum(t.nbytes for t in tensors), len(tensors), 'orbax-to-hf', progress)
    try:
      write_safetensors(tmp, _counting(tensors, bar), shard_bytes, bar.add_bytes)
    finally:
      bar.close()
    hf = cfg.replace(param_dtype=stored_dtype).to_hf()
    store.write_json(os.path.join(tmp, 'config.json'), hf)
    store.copy_tokenizer_files(src, tmp)
  return cfg


def _counting(tensors: list[OutTensor], bar: _Progress) -> list[OutTensor]:
  def wrap(t):
    def chunks():
      yield from t.chunks()
      bar.tensor_done()
    return dataclasses.replace(t, chunks=chunks)
  return [wrap(t) for t in tensors]

