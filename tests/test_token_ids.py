"""Token ids come from the checkpoint: config.json, then its tokenizer files (SPEC §1)."""

import json

import pytest

from illada_jax import ModelConfig
from helpers import tiny_cfg

LLADA_8B_MASK = 126336


def _llada_small_hf(**drop_or_set):
  """config.json of a vocab-128 LLaDA-layout checkpoint with the keys the reference writes."""
  hf = tiny_cfg('llada').to_hf()
  for k, v in drop_or_set.items():
    if v is None:
      hf.pop(k, None)
    else:
      hf[k] = v
  return hf


def _write(tmp_path, hf, files=()):
  (tmp_path / 'config.json').write_text(json.dumps(hf))
  for name, obj in dict(files).items():
    (tmp_path / name).write_text(json.dumps(obj))
  return tmp_path / 'config.json'


def test_small_llada_without_bos_or_eot_gets_none():
  cfg = ModelConfig.from_hf(_llada_small_hf(bos_token_id=None, eot_token_id=None))
  assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (120, 122, 122)
  assert cfg.bos_token_id is None and cfg.eot_token_id is None
  assert 'bos_token_id' not in cfg.to_hf() and ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_8b_table_applies_only_to_that_exact_vocabulary():
  llada_8b = ModelConfig.from_hf(tiny_cfg('llada').replace(vocab_size=126464).to_hf())
  small = {k: v for k, v in llada_8b.to_hf().items() if k not in ('bos_token_id', 'eot_token_id')}
  assert ModelConfig.from_hf(small).bos_token_id == 126080  # the published LLaDA vocabulary
  other = {**small, 'vocab_size': 126465, 'embedding_size': 126465}
  assert ModelConfig.from_hf(other).bos_token_id is None


@pytest.mark.parametrize('vocab', [126464, 155136, 200000])
def test_illada_never_gets_the_llada_mask(vocab):
  hf = {k: v for k, v in tiny_cfg('illada').replace(vocab_size=vocab).to_hf().items()
        if k != 'mask_token_id'}
  if vocab == 155136:  # the published iLLaDA vocabulary: its own table
    assert ModelConfig.from_hf(hf).mask_token_id == 5
  else:
    with pytest.raises(ValueError, match='no mask token id'):
      ModelConfig.from_hf(hf)


@pytest.mark.parametrize('files', [
    {'tokenizer.json': {'added_tokens': [{'id': 126, 'content': '<|mdm_mask|>'}]}},
    {'tokenizer_config.json': {'added_tokens_decoder': {'126': {'content': '<[MASK]>'}}}},
    {'special_tokens_map.json': {'mask_token': {'content': '<m>'}},
     'tokenizer.json': {'model': {'vocab': {'a': 0, '<m>': 126}}}},
], ids=['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'])
def test_mask_id_given_only_by_the_tokenizer_files_is_found(tmp_path, files):
  path = _write(tmp_path, _llada_small_hf(mask_token_id=None), files)
  assert ModelConfig.from_hf_file(path).mask_token_id == 126


def test_other_ids_from_the_tokenizer_files_and_config_json_first(tmp_path):
  hf = _llada_small_hf(bos_token_id=None, eos_token_id=None, pad_token_id=None,
                       eot_token_id=None, mask_token_id=7)
  added = [{'id': i, 'content': t} for i, t in
           [(100, '<|startoftext|>'), (101, '<|endoftext|>'), (102, '<|eot_id|>'),
            (103, '<|mdm_mask|>')]]
  path = _write(tmp_path, hf, {
      'tokenizer.json': {'added_tokens': added},
      'special_tokens_map.json': {'bos_token': '<|startoftext|>'},
      'tokenizer_config.json': {'eos_token': {'content': '<|endoftext|>'}}})
  cfg = ModelConfig.from_hf_file(path)
  assert cfg.mask_token_id == 7  # config.json wins over the tokenizer's <|mdm_mask|>
  assert (cfg.bos_token_id, cfg.eos_token_id, cfg.eot_token_id) == (100, 101, 102)
  assert cfg.pad_token_id == 101  # no PAD anywhere: the EOS, as in LLaDA


def test_missing_mask_id_says_where_it_looked(tmp_path):
  path = _write(tmp_path, _llada_small_hf(mask_token_id=None),
                {'tokenizer_config.json': {'bos_token': '<s>'}})
  with pytest.raises(ValueError) as info:
    ModelConfig.from_hf_file(path)
  msg = str(info.value)
  for part in (str(path), "'mask_token_id'", "'mask_token'", '<|mdm_mask|>', str(tmp_path),
               'found: tokenizer_config.json', 'vocabulary 128'):
    assert part in msg, (part, msg)



def test_every_declared_eos_id_ends_a_request(tmp_path):
  """config.json lists, generation_config.json and the tokenizer's EOS all end a request."""
  import numpy as np
  from illada_jax import prompts, sampling
  hf = _llada_small_hf(eos_token_id=[122, 7])
  (tmp_path / 'generation_config.json').write_text(json.dumps({'eos_token_id': [122, 9, 7]}))
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
      {'eos_token': '<end>', 'added_tokens_decoder': {'11': {'content': '<end>'}}}))
  cfg = ModelConfig.from_hf(hf, tmp_path)
  assert cfg.eos_token_id == 122 and cfg.extra_eos_token_ids == (7, 9, 11)
  assert cfg.end_token_ids == (122, 7, 9, 11, 123)  # and EOT
  assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  assert cfg.to_hf()['eos_token_id'] == [122, 7, 9, 11]
  assert ModelConfig.from_hf(cfg.to_hf()) == cfg
  x = np.array([[3, 7, 122, 9, 11, 123, 4]])
  np.testing.assert_array_equal(sampling.is_end(cfg, x), [[0, 1, 1, 1, 1, 1, 0]])
  assert prompts.completion_ids(cfg, [3, 4, 9, 5]) == [3, 4]
