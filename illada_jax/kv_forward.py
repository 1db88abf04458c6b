"""The Transformer trunk as a function of its params, with per-layer K/V exposed.

Used by the approximate block KV cache of the fast sampler (SPEC §2, "Faster
sampling"). `forward_with_kv` runs the whole canvas and returns every layer's
keys and values; `forward_window` recomputes only a contiguous window of
positions, writing the window's fresh K/V over the cached ones and attending
to the full canvas. With a cache computed from the same tokens, the window's
hidden states equal `Transformer.hidden` on those positions (tested).

The layer math is `model.Block` written over the param tree so the cache can
enter and leave each layer; it reuses the model's own `rms_norm`,
`apply_rope`, `Mlp` and attention dispatch, so only the wiring is restated.

Cache layout: `(k_NBLKD, v_NBLKD)`, `N` layers, compute dtype, RoPE applied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from illada_jax import model as model_lib
from illada_jax import sharding
from illada_jax.attention import attention
from illada_jax.config import ModelConfig

_KV_NAMES = ('act_batch', 'act_length', 'act_kv_heads', 'act_head_dim')


def _stacked_layers(cfg: ModelConfig, params):
  if cfg.scan_layers:
    return params['layers']
  return model_lib.stack_layers(params, cfg.num_layers)['layers']


def _layer(cfg: ModelConfig, p, x_BWD, positions_BW, kv_BLKD, start, kv_mask_BL):
  """One pre-norm block over a window; returns (x_BWD, (k_BLKD, v_BLKD)) with the window written."""
  dt = cfg.dtype
  a = p['attn']
  h_BWD = model_lib.rms_norm(x_BWD, p['attn_norm']['scale'], cfg.norm_eps)
  q_BWHD = model_lib._matmul('bld,dhk->blhk', h_BWD, a['q_proj'], dt)
  k_BWKD = model_lib._matmul('bld,dhk->blhk', h_BWD, a['k_proj'], dt)
  v_BWKD = model_lib._matmul('bld,dhk->blhk', h_BWD, a['v_proj'], dt)
  q_BWHD = model_lib.apply_rope(q_BWHD, positions_BW, cfg.rope_theta)
  k_BWKD = model_lib.apply_rope(k_BWKD, positions_BW, cfg.rope_theta)
  k_BLKD, v_BLKD = kv_BLKD
  k_BLKD = jax.lax.dynamic_update_slice_in_dim(k_BLKD, k_BWKD.astype(k_BLKD.dtype), start, 1)
  v_BLKD = jax.lax.dynamic_update_slice_in_dim(v_BLKD, v_BWKD.astype(v_BLKD.dtype), start, 1)
  k_BLKD = sharding.constrain(k_BLKD, _KV_NAMES)
  v_BLKD = sharding.constrain(v_BLKD, _KV_NAMES)
  out_BWHD = attention(q_BWHD, k_BLKD, v_BLKD, kv_mask_BL, impl=cfg.attention_impl)
  x_BWD = x_BWD + model_lib._matmul('blhk,hkd->bld', out_BWHD, a['o_proj'], dt)
  x_BWD = sharding.constrain(x_BWD, ('act_batch', 'act_length', 'act_embed'))
  m_BWD = model_lib.rms_norm(x_BWD, p['mlp_norm']['scale'], cfg.norm_eps)
  x_BWD = x_BWD + model_lib.Mlp(cfg).apply({'params': p['mlp']}, m_BWD)
  x_BWD = sharding.constrain(x_BWD, ('act_batch', 'act_length', 'act_embed'))
  return x_BWD, (k_BLKD, v_BLKD)


def empty_cache(cfg: ModelConfig, b: int, l: int):
  """Zero `(k_NBLKD, v_NBLKD)` in the compute dtype."""
  shape = (cfg.num_layers, b, l, cfg.num_kv_heads, cfg.head_dim)
  return jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)


def forward_window(cfg: ModelConfig, params, tokens_BW, start, cache, kv_mask_BL=None):
  """Hidden states of the window `[start, start + W)` against a cached canvas.

  Args:
    tokens_BW: int `[B, W]`, the window's current tokens.
    start: int (static or traced), the window's first absolute position.
    cache: `(k_NBLKD, v_NBLKD)`; the window's slots are overwritten.
    kv_mask_BL: bool/int `[B, L]` key mask over the whole canvas, or None.
  Returns:
    final-normed hidden `[B, W, D]` (compute dtype) and the updated cache.
  """
  b, w = tokens_BW.shape
  positions_BW = jnp.broadcast_to(start + jnp.arange(w, dtype=jnp.int32), (b, w))
  kv_mask_BL = None if kv_mask_BL is None else kv_mask_BL.astype(bool)
  x_BWD = jnp.take(params['embedder']['embedding'], tokens_BW, axis=0).astype(cfg.dtype)

  def body(x_BWD, layer):
    p, k_BLKD, v_BLKD = layer
    x_BWD, kv = _layer(cfg, p, x_BWD, positions_BW, (k_BLKD, v_BLKD), start, kv_mask_BL)
    return x_BWD, kv

  x_BWD, cache = jax.lax.scan(body, x_BWD, (_stacked_layers(cfg, params), *cache))
  return model_lib.rms_norm(x_BWD, params['final_norm']['scale'], cfg.norm_eps), cache


def forward_with_kv(cfg: ModelConfig, params, tokens_BL, kv_mask_BL=None):
  """Full pass: final-normed hidden `[B, L, D]` and the fresh cache `(k_NBLKD, v_NBLKD)`."""
  b, l = tokens_BL.shape
  return forward_window(cfg, params, tokens_BL, 0, empty_cache(cfg, b, l), kv_mask_BL)


def head(cfg: ModelConfig, params, x_BWD):
  """The model's LM head on any `[B, W, D]` hidden states -> float32 `[B, W, V]`."""
  return model_lib.Transformer(cfg).apply({'params': params}, x_BWD, method='logits')
