"""Grain input pipelines: documents -> tokens -> fixed-length rows -> batches.

Sources: JSONL (`.jsonl`/`.json`, one object per line), Parquet, ArrayRecord
(records are JSON objects or raw UTF-8 text) and plain text (`.txt`, split
into documents at blank lines). Every source becomes a random-access
`grain.MapDataset` of records, sliced per process, shuffled with a seed and
repeated, so the iterator state is a small JSON dict saved with the train
state (the `data` checkpoint item, one file per process).

Rows:
  pretrain: tokens `[L]` int32 — documents joined with the model's EOS
            (`special_ids`) and cut into rows of L (Grain's concat-then-split packing).
  sft:      tokens `[L]` = `[BOS? prompt | response | EOS ... EOS]` and
            response_mask `[L]` (1 on the response and its EOS padding), from
            `prompt`/`response` pairs or `messages` chats (one row per
            assistant turn, rendered with the chat template; rules and
            over-length handling in `illada_jax.sft_rows`).
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

from illada_jax import chat_template, sft_rows, text_tokenizer
from illada_jax.config import DataConfig  # noqa: F401  (re-exported: `data.DataConfig`)
from illada_jax.prompts import PromptFormat
from illada_jax.sft_rows import SftCounts, sft_row  # noqa: F401  (re-exported)


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


def _read_records(path: str, fmt: str) -> list[tuple[str, Any]]:
  """In-memory `(where, record)` of one JSONL / Parquet / text file (dicts or strings).

  `where` names the file and line (JSONL), row (Parquet) or document (text).
  Raises ValueError naming the line of invalid JSON.
  """
  if fmt == 'jsonl':
    out = []
    with open(path, encoding='utf-8') as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            out.append((f'{path}:{n}', json.loads(line)))
          except json.JSONDecodeError as e:
            raise ValueError(f'{path}:{n}: not valid JSON ({e})') from None
    return out
  if fmt == 'parquet':
    import pyarrow.parquet as pq
    return [(f'{path} row {i}', r) for i, r in enumerate(pq.read_table(path).to_pylist())]
  if fmt == 'text':
    with open(path, encoding='utf-8') as f:
      docs = f.read().split('\n\n')
    docs = [d.strip('\n') for d in docs if d.strip()]
    return [(f'{path} document {i}', d) for i, d in enumerate(docs)]
  raise ValueError(f'data: unknown format {fmt!r} for {path}')


class _ArrayRecordRecords:
  """ArrayRecord files as a random-access source of decoded records (or `(where, record)`)."""

  def __init__(self, files, located: bool = False):
    self._src = grain.sources.ArrayRecordDataSource(files)
    self._files, self._located = list(files), located
    self._starts = None
    if located:  # record i's file, for error messages
      sizes = [len(grain.sources.ArrayRecordDataSource([f])) for f in files]
      self._starts = np.cumsum([0] + sizes[:-1])

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i):
    raw = self._src[i]
    text = raw.decode('utf-8') if isinstance(raw, bytes) else raw
    try:
      record = json.loads(text)
    except json.JSONDecodeError:
      record = text
    if not self._located:
      return record
    k = int(np.searchsorted(self._starts, i, side='right')) - 1
    return (f'{self._files[k]} record {i - int(self._starts[k])}', record)


def record_source(paths: Sequence[str], fmt: str = 'auto', located: bool = False
                  ) -> grain.MapDataset:
  """A MapDataset of the records (dicts or strings) of all `paths`.

  With `located`, each element is `(where, record)`, `where` naming the file
  and line / row / record for error messages.
  """
  files = _expand(paths)
  fmts = {_format_of(f, fmt) for f in files}
  if fmts == {'arrayrecord'}:
    return grain.MapDataset.source(_ArrayRecordRecords(files, located))
  if 'arrayrecord' in fmts:
    raise ValueError('data: ArrayRecord files cannot be mixed with other formats')
  records = []
  for f in files:
    records.extend(_read_records(f, _format_of(f, fmt)))
  if not records:
    raise ValueError(f'data: no records in {files}')
  return grain.MapDataset.source(records if located else [r for _, r in records])


# -- tokenisation and rows -----------------------------------------------------------

def _field(record, key: str) -> str:
  if isinstance(record, str):
    return record
  return str(record[key])


class _TokenizeDoc(grain.transforms.Map):
  """record -> {'tokens': [BOS] + ids + [EOS]} (EOS separates packed documents)."""

  def __init__(self, tok, key: str, add_bos: bool, bos_id: int | None, eos_id: int):
    self.tok, self.key = tok, key
    self.bos = [bos_id] if add_bos and bos_id is not None else []
    self.eos_id = eos_id

  def map(self, record):
    ids = self.tok.encode(_field(record, self.key))
    return {'tokens': np.asarray(self.bos + ids + [self.eos_id], np.int32)}


def special_ids(tok, model) -> tuple[int | None, int]:
  """(BOS, EOS) of training rows: the model's ids when it is known, else the tokenizer's.

  The tokenizer's EOS must be one of the model's EOS ids (`model.eos_token_ids`):
  rows padded or separated with another id would teach the model an end it
  does not stop at. Raises ValueError naming both ids otherwise.
  """
  if model is None:
    return tok.bos_id, tok.eos_id
  if tok.eos_id is not None and tok.eos_id not in model.eos_token_ids:
    raise ValueError(f'tokenizer {tok.path}: its EOS id {tok.eos_id} is not the model\'s '
                     f'EOS {model.eos_token_id} (eos_token_ids {list(model.eos_token_ids)}); '
                     'use the tokenizer the model was trained with, or set model.eos_token_id')
  return model.bos_token_id, model.eos_token_id


def prompt_format(cfg: DataConfig) -> PromptFormat:
  """The prompt convention of SFT rows: `cfg.add_bos` and the chat template (`cfg.chat_template`).

  '' reads the tokenizer's directory as transformers would
  (`PromptFormat.from_checkpoint`); a directory likewise; a `.json` file its
  `chat_template` (a string, or the `default` of a named list); any other
  file is the template itself. Raises FileNotFoundError / ValueError naming
  the file if `cfg.chat_template` is given and holds no template.
  """
  src = cfg.chat_template
  tok = os.path.abspath(cfg.tokenizer) if cfg.tokenizer else ''
  tok_dir = tok if os.path.isdir(tok) else os.path.dirname(tok)
  fmt = PromptFormat.from_checkpoint(tok_dir) if tok else PromptFormat()
  fmt = dataclasses.replace(fmt, add_bos=cfg.add_bos)
  if not src:
    return fmt
  if not os.path.exists(src):
    raise FileNotFoundError(f'data.chat_template: {src} does not exist')
  if os.path.isdir(src):
    template, where = chat_template.find(src, 'default')
  elif src.endswith('.json'):
    found, where = chat_template.templates_in_json(src)
    if 'default' not in found:
      raise ValueError(f'data.chat_template: {src} has no "chat_template" (or none named '
                       f'"default": {sorted(found)})')
    template = found['default']
  else:
    template, where = chat_template.read_template(src), src
  return dataclasses.replace(fmt, chat_template=template, source=where)


def _sft_rows(tok, cfg: DataConfig, seq_len: int, model, counts=None) -> sft_rows.SftRows:
  # BOS as the sampler puts it, EOS padding the model's own (`special_ids`).
  bos_id, eos_id = special_ids(tok, model)
  return sft_rows.SftRows(
      tok, prompt_format(cfg), seq_len=seq_len, bos_id=bos_id, eos_id=eos_id,
      add_bos=cfg.add_bos, prompt_key=cfg.prompt_key, response_key=cfg.response_key,
      messages_key=cfg.messages_key, turns=cfg.chat_turns, overlong=cfg.chat_overlong,
      counts=counts)


def sft_counts(cfg: DataConfig, *, seq_len: int, paths: Sequence[str] | None = None,
               model=None) -> SftCounts:
  """What the SFT row rules do to every record of `paths` (default `cfg.paths`), once.

  A dry run: rows are built and counted (truncated, dropped, ...), not kept.
  Raises ValueError naming the file and line of a bad record.
  """
  tok = text_tokenizer.load(cfg.tokenizer)
  rows = _sft_rows(tok, cfg, seq_len, model)
  for element in record_source(paths or cfg.paths, cfg.format, located=True):
    rows.flat_map(element)
  return rows.counts


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
                 process_count: int | None = None, model=None, repeat: bool = True,
                 counts: SftCounts | None = None) -> grain.IterDataset:
  """The batched IterDataset of one process (see the module docstring).

  `counts`: SFT tallies to add to (in this process; Grain workers keep their own).
  """
  import jax
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  tok = text_tokenizer.load(cfg.tokenizer)
  _check_tokenizer(tok, model)
  ds = record_source(paths or cfg.paths, cfg.format, located=objective == 'sft')
  ds = ds[pi::pc]
  if cfg.shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  if objective == 'pretrain':
    ds = ds.map(_TokenizeDoc(tok, cfg.text_key, cfg.add_bos, *special_ids(tok, model)))
    ds = ds.to_iter_dataset()
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={'tokens': seq_len})
    ds = ds.map(_KeepTokens())
  elif objective == 'sft':
    # One record -> 0..n rows (a row per assistant turn, drops); the flat map's
    # state is the record's and the row's index in it, so resuming stays exact.
    ds = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(),
                                               _sft_rows(tok, cfg, seq_len, model, counts))
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
      if isinstance(r, dict) and isinstance(r.get(cfg.messages_key), list):
        t = '\n'.join(str(m.get('content', '')) for m in r[cfg.messages_key]
                      if isinstance(m, dict))
      elif isinstance(r, str) or cfg.text_key in r:
        t = _field(r, cfg.text_key)
      else:
        t = _field(r, cfg.prompt_key) + _field(r, cfg.response_key)
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
