"""Flash attention for GPU (Pallas / Triton): bidirectional, GQA, key padding.

Same algorithm, layout and numerics as `flash_tpu` (see `_common`), in the
Triton style: one program per (query tile, batch, KV head) walks all KV tiles
in a `fori_loop` (forward, dQ); one program per (KV tile, batch, KV head) walks
all query tiles (dK, dV). A query tile is `block_q * G` rows, so each KV tile
is loaded once for the G query heads that share it. Triton needs power-of-two
tiles: G, `block_q`, `block_k` and Dh must be powers of two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from illada_jax.kernels import _common as C

f32 = jnp.float32

# A100/H100-sized defaults at Dh = 128: 128 query rows (block_q * G with G = 4)
# against 64-key tiles; the backward uses 64 x 64 to bound register pressure.
BLOCK_Q = 32  # query positions per tile (x G rows)
BLOCK_K = 64
BLOCK_Q_BWD = 16
BLOCK_K_BWD = 64
NUM_WARPS = 4
NUM_STAGES = 2


def _pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def supports(q_shape, k_shape, **blocks) -> bool:
  """Whether `flash_attention_gpu` can tile these `[B, L, H, Dh]` / `[B, S, K, Dh]` shapes."""
  g, dh = q_shape[2] // k_shape[2], q_shape[3]
  sizes = {'block_q': BLOCK_Q, 'block_k': BLOCK_K, 'block_q_bwd': BLOCK_Q_BWD,
           'block_k_bwd': BLOCK_K_BWD, **blocks}
  return all(_pow2(n) for n in (g, dh, *sizes.values()))


def flash_attention_gpu(q_BLHD, k_BSKD, v_BSKD, kv_mask_BS=None, *, block_q: int = BLOCK_Q,
                        block_k: int = BLOCK_K, block_q_bwd: int = BLOCK_Q_BWD,
                        block_k_bwd: int = BLOCK_K_BWD, interpret: bool = False):
  """Bidirectional GQA attention; shapes and dtypes as `attention.xla_attention`."""
  _, l, h, dh = q_BLHD.shape
  s, kv = k_BSKD.shape[1], k_BSKD.shape[2]
  g = h // kv
  for name, n in (('G', g), ('Dh', dh), ('block_q', block_q), ('block_k', block_k),
                  ('block_q_bwd', block_q_bwd), ('block_k_bwd', block_k_bwd)):
    if not _pow2(n):
      raise ValueError(f'flash_attention_gpu: {name}={n} must be a power of two')
  # Power-of-two tiles: short sequences round up to the next power of two.
  lp, bq, bqb = C.tiles(l, block_q, block_q_bwd, align=1)
  sp, bk, bkb = C.tiles(s, block_k, block_k_bwd, align=1)
  if lp <= min(block_q, block_q_bwd):
    lp = bq = bqb = max(16, pl.next_power_of_2(l))
  if sp <= min(block_k, block_k_bwd):
    sp = bk = bkb = max(16, pl.next_power_of_2(s))
  tiles = C.Tiles(bq * g, bk, bqb * g, bkb, dh ** -0.5, interpret)
  return C.attend_rows(_flash, q_BLHD, k_BSKD, v_BSKD, kv_mask_BS, lp, sp, tiles)


def _call(kernel, grid, in_specs, out_specs, out_shape, cost, t, name):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      cost_estimate=cost, interpret=t.interpret, name=name)


def _forward(q, k, v, code, t: C.Tiles):
  b, kv, r, dh = q.shape
  sp = k.shape[2]
  br, bk = t.br, t.bk

  def kernel(q_ref, k_ref, v_ref, code_ref, o_ref, m_ref, l_ref):
    q_ = q_ref[...]

    def body(j, carry):
      acc, m, l = carry
      sl = pl.ds(pl.multiple_of(j * bk, bk), bk)
      v_ = v_ref[sl, :]
      s = C.masked_scores(q_, k_ref[sl, :], code_ref[sl][None, :], t.scale)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      alpha = jnp.exp(m - m_new)  # 0 on the first tile (m = -inf)
      p = jnp.exp(s - m_new[:, None])
      acc = acc * alpha[:, None] + C.dot(p.astype(v_.dtype), v_)
      return acc, m_new, alpha * l + jnp.sum(p, axis=1)

    init = (jnp.zeros((br, dh), f32), jnp.full((br,), -jnp.inf, f32), jnp.zeros((br,), f32))
    acc, m, l = jax.lax.fori_loop(0, sp // bk, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    m_ref[...] = m
    l_ref[...] = l

  row = pl.BlockSpec((None, None, br, dh), lambda i, b_, h_: (b_, h_, i, 0))
  stat = pl.BlockSpec((None, None, br), lambda i, b_, h_: (b_, h_, i))
  keys = pl.BlockSpec((None, None, sp, dh), lambda i, b_, h_: (b_, h_, 0, 0))
  codes = pl.BlockSpec((None, sp), lambda i, b_, h_: (b_, 0))
  stat_shape = jax.ShapeDtypeStruct((b, kv, r), f32)
  return _call(kernel, (r // br, b, kv), [row, keys, keys, codes], [row, stat, stat],
               [jax.ShapeDtypeStruct(q.shape, q.dtype), stat_shape, stat_shape],
               C.cost_estimate(q, k, br, backward=False), t, 'illada_flash_fwd_gpu')(q, k, v, code)


def _backward_kv(q, k, v, code, do, m, inv_l, delta, t: C.Tiles):
  b, kv, r, dh = q.shape
  sp = k.shape[2]
  br, bk = t.br_bwd, t.bk_bwd

  def kernel(q_ref, k_ref, v_ref, code_ref, do_ref, m_ref, il_ref, d_ref, dk_ref, dv_ref):
    k_, v_, code_ = k_ref[...], v_ref[...], code_ref[...][:, None]

    def body(i, carry):
      dk, dv = carry
      sl = pl.ds(pl.multiple_of(i * br, br), br)
      q_, do_ = q_ref[sl, :], do_ref[sl, :]
      p_t, ds_t = C.probs_and_dscores_t(q_, k_, v_, do_, code_, m_ref[sl][None, :],
                                        il_ref[sl][None, :], d_ref[sl][None, :], t.scale)
      # Rows hold every query head of the group, so these sums are the GQA sums.
      dv = dv + C.dot(p_t.astype(do_.dtype), do_)
      dk = dk + C.dot(ds_t.astype(q_.dtype), q_)
      return dk, dv

    zeros = jnp.zeros((bk, dh), f32)
    dk, dv = jax.lax.fori_loop(0, r // br, body, (zeros, zeros))
    dk_ref[...] = (dk * t.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)

  rows = pl.BlockSpec((None, None, r, dh), lambda j, b_, h_: (b_, h_, 0, 0))
  stats = pl.BlockSpec((None, None, r), lambda j, b_, h_: (b_, h_, 0))
  key = pl.BlockSpec((None, None, bk, dh), lambda j, b_, h_: (b_, h_, j, 0))
  cod = pl.BlockSpec((None, bk), lambda j, b_, h_: (b_, j))
  return _call(kernel, (sp // bk, b, kv), [rows, key, key, cod, rows, stats, stats, stats],
               [key, key], [jax.ShapeDtypeStruct(k.shape, k.dtype),
                            jax.ShapeDtypeStruct(v.shape, v.dtype)],
               C.cost_estimate(q, k, br, backward=True), t, 'illada_flash_dkv_gpu')(
                   q, k, v, code, do, m, inv_l, delta)


def _backward_q(q, k, v, code, do, m, inv_l, delta, t: C.Tiles):
  b, kv, r, dh = q.shape
  sp = k.shape[2]
  br, bk = t.br_bwd, t.bk_bwd

  def kernel(q_ref, k_ref, v_ref, code_ref, do_ref, m_ref, il_ref, d_ref, dq_ref):
    q_, do_ = q_ref[...], do_ref[...]
    m_, il_, d_ = m_ref[...][None, :], il_ref[...][None, :], d_ref[...][None, :]

    def body(j, dq):
      sl = pl.ds(pl.multiple_of(j * bk, bk), bk)
      k_ = k_ref[sl, :]
      _, ds_t = C.probs_and_dscores_t(q_, k_, v_ref[sl, :], do_, code_ref[sl][:, None], m_,
                                      il_, d_, t.scale)
      return dq + C.dot(ds_t.astype(k_.dtype), k_, C.TN)

    dq = jax.lax.fori_loop(0, sp // bk, body, jnp.zeros((br, dh), f32))
    dq_ref[...] = (dq * t.scale).astype(dq_ref.dtype)

  row = pl.BlockSpec((None, None, br, dh), lambda i, b_, h_: (b_, h_, i, 0))
  stat = pl.BlockSpec((None, None, br), lambda i, b_, h_: (b_, h_, i))
  keys = pl.BlockSpec((None, None, sp, dh), lambda i, b_, h_: (b_, h_, 0, 0))
  codes = pl.BlockSpec((None, sp), lambda i, b_, h_: (b_, 0))
  return _call(kernel, (r // br, b, kv), [row, keys, keys, codes, row, stat, stat, stat], row,
               jax.ShapeDtypeStruct(q.shape, q.dtype), C.cost_estimate(q, k, br, backward=True), t,
               'illada_flash_dq_gpu')(q, k, v, code, do, m, inv_l, delta)


_flash = C.flash_vjp(_forward, _backward_kv, _backward_q)
