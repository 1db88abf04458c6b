"""Masked-diffusion training losses (SPEC §4), with a chunked LM head.

Both objectives draw one noise level per sequence, `t ~ U(0, 1)`, and mask
each eligible token independently with probability `p = (1 - eps) t + eps`:

  pre-training:  sum_{masked} CE / p_b                 / (B * L_eff)
  SFT:           (1/B) sum_b sum_{masked} CE / (p_b * R_b)

where `R_b` is the response length of row b counting its EOS padding (prompt
tokens are never masked), and `L_eff` is the row length, cut with probability
`random_length_prob` to `U{1..L}` for the whole batch. A cut is applied with
the key-padding mask (positions >= L_eff are invisible and never masked):
attention is bidirectional and RoPE relative, so the visible prefix computes
exactly what the truncated batch would, while shapes stay static.

The `[B, L, V]` logits are never materialised: the LM head and the
cross-entropy run over chunks of the sequence inside a rematerialised scan,
so the backward pass recomputes one chunk's logits at a time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from illada_jax import sharding
from illada_jax.config import ModelConfig
from illada_jax.model import Transformer

f32 = jnp.float32


class Noise(NamedTuple):
  """A masking draw. `noisy_BL` int32, `masked_BL` bool, `p_B` float32, `valid_BL` bool."""
  noisy_BL: jax.Array
  masked_BL: jax.Array
  p_B: jax.Array
  valid_BL: jax.Array


def mask_probability(t_B, eps: float):
  """`p = (1 - eps) t + eps`: masking probability from the noise level t in [0, 1)."""
  return (1.0 - eps) * t_B + eps


def draw_noise(key, tokens_BL, mask_id: int, *, eps: float = 1e-3, maskable_BL=None,
               random_length_prob: float = 0.0) -> Noise:
  """Masks tokens with a per-sequence probability p (SPEC §4).

  Args:
    key: PRNG key.
    tokens_BL: int `[B, L]` clean tokens.
    mask_id: the MASK token id.
    eps: minimum masking probability.
    maskable_BL: bool `[B, L]`, positions that may be masked (SFT: the
      response incl. its EOS padding); None = every position.
    random_length_prob: probability that the whole batch is cut to a length
      drawn from `U{1..L}` (pre-training uses 0.01).
  """
  b, l = tokens_BL.shape
  k_t, k_mask, k_cut, k_len = jax.random.split(key, 4)
  p_B = mask_probability(jax.random.uniform(k_t, (b,), f32), eps)
  masked_BL = jax.random.uniform(k_mask, (b, l), f32) < p_B[:, None]
  cut = jax.random.uniform(k_cut, (), f32) < random_length_prob
  length = jnp.where(cut, jax.random.randint(k_len, (), 1, l + 1), l)
  valid_BL = jnp.broadcast_to(jnp.arange(l) < length, (b, l))
  masked_BL &= valid_BL
  if maskable_BL is not None:
    masked_BL &= maskable_BL.astype(bool)
  noisy_BL = jnp.where(masked_BL, mask_id, tokens_BL).astype(jnp.int32)
  return Noise(noisy_BL, masked_BL, p_B, valid_BL)


def _head_weight(cfg: ModelConfig, params) -> tuple[jax.Array, str]:
  """The LM-head matrix and its einsum spec for `[B, C, D] -> [B, C, V]`."""
  if cfg.tie_embeddings:
    return params['embedder']['embedding'], 'bcd,vd->bcv'
  return params['lm_head'], 'bcd,dv->bcv'


def chunked_cross_entropy(cfg: ModelConfig, params, x_BLD, targets_BL, weights_BL,
                          chunk: int = 512):
  """Weighted CE and argmax hits of the LM head, computed `chunk` positions at a time.

  Args:
    x_BLD: final-normed hidden states `[B, L, D]` (compute dtype).
    targets_BL: int `[B, L]` target tokens.
    weights_BL: float32 `[B, L]` per-position weights (0 = ignored).
    chunk: positions per chunk; L is padded up to a multiple (with weight 0).

  Returns:
    (sum_BL of weights * CE, float32 `[B, L]`; correct_BL, bool `[B, L]`
    whether argmax logits == target). Only `[B, chunk, V]` logits ever exist,
    in the forward and (through `jax.checkpoint`) in the backward pass.
  """
  b, l, d = x_BLD.shape
  chunk = min(chunk, l)
  n = -(-l // chunk)
  pad = n * chunk - l
  if pad:
    x_BLD = jnp.pad(x_BLD, ((0, 0), (0, pad), (0, 0)))
    targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
    weights_BL = jnp.pad(weights_BL, ((0, 0), (0, pad)))
  w, spec = _head_weight(cfg, params)

  # Chunks along a leading scan axis: [N, B, C, ...].
  to_chunks = lambda a: jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)
  xs = (to_chunks(x_BLD), to_chunks(targets_BL), to_chunks(weights_BL))

  @jax.checkpoint
  def chunk_ce(w, x_BCD, t_BC, wt_BC):
    logits_BCV = jnp.einsum(spec, x_BCD, w.astype(x_BCD.dtype), preferred_element_type=f32)
    logits_BCV = sharding.constrain(logits_BCV, ('act_batch', 'act_length', 'act_vocab'))
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    target_logit_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
    ce_BC = lse_BC - target_logit_BC
    # Ties count as correct only if the target attains the max.
    correct_BC = target_logit_BC >= jnp.max(logits_BCV, axis=-1)
    return ce_BC * wt_BC, correct_BC

  def body(carry, chunk_xs):
    return carry, chunk_ce(w, *chunk_xs)

  _, (wce_NBC, correct_NBC) = jax.lax.scan(body, None, xs)
  from_chunks = lambda a: jnp.moveaxis(a, 0, 1).reshape(b, n * chunk)[:, :l]
  return from_chunks(wce_NBC), from_chunks(correct_NBC)


def _trunk(cfg: ModelConfig, params, noisy_BL, attention_mask_BL, model=None):
  # By name, so that a wrapped model's own `hidden` runs (the LoRA model of `illada_jax.lora`).
  return (model or Transformer(cfg)).apply({'params': params}, noisy_BL, attention_mask_BL,
                                           method='hidden')


def _metrics(loss, wce_BL, correct_BL, masked_BL):
  n_masked = jnp.sum(masked_BL.astype(f32))
  return {
      'loss': loss,
      'masked_tokens': n_masked,
      'masked_accuracy': jnp.sum((correct_BL & masked_BL).astype(f32)) / jnp.maximum(n_masked, 1.0),
      'masked_ce': jnp.sum(jnp.where(masked_BL, wce_BL, 0.0)) / jnp.maximum(n_masked, 1.0),
  }


def pretrain_loss(cfg: ModelConfig, params, tokens_BL, key, *, eps: float = 1e-3,
                  random_length_prob: float = 0.01, chunk: int = 512, model=None,
                  ) -> tuple[jax.Array, dict[str, Any]]:
  """Pre-training loss `sum_masked CE / p_b / (B * L_eff)` and metrics.

  `tokens_BL` int `[B, L]`; returns (scalar float32 loss, metrics dict of
  float32 scalars: loss, masked_tokens, masked_accuracy, masked_ce — the
  unweighted mean CE over masked positions). `model`: the Linen module
  `params` belong to (default `Transformer(cfg)`; LoRA passes its own).
  """
  noise = draw_noise(key, tokens_BL, cfg.mask_token_id, eps=eps,
                     random_length_prob=random_length_prob)
  return pretrain_loss_from_noise(cfg, params, tokens_BL, noise, chunk=chunk, model=model)


def pretrain_loss_from_noise(cfg: ModelConfig, params, tokens_BL, noise: Noise, *,
                             chunk: int = 512, model=None):
  """`pretrain_loss` for a given masking draw (deterministic; used by tests)."""
  x_BLD = _trunk(cfg, params, noise.noisy_BL, noise.valid_BL, model)
  weights_BL = noise.masked_BL.astype(f32) / noise.p_B[:, None]
  wce_BL, correct_BL = chunked_cross_entropy(cfg, params, x_BLD, tokens_BL, weights_BL, chunk)
  # L_eff * B = number of visible positions.
  loss = jnp.sum(wce_BL) / jnp.sum(noise.valid_BL.astype(f32))
  metrics = _metrics(loss, wce_BL * noise.p_B[:, None], correct_BL, noise.masked_BL)
  return loss, metrics


def sft_loss(cfg: ModelConfig, params, tokens_BL, response_mask_BL, key, *,
             eps: float = 1e-3, chunk: int = 512, model=None,
             ) -> tuple[jax.Array, dict[str, Any]]:
  """SFT loss `(1/B) sum_b sum_masked CE / (p_b * R_b)` and metrics.

  `tokens_BL` int `[B, L]` is `[prompt | response | EOS ... EOS]`;
  `response_mask_BL` is 1 on the response and its EOS padding (R_b of them),
  0 on the prompt (never masked). `model` as in `pretrain_loss`.
  """
  maskable_BL = response_mask_BL.astype(bool)
  noise = draw_noise(key, tokens_BL, cfg.mask_token_id, eps=eps, maskable_BL=maskable_BL)
  return sft_loss_from_noise(cfg, params, tokens_BL, response_mask_BL, noise, chunk=chunk,
                             model=model)


def sft_loss_from_noise(cfg: ModelConfig, params, tokens_BL, response_mask_BL, noise: Noise,
                        *, chunk: int = 512, model=None):
  """`sft_loss` for a given masking draw (deterministic; used by tests)."""
  b = tokens_BL.shape[0]
  r_B = jnp.maximum(jnp.sum(response_mask_BL.astype(f32), axis=1), 1.0)
  x_BLD = _trunk(cfg, params, noise.noisy_BL, None, model)
  weights_BL = noise.masked_BL.astype(f32) / (noise.p_B * r_B)[:, None]
  wce_BL, correct_BL = chunked_cross_entropy(cfg, params, x_BLD, tokens_BL, weights_BL, chunk)
  loss = jnp.sum(wce_BL) / b
  metrics = _metrics(loss, wce_BL * (noise.p_B * r_B)[:, None], correct_BL, noise.masked_BL)
  return loss, metrics
