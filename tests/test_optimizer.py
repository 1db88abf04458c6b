"""Schedules, decay mask and one AdamW step against a hand computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from illada_jax import get_preset, optimizer
from illada_jax.model import abstract_params


def test_wsd_schedule():
  cfg = optimizer.OptimizerConfig(lr=1.0, schedule='wsd', warmup_steps=10, total_steps=100,
                                  decay_fraction=0.2, final_lr_fraction=0.0)
  s = optimizer.learning_rate_schedule(cfg)
  np.testing.assert_allclose([s(0), s(5), s(10), s(50), s(80), s(90), s(100)],
                             [0, 0.5, 1, 1, 1, 0.5, 0], atol=1e-6)


def test_cosine_schedule():
  cfg = optimizer.OptimizerConfig(lr=2.0, schedule='cosine', warmup_steps=10, total_steps=110,
                                  final_lr_fraction=0.1)
  s = optimizer.learning_rate_schedule(cfg)
  np.testing.assert_allclose([s(0), s(10), s(60), s(110)], [0, 2.0, 1.1, 0.2], atol=1e-5)


def test_unknown_schedule():
  with pytest.raises(ValueError, match='schedule'):
    optimizer.learning_rate_schedule(optimizer.OptimizerConfig(schedule='step'))


def test_decay_mask_excludes_norms():
  params = abstract_params(get_preset('illada_tiny'))
  mask = optimizer.decay_mask(params)
  assert mask['embedder']['embedding']
  assert mask['layers']['attn']['q_proj'] and mask['layers']['mlp']['down_proj']
  assert not mask['layers']['attn_norm']['scale'] and not mask['final_norm']['scale']


def test_adamw_step_by_hand():
  """First step: update = -lr (g_hat / (|g_hat| + eps) + wd * w) where decayed; clipping first."""
  cfg = optimizer.OptimizerConfig(lr=0.1, schedule='constant', warmup_steps=0, weight_decay=0.5,
                                  clip_norm=1.0, adam_eps=1e-8)
  params = {'w': jnp.array([[1.0, -2.0]]), 'scale': jnp.array([3.0])}
  grads = {'w': jnp.array([[3.0, 0.0]]), 'scale': jnp.array([4.0])}
  tx = optimizer.make_optimizer(cfg)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Clipped grads (norm 5 -> 1): w [0.6, 0], scale [0.8]; Adam's first step is sign(g).
  np.testing.assert_allclose(updates['w'], -0.1 * (np.array([[1.0, 0.0]]) + 0.5 * np.array([[1.0, -2.0]])),
                             rtol=1e-5)
  np.testing.assert_allclose(updates['scale'], [-0.1], rtol=1e-5)


def test_state_dtype():
  cfg = optimizer.OptimizerConfig(state_dtype='bfloat16')
  state = optimizer.make_optimizer(cfg).init({'w': jnp.ones((2, 2))})
  mus = [x for x in jax.tree.leaves(state) if getattr(x, 'shape', None) == (2, 2)]
  assert {str(m.dtype) for m in mus} == {'bfloat16', 'float32'}  # mu bf16, nu f32
