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
import itertools
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
from illada_jax.checkpoint._transpose import from_param, row_axis, to_param
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


@dataclasses.dataclass(frozen=True)
class _Block:
  """One outer chunk of a parameter and the Hugging Face rows it comes from."""
  index: Any  # into the stored array: a layer, a row range of a table, or ()
  hf: str  # HF tensor name
  rows: tuple[int, int]  # HF rows [r0, r1)
  shape: tuple[int, ...]  # of the block


def _param_blocks(m, cfg: ModelConfig, itemsize: int):
  """(write chunk, the dim of the stored array the HF rows run along, blocks) of parameter `m`."""
  shape = m.shape(cfg)
  dim = row_axis(m.kind, cfg)[0]
  if m.stacked:
    chunk = (1,) + shape[1:]
    return chunk, 1 + dim, [_Block(i, m.hf_name(i), (0, m.hf_shape[0]), chunk)
                            for i in range(cfg.num_layers)]
  if m.kind in ('copy', 'head') and len(shape) == 2:  # [V, D] / [D, V] tables: row blocks
    rows = _table_rows(cfg.d_model * itemsize, cfg.vocab_size)
    chunk = list(shape)
    chunk[dim] = rows
    blocks = []
    for r0, r1 in _blocks(cfg.vocab_size, rows):
      block = list(shape)
      block[dim] = r1 - r0
      index = slice(r0, r1) if dim == 0 else (slice(None), slice(r0, r1))
      blocks.append(_Block(index, m.hf_name(), (r0, r1), tuple(block)))
    return tuple(chunk), dim, blocks
  return shape, dim, [_Block((), m.hf_name(), (0, m.hf_shape[0]), shape)]


def _lazy_tree(src: HFSource, cfg: ModelConfig, prefs, progress) -> dict[str, Any]:
  """The parameter tree as `LazyArray`s that read, convert and hand over their blocks.

  Where every inner chunk is a block of HF rows (`default_read_chunk` splits
  only the dimension the rows run along), a block is handed over as
  `Pieces`: rows are read, transposed and written an inner chunk (<= 16 MB)
  at a time, so little memory is in flight (on the VM this was measured on,
  first touches of fresh memory were most of the converter's CPU time).
  Otherwise a block is converted whole.
  """
  dtype = np.dtype(cfg.param_dtype)
  tree: dict[str, Any] = {}
  for m in layout(cfg):
    chunk, split, blocks = _param_blocks(m, cfg, dtype.itemsize)
    read_chunk = _orbax_stream.default_read_chunk(
        chunk, dtype.itemsize, None if prefs is None else prefs[m.key], split_dim=split)
    streamed = all(r == c for d, (r, c) in enumerate(zip(read_chunk, chunk)) if d != split)
    make = _streamed_blocks if streamed else _whole_blocks
    leaf = _orbax_stream.LazyArray(
        m.shape(cfg), dtype, chunk,
        lambda m=m, make=make, blocks=blocks, read_chunk=read_chunk, split=split: make(
            src, cfg, m, blocks, read_chunk, split, progress),
        read_chunk=read_chunk, on_block=progress.add_bytes)
    node = tree
    for k in m.path[:-1]:
      node = node.setdefault(k, {})
    node[m.path[-1]] = leaf
  return tree


def _streamed_blocks(src, cfg, m, blocks, read_chunk, split, progress):
  """Blocks as `Pieces`, read and transposed by worker threads a few inner chunks ahead."""
  step = row_axis(m.kind, cfg)[1]
  per = read_chunk[split] * step  # HF rows per inner chunk

  def reads():
    for b in blocks:
      for r0 in range(b.rows[0], b.rows[1], per):
        r1 = min(b.rows[1], r0 + per)
        cut = b.shape[:split] + ((r1 - r0) // step,) + b.shape[split + 1:]
        yield cut, read_tensor(src.entries[b.hf], (r0, r1), pool=_rawio.POOL), r1
      if b.rows[1] == m.hf_shape[0]:
        progress.tensor_done()

  def pieces():
    for cut, a, _ in _rawio.in_background(reads(), depth=4):
      yield to_param(m.kind, a, cfg).reshape(cut)

  # Three threads: reading, transposing (itself on two) and, in the caller, writing.
  flat = _rawio.in_background(pieces(), depth=4)
  for b in blocks:
    count = -(-b.shape[split] // read_chunk[split])
    yield b.index, _orbax_stream.Pieces(b.shape, read_chunk, itertools.islice(flat, count))


def _whole_blocks(src, cfg, m, blocks, read_chunk, split, progress):
  """Blocks converted whole, in a worker thread one or two ahead of the writer."""
  def convert():
    for b in blocks:
      rows = None if b.rows == (0, m.hf_shape[0]) else b.rows
      a = read_tensor(src.entries[b.hf], rows, pool=_rawio.POOL)
      yield b.index, to_param(m.kind, a, cfg).reshape(b.shape)
      if b.rows[1] == m.hf_shape[0]:
        progress.tensor_done()
  return _rawio.in_background(convert())


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
  """The HF tensors of a stored checkpoint, in layer order, each read block by block.

  Where the stored inner chunks are blocks of HF rows (as `hf_to_orbax`
  writes them), a tensor is read, transposed and written one inner chunk at
  a time; otherwise one layer (or table row block) at a time.
  """
  maps = {m.key: m for m in layout(cfg)}
  raws = {key: _rawio.RawZarr3.open(array) for key, array in arrays.items()}
  plan: list[tuple[str, tuple]] = []  # every read, in the order the chunks below ask for them
  read = _ReadAhead(arrays, raws, plan)
  itemsize = {key: np.dtype(a.dtype.numpy_dtype).itemsize for key, a in arrays.items()}

  def tensor(name, m, block):
    """OutTensor `name`: the HF rows of `block` (a `_Block` of `m`), read a few at a time."""
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
    chunks[m.key], _, blocks[m.key] = _param_blocks(m, cfg, itemsize[m.key])
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
  through TensorStore for layouts `_rawio.RawZarr3` does not take) with
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

