"""hf-to-orbax: checks of the source, and the parameter tree as lazily converted leaves."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from illada_jax import sharding as sharding_lib
from illada_jax.checkpoint import _orbax_stream, _rawio
from illada_jax.checkpoint._blocks import param_blocks, row_blocks, table_rows
from illada_jax.checkpoint._transpose import row_axis, to_param
from illada_jax.checkpoint.errors import ConversionError
from illada_jax.checkpoint.hf_names import embedding_name, head_name, layout
from illada_jax.checkpoint.safetensors_io import ST_DTYPES, HFSource, read_tensor
from illada_jax.config import ModelConfig


def check_source(src: HFSource, cfg: ModelConfig) -> bool:
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
  block = table_rows(cfg.d_model * 4, cfg.vocab_size)
  for rows in row_blocks(cfg.vocab_size, block):
    a, b = read_tensor(h, rows), read_tensor(e, rows)
    if a.dtype != b.dtype or not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
      raise ConversionError(
          f'{h.file}: tensor {head} differs from {embed}, but config.json ties the head to '
          'the embedding; set tie_word_embeddings (weight_tying) to false to keep both')


def read_chunk_prefs(cfg: ModelConfig, mesh_shape) -> dict[str, tuple[int, ...]] | None:
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


def lazy_tree(src: HFSource, cfg: ModelConfig, prefs, progress) -> dict[str, Any]:
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
    chunk, split, blocks = param_blocks(m, cfg, dtype.itemsize)
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
