"""The iLLaDA / LLaDA Transformer in Flax Linen, and its functional API.

A pre-norm Llama-style stack with fully bidirectional attention (SPEC §1):

  x = embed[tokens]
  per layer:  h = x + attn(rms_attn(x));  x = h + down(silu(gate(rms_mlp(h))) * up(rms_mlp(h)))
  logits = rms_final(x) @ W_out            (W_out = embed^T when tied)

Numerics: parameters are cast to `cfg.compute_dtype` at use; every matmul
takes compute-dtype inputs and accumulates in float32; RMSNorm, RoPE and
softmax run in float32; logits are returned in float32. Logits are not
shifted: position i predicts token i.

Parameter tree (`N` = layers, leading axis only when `cfg.scan_layers`):

  embedder/embedding      [V, D]        (vocab, embed)
  layers/attn_norm/scale  [N, D]        (layers, norm)
  layers/attn/q_proj      [N, D, H, Dh] (layers, embed, q_heads, head_dim)
  layers/attn/k_proj      [N, D, K, Dh] (layers, embed, kv_heads, head_dim)
  layers/attn/v_proj      [N, D, K, Dh] (layers, embed, kv_heads, head_dim)
  layers/attn/o_proj      [N, H, Dh, D] (layers, q_heads, head_dim, embed)
  layers/mlp_norm/scale   [N, D]        (layers, norm)
  layers/mlp/gate_proj    [N, D, F]     (layers, embed, mlp)
  layers/mlp/up_proj      [N, D, F]     (layers, embed, mlp)
  layers/mlp/down_proj    [N, F, D]     (layers, mlp, embed)
  final_norm/scale        [D]           (norm,)
  lm_head                 [D, V]        (embed, vocab)   untied only

Unscanned models name their layers `layers_0 .. layers_{N-1}` without the
leading axis; `stack_layers` / `unstack_layers` convert between the two.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from illada_jax import sharding
from illada_jax.attention import attention
from illada_jax.config import ModelConfig

Params = Any  # a nested dict of arrays
f32 = jnp.float32

_INIT_STD = 0.02


def _param(module: nn.Module, name: str, shape, names, init=None):
  init = init or nn.initializers.normal(_INIT_STD)
  return module.param(name, nn.with_logical_partitioning(init, names), shape,
                      module.cfg.weight_dtype)


@functools.lru_cache(maxsize=None)
def _dimension_numbers(spec: str):
  """`lax.dot_general` dimension numbers of a contraction `spec` (no batch axes).

  The output must be x's free axes then w's, in order (true of every
  projection here); anything else raises ValueError.
  """
  ins, out = spec.split('->')
  xs, ws = ins.split(',')
  shared = [c for c in xs if c in ws]
  if out != ''.join(c for c in xs if c not in shared) + ''.join(c for c in ws if c not in shared):
    raise ValueError(f'{spec}: output is not x free axes + w free axes')
  return (tuple(xs.index(c) for c in shared), tuple(ws.index(c) for c in shared)), ((), ())


def _matmul(spec: str, x, w, dtype):
  """`einsum(spec, x, w)` with `dtype` inputs and float32 accumulation, rounded to `dtype`.

  Written as `lax.dot_general` (the same op einsum lowers to): qwix's LoRA
  (`illada_jax.lora`) intercepts `dot_general` on the projection weights;
  its einsum path sets an attribute on the calling module, which Linen
  forbids outside `setup`.
  """
  return jax.lax.dot_general(x, w.astype(dtype), _dimension_numbers(spec),
                             preferred_element_type=f32).astype(dtype)


def rms_norm(x, scale, eps: float):
  """float32 `x * rsqrt(mean(x^2) + eps)`, cast back to x.dtype, then `* scale`."""
  x32 = x.astype(f32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype) * scale.astype(x.dtype)


def apply_rope(x_BLHD, positions_BL, theta: float):
  """Rotate-half (NeoX) RoPE in float32; returns x.dtype.

  `inv_freq_j = theta^(-2j/Dh)`, angles `pos * inv_freq` duplicated `[f, f]`
  over the head dim, `rotate_half([x1, x2]) = [-x2, x1]`.
  """
  dh = x_BLHD.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=f32) / dh))
  angles_BLF = positions_BL.astype(f32)[..., None] * inv_freq
  angles_BL1D = jnp.concatenate([angles_BLF, angles_BLF], axis=-1)[:, :, None, :]
  x32 = x_BLHD.astype(f32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x32 * jnp.cos(angles_BL1D) + rotated * jnp.sin(angles_BL1D)
  return out.astype(x_BLHD.dtype)


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD):
    scale = _param(self, 'scale', (x_BLD.shape[-1],), ('norm',), nn.initializers.ones)
    return rms_norm(x_BLD, scale, self.cfg.norm_eps)


class KVCache(NamedTuple):
  """Per-layer keys and values of a whole canvas of `S` positions, RoPE applied.

  `k`, `v`: `[N, B, S, K, Dh]` in the compute dtype (`[B, S, K, Dh]` inside
  one layer). The approximate block cache of the fast sampler (SPEC §2)
  keeps them across denoising steps and recomputes only a window.
  """
  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> 'KVCache':
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return cls(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))


_KV_NAMES = ('act_batch', 'act_length', 'act_kv_heads', 'act_head_dim')


class Attention(nn.Module):
  """Bidirectional GQA self-attention with RoPE.

  With a layer's `cache` (`KVCache` of `[B, S, K, Dh]`), the `L` queries are
  the window `[cache_start, cache_start + L)` of the cached canvas: their
  fresh keys and values overwrite the window's slots, they attend to all `S`
  positions (`kv_mask_BL` then masks `[B, S]` keys), and the updated cache is
  returned with the output.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, positions_BL, kv_mask_BL, cache=None, cache_start=0):
    cfg, dt = self.cfg, self.cfg.dtype
    d, h, k, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    w_q = _param(self, 'q_proj', (d, h, dh), ('embed', 'q_heads', 'head_dim'))
    w_k = _param(self, 'k_proj', (d, k, dh), ('embed', 'kv_heads', 'head_dim'))
    w_v = _param(self, 'v_proj', (d, k, dh), ('embed', 'kv_heads', 'head_dim'))
    w_o = _param(self, 'o_proj', (h, dh, d), ('q_heads', 'head_dim', 'embed'))

    q_BLHD = _matmul('bld,dhk->blhk', x_BLD, w_q, dt)
    k_BLKD = _matmul('bld,dhk->blhk', x_BLD, w_k, dt)
    v_BLKD = _matmul('bld,dhk->blhk', x_BLD, w_v, dt)
    q_BLHD = apply_rope(q_BLHD, positions_BL, cfg.rope_theta)
    k_BLKD = apply_rope(k_BLKD, positions_BL, cfg.rope_theta)
    q_BLHD = sharding.constrain(q_BLHD, ('act_batch', 'act_length', 'act_heads', 'act_head_dim'))
    k_BLKD = sharding.constrain(k_BLKD, _KV_NAMES)
    v_BLKD = sharding.constrain(v_BLKD, _KV_NAMES)
    q_BLHD = checkpoint_name(q_BLHD, 'query')
    k_BLKD = checkpoint_name(k_BLKD, 'key')
    v_BLKD = checkpoint_name(v_BLKD, 'value')
    if cache is not None:
      write = lambda old_BSKD, new_BLKD: sharding.constrain(jax.lax.dynamic_update_slice_in_dim(
          old_BSKD, new_BLKD.astype(old_BSKD.dtype), cache_start, axis=1), _KV_NAMES)
      cache = KVCache(write(cache.k, k_BLKD), write(cache.v, v_BLKD))
      k_BLKD, v_BLKD = cache.k, cache.v  # now [B, S, K, Dh]

    out_BLHD = attention(q_BLHD, k_BLKD, v_BLKD, kv_mask_BL, impl=cfg.attention_impl)
    out_BLHD = checkpoint_name(out_BLHD, 'attn_out')
    return _matmul('blhk,hkd->bld', out_BLHD, w_o, dt), cache


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD):
    cfg, dt = self.cfg, self.cfg.dtype
    d, f = cfg.d_model, cfg.mlp_hidden
    w_gate = _param(self, 'gate_proj', (d, f), ('embed', 'mlp'))
    w_up = _param(self, 'up_proj', (d, f), ('embed', 'mlp'))
    w_down = _param(self, 'down_proj', (f, d), ('mlp', 'embed'))
    gate_BLF = _matmul('bld,df->blf', x_BLD, w_gate, dt)
    up_BLF = _matmul('bld,df->blf', x_BLD, w_up, dt)
    hidden_BLF = (jax.nn.silu(gate_BLF.astype(f32)).astype(dt) * up_BLF)
    hidden_BLF = sharding.constrain(hidden_BLF, ('act_batch', 'act_length', 'act_mlp'))
    return _matmul('blf,fd->bld', hidden_BLF, w_down, dt)


class Block(nn.Module):
  """One pre-norm layer: `(x, positions, kv_mask, cache, cache_start) -> (x, cache)`.

  The layer cache (see `Attention`) is None except in cached decoding; the
  signature fits nn.scan with the cache scanned over layers.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, positions_BL, kv_mask_BL, cache=None, cache_start=0):
    attn_BLD, cache = Attention(self.cfg, name='attn')(
        RMSNorm(self.cfg, name='attn_norm')(x_BLD), positions_BL, kv_mask_BL, cache, cache_start)
    h_BLD = sharding.constrain(x_BLD + attn_BLD, ('act_batch', 'act_length', 'act_embed'))
    x_BLD = h_BLD + Mlp(self.cfg, name='mlp')(RMSNorm(self.cfg, name='mlp_norm')(h_BLD))
    x_BLD = sharding.constrain(x_BLD, ('act_batch', 'act_length', 'act_embed'))
    return x_BLD, cache


def _remat_policy(name: str):
  cp = jax.checkpoint_policies
  return {
      'full': None,
      'dots': cp.checkpoint_dots,
      'dots_no_batch': cp.dots_with_no_batch_dims_saveable,
      'save_qkv_attn': cp.save_only_these_names('query', 'key', 'value', 'attn_out'),
  }[name]


class Transformer(nn.Module):
  """`apply({'params': p}, tokens_BL, attention_mask_BL=None) -> logits_BLV` (float32).

  `attention_mask_BL` (1 = real token) hides padded keys from every query;
  padded queries still produce (meaningless) logits. `positions_BL`
  defaults to `0..L-1` on every row, left padding included.
  Methods `hidden` and `logits` split the trunk from the LM head, so callers
  can apply the head to a subset of positions; `hidden_cached` runs a window
  of positions against a `KVCache` of the whole canvas.
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embedder = Embedder(cfg)
    block = Block
    if cfg.remat_policy != 'none':
      block = nn.remat(block, policy=_remat_policy(cfg.remat_policy),
                       prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={'params': 0}, split_rngs={'params': True},
          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})(cfg)
    else:
      self.layers = [block(cfg) for _ in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = _param(self, 'lm_head', (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'))

  def hidden(self, tokens_BL, attention_mask_BL=None, positions_BL=None):
    """Final-normed hidden states `[B, L, D]` in the compute dtype."""
    b, l = tokens_BL.shape
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    return self._trunk(tokens_BL, attention_mask_BL, positions_BL, None, 0)[0]

  def hidden_cached(self, tokens_BW, cache: KVCache, attention_mask_BS=None, start=0,
                    positions_BW=None):
    """Hidden states of the window `[start, start + W)` of a cached canvas of `S` positions.

    Args:
      tokens_BW: int `[B, W]`, the window's current tokens (positions
        `start + 0..W-1`).
      cache: `KVCache` of `[N, B, S, K, Dh]`; the window's slots are
        recomputed, the others are used as they are (stale if their tokens
        changed since they were computed: the cache is approximate).
      attention_mask_BS: `[B, S]` key mask over the whole canvas, or None.
      start: int, static or traced: the window's first cache slot.
      positions_BW: int `[B, W]` RoPE positions of the window (default
        `start + 0..W-1`); the sampler's rotated canvas passes its own.
    Returns:
      final-normed hidden `[B, W, D]` (compute dtype) and the updated cache.
      From `KVCache.zeros` with `start=0` and `W = S`, this is `hidden` of
      the canvas plus a fresh cache.
    """
    b, w = tokens_BW.shape
    if positions_BW is None:
      positions_BW = jnp.broadcast_to(start + jnp.arange(w, dtype=jnp.int32), (b, w))
    return self._trunk(tokens_BW, attention_mask_BS, positions_BW, cache, start)

  def _trunk(self, tokens_BL, attention_mask, positions_BL, cache, cache_start):
    kv_mask = None if attention_mask is None else attention_mask.astype(bool)
    x_BLD = self.embedder.encode(tokens_BL)
    x_BLD = sharding.constrain(x_BLD, ('act_batch', 'act_length', 'act_embed'))
    if self.cfg.scan_layers:
      x_BLD, cache = self.layers(x_BLD, positions_BL, kv_mask, cache, cache_start)
    else:
      per_layer = []
      for i, layer in enumerate(self.layers):
        layer_cache = None if cache is None else KVCache(cache.k[i], cache.v[i])
        x_BLD, layer_cache = layer(x_BLD, positions_BL, kv_mask, layer_cache, cache_start)
        per_layer.append(layer_cache)
      if cache is not None:
        cache = KVCache(jnp.stack([c.k for c in per_layer]), jnp.stack([c.v for c in per_layer]))
    return self.final_norm(x_BLD), cache

  def logits(self, x_BLD):
    """LM head: `[B, L, D]` hidden -> float32 `[B, L, V]` logits."""
    if self.cfg.tie_embeddings:
      logits_BLV = self.embedder.decode(x_BLD)
    else:
      logits_BLV = jnp.einsum('bld,dv->blv', x_BLD, self.lm_head.astype(x_BLD.dtype),
                              preferred_element_type=f32)
    # float32 also when qwix computes an int8 head (it returns the compute dtype)
    return sharding.constrain(logits_BLV.astype(f32), ('act_batch', 'act_length', 'act_vocab'))

  def __call__(self, tokens_BL, attention_mask_BL=None, positions_BL=None):
    return self.logits(self.hidden(tokens_BL, attention_mask_BL, positions_BL))


class Embedder(nn.Module):
  """Token embedding; with tied weights also the LM head."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = _param(self, 'embedding', (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'))

  def encode(self, tokens_BL):
    # Gather from a table sharded over vocab only (FSDP all-gathers the model
    # dim as for any weight); each vocab shard fills its rows and SPMD sums.
    table_VD = sharding.constrain(self.embedding, ('vocab', None))
    if not isinstance(table_VD, jax.Array):  # int8 tied head (quant.py): dequantize the rows
      import qwix
      return qwix.dequantize(table_VD[tokens_BL]).astype(self.cfg.dtype)
    return jnp.take(table_VD, tokens_BL, axis=0).astype(self.cfg.dtype)

  def decode(self, x_BLD):
    return jnp.einsum('bld,vd->blv', x_BLD, self.embedding.astype(x_BLD.dtype),
                      preferred_element_type=f32)


# -- functional API -------------------------------------------------------------

def build(cfg: ModelConfig) -> nn.Module:
  """The module to apply `cfg`'s parameters with: `Transformer(cfg)`, or with
  `cfg.quantize` set, the same model under qwix PTQ (`illada_jax.quant`)."""
  if cfg.quantize == 'none':
    return Transformer(cfg)
  from illada_jax import quant
  return quant.quantized_model(cfg)


def _init_boxed(cfg: ModelConfig, key):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(cfg).init(key, tokens)['params']


def param_logical_axes(cfg: ModelConfig):
  """Pytree of logical-axis-name tuples, one per parameter."""
  return sharding.logical_axes(jax.eval_shape(functools.partial(_init_boxed, cfg),
                                              jax.random.key(0)))


def param_shardings(cfg: ModelConfig, mesh, rules=sharding.RULES):
  """Pytree of NamedShardings placing each parameter on `mesh` by `rules`."""
  return sharding.param_shardings(param_logical_axes(cfg), mesh, rules)


def abstract_params(cfg: ModelConfig, mesh=None, rules=sharding.RULES):
  """`jax.ShapeDtypeStruct` pytree of the parameters (with shardings on a mesh);
  with `cfg.quantize` set, of the int8 tree (`quant.abstract_quantized`)."""
  if cfg.quantize != 'none':
    from illada_jax import quant
    return quant.abstract_quantized(cfg, mesh, rules)
  shapes = nn.meta.unbox(jax.eval_shape(functools.partial(_init_boxed, cfg), jax.random.key(0)))
  if mesh is None:
    return shapes
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, param_shardings(cfg, mesh, rules))


def init_params(cfg: ModelConfig, key, mesh=None, rules=sharding.RULES) -> Params:
  """Randomly initialised parameters (plain arrays in `cfg.param_dtype`).

  With `mesh`, every parameter is created directly in its shard (jit with
  out_shardings): the full model never exists on one host.
  """
  init = lambda k: nn.meta.unbox(_init_boxed(cfg, k))
  out_shardings = None if mesh is None else param_shardings(cfg, mesh, rules)
  return jax.jit(init, out_shardings=out_shardings)(key)


def param_count(cfg: ModelConfig) -> int:
  """Number of parameters, from abstract shapes (nothing is allocated)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg))))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(cfg, mesh, params, tokens_BL, attention_mask_BL, positions_BL):
  with sharding.activation_sharding(mesh):
    return build(cfg).apply({'params': params}, tokens_BL, attention_mask_BL, positions_BL)


def forward(cfg: ModelConfig, params: Params, tokens_BL, attention_mask_BL=None,
            positions_BL=None):
  """Jitted forward pass: int tokens `[B, L]` -> float32 logits `[B, L, V]`.

  If `params` live on a named mesh, activations are sharded on that mesh by
  the logical axis rules.
  """
  return _forward(cfg, sharding.mesh_of(params), params, tokens_BL, attention_mask_BL,
                  positions_BL)


def unstack_layers(params: Params, num_layers: int) -> Params:
  """Scanned params (leading layer axis under `layers`) -> `layers_{i}` entries."""
  out = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(num_layers):
    out[f'layers_{i}'] = jax.tree.map(lambda a: a[i], params['layers'])
  return out


def stack_layers(params: Params, num_layers: int) -> Params:
  """Inverse of `unstack_layers`."""
  out = {k: v for k, v in params.items() if not k.startswith('layers_')}
  out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[params[f'layers_{i}'] for i in range(num_layers)])
  return out
