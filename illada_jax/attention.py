"""Bidirectional grouped-query attention, dispatched on `cfg.attention_impl`.

All implementations share one contract:

  q_BLHD: [B, L, H, Dh]   queries, compute dtype, RoPE applied
  k_BSKD: [B, S, K, Dh]   keys (K = KV heads; H % K == 0)
  v_BSKD: [B, S, K, Dh]   values
  kv_mask_BS: [B, S] bool or None; False keys are invisible to every query
  returns [B, L, H, Dh] in the dtype of q

Query head h reads KV head h // (H // K). There is no causal mask.

Implementations: 'xla' (below, the reference), 'pallas' (own flash kernels:
TPU, GPU, interpret mode on CPU) and 'splash' (jax's TPU splash attention);
see illada_jax/kernels and docs/kernels.md.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

# Score of a hidden key, here and in the kernels. Finite so that a query with
# no visible key gives a uniform (ignored) distribution instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def xla_attention(q_BLHD, k_BSKD, v_BSKD, kv_mask_BS=None):
  """Reference attention in plain XLA: materialises [B, K, G, L, S] scores.

  GQA is a grouped einsum over a [B, L, K, G, Dh] view of the queries, so K/V
  are never repeated in memory. Scores and softmax are float32; the
  probabilities are cast to the compute dtype before the value matmul, which
  accumulates in float32.
  """
  b, l, h, dh = q_BLHD.shape
  k = k_BSKD.shape[2]
  q_BLKGD = q_BLHD.reshape(b, l, k, h // k, dh)
  scores_BKGLS = jnp.einsum('blkgd,bskd->bkgls', q_BLKGD, k_BSKD,
                            preferred_element_type=jnp.float32)
  scores_BKGLS = scores_BKGLS * (dh ** -0.5)
  if kv_mask_BS is not None:
    scores_BKGLS = jnp.where(kv_mask_BS[:, None, None, None, :], scores_BKGLS, MASK_VALUE)
  probs_BKGLS = jax.nn.softmax(scores_BKGLS, axis=-1).astype(v_BSKD.dtype)
  out_BLKGD = jnp.einsum('bkgls,bskd->blkgd', probs_BKGLS, v_BSKD,
                         preferred_element_type=jnp.float32)
  return out_BLKGD.reshape(b, l, h, dh).astype(q_BLHD.dtype)


_IMPLS = {'xla': xla_attention}

# Kernel implementations, imported on first use so that importing the model
# does not import Pallas: name -> (module, attribute).
_LAZY = {
    'pallas': ('illada_jax.kernels.dispatch', 'pallas_attention'),
    'splash': ('illada_jax.kernels.dispatch', 'splash_attention'),
}


def register(name: str, fn) -> None:
  """Adds an attention implementation under `name` (used by kernel packages)."""
  _IMPLS[name] = fn


def attention(q_BLHD, k_BSKD, v_BSKD, kv_mask_BS=None, *, impl: str = 'xla'):
  """Dispatches to the implementation named by `impl` (see module docstring)."""
  if impl not in _IMPLS and impl in _LAZY:
    module, attr = _LAZY[impl]
    register(impl, getattr(importlib.import_module(module), attr))
  try:
    fn = _IMPLS[impl]
  except KeyError:
    raise ValueError(f'attention_impl={impl!r} is not available; have {sorted(_IMPLS)}') from None
  return fn(q_BLHD, k_BSKD, v_BSKD, kv_mask_BS)
