"""Hugging Face safetensors <-> Orbax conversion, streaming, for both families.

`hf_to_orbax` reads a Hugging Face directory (`config.json`, one
`model.safetensors` or shards with `model.safetensors.index.json`, tokenizer
files) of the iLLaDA (Llama names) or LLaDA (OLMo names) layout and writes a
checkpoint directory of `illada_jax.checkpoint`; `orbax_to_hf` goes back.
Either way memory holds a few tensors, never the model:

* Safetensors files are read by their header offsets straight into numpy
  buffers (`readinto`): no pickle, no `safetensors` numpy API (which has no
  bfloat16), one tensor (or one row block of a [V, D] table) at a time.
* The Orbax side is written leaf by leaf with `checkpoint.save_streaming`
  (each layer's tensor becomes one slice of its stacked leaf) and read back
  slice by slice with TensorStore.
* Safetensors output is streamed: the header is computed from the config
  before any data, then tensors are appended in order.

Every input problem raises `ConversionError` naming the file and tensor,
before anything is written where possible; output goes to a temporary
sibling directory renamed into place at the end and removed on failure.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import math
import os
import queue
import re
import shutil
import tempfile
import threading
from typing import Any, Callable, Iterable, Iterator

import ml_dtypes
import numpy as np
import tensorstore as ts
from tqdm.auto import tqdm

from illada_jax import checkpoint as ckpt_lib
from illada_jax import rawio
from illada_jax import sharding as sharding_lib
from illada_jax.config import ModelConfig


class ConversionError(ValueError):
  """A checkpoint cannot be converted; the message names the file and tensor."""


ST_DTYPES = {'BF16': np.dtype(ml_dtypes.bfloat16), 'F16': np.dtype(np.float16),
             'F32': np.dtype(np.float32)}
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
HF_INDEX = 'model.safetensors.index.json'
HF_SINGLE = 'model.safetensors'
_PICKLE_PATTERNS = ('*.bin', '*.pt', '*.pth', '*.ckpt', '*.pkl')
# Row blocks of the [V, D] tables: bounded memory, aligned outer chunks.
_TABLE_BLOCK_BYTES = 64 << 20


# -- safetensors reading -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """One tensor of a safetensors file: where its bytes are, as the header says."""
  name: str
  file: str
  dtype: str  # safetensors dtype name, e.g. 'BF16'
  shape: tuple[int, ...]
  offset: int  # absolute byte offset in `file`
  nbytes: int


def read_header(path: str) -> dict[str, TensorEntry]:
  """Parses and checks a safetensors header; raises ConversionError if truncated or malformed."""
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConversionError(f'{path}: truncated safetensors file ({size} bytes)')
    n = int.from_bytes(head, 'little')
    if n > size - 8:
      raise ConversionError(f'{path}: truncated safetensors file: header of {n} bytes, '
                            f'file has {size} bytes')
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f'{path}: safetensors header is not valid JSON ({e})') from None
  if not isinstance(header, dict):
    raise ConversionError(f'{path}: safetensors header is not a JSON object')
  entries = {}
  for name, e in header.items():
    if name == '__metadata__':
      continue
    try:
      dtype, shape = str(e['dtype']), tuple(int(d) for d in e['shape'])
      begin, end = (int(x) for x in e['data_offsets'])
    except (KeyError, TypeError, ValueError):
      raise ConversionError(f'{path}: tensor {name}: malformed header entry {e!r}') from None
    if not 0 <= begin <= end:
      raise ConversionError(f'{path}: tensor {name}: bad data_offsets {[begin, end]}')
    if 8 + n + end > size:
      raise ConversionError(f'{path}: truncated safetensors file: tensor {name} ends at byte '
                            f'{8 + n + end}, file has {size} bytes')
    if dtype in ST_DTYPES and end - begin != math.prod(shape) * ST_DTYPES[dtype].itemsize:
      raise ConversionError(f'{path}: tensor {name}: {end - begin} bytes do not hold '
                            f'{dtype}{list(shape)}')
    entries[name] = TensorEntry(name, path, dtype, shape, 8 + n + begin, end - begin)
  return entries


def read_tensor(entry: TensorEntry, rows: tuple[int, int] | None = None,
                pool: rawio.BufferPool | None = None) -> np.ndarray:
  """The tensor (or its rows `[r0, r1)` along axis 0) as a numpy array (from `pool`)."""
  dtype = ST_DTYPES[entry.dtype]
  shape, offset = entry.shape, entry.offset
  if rows is not None:
    r0, r1 = rows
    offset += r0 * math.prod(shape[1:]) * dtype.itemsize
    shape = (r1 - r0,) + shape[1:]
  nbytes = math.prod(shape) * dtype.itemsize
  if pool is not None and nbytes >= pool.MIN_BYTES:
    out = _read_direct(entry, offset, nbytes, pool)
    if out is not None:
      return out.view(dtype).reshape(shape)
  out = pool.empty(shape, dtype) if pool is not None else np.empty(shape, dtype)
  buf = memoryview(out.reshape(-1).view(np.uint8))
  with open(entry.file, 'rb', buffering=0) as f:
    f.seek(offset)
    done = 0
    while done < len(buf):
      got = f.readinto(buf[done:done + rawio.READ_CALL_BYTES])
      if not got:
        raise ConversionError(f'{entry.file}: truncated while reading tensor {entry.name}')
      done += got
  return out


def _read_direct(entry: TensorEntry, offset: int, nbytes: int,
                 pool: rawio.BufferPool) -> np.ndarray | None:
  """Bytes `[offset, offset + nbytes)` of the file read with `O_DIRECT` (uint8, from `pool`).

  Skips the page cache: no copy out of it, and no fresh cache pages to
  allocate (on this machine the kernel's part of a buffered read costs about
  as much CPU as the rest of hf-to-orbax's reading). None where the
  filesystem refuses `O_DIRECT`.
  """
  if not hasattr(os, 'O_DIRECT'):
    return None
  try:
    fd = os.open(entry.file, os.O_RDONLY | os.O_DIRECT | getattr(os, 'O_CLOEXEC', 0))
  except OSError:
    return None
  try:
    out = rawio.pread_aligned(fd, offset, nbytes, pool)
  except OSError:
    return None
  finally:
    os.close(fd)
  if out is None:
    raise ConversionError(f'{entry.file}: truncated while reading tensor {entry.name}')
  return out


class HFSource:
  """The safetensors tensors of a Hugging Face directory, by name (headers only)."""

  def __init__(self, directory: str | os.PathLike):
    self.dir = os.path.abspath(directory)
    if not os.path.isdir(self.dir):
      raise ConversionError(f'{self.dir}: not a directory')
    index_path = os.path.join(self.dir, HF_INDEX)
    if os.path.isfile(index_path):
      files, weight_map = self._read_index(index_path)
    elif os.path.isfile(os.path.join(self.dir, HF_SINGLE)):
      files, weight_map = [HF_SINGLE], None
    else:
      pickles = sorted(os.path.basename(p) for pat in _PICKLE_PATTERNS
                       for p in glob.glob(os.path.join(glob.escape(self.dir), pat)))
      if pickles:
        raise ConversionError(
            f'{self.dir}: only PyTorch pickle files ({", ".join(pickles[:3])}) found. '
            'Pickles are never loaded here (unpickling runs arbitrary code); convert them '
            'to safetensors first (e.g. `model.save_pretrained(dir, safe_serialization=True)`).')
      raise ConversionError(f'{self.dir}: no {HF_SINGLE} or {HF_INDEX}')
    self.entries: dict[str, TensorEntry] = {}
    for file in files:
      for name, entry in read_header(os.path.join(self.dir, file)).items():
        if name in self.entries:
          raise ConversionError(f'{entry.file}: tensor {name} also stored in '
                                f'{self.entries[name].file}')
        self.entries[name] = entry
    for name, file in (weight_map or {}).items():
      if name not in self.entries or os.path.basename(self.entries[name].file) != file:
        raise ConversionError(f'{index_path}: maps tensor {name} to {file}, '
                              'but that file has no such tensor')

  def _read_index(self, index_path):
    try:
      with open(index_path) as f:
        weight_map = json.load(f)['weight_map']
      files = sorted(set(weight_map.values()))
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
      raise ConversionError(f'{index_path}: not a valid safetensors index ({e})') from None
    for file in files:
      if not os.path.isfile(os.path.join(self.dir, file)):
        name = next(n for n, f in weight_map.items() if f == file)
        raise ConversionError(f'{index_path}: names shard {file} (e.g. for tensor {name}), '
                              'which does not exist')
    return files, weight_map

  def config(self, **overrides) -> ModelConfig:
    path = os.path.join(self.dir, 'config.json')
    if not os.path.isfile(path):
      raise ConversionError(f'{self.dir}: no config.json')
    try:
      return ModelConfig.from_hf_file(path, **overrides)
    except ValueError as e:
      raise ConversionError(str(e)) from None


# -- the name and layout mapping ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamMap:
  """One parameter of the tree and its Hugging Face tensor(s).

  `kind` says how an HF tensor (PyTorch `[out, in]`) becomes the parameter
  (per layer when `stacked`): 'copy' as is; 'qkv' `[X*Dh, D] -> [D, X, Dh]`;
  'o' `[D, H*Dh] -> [H, Dh, D]`; 'linear' `[out, in] -> [in, out]`;
  'head' `[V, D] -> [D, V]`.
  """
  path: tuple[str, ...]
  hf: str  # HF name; '{i}' stands for the layer index when stacked
  kind: str
  hf_shape: tuple[int, ...]  # per layer
  stacked: bool = False

  @property
  def key(self) -> str:
    return '/'.join(self.path)

  def hf_name(self, i: int | None = None) -> str:
    return self.hf.format(i=i)

  def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
    """The parameter's shape (with the leading layer axis when stacked)."""
    a, b = self.hf_shape[0], self.hf_shape[-1]
    per_layer = {
        'copy': self.hf_shape,
        'qkv': (b, a // cfg.head_dim, cfg.head_dim),
        'o': (b // cfg.head_dim, cfg.head_dim, a),
        'linear': (b, a),
        'head': (b, a),
    }[self.kind]
    return ((cfg.num_layers,) if self.stacked else ()) + tuple(per_layer)


_LLAMA = {
    'embed': 'model.embed_tokens.weight', 'layer': 'model.layers.{i}.',
    'attn_norm': 'input_layernorm.weight', 'q': 'self_attn.q_proj.weight',
    'k': 'self_attn.k_proj.weight', 'v': 'self_attn.v_proj.weight',
    'o': 'self_attn.o_proj.weight', 'mlp_norm': 'post_attention_layernorm.weight',
    'gate': 'mlp.gate_proj.weight', 'up': 'mlp.up_proj.weight', 'down': 'mlp.down_proj.weight',
    'final_norm': 'model.norm.weight', 'head': 'lm_head.weight',
}
# OLMo names: ff_proj is the gate (through silu), up_proj the up, ff_out the down.
_OLMO = {
    'embed': 'model.transformer.wte.weight', 'layer': 'model.transformer.blocks.{i}.',
    'attn_norm': 'attn_norm.weight', 'q': 'q_proj.weight', 'k': 'k_proj.weight',
    'v': 'v_proj.weight', 'o': 'attn_out.weight', 'mlp_norm': 'ff_norm.weight',
    'gate': 'ff_proj.weight', 'up': 'up_proj.weight', 'down': 'ff_out.weight',
    'final_norm': 'model.transformer.ln_f.weight', 'head': 'model.transformer.ff_out.weight',
}


def head_name(cfg: ModelConfig) -> str:
  """The HF name of the LM head of `cfg.family`."""
  return (_LLAMA if cfg.family == 'illada' else _OLMO)['head']


def layout(cfg: ModelConfig) -> list[ParamMap]:
  """Every parameter of `cfg` with its HF name and shape, in HF file order."""
  n = _LLAMA if cfg.family == 'illada' else _OLMO
  d, h, k, dh, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.mlp_hidden, cfg.vocab_size)
  layer = lambda path, name, kind, shape: ParamMap(('layers',) + path, n['layer'] + n[name],
                                                   kind, shape, stacked=True)
  maps = [
      ParamMap(('embedder', 'embedding'), n['embed'], 'copy', (v, d)),
      layer(('attn_norm', 'scale'), 'attn_norm', 'copy', (d,)),
      layer(('attn', 'q_proj'), 'q', 'qkv', (h * dh, d)),
      layer(('attn', 'k_proj'), 'k', 'qkv', (k * dh, d)),
      layer(('attn', 'v_proj'), 'v', 'qkv', (k * dh, d)),
      layer(('attn', 'o_proj'), 'o', 'o', (d, h * dh)),
      layer(('mlp_norm', 'scale'), 'mlp_norm', 'copy', (d,)),
      layer(('mlp', 'gate_proj'), 'gate', 'linear', (f, d)),
      layer(('mlp', 'up_proj'), 'up', 'linear', (f, d)),
      layer(('mlp', 'down_proj'), 'down', 'linear', (d, f)),
      ParamMap(('final_norm', 'scale'), n['final_norm'], 'copy', (d,)),
  ]
  if not cfg.tie_embeddings:
    maps.append(ParamMap(('lm_head',), n['head'], 'head', (v, d)))
  return maps


def to_param(kind: str, a: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """HF tensor (one layer) -> parameter slice, C-contiguous (transposed by `transpose2d`).

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
  """Inverse of `to_param`: parameter slice -> contiguous HF tensor."""
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


def transpose2d(a: np.ndarray, pool: rawio.BufferPool | None = rawio.POOL) -> np.ndarray:
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
      scratch = np.empty((block // g, cols, g), u)
      for r0 in range(r_begin, r_end, block):
        n = (min(r_end, r0 + block) - r0) // g
        rows_gC = src[r0:r0 + n * g]
        for j in range(g):
          scratch[:n, :, j] = rows_gC[j::g]
        w = scratch[:n].view(_WORD).reshape(n, cols)
        k0 = r0 // g
        for k in range(0, n, 8):
          words[:, k0 + k:k0 + min(n, k + 8)] = w[k:k + 8].T

    if a.nbytes < (8 << 20) or packed < 2 * block:
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
    _check_tied(src, cfg, head, maps[0].hf)
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
          p = to_param(m.kind, read_tensor(src.entries[m.hf_name(i)], pool=rawio.POOL), cfg)
          progress.tensor_done()
          yield i, p
    elif m.kind in ('copy', 'head') and len(shape) == 2:
      rows = _table_rows(cfg.d_model * dtype.itemsize, cfg.vocab_size)
      write_chunk = (rows, shape[1]) if m.kind == 'copy' else (shape[0], rows)

      def blocks(m=m, rows=rows):
        entry = src.entries[m.hf_name()]
        for r0, r1 in _blocks(cfg.vocab_size, rows):
          a = read_tensor(entry, (r0, r1), pool=rawio.POOL)
          index = slice(r0, r1) if m.kind == 'copy' else (slice(None), slice(r0, r1))
          yield index, to_param(m.kind, a, cfg)
        progress.tensor_done()
    else:
      write_chunk = shape

      def blocks(m=m):
        a = read_tensor(src.entries[m.hf_name()])
        progress.tensor_done()
        yield (), to_param(m.kind, a, cfg)
    read_chunk = ckpt_lib.default_read_chunk(write_chunk, dtype.itemsize,
                                             None if prefs is None else prefs[m.key])
    # Blocks are read and transposed in a worker thread, one or two ahead of
    # TensorStore writing the previous ones: the two halves overlap.
    ahead = lambda blocks=blocks: _in_background(blocks())
    leaf = ckpt_lib.LazyArray(shape, dtype, write_chunk, ahead, read_chunk=read_chunk,
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
  """A temporary sibling of `dst`, renamed onto `dst` by `commit`, removed on failure."""

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
      ckpt_lib.save_streaming(ckpt_lib.params_dir(tmp), _lazy_tree(src, cfg, prefs, bar))
    except ConversionError:
      raise
    except Exception as e:  # Orbax re-raises from its worker thread with context lost
      raise ConversionError(f'{src.dir}: writing {dst_dir} failed: {e!r}') from e
    finally:
      bar.close()
    ckpt_lib.write_json(os.path.join(tmp, ckpt_lib.CONFIG_FILE), cfg.to_dict())
    dtypes = sorted({src.entries[m.hf_name(0 if m.stacked else None)].dtype for m in maps})
    ckpt_lib.write_json(os.path.join(tmp, ckpt_lib.SOURCE_FILE), {
        'family': cfg.family, 'tied_head_stored': tied_head, 'source_dtypes': dtypes,
        'source_dir': src.dir})
    ckpt_lib.copy_tokenizer_files(src.dir, tmp)
  return cfg


# -- Orbax -> HF -------------------------------------------------------------------

@dataclasses.dataclass
class OutTensor:
  """A tensor to write to safetensors; `chunks()` yields its C-order data in pieces."""
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  chunks: Callable[[], Iterable[np.ndarray]]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def parse_size(text: str | int) -> int:
  """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, '1024' -> 1024 (Hugging Face's units)."""
  if isinstance(text, int):
    return text
  m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*', text.upper())
  if not m:
    raise ConversionError(f'--shard-size {text!r}: expected e.g. 5GB, 500MB, 2GiB')
  unit = m.group(2).rstrip('B') or 'B'
  scale = {'B': 1, 'K': 10**3, 'M': 10**6, 'G': 10**9, 'T': 10**12,
           'KI': 2**10, 'MI': 2**20, 'GI': 2**30, 'TI': 2**40}[unit]
  size = int(float(m.group(1)) * scale)
  if size <= 0:
    raise ConversionError(f'--shard-size {text!r}: must be positive')
  return size


def write_safetensors(dst_dir: str, tensors: list[OutTensor], shard_size: int,
                      on_bytes: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Streams `tensors` into `model-0000k-of-0000n.safetensors` shards; returns the index.

  Shards are filled in order up to `shard_size` bytes of data (a larger
  tensor gets a shard of its own). The header is computed up front, so each
  tensor's data is appended as it is produced.
  """
  shards: list[list[OutTensor]] = [[]]
  size = 0
  for t in tensors:
    if shards[-1] and size + t.nbytes > shard_size:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  n = len(shards)
  weight_map = {}
  headers = []
  for k, shard in enumerate(shards, 1):
    fname = f'model-{k:05d}-of-{n:05d}.safetensors'
    header: dict[str, Any] = {'__metadata__': {'format': 'pt'}}
    offset = 0
    for t in shard:
      if np.dtype(t.dtype) not in _ST_NAMES:
        raise ConversionError(f'tensor {t.name}: dtype {np.dtype(t.dtype)} has no '
                              'safetensors equivalent here')
      header[t.name] = {'dtype': _ST_NAMES[np.dtype(t.dtype)], 'shape': list(t.shape),
                        'data_offsets': [offset, offset + t.nbytes]}
      offset += t.nbytes
      weight_map[t.name] = fname
    headers.append((fname, header))
  # Chunks are produced (read, transposed) in a worker thread while this one
  # writes: the two halves of the work overlap on two cores.
  stream = _in_background((t, c) for shard in shards for t in shard for c in t.chunks())
  try:
    for (fname, header), shard in zip(headers, shards):
      raw = json.dumps(header, separators=(',', ':')).encode()
      raw += b' ' * (-len(raw) % 8)
      with rawio.DirectFile(os.path.join(dst_dir, fname)) as f:
        f.write(len(raw).to_bytes(8, 'little'))
        f.write(raw)
        for t in shard:
          written = 0
          while written < t.nbytes:
            owner, chunk = next(stream)
            assert owner is t, (owner.name, t.name)
            chunk = np.ascontiguousarray(chunk, dtype=t.dtype)
            f.write(chunk.reshape(-1).view(np.uint8))
            written += chunk.nbytes
            if on_bytes is not None:
              on_bytes(chunk.nbytes)
          if written != t.nbytes:
            raise RuntimeError(f'tensor {t.name}: produced {written} bytes, expected {t.nbytes}')
  finally:
    stream.close()
  index = {'metadata': {'total_size': sum(t.nbytes for t in tensors)}, 'weight_map': weight_map}
  ckpt_lib.write_json(os.path.join(dst_dir, HF_INDEX), index)
  return index


def _in_background(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
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
  through TensorStore for layouts `rawio.RawZarr3` does not take) with
  transposing and writing this one, holding at most one tensor extra.
  """

  def __init__(self, arrays, order: list[tuple[str, int]]):
    self.arrays, self.order = arrays, order
    self.position = {k: n for n, k in enumerate(order)}
    self.started: dict[tuple[str, int], Any] = {}
    self.raw = {key: rawio.RawZarr3.open(store) for key, store in arrays.items()}
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
    out = raw.read(index, rawio.POOL) if raw is not None else None
    if out is None:  # into a pooled buffer, not one TensorStore allocates
      view = self.arrays[key][index]
      out = rawio.POOL.empty(tuple(view.shape), view.dtype.numpy_dtype)
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
    cfg = ckpt_lib.load_config(src)
    arrays = ckpt_lib.open_stored_arrays(src)
  except (OSError, ValueError) as e:
    raise ConversionError(f'{src}: not a readable checkpoint ({e})') from None
  maps = layout(cfg)
  for m in maps:
    if m.key not in arrays:
      raise ConversionError(f'{src}: parameter {m.key} is missing')
    if tuple(arrays[m.key].shape) != m.shape(cfg):
      raise ConversionError(f'{src}: parameter {m.key} has shape {list(arrays[m.key].shape)}, '
                            f'{ckpt_lib.CONFIG_FILE} implies {list(m.shape(cfg))}')
  extra = sorted(set(arrays) - {m.key for m in maps})
  if extra:
    raise ConversionError(f'{src}: unexpected parameter {extra[0]}')
  source = {}
  source_path = os.path.join(src, ckpt_lib.SOURCE_FILE)
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
    ckpt_lib.write_json(os.path.join(tmp, 'config.json'), hf)
    ckpt_lib.copy_tokenizer_files(src, tmp)
  return cfg


def _counting(tensors: list[OutTensor], bar: _Progress) -> list[OutTensor]:
  def wrap(t):
    def chunks():
      yield from t.chunks()
      bar.tensor_done()
    return dataclasses.replace(t, chunks=chunks)
  return [wrap(t) for t in tensors]
