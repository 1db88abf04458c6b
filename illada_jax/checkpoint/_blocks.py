"""How a parameter is cut into blocks (outer zarr3 chunks), and which Hugging Face rows each holds."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from illada_jax.checkpoint._transpose import row_axis
from illada_jax.config import ModelConfig

# Row blocks of the [V, D] tables: bounded memory, aligned outer chunks.
TABLE_BLOCK_BYTES = 64 << 20


def table_rows(row_bytes: int, rows: int) -> int:
  """Rows per block of a [rows, ...] table: a power of two within TABLE_BLOCK_BYTES."""
  r = 1
  while r * 2 * row_bytes <= TABLE_BLOCK_BYTES and r * 2 <= rows:
    r *= 2
  return r


def row_blocks(rows: int, block: int) -> Iterator[tuple[int, int]]:
  """`(r0, r1)` ranges of `block` rows (the last one shorter) covering `rows`."""
  for r0 in range(0, rows, block):
    yield r0, min(rows, r0 + block)


@dataclasses.dataclass(frozen=True)
class Block:
  """One outer chunk of a parameter and the Hugging Face rows it comes from."""
  index: Any  # into the stored array: a layer, a row range of a table, or ()
  hf: str  # HF tensor name
  rows: tuple[int, int]  # HF rows [r0, r1)
  shape: tuple[int, ...]  # of the block


def param_blocks(m, cfg: ModelConfig, itemsize: int):
  """(write chunk, the dim of the stored array the HF rows run along, blocks) of parameter `m`."""
  shape = m.shape(cfg)
  dim = row_axis(m.kind, cfg)[0]
  if m.stacked:
    chunk = (1,) + shape[1:]
    return chunk, 1 + dim, [Block(i, m.hf_name(i), (0, m.hf_shape[0]), chunk)
                            for i in range(cfg.num_layers)]
  if m.kind in ('copy', 'head') and len(shape) == 2:  # [V, D] / [D, V] tables: row blocks
    rows = table_rows(cfg.d_model * itemsize, cfg.vocab_size)
    chunk = list(shape)
    chunk[dim] = rows
    blocks = []
    for r0, r1 in row_blocks(cfg.vocab_size, rows):
      block = list(shape)
      block[dim] = r1 - r0
      index = slice(r0, r1) if dim == 0 else (slice(None), slice(r0, r1))
      blocks.append(Block(index, m.hf_name(), (r0, r1), tuple(block)))
    return tuple(chunk), dim, blocks
  return shape, dim, [Block((), m.hf_name(), (0, m.hf_shape[0]), shape)]
