"""Named settings (configs/sampling.py, configs/scoring.py) through the CLIs; flags override."""

import json

import numpy as np
import pytest

import illada_jax
from illada_jax import prompts, sampling, scoring
from illada_jax.cli import sample as sample_cli
from illada_jax.cli import score as score_cli

from helpers import WORD_CFG as CFG
from helpers import word_checkpoint, write_jsonl


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  return word_checkpoint(str(tmp_path_factory.mktemp('ckpt')))


def test_published_instruct_preset():
  o = illada_jax.sampling_preset('illada_instruct')
  assert (o.steps, o.block_length, o.gen_length, o.variable_length, o.temperature) == (
      32, 32, 2048, True, 0.)
  assert (o.end_think, o.end_think_boost, o.end_think_power) == ('</think>', 100., 3.)
  assert illada_jax.sampling_preset('illada_instruct_math').gen_length == 4096
  with pytest.raises(ValueError, match='unknown sampling preset'):
    illada_jax.sampling_preset('nope')


def test_sample_cli_preset_with_overrides(ckpt, tmp_path):
  path, params = ckpt
  out = tmp_path / 'out.jsonl'
  assert sample_cli.main(['--ckpt', path, '--prompt', 'w3 w4', '--preset', 'illada_instruct',
                          '--gen-length', '16', '--block-length', '8', '--steps', '8',
                          '--end-think', 'w1 w2', '--out', str(out), '--no-progress']) == 0
  got = json.loads(out.read_text())
  o = illada_jax.sampling_preset('illada_instruct').replace(
      gen_length=16, block_length=8, steps=8, end_think='w1 w2')
  tok = prompts.load_tokenizer(path)
  res = sampling.sample(CFG, params, np.asarray([[9, 10]]), options=o, tokenizer=tok)  # T = 0
  gen = prompts.completion_ids(CFG, np.asarray(res.tokens)[0, 2:])
  assert got['completion'] == tok.decode(gen)
  assert 'w1 w2' in got['completion']


def test_score_cli_preset_greedy_and_bos_flags(ckpt, tmp_path):
  path, params = ckpt
  data = write_jsonl(tmp_path / 'items.jsonl', [{'context': 'w1 w2', 'choices': ['w3', 'w4 w5']}])
  out = tmp_path / 'scores.jsonl'
  assert score_cli.main(['--ckpt', path, '--input', data, '--out', str(out), '--no-progress',
                         '--preset', 'illada_confidence', '--check-greedy']) == 0
  rec = json.loads(out.read_text())
  pairs = [([7, 8], [9]), ([7, 8], [10, 11])]
  kw = dict(add_bos=True, padd_eos=True)
  np.testing.assert_allclose(rec['scores'], scoring.confidence_score(CFG, params, pairs, **kw),
                             rtol=1e-5)
  assert rec['greedy'] == scoring.greedy_match(CFG, params, pairs, **kw).tolist()
  out2 = tmp_path / 'scores2.jsonl'
  assert score_cli.main(['--ckpt', path, '--input', data, '--out', str(out2), '--no-progress',
                         '--preset', 'illada_confidence', '--no-add-bos']) == 0
  rec = json.loads(out2.read_text())
  np.testing.assert_allclose(rec['scores'], scoring.confidence_score(CFG, params, pairs,
                                                                     padd_eos=True), rtol=1e-5)
  assert 'greedy' not in rec


def test_boolean_flags_turn_a_preset_field_off_and_on():
  import argparse
  from illada_jax.cli import _common
  from illada_jax.configs.sampling import PRESETS
  p = argparse.ArgumentParser()
  _common.add_options(p, sampling.SamplingOptions, 'sampling', PRESETS)
  def opts(*argv):
    return _common.options_from(p.parse_args(list(argv)), sampling.SamplingOptions, PRESETS)
  assert opts('--preset', 'illada_instruct').variable_length
  assert not opts('--preset', 'illada_instruct', '--no-variable-length',
                  '--gen-length', '64', '--steps', '64').variable_length
  assert opts('--after-think').after_think and not opts().after_think
