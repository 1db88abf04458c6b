"""Grain input pipelines: documents -> tokens -> fixed-length rows -> batches.

Sources: JSONL (`.jsonl`/`.json`, one object per line), Parquet, ArrayRecord
(records are JSON objects or raw UTF-8 text) and plain text (`.txt`, split
into documents at blank lines). Every source becomes a random-access
`grain.MapDataset` of records, sliced per process, shuffled with a seed and
repeated, so the iterator state is a small JSON dict saved with the train
state (the `data` checkpoint item, one file per process).

Rows:
  pretrain: tokens `[L]` int32 — documents joined with EOS and cut into rows
            of L (Grain's concat-then-split packing).
  sft:      tokens `[L]` = `[BOS? prompt | response | EOS ... EOS]` and
            response_mask `[L]` (1 on the response and its EOS padding). A
            pair longer than L loses the end of its response (at least one EOS
            is kept).
Batches are dicts of numpy arrays with a leading process-local batch axis.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from illada_jax import text_tokenizer
from illada_jax.config import DataConfig  # noqa: F401  (re-exported: `data.DataConfig`)


# -- sources ----------------------------------------------------------------------

def _expand(paths: Sequence[str]) -> list[str]:
  files = []
  for p in paths:
    hits = sorted(glob.glob(p))
    if not hits:
      raise FileNotFoundError(f'data: no file matches {p!r}; give the data with '
                              f'--set data.paths="(\'/path/to/file\',)" (setting data.paths)')
    files.extend(hits)
  return files


def _format_of(path: str, fmt: str) -> str:
  if fmt != 'auto':
    return fmt
  ext = path.rsplit('.', 1)[-1].lower()
  return {'jsonl': 'jsonl', 'json': 'jsonl', 'parquet': 'parquet', 'arrayrecord': 'arrayrecord',
          'array_record': 'arrayrecord', 'txt': 'text', 'text': 'text'}.get(ext, 'text')


def _read_records(path: str, fmt: str) -> list[Any]:
  """In-memory records of one JSONL / Parquet / text file (dicts or strings)."""
  if fmt == 'jsonl':
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]
  if fmt == 'parquet':
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pylist()
  if fmt == 'text':
    with open(path, encoding='utf-8') as f:
      docs = f.read().split('\n\n')
    return [d.strip('\n') for d in docs if d.strip()]
  raise ValueError(f'data: unknown format {fmt!r} for {path}')


class _ArrayRecordRecords:
  """ArrayRecord files as a random-access source of decoded records."""

  def __init__(self, files):
    self._src = grain.sources.ArrayRecordDataSource(files)

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i):
    raw = self._src[i]
    text = raw.decode('utf-8') if isinstance(raw, bytes) else raw
    try:
      return json.loads(text)
    except json.JSONDecodeError:
      return text


def record_source(paths: Sequence[str], fmt: str = 'auto') -> grain.MapDataset:
  """A MapDataset of the records (dicts or strings) of all `paths`."""
  files = _expand(paths)
  fmts = {_format_of(f, fmt) for f in files}
  if fmts == {'arrayrecord'}:
    return grain.MapDataset.source(_ArrayRecordRecords(files))
  if 'arrayrecord' in fmts:
    raise ValueError('data: ArrayRecord files cannot be mixed with other formats')
  records = []
  for f in files:
    records.extend(_read_records(f, _format_of(f, fmt)))
  if not records:
    raise ValueError(f'data: no records in {files}')
  return grain.MapDataset.source(records)


# -- tokenisation and rows -----------------------------------------------------------

def _field(record, key: str) -> str:
  if isinstance(record, str):
    return record
  return str(record[key])


class _TokenizeDoc(grain.transforms.Map):
  """record -> {'tokens': [BOS] + ids + [EOS]} (EOS separates packed documents)."""

  def __init__(self, tok, key: str, add_bos: bool):
    self.tok, self.key, self.add_bos = tok, key, add_bos

  def map(self, record):
    ids = self.tok.encode(_field(record, self.key))
    bos = [self.tok.bos_id] if self.add_bos and self.tok.bos_id is not None else []
    return {'tokens': np.asarray(bos + ids + [self.tok.eos_id], np.int32)}


def sft_row(prompt_ids: Sequence[int], response_ids: Sequence[int], seq_len: int, eos_id: int,
            bos_id: int | None = None) -> dict[str, np.ndarray]:
  """`[BOS? prompt | response | EOS...]` of length L and its response mask."""
  prompt = ([bos_id] if bos_id is not None else []) + list(prompt_ids)
  if len(prompt) >= seq_len:
    raise ValueError(f'SFT prompt of {len(prompt)} tokens does not fit seq_len={seq_len}')
  response = list(response_ids)[:seq_len - len(prompt) - 1] + [eos_id]
  tokens = prompt + response
  tokens += [eos_id] * (seq_len - len(tokens))
  mask = np.zeros(seq_len, np.int32)
  mask[len(prompt):] = 1
  return {'tokens': np.asarray(tokens, np.int32), 'response_mask': mask}


class _SftRow(grain.transforms.Map):

  def __init__(self, tok, cfg: DataConfig, seq_len: int):
    self.tok, self.cfg, self.seq_len = tok, cfg, seq_len

  def map(self, record):
    tok = self.tok
    return sft_row(tok.encode(_field(record, self.cfg.prompt_key)),
                   tok.encode(_field(record, self.cfg.response_key)), self.seq_len,
                   tok.eos_id, tok.bos_id if self.cfg.add_bos else None)


class _KeepTokens(grain.transforms.Map):

  def map(self, row):
    return {'tokens': row['tokens']}


def _check_tokenizer(tok, model):
  if model is not None and tok.vocab_size > model.vocab_size:
    raise ValueError(f'tokenizer {tok.path} has {tok.vocab_size} tokens, '
                     f'model vocab_size={model.vocab_size}')
  if model is not None and tok.mask_id is not None and tok.mask_id != model.mask_token_id:
    raise ValueError(f'tokenizer mask id {tok.mask_id} != model.mask_token_id '
                     f'{model.mask_token_id}')


def make_dataset(cfg: DataConfig, *, batch_size: int, seq_len: int, objective: str, seed: int,
                 paths: Sequence[str] | None = None, process_index: int | None = None,
                 process_count: int | None = None, model=None, repeat: bool = True
                 ) -> grain.IterDataset:
  """The batched IterDataset of one process (see the module docstring)."""
  import jax
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  tok = text_tokenizer.load(cfg.tokenizer)
  _check_tokenizer(tok, model)
  ds = record_source(paths or cfg.paths, cfg.format)
  ds = ds[pi::pc]
  if cfg.shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  if objective == 'pretrain':
    ds = ds.map(_TokenizeDoc(tok, cfg.text_key, cfg.add_bos)).to_iter_dataset()
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={'tokens': seq_len})
    ds = ds.map(_KeepTokens())
  elif objective == 'sft':
    ds = ds.map(_SftRow(tok, cfg, seq_len)).to_iter_dataset()
  else:
    raise ValueError(f'objective={objective!r}; use pretrain or sft')
  ds = ds.batch(batch_size, drop_remainder=True)
  if cfg.worker_count > 0:
    from absl import flags  # Grain workers read absl flags; outside an absl app, use defaults
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=cfg.worker_count, per_worker_buffer_size=cfg.prefetch_buffer))
  return ds


def make_train_iterator(cfg: DataConfig, *, batch_size: int, seq_len: int, objective: str,
                        seed: int, model=None) -> grain.DatasetIterator:
  """A checkpointable iterator of process-local batches."""
  return iter(make_dataset(cfg, batch_size=batch_size, seq_len=seq_len, objective=objective,
                           seed=seed, model=model))


def make_eval_batches(cfg: DataConfig, *, batch_size: int, seq_len: int, objective: str,
                      num_batches: int, model=None) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` batches of the eval files (fixed across the run)."""
  paths = cfg.eval_paths or cfg.paths
  ecfg = dataclasses.replace(cfg, worker_count=0)
  it = iter(make_dataset(ecfg, batch_size=batch_size, seq_len=seq_len, objective=objective,
                         seed=12345, paths=paths, model=model))
  return [next(it) for _ in range(num_batches)]


def ensure_tokenizer(cfg: DataConfig) -> None:
  """Trains the SentencePiece model `cfg.tokenizer` on the training text if it is missing.

  Only when `cfg.train_tokenizer_vocab > 0` and the path ends in `.model`;
  process 0 trains, the others wait for it.
  """
  import jax
  if os.path.exists(cfg.tokenizer) or cfg.train_tokenizer_vocab <= 0:
    return
  if not cfg.tokenizer.endswith('.model'):
    raise ValueError(f'data.tokenizer {cfg.tokenizer!r} is missing (only a .model can be trained)')
  if jax.process_index() == 0:
    texts = []
    for r in record_source(cfg.paths, cfg.format):
      t = _field(r, cfg.text_key) if isinstance(r, str) or cfg.text_key in r else (
          _field(r, cfg.prompt_key) + _field(r, cfg.response_key))
      texts.extend(line for line in t.split('\n') if line.strip())
    text_tokenizer.train_sentencepiece(texts, cfg.tokenizer[:-len('.model')],
                                       vocab_size=cfg.train_tokenizer_vocab)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('illada_tokenizer')


# -- checkpointing ----------------------------------------------------------------

def checkpoint_save_args(iterator):
  """Orbax args saving `iterator`'s state (one JSON file per process)."""
  return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_args(iterator):
  """Orbax args restoring the state into `iterator` in place."""
  return grain.checkpoint.CheckpointRestore(iterator)


def write_jsonl(path: str, records: Sequence[dict[str, Any]]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
