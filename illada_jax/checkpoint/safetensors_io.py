"""Hugging Face safetensors directories: reading through `safe_open`, streamed writing.

Reading: every file is opened and validated by the `safetensors` library
(`safe_open`: header, dtypes, shapes against byte sizes, byte ranges that
tile the data section exactly), which also lists the tensors. Small tensors
and row blocks are read with `safe_open(...).get_slice`. Large ones are read
with `O_DIRECT` into pooled page-aligned buffers at the byte offsets of the
header the library has just validated, because through the library's
memory map a cold read costs CPU time the converter does not have: 16
[14336, 4096] bfloat16 tensors (1.9 GB, page cache evicted) took 2.2 s wall
and 2.0 s CPU with `get_tensor`, and 0.8-1.0 s wall and 0.04 s CPU with
`O_DIRECT` (2 cores, 2026-12-01).

Writing: `write_safetensors` streams shards tensor by tensor, chunk by
chunk (the header is computed up front from the shapes). The library's
`save_file` needs every tensor in memory at once, which for the 8B model is
the 15 GB this module exists to avoid.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from illada_jax.checkpoint import _rawio
from illada_jax.checkpoint.errors import ConversionError
from illada_jax.config import ModelConfig

ST_DTYPES = {'BF16': np.dtype(ml_dtypes.bfloat16), 'F16': np.dtype(np.float16),
             'F32': np.dtype(np.float32)}  # the dtypes a parameter may be stored in
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
HF_INDEX = 'model.safetensors.index.json'
HF_SINGLE = 'model.safetensors'
_PICKLE_PATTERNS = ('*.bin', '*.pt', '*.pth', '*.ckpt', '*.pkl')


@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """One tensor of a safetensors file: where its bytes are."""
  name: str
  file: str
  dtype: str  # safetensors dtype name, e.g. 'BF16'
  shape: tuple[int, ...]
  offset: int  # absolute byte offset in `file`
  nbytes: int


_MAX_HEADER_BYTES = 100_000_000  # the `safetensors` library's own limit on the header JSON
_LFS_POINTER = b'version https://git-lfs'


def _header_length(path: str) -> int:
  """The header JSON length the first 8 bytes of `path` give, checked against the file size.

  Raises ConversionError naming the file if it does not fit the file (or the
  library's 100 MB limit): a git-lfs pointer or an HTML page saved under a
  shard's name would otherwise ask for exabytes.
  """
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(len(_LFS_POINTER))
  n = int.from_bytes(head[:8], 'little')
  if len(head) >= 8 and n <= min(size - 8, _MAX_HEADER_BYTES):
    return n
  if head.startswith(_LFS_POINTER):
    raise ConversionError(f'{path}: a git-lfs pointer ({size} bytes), not the safetensors file: '
                          'fetch the weights (git lfs pull, or huggingface-cli download)')
  if len(head) < 8:
    raise ConversionError(f'{path}: not a safetensors file: only {size} bytes')
  raise ConversionError(f'{path}: not a safetensors file: its first 8 bytes give a header of '
                        f'{n} bytes, the file has {size} (it starts with {head[:16]!r})')


def _raw_header(path: str) -> tuple[int, dict[str, Any]]:
  """(JSON length, JSON object) of a file's header; checks only the length (`_header_length`)."""
  n = _header_length(path)
  with open(path, 'rb') as f:
    f.seek(8)
    return n, json.loads(f.read(n))


def read_header(path: str) -> dict[str, TensorEntry]:
  """The tensors of safetensors file `path`, in file order, as `safe_open` validates them.

  Raises ConversionError naming the file (and the tensor where one is to
  blame) if the library refuses it.
  """
  _header_length(path)  # a message for a git-lfs pointer or web page, not the library's
  try:
    with safe_open(path, 'numpy') as f:
      listed = {n: (f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape()))
                for n in f.offset_keys()}
  except SafetensorError as e:
    raise ConversionError(_explain(path, e)) from None
  header_len, header = _raw_header(path)
  entries = {}
  for name, (dtype, shape) in listed.items():
    begin, end = header[name]['data_offsets']
    entries[name] = TensorEntry(name, path, dtype, shape, 8 + header_len + begin, end - begin)
  return entries


def _explain(path: str, error: SafetensorError) -> str:
  """Why `safe_open` refused `path`, naming the tensor that runs past the end of the file."""
  size = os.path.getsize(path)
  try:
    header_len, header = _raw_header(path)
    cut = sorted((8 + header_len + int(e['data_offsets'][1]), n) for n, e in header.items()
                 if n != '__metadata__' and 8 + header_len + int(e['data_offsets'][1]) > size)
  except (OSError, ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError):
    return f'{path}: not a valid safetensors file ({size} bytes): {error}'
  if cut:  # name the first tensor the file stops short of
    return (f'{path}: truncated safetensors file: tensor {cut[0][1]} ends at byte '
            f'{cut[0][0]}, file has {size} bytes')
  return f'{path}: not a valid safetensors file: {error}'


def read_tensor(entry: TensorEntry, rows: tuple[int, int] | None = None,
                pool: _rawio.BufferPool | None = None) -> np.ndarray:
  """The tensor (or its rows `[r0, r1)` along axis 0) as a numpy array.

  With `pool`, a read of at least `pool.MIN_BYTES` goes around the page
  cache into a buffer of `pool` (see the module docstring); anything else
  through `safe_open`.
  """
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
  with safe_open(entry.file, 'numpy') as f:
    part = f.get_slice(entry.name)
    return part[rows[0]:rows[1]] if rows is not None else part[:]


def _read_direct(entry: TensorEntry, offset: int, nbytes: int,
                 pool: _rawio.BufferPool) -> np.ndarray | None:
  """Bytes `[offset, offset + nbytes)` of the file read with `O_DIRECT` (uint8, from `pool`).

  None where the filesystem refuses `O_DIRECT`.
  """
  if not hasattr(os, 'O_DIRECT'):
    return None
  try:
    fd = os.open(entry.file, os.O_RDONLY | os.O_DIRECT | getattr(os, 'O_CLOEXEC', 0))
  except OSError:
    return None
  try:
    out = _rawio.pread_aligned(fd, offset, nbytes, pool)
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
    """`ModelConfig.from_hf_file` of the directory's `config.json` (and tokenizer files)."""
    path = os.path.join(self.dir, 'config.json')
    if not os.path.isfile(path):
      raise ConversionError(f'{self.dir}: no config.json')
    try:
      return ModelConfig.from_hf_file(path, **overrides)
    except ValueError as e:
      raise ConversionError(str(e)) from None


# -- writing -----------------------------------------------------------------------

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
  tensor gets a shard of its own). Each shard is written sequentially with
  `O_DIRECT` (`_rawio.DirectFile`) while a worker thread produces the next
  chunks. Also writes `model.safetensors.index.json`.
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
  stream = _rawio.in_background((t, c) for shard in shards for t in shard for c in t.chunks())
  try:
    for (fname, header), shard in zip(headers, shards):
      raw = json.dumps(header, separators=(',', ':')).encode()
      # Spaces (allowed after the JSON) align the data to 4 KiB, so that
      # aligned tensors are written without a copy (`DirectFile.write`).
      raw += b' ' * (-(8 + len(raw)) % _rawio.ALIGN)
      with _rawio.DirectFile(os.path.join(dst_dir, fname)) as f:
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
  with open(os.path.join(dst_dir, HF_INDEX), 'w') as f:
    json.dump(index, f, indent=2, sort_keys=True)
    f.write('\n')
  return index
