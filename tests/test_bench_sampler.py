"""tools/bench_sampler.py's host-loop baseline runs the same algorithm as the jitted sampler."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import illada_jax
from illada_jax import sampling

_spec = importlib.util.spec_from_file_location(
    'bench_sampler', os.path.join(os.path.dirname(os.path.dirname(__file__)), 'tools',
                                  'bench_sampler.py'))
bench_sampler = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_sampler)

CFG = illada_jax.get_preset('llada_tiny').replace(
    num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_hidden=96,
    vocab_size=90, max_len=64, mask_token_id=80, bos_token_id=81, eos_token_id=82,
    pad_token_id=82, eot_token_id=83, param_dtype='float32', compute_dtype='float32',
    remat_policy='none')
OPTS = dict(gen_length=16, block_length=8, steps=16)


def _params(mask_column: float):
  """Sharpened random params; the head's MASK column is set to `mask_column`."""
  params = jax.tree.map(lambda x: x * 5, illada_jax.init_params(CFG, jax.random.key(0)))
  params['lm_head'] = params['lm_head'].at[:, CFG.mask_token_id].set(mask_column)
  return params


PROMPT = jnp.asarray(np.random.default_rng(0).integers(0, 80, (3, 6)), jnp.int32)


@pytest.mark.parametrize('extra', [{}, {'threshold': 0.5}, {'threshold': 0.5, 'cache': 'dual'}],
                         ids=['fixed', 'threshold', 'threshold+dual'])
def test_host_loop_equals_the_jitted_sampler(extra):
  params = _params(0.)
  o = sampling.SamplingOptions(**OPTS, **extra)
  key = jax.random.key(1)
  want = sampling.sample(CFG, params, PROMPT, **OPTS, **extra, key=key)
  got, nfe = bench_sampler.python_loop(CFG, params, o, PROMPT, key)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want.tokens))
  assert nfe == int(want.nfe)
  if 'threshold' in extra:
    assert nfe < OPTS['steps']  # several commits per step with these sharp weights


def test_host_loop_stops_when_the_model_predicts_mask():
  """A committed MASK stays masked: both loops stop after W calls per block."""
  params = _params(1e3)  # every position's argmax is MASK, confidently
  o = sampling.SamplingOptions(**OPTS, threshold=0.9)
  want = sampling.sample(CFG, params, PROMPT, **OPTS, threshold=0.9)
  got, nfe = bench_sampler.python_loop(CFG, params, o, PROMPT, jax.random.key(0))
  assert nfe == int(want.nfe) == OPTS['gen_length']
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want.tokens))


def test_forward_baseline_applies_the_head_to_the_block_only():
  """As a sampler step: the trunk on all L positions, the LM head on the W of the block."""
  params = _params(0.)
  b, p = PROMPT.shape
  w = OPTS['block_length']
  x = jnp.concatenate([PROMPT, jnp.full((b, OPTS['gen_length']), CFG.mask_token_id)], 1)
  x = x.at[:, p + w + 2].set(7)  # a committed token inside the block
  visible = jnp.ones(x.shape, bool)
  got = bench_sampler.block_forward(CFG, w)(params, x, visible, p + w)
  assert got.shape == (b, w, CFG.vocab_size)
  want = illada_jax.forward(CFG, params, x, visible)[:, p + w:p + 2 * w]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_answer_lengths_stop_at_the_first_eos():
  eos = CFG.eos_token_id
  gen = np.array([[5, 6, eos, 7, eos], [eos, eos, eos, eos, eos], [1, 2, 3, 4, 5]])
  np.testing.assert_array_equal(bench_sampler.answer_lengths(gen, eos), [2, 0, 5])
