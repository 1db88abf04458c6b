"""Checkpoints written by transformers itself: configs of 5.x and 4.x, logits against it."""

import json

import numpy as np
import pytest

import illada_jax
from illada_jax import ModelConfig, checkpoint
from helpers import WORD_CFG, transformers_llama, transformers_logits

pytestmark = pytest.mark.torch
TINY = WORD_CFG.replace(rope_theta=500000.0, tie_embeddings=False, num_layers=2)


def _as_4x(conf):
  """transformers 4.x's spelling of the same config: top-level rope_theta, rope_scaling."""
  rope = conf.pop('rope_parameters')
  conf.update(rope_theta=rope['rope_theta'], rope_scaling=None,
              torch_dtype=conf.pop('dtype', 'float32'), transformers_version='4.46.0')
  return conf


@pytest.mark.parametrize('style', ['5.x', '4.x'])
def test_logits_match_transformers_for_its_own_checkpoints(tmp_path, style):
  src = transformers_llama(tmp_path / 'hf', TINY, seed=1,
                           config_edit=_as_4x if style == '4.x' else None)
  conf = json.load(open(tmp_path / 'hf' / 'config.json'))
  assert ('rope_theta' in conf) == (style == '4.x')  # 5.x: only inside rope_parameters
  cfg = checkpoint.hf_to_orbax(src, tmp_path / 'ck', dtype='float32', progress=False)
  assert cfg.rope_theta == 500000.0
  cfg, params = illada_jax.load_checkpoint(tmp_path / 'ck')
  cfg = cfg.replace(compute_dtype='float32')
  tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 24))
  want = transformers_logits(src, tokens)
  got = np.asarray(illada_jax.forward(cfg, params, tokens))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(want).max() > 1.0
  wrong = np.asarray(illada_jax.forward(cfg.replace(rope_theta=10000.0), params, tokens))
  assert np.abs(wrong - want).max() > 1e-3  # the test sees theta


@pytest.mark.parametrize('key, rope', [
    ('rope_parameters', {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                         'high_freq_factor': 4.0, 'original_max_position_embeddings': 32,
                         'rope_theta': 500000.0}),
    ('rope_parameters', {'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 10000.0}),
    ('rope_scaling', {'type': 'linear', 'factor': 2.0}),
    ('rope_scaling', {'rope_type': 'dynamic', 'factor': 2.0}),
])
def test_rope_types_not_implemented_are_refused_by_name(key, rope):
  hf = {**TINY.to_hf(), key: rope}
  hf.pop('rope_parameters') if key == 'rope_scaling' else None
  with pytest.raises(ValueError, match=f"{key} rope_type='{rope.get('rope_type', rope.get('type'))}'"):
    ModelConfig.from_hf(hf)


def test_rope_theta_from_either_spelling_and_conflicts():
  base = {k: v for k, v in TINY.to_hf().items() if not k.startswith('rope')}
  read = lambda **kw: ModelConfig.from_hf({**base, **kw}).rope_theta
  assert read(rope_parameters={'rope_type': 'default', 'rope_theta': 123.0}) == 123.0
  assert read(rope_theta=321.0, rope_scaling=None) == 321.0
  assert read(rope_scaling={'type': 'default'}) == 10000.0  # transformers' default
  with pytest.raises(ValueError, match='given differently'):
    read(rope_theta=1.0, rope_parameters={'rope_type': 'default', 'rope_theta': 2.0})
