"""Grain pipeline: formats, packing with EOS separators, SFT rows, sharding, state."""

import json
import os

import numpy as np
import pytest

from illada_jax import data, text_tokenizer

DOCS = [f'document number {i} says hello {"x" * (i % 7)}' for i in range(40)]


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  root = tmp_path_factory.mktemp('tok')
  return text_tokenizer.train_sentencepiece(DOCS * 5, str(root / 'sp'), vocab_size=40)


def _write_all_formats(root):
  paths = {}
  paths['jsonl'] = str(root / 'd.jsonl')
  data.write_jsonl(paths['jsonl'], [{'text': d} for d in DOCS])
  import pyarrow as pa
  import pyarrow.parquet as pq
  paths['parquet'] = str(root / 'd.parquet')
  pq.write_table(pa.table({'text': DOCS}), paths['parquet'])
  paths['text'] = str(root / 'd.txt')
  with open(paths['text'], 'w') as f:
    f.write('\n\n'.join(DOCS))
  from array_record.python import array_record_module as arm
  paths['arrayrecord'] = str(root / 'd.arrayrecord')
  w = arm.ArrayRecordWriter(paths['arrayrecord'], 'group_size:1')
  for d in DOCS:
    w.write(json.dumps({'text': d}).encode())
  w.close()
  return paths


def test_formats_give_the_same_records(tmp_path):
  for fmt, path in _write_all_formats(tmp_path).items():
    recs = [data._field(r, 'text') for r in data.record_source([path])]
    assert recs == DOCS, fmt


def test_pretrain_packing(tmp_path, tok):
  path = str(tmp_path / 'd.jsonl')
  data.write_jsonl(path, [{'text': d} for d in DOCS])
  cfg = data.DataConfig(paths=(path,), tokenizer=tok.path, shuffle=False)
  ds = data.make_dataset(cfg, batch_size=2, seq_len=16, objective='pretrain', seed=0,
                         process_index=0, process_count=1, repeat=False)
  rows = np.concatenate([b['tokens'] for b in ds]).reshape(-1)
  want = []
  for d in DOCS:
    want += [tok.bos_id] + tok.encode(d) + [tok.eos_id]
  assert rows.dtype == np.int32
  np.testing.assert_array_equal(rows, want[:len(rows)])  # concat with BOS/EOS, then split
  assert len(want) - len(rows) < 2 * 16


def test_sft_row():
  row = data.sft_row([7, 8, 9], [10, 11], 8, eos_id=2, bos_id=0)
  np.testing.assert_array_equal(row['tokens'], [0, 7, 8, 9, 10, 11, 2, 2])
  np.testing.assert_array_equal(row['response_mask'], [0, 0, 0, 0, 1, 1, 1, 1])
  long = data.sft_row([7], list(range(10, 30)), 6, eos_id=2)
  np.testing.assert_array_equal(long['tokens'], [7, 10, 11, 12, 13, 14])  # no invented EOS
  np.testing.assert_array_equal(long['response_mask'], [0, 1, 1, 1, 1, 1])
  exact = data.sft_row([7], [10, 11, 12, 13], 6, eos_id=2)  # the EOS still fits
  np.testing.assert_array_equal(exact['tokens'], [7, 10, 11, 12, 13, 2])


def test_shuffle_sharding_and_state(tmp_path, tok):
  path = str(tmp_path / 'd.jsonl')
  data.write_jsonl(path, [{'prompt': d[:10], 'response': d[10:]} for d in DOCS])
  cfg = data.DataConfig(paths=(path,), tokenizer=tok.path)
  kw = dict(batch_size=2, seq_len=32, objective='sft', seed=3)
  first = lambda pi: [b['tokens'] for _, b in zip(range(5), data.make_dataset(
      cfg, process_index=pi, process_count=2, **kw))]
  a0, a1 = first(0), first(1)
  assert not any(np.array_equal(x, y) for x in a0 for y in a1)  # disjoint shards
  np.testing.assert_array_equal(np.stack(a0), np.stack(first(0)))  # seeded
  # Iterator state round trip (what the checkpoint stores).
  it = iter(data.make_dataset(cfg, process_index=0, process_count=1, **kw))
  for _ in range(3):
    next(it)
  state = it.get_state()
  json.dumps(state)
  want = [next(it)['tokens'] for _ in range(4)]
  it2 = iter(data.make_dataset(cfg, process_index=0, process_count=1, **kw))
  it2.set_state(state)
  got = [next(it2)['tokens'] for _ in range(4)]
  np.testing.assert_array_equal(np.stack(want), np.stack(got))


@pytest.mark.slow
def test_multiprocess_prefetch_resumes_exactly(tmp_path, tok):
  """Worker processes interleave their shards; the saved state still resumes exactly."""
  path = str(tmp_path / 'd.jsonl')
  data.write_jsonl(path, [{'text': d} for d in DOCS])
  kw = dict(batch_size=2, seq_len=16, objective='pretrain', seed=1, process_index=0,
            process_count=1)
  mp = data.DataConfig(paths=(path,), tokenizer=tok.path, worker_count=2)
  it = iter(data.make_dataset(mp, **kw))
  for _ in range(3):
    assert next(it)['tokens'].shape == (2, 16)
  state = it.get_state()
  want = [next(it)['tokens'] for _ in range(4)]
  it2 = iter(data.make_dataset(mp, **kw))
  it2.set_state(state)
  got = [next(it2)['tokens'] for _ in range(4)]
  np.testing.assert_array_equal(np.stack(want), np.stack(got))


def test_tokenizer_json(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  hf = Tokenizer(models.BPE(unk_token='<unk>'))
  hf.pre_tokenizer = pre_tokenizers.ByteLevel()
  hf.decoder = decoders.ByteLevel()
  hf.train_from_iterator(DOCS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<s>', '<pad>', '</s>', '<unk>', '<|eot_id|>', '<|mdm_mask|>']))
  hf.save(str(tmp_path / 'tokenizer.json'))
  t = text_tokenizer.load(str(tmp_path))
  assert (t.bos_id, t.pad_id, t.eos_id, t.mask_id) == (0, 1, 2, 5)
  assert t.decode(t.encode('hello number 3')).strip() == 'hello number 3'


def test_rows_use_the_models_eos_and_refuse_a_tokenizer_with_another(tmp_path, tok):
  """The model's EOS separates documents and pads SFT rows; the tokenizer's must be one of
  the model's EOS ids, else the error names both."""
  import illada_jax
  docs, pairs = str(tmp_path / 'd.jsonl'), str(tmp_path / 'p.jsonl')
  data.write_jsonl(docs, [{'text': d} for d in DOCS])
  data.write_jsonl(pairs, [{'prompt': 'document', 'response': 'x'}])
  model = illada_jax.get_preset('illada_tiny').replace(vocab_size=64, eos_token_id=9,
                                                       extra_eos_token_ids=(tok.eos_id,))
  first = lambda path, objective='pretrain', model=model: next(iter(data.make_dataset(
      data.DataConfig(paths=(path,), tokenizer=tok.path, shuffle=False), batch_size=1,
      seq_len=16, objective=objective, seed=0, process_index=0, process_count=1,
      repeat=False, model=model)))['tokens'][0].tolist()
  assert first(docs) == ([model.bos_token_id] + tok.encode(DOCS[0]) + [9])[:16]
  assert first(pairs, 'sft')[-1] == 9
  with pytest.raises(ValueError, match=f'EOS id {tok.eos_id} is not the model.s EOS 3'):
    first(docs, model=model.replace(eos_token_id=3, extra_eos_token_ids=()))
