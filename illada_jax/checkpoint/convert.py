"""Hugging Face safetensors <-> checkpoint directory conversion, streaming, both families.

`hf_to_orbax` reads a Hugging Face directory (`config.json`, one
`model.safetensors` or shards with `model.safetensors.index.json`, tokenizer
files) of the iLLaDA (Llama names) or LLaDA (OLMo names) layout and writes a
checkpoint directory (`store`); `orbax_to_hf` goes back. Either way memory
holds a few blocks of rows, never a whole tensor:

* safetensors are read a block of rows at a time (`safetensors_io`),
  renamed and re-laid out by `hf_names` and `_transpose`, and written leaf
  by leaf into the Orbax item (`_to_orbax`, `_orbax_stream.save_streaming`:
  each block of rows becomes one zarr3 inner chunk of its leaf, `_blocks`);
* going back, stored arrays are read an inner chunk (or a layer) at a time
  (`_to_hf`) and streamed into safetensors shards whose headers are
  computed before any data.

Every input problem raises `ConversionError` naming the file and tensor,
before anything is written where possible; output goes to a temporary
sibling directory renamed into place at the end and removed on failure.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from illada_jax.checkpoint import _orbax_stream, _to_hf, _to_orbax, store
from illada_jax.checkpoint._destination import Destination, check_apart
from illada_jax.checkpoint.errors import ConversionError
from illada_jax.checkpoint.hf_names import layout
from illada_jax.checkpoint.safetensors_io import HFSource, OutTensor, parse_size, write_safetensors
from illada_jax.config import ModelConfig


# The source's own modelling code (`auto_map` / `trust_remote_code`), kept for the way back.
REMOTE_CODE = ('*.py',)
# hf_source.json's safetensors dtype names -> the `dtype` argument of `orbax_to_hf`.
_SOURCE_DTYPES = {'BF16': 'bfloat16', 'F32': 'float32', 'F16': 'float16'}
# Keys of the source's config.json that say which code loads the model: kept on the way back.
_LOADER_KEYS = ('model_type', 'architectures', 'auto_map')


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


# Write beside, then swap; refuse a destination that overlaps the source (`_destination`).
_Destination = Destination
_check_apart = check_apart


def hf_to_orbax(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, *,
                dtype: str = 'bfloat16', mesh: str | None = None, overwrite: bool = False,
                progress: bool = True) -> ModelConfig:
  """Converts a Hugging Face directory of either family to a checkpoint directory.

  `dtype` is the stored parameter dtype (`cfg.param_dtype`). `mesh`
  ('data=1,fsdp=8,tensor=1') picks inner chunks that match one device's
  shard on that mesh, so restoring there reads no more than it needs.
  Returns the model config. Raises ConversionError on any bad input, and
  if `dst_dir` is `src_dir`, inside it, or holds it.
  """
  _check_apart(src_dir, dst_dir)
  if dtype not in ('bfloat16', 'float32', 'float16'):
    raise ConversionError(f'--dtype {dtype}: expected bfloat16, float32 or float16')
  src = HFSource(src_dir)
  cfg = src.config(param_dtype=dtype)
  try:
    prefs = _to_orbax.read_chunk_prefs(cfg, mesh)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  tied_head = _to_orbax.check_source(src, cfg)
  maps = layout(cfg)
  itemsize = np.dtype(dtype).itemsize
  total_bytes = sum(math.prod(m.shape(cfg)) for m in maps) * itemsize
  total_tensors = sum(cfg.num_layers if m.stacked else 1 for m in maps)
  with _Destination(dst_dir, overwrite) as tmp:
    bar = _Progress(total_bytes, total_tensors, 'hf-to-orbax', progress)
    try:
      _orbax_stream.save_streaming(store.params_dir(tmp), _to_orbax.lazy_tree(src, cfg, prefs, bar))
    except ConversionError:
      raise
    except Exception as e:  # Orbax re-raises from its worker thread with context lost
      raise ConversionError(f'{src.dir}: writing {dst_dir} failed: {e!r}') from e
    finally:
      bar.close()
    store.write_config(tmp, cfg)
    dtypes = sorted({src.entries[m.hf_name(0 if m.stacked else None)].dtype for m in maps})
    with open(os.path.join(src.dir, 'config.json')) as f:
      source_config = json.load(f)
    store.write_json(os.path.join(tmp, store.SOURCE_FILE), {
        'family': cfg.family, 'tied_head_stored': tied_head, 'source_dtypes': dtypes,
        'source_dir': src.dir, 'config': source_config})
    store.copy_tokenizer_files(src.dir, tmp)
    store.copy_matching(src.dir, tmp, REMOTE_CODE)
  return cfg


def orbax_to_hf(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, *,
                shard_size: str | int = '5GB', overwrite: bool = False,
                progress: bool = True, dtype: str | None = None) -> ModelConfig:
  """Converts a checkpoint directory back to a Hugging Face directory of its family.

  `src_dir` is a converted checkpoint or a training step directory
  (`<workdir>/checkpoints/<step>`). Writes `config.json`, safetensors shards
  of at most `shard_size`, `model.safetensors.index.json`, the tokenizer
  files and chat templates, so that the directory loads where the source did
  (`hf_config`): the source's `config.json` (recorded in `hf_source.json`)
  with the model's values, keeping its `model_type`, `architectures` and
  `auto_map`, and its remote-code `*.py` files (from the checkpoint, else
  from the source directory when it still exists). `dtype` ('bfloat16',
  'float32', 'float16'; default: the source's single dtype from
  `hf_source.json`, else as stored) casts every tensor (round to nearest
  even), e.g. a run's float32 master weights to bfloat16; a finite value the
  cast would turn into inf raises ConversionError naming the tensor and its
  range. A tied head is written only if the converted source had one. Raises ConversionError on any
  bad input, and if `dst_dir` is `src_dir`, inside it, or holds it.
  """
  if dtype not in (None, 'bfloat16', 'float32', 'float16'):
    raise ConversionError(f'--dtype {dtype}: expected bfloat16, float32 or float16')
  _check_apart(src_dir, dst_dir)
  src = os.path.abspath(src_dir)
  try:
    store.check_not_lora(src)
  except ValueError as e:
    raise ConversionError(str(e)) from None
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
  tensors = _to_hf.out_tensors(cfg, arrays, bool(source.get('tied_head_stored', False)))
  stored_dtype = str(np.dtype(arrays['embedder/embedding'].dtype.numpy_dtype))
  source_dtypes = source.get('source_dtypes') or []
  if dtype is None and len(source_dtypes) == 1 and source_dtypes[0] in _SOURCE_DTYPES:
    dtype = _SOURCE_DTYPES[source_dtypes[0]]  # as the source was stored
  if dtype is not None:  # the shard writer casts each chunk to its tensor's dtype
    out_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == 'bfloat16' else np.dtype(dtype)
    tensors = [_cast_checked(t, out_dtype) for t in tensors]
    stored_dtype = dtype
  with _Destination(dst_dir, overwrite) as tmp:
    bar = _Progress(sum(t.nbytes for t in tensors), len(tensors), 'orbax-to-hf', progress)
    try:
      write_safetensors(tmp, _counting(tensors, bar), shard_bytes, bar.add_bytes)
    finally:
      bar.close()
    store.write_json(os.path.join(tmp, 'config.json'),
                     hf_config(cfg.replace(param_dtype=stored_dtype), source.get('config')))
    store.copy_tokenizer_files(src, tmp)
    code_dir = source.get('source_dir')
    if not store.copy_matching(src, tmp, REMOTE_CODE) and code_dir and os.path.isdir(code_dir):
      store.copy_matching(code_dir, tmp, REMOTE_CODE)
  return cfg


def hf_config(cfg: ModelConfig, source: dict | None) -> dict:
  """The `config.json` of an export: `cfg.to_hf()` over the source's own config.

  The source's other keys stay (transformers' bookkeeping, `rope_parameters`
  spelled its way, ...), and so do the keys that choose the code that loads
  it (`model_type`, `architectures`, `auto_map`): a Llama checkpoint comes
  back as `llama`, a remote-code one with its `auto_map`.
  """
  hf = cfg.to_hf()
  if not source:
    return hf
  out = {**source, **hf}
  for key in _LOADER_KEYS:
    if key in source:
      out[key] = source[key]
  if 'rope_parameters' in source and 'rope_theta' not in source:
    out.pop('rope_theta')  # transformers 5 style: theta lives in rope_parameters only
  return out


def _cast_checked(t: OutTensor, out_dtype: np.dtype) -> OutTensor:
  """`t` cast to `out_dtype` chunk by chunk; ConversionError naming the tensor and its range
  if a finite value becomes inf (a float16 export of weights beyond +-65504)."""
  def chunks():
    for chunk in t.chunks():
      cast = chunk.astype(out_dtype)
      if np.issubdtype(chunk.dtype, np.floating) or chunk.dtype == ml_dtypes.bfloat16:
        bad = ~np.isfinite(cast.astype(np.float32)) & np.isfinite(chunk.astype(np.float32))
        if bad.any():
          wide = chunk.astype(np.float32)
          raise ConversionError(
              f'tensor {t.name}: values in [{wide.min():.6g}, {wide.max():.6g}] overflow '
              f'{np.dtype(out_dtype).name} (largest {float(ml_dtypes.finfo(out_dtype).max):.6g}); '
              'export in bfloat16 or float32 instead')
      yield cast
  return dataclasses.replace(t, dtype=out_dtype, chunks=chunks)


def _counting(tensors: list[OutTensor], bar: _Progress) -> list[OutTensor]:
  def wrap(t):
    def chunks():
      yield from t.chunks()
      bar.tensor_done()
    return dataclasses.replace(t, chunks=chunks)
  return [wrap(t) for t in tensors]

