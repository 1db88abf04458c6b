"""Losses against a direct NumPy computation on fixed masks (SPEC §4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from illada_jax import get_preset, init_params, loss
from illada_jax.model import forward

CFG = get_preset('illada_tiny').replace(
    num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_hidden=128,
    vocab_size=97, mask_token_id=5, param_dtype='float32', compute_dtype='float32')


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _ce_np(logits_BLV, tokens_BL):
  lp = _log_softmax(np.asarray(logits_BLV, np.float64))
  return -np.take_along_axis(lp, tokens_BL[..., None], -1)[..., 0]


@pytest.fixture(scope='module')
def setup():
  params = init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(6, CFG.vocab_size, (3, 10)).astype(np.int32)
  return params, tokens, rng


@pytest.mark.parametrize('chunk', [3, 4, 10, 512])
def test_pretrain_matches_numpy(setup, chunk):
  params, tokens, rng = setup
  masked = rng.random(tokens.shape) < 0.5
  masked[0, 0] = True
  p = np.array([0.3, 0.7, 0.05], np.float32)
  noisy = np.where(masked, CFG.mask_token_id, tokens).astype(np.int32)
  valid = np.ones_like(masked)
  noise = loss.Noise(jnp.asarray(noisy), jnp.asarray(masked), jnp.asarray(p), jnp.asarray(valid))
  got, metrics = loss.pretrain_loss_from_noise(CFG, params, jnp.asarray(tokens), noise, chunk=chunk)
  logits = np.asarray(forward(CFG, params, jnp.asarray(noisy)))
  ce = _ce_np(logits, tokens)
  want = (ce * masked / p[:, None]).sum() / tokens.size
  np.testing.assert_allclose(float(got), want, rtol=2e-5)
  acc = (logits.argmax(-1) == tokens)[masked].mean()
  np.testing.assert_allclose(float(metrics['masked_accuracy']), acc, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['masked_ce']), ce[masked].mean(), rtol=2e-5)


def test_pretrain_random_length_equals_truncated_batch(setup):
  """A cut batch (key-padding mask) gives the loss of the truncated batch."""
  params, tokens, rng = setup
  cut = 6
  masked = rng.random(tokens.shape) < 0.5
  masked[:, cut:] = False
  masked[:, 0] = True
  p = np.array([0.5, 0.2, 0.9], np.float32)
  noisy = np.where(masked, CFG.mask_token_id, tokens).astype(np.int32)
  valid = np.broadcast_to(np.arange(tokens.shape[1]) < cut, tokens.shape)
  noise = loss.Noise(jnp.asarray(noisy), jnp.asarray(masked), jnp.asarray(p), jnp.asarray(valid))
  got, _ = loss.pretrain_loss_from_noise(CFG, params, jnp.asarray(tokens), noise, chunk=4)
  logits = np.asarray(forward(CFG, params, jnp.asarray(noisy[:, :cut])))
  ce = _ce_np(logits, tokens[:, :cut])
  want = (ce * masked[:, :cut] / p[:, None]).sum() / (tokens.shape[0] * cut)
  np.testing.assert_allclose(float(got), want, rtol=2e-5)


def test_sft_matches_numpy(setup):
  params, tokens, rng = setup
  prompt_len = np.array([3, 5, 1])
  eos = CFG.eos_token_id
  tokens = tokens.copy()
  tokens[0, 7:] = eos  # EOS padding is part of the response
  response = np.arange(tokens.shape[1])[None] >= prompt_len[:, None]
  masked = (rng.random(tokens.shape) < 0.6) & response
  masked[:, -1] = True
  p = np.array([0.6, 0.25, 0.8], np.float32)
  noisy = np.where(masked, CFG.mask_token_id, tokens).astype(np.int32)
  noise = loss.Noise(jnp.asarray(noisy), jnp.asarray(masked), jnp.asarray(p),
                     jnp.ones(tokens.shape, bool))
  got, _ = loss.sft_loss_from_noise(CFG, params, jnp.asarray(tokens), jnp.asarray(response),
                                    noise, chunk=4)
  logits = np.asarray(forward(CFG, params, jnp.asarray(noisy)))
  ce = _ce_np(logits, tokens)
  r = response.sum(1)
  want = np.mean((ce * masked).sum(1) / (p * r))
  np.testing.assert_allclose(float(got), want, rtol=2e-5)


def test_draw_noise_statistics():
  tokens = jnp.full((4000, 64), 7, jnp.int32)
  maskable = jnp.broadcast_to(jnp.arange(64) >= 16, tokens.shape)
  noise = loss.draw_noise(jax.random.key(1), tokens, 5, maskable_BL=maskable)
  m = np.asarray(noise.masked_BL)
  assert not m[:, :16].any()
  assert np.all(np.asarray(noise.noisy_BL)[m] == 5)
  p = np.asarray(noise.p_B)
  assert p.min() >= 1e-3 and p.max() <= 1.0
  # Per-row masked fraction tracks p; p is ~uniform on [eps, 1].
  np.testing.assert_allclose(m[:, 16:].mean(1), p, atol=0.3)
  assert abs(np.corrcoef(m[:, 16:].mean(1), p)[0, 1] - 1) < 0.05
  assert abs(p.mean() - 0.5) < 0.02


def test_random_length_probability():
  tokens = jnp.zeros((2, 32), jnp.int32)
  keys = jax.random.split(jax.random.key(0), 2000)
  valid = jax.vmap(lambda k: loss.draw_noise(k, tokens, 5, random_length_prob=0.01).valid_BL)(keys)
  cut = ~np.asarray(valid).all(axis=(1, 2))
  assert 5 <= cut.sum() <= 40  # ~1% of 2000 (the U{1..L} draw may return L)


def test_chunked_grad_matches_full(setup):
  """The rematerialised chunked head has the gradient of the plain one."""
  params, tokens, rng = setup
  masked = rng.random(tokens.shape) < 0.5
  p = np.array([0.3, 0.7, 0.4], np.float32)
  noisy = np.where(masked, CFG.mask_token_id, tokens).astype(np.int32)
  noise = loss.Noise(jnp.asarray(noisy), jnp.asarray(masked), jnp.asarray(p),
                     jnp.ones(tokens.shape, bool))
  f = lambda prm, c: loss.pretrain_loss_from_noise(CFG, prm, jnp.asarray(tokens), noise, chunk=c)[0]
  grad = jax.jit(jax.grad(f), static_argnums=1)
  g3, g_full = grad(params, 3), grad(params, 512)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g3, g_full)


def test_no_full_logits_in_chunked_hlo():
  """The compiled loss never holds a [B, L, V] float32 array."""
  cfg = CFG.replace(vocab_size=4099)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((2, 256), jnp.int32)
  f = lambda prm, t: jax.value_and_grad(
      lambda q: loss.pretrain_loss(cfg, q, t, jax.random.key(0), chunk=32)[0])(prm)
  hlo = jax.jit(f).lower(params, tokens).as_text()
  assert 'tensor<2x256x4099xf32>' not in hlo
  assert 'tensor<2x32x4099xf32>' in hlo
