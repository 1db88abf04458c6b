"""Pallas attention kernels against the XLA reference, in interpret mode on CPU.

Forward outputs and (dq, dk, dv) of the TPU and GPU kernels are compared with
`xla_attention` over lengths that are not tile multiples, GQA ratios 1/4/8,
head dims 64/128, left and right padding down to one (or zero) visible key,
float32 and bfloat16. float32 must agree to float32 round-off; bfloat16 is
held to twice the error of the XLA path itself against a float32 reference.
Then the whole tiny model: logits and parameter gradients of 'pallas' and
'splash' against 'xla', on one device and on a 2x2x2 mesh.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import illada_jax as ij
from illada_jax import sharding
from illada_jax.attention import attention, xla_attention
from illada_jax.kernels import _common
from illada_jax.kernels.flash_gpu import flash_attention_gpu
from illada_jax.kernels.flash_tpu import flash_attention_tpu

f32 = jnp.float32

TPU_SMALL = functools.partial(flash_attention_tpu, block_q=32, block_k=32, block_q_bwd=16,
                              block_k_bwd=64, interpret=True)
GPU_SMALL = functools.partial(flash_attention_gpu, block_q=8, block_k=32, block_q_bwd=4,
                              block_k_bwd=64, interpret=True)


def _inputs(seed, b, l, s, h, kv, dh, dtype, valid, left=True):
  """Random q/k/v and a key mask with `valid[i]` real keys in row i (None: no mask)."""
  kq, kk, kv_, kw = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (b, l, h, dh), f32).astype(dtype)
  k = jax.random.normal(kk, (b, s, kv, dh), f32).astype(dtype)
  v = jax.random.normal(kv_, (b, s, kv, dh), f32).astype(dtype)
  w = jax.random.normal(kw, (b, l, h, dh), f32)
  if valid is None:
    return q, k, v, None, w
  n = jnp.asarray(valid)[:, None]
  pos = jnp.arange(s)[None]
  mask = pos >= s - n if left else pos < n
  return q, k, v, mask, w


def _value_and_grads(fn, q, k, v, mask, w):
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v, mask).astype(f32) * w)
  out = jax.jit(lambda q, k, v: fn(q, k, v, mask))(q, k, v)
  return (out,) + tuple(jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v))


def _check(kernel, q, k, v, mask, w):
  got = _value_and_grads(kernel, q, k, v, mask, w)
  if q.dtype == f32:
    want = _value_and_grads(xla_attention, q, k, v, mask, w)
    for name, g, r in zip(('out', 'dq', 'dk', 'dv'), got, want):
      scale = float(jnp.max(jnp.abs(r))) + 1e-6
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=2e-5 * scale,
                                 err_msg=name)
    return
  up = [x.astype(f32) for x in (q, k, v)]
  exact = _value_and_grads(xla_attention, *up, mask, w)
  xla_lo = _value_and_grads(xla_attention, q, k, v, mask, w)
  for name, g, r, x in zip(('out', 'dq', 'dk', 'dv'), got, exact, xla_lo):
    err = float(jnp.max(jnp.abs(g.astype(f32) - r)))
    xla_err = float(jnp.max(jnp.abs(x.astype(f32) - r)))
    scale = float(jnp.max(jnp.abs(r)))
    assert err <= 2 * xla_err + 1e-3 * scale, (name, err, xla_err, scale)


# (L, S, H, KV, Dh, dtype, valid keys per row, left padding)
CASES = [
    (40, 40, 2, 2, 64, f32, [1, 40], True),       # MHA, one visible key, left pad
    (130, 130, 8, 2, 128, f32, [2, 97], True),    # GQA 4, L not a tile multiple
    (130, 130, 8, 1, 64, f32, [3, 130], False),   # GQA 8, right padding
    (40, 130, 8, 2, 64, f32, None, True),         # L != S, no mask
    (130, 130, 8, 2, 64, jnp.bfloat16, [1, 70], True),
    (40, 40, 8, 1, 128, jnp.bfloat16, None, True),
]
SLOW = {1, 4}


def _params(cases):
  return [pytest.param(*c, marks=pytest.mark.slow) if i in SLOW else c
          for i, c in enumerate(cases)]


@pytest.mark.parametrize('l,s,h,kv,dh,dtype,valid,left', _params(CASES))
def test_tpu_kernel_matches_xla(l, s, h, kv, dh, dtype, valid, left):
  _check(TPU_SMALL, *_inputs(0, 2, l, s, h, kv, dh, dtype, valid, left))


@pytest.mark.parametrize('l,s,h,kv,dh,dtype,valid,left', _params(CASES))
def test_gpu_kernel_matches_xla(l, s, h, kv, dh, dtype, valid, left):
  _check(GPU_SMALL, *_inputs(1, 2, l, s, h, kv, dh, dtype, valid, left))


@pytest.mark.parametrize('kernel', [TPU_SMALL, GPU_SMALL], ids=['tpu', 'gpu'])
def test_row_without_visible_keys_is_uniform_like_xla(kernel):
  # A fully padded row: XLA gives a uniform distribution over the S keys (and
  # its gradients); the kernels keep max and sum apart so they do the same.
  _check(kernel, *_inputs(2, 2, 40, 40, 4, 1, 64, f32, [0, 5]))


def test_default_tiles_match_xla():
  # Default (8k) block sizes clamp to one tile on short sequences.
  q, k, v, mask, w = _inputs(3, 1, 72, 72, 8, 2, 64, f32, [30])
  _check(functools.partial(flash_attention_tpu, interpret=True), q, k, v, mask, w)


def test_tiles_pad_and_clamp():
  assert _common.tiles(40, 256, 512) == (40, 40, 40)
  assert _common.tiles(130, 32, 16) == (160, 32, 16)
  assert _common.tiles(8192, 256, 512) == (8192, 256, 512)
  assert _common.tiles(300, 256, 512) == (512, 256, 512)
  with pytest.raises(ValueError):
    _common.tiles(1000, 96, 128)


def test_gpu_kernel_needs_power_of_two_tiles():
  q, k, v, mask, _ = _inputs(4, 1, 16, 16, 6, 2, 64, f32, None)
  with pytest.raises(ValueError, match='G=3'):
    flash_attention_gpu(q, k, v, mask, interpret=True)


def test_gpu_kernel_lowers_for_cuda():
  # No GPU here: lowering runs the Pallas->Triton IR translation of all three
  # kernels (forward, dK/dV, dQ); only PTX compilation is left untested.
  q, k, v, mask, _ = _inputs(5, 1, 256, 256, 32, 8, 128, jnp.bfloat16, [200])

  def fwd_bwd(q, k, v):
    return jax.grad(lambda *a: jnp.sum(flash_attention_gpu(*a, mask).astype(f32)),
                    (0, 1, 2))(q, k, v)

  text = jax.jit(fwd_bwd).trace(q, k, v).lower(lowering_platforms=('cuda',)).as_text()
  assert text.count('__gpu$xla.gpu.triton') == 3, text.count('__gpu$xla.gpu.triton')


def test_unknown_impl_is_refused():
  q, k, v, _, _ = _inputs(6, 1, 8, 8, 2, 1, 64, f32, None)
  with pytest.raises(ValueError, match='not available'):
    attention(q, k, v, impl='flash3')


# -- the whole model ------------------------------------------------------------

def _model_case():
  cfg = ij.get_preset('illada_tiny').replace(compute_dtype='float32', param_dtype='float32')
  params = ij.init_params(cfg, jax.random.key(0))
  b, l = 2, 40
  tokens = jax.random.randint(jax.random.key(1), (b, l), 0, cfg.vocab_size)
  mask = (jnp.arange(l)[None] >= jnp.array([31, 0])[:, None]).astype(jnp.int32)
  return cfg, params, tokens, mask


def _loss(cfg, params, tokens, mask):
  logits = ij.Transformer(cfg).apply({'params': params}, tokens, mask)
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  return jnp.sum(nll * mask) / jnp.sum(mask), logits


def _assert_tree_close(a, b, rtol=1e-4, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol * (float(jnp.max(jnp.abs(y))) + 1e-6))


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['pallas', 'splash'])
def test_model_logits_and_grads_match_xla(impl):
  cfg, params, tokens, mask = _model_case()
  grad = lambda c: jax.jit(jax.value_and_grad(functools.partial(_loss, c), has_aux=True))(
      params, tokens, mask)
  (_, want_logits), want_grads = grad(cfg)
  (_, got_logits), got_grads = grad(cfg.replace(attention_impl=impl))
  real = mask.astype(bool)  # padded positions' logits are meaningless by contract
  np.testing.assert_allclose(np.asarray(got_logits[real]), np.asarray(want_logits[real]),
                             rtol=1e-4, atol=1e-4)
  _assert_tree_close(got_grads, want_grads)


def test_model_on_a_mesh_shard_maps_the_kernel():
  cfg, params, tokens, mask = _model_case()
  want = ij.forward(cfg, params, tokens, mask)
  pcfg = cfg.replace(attention_impl='pallas')
  mesh = ij.make_mesh('data=2,fsdp=2,tensor=2')  # tensor=2 splits K=2 KV heads
  sharded = jax.device_put(params, ij.param_shardings(pcfg, mesh))
  with sharding.activation_sharding(mesh):
    text = jax.jit(lambda p: ij.Transformer(pcfg).apply({'params': p}, tokens, mask)).lower(
        sharded).as_text()
  assert 'shard_map' in text or 'sdy.manual_computation' in text
  got = ij.forward(pcfg, sharded, tokens, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got[real]), np.asarray(want[real]), rtol=1e-4, atol=1e-4)
