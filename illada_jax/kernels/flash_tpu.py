"""Flash attention for TPU (Pallas / Mosaic): bidirectional, GQA, key padding.

`flash_attention_tpu(q_BLHD, k_BSKD, v_BSKD, kv_mask_BS)` has the contract of
`illada_jax.attention` and a custom VJP. Three pallas_calls over the row
layout of `_common` (query heads of a KV group folded into the rows):

  forward  grid (B, K, R/br, Sp/bk)   online softmax over KV tiles (last axis)
  dK, dV   grid (B, K, Sp/bk, R/br)   KV tile resident, query tiles streamed
  dQ       grid (B, K, R/br, Sp/bk)   query tile resident, KV tiles streamed

with br = block_q * G rows. Accumulators live in VMEM scratch in float32; HBM
holds O(L) residuals only (rows-layout q/o, running max and sum per row,
stored lane-dense as [B, K, 1, R]). The backward kernels work on transposed
score tiles [bk, br] so those row statistics broadcast without a relayout.
On a non-TPU backend pass `interpret=True` (the CPU tests do).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from illada_jax.kernels import _common as C

f32 = jnp.float32

# Defaults for L ~ 8k, Dh = 128, G = 4: a 1024 x 512 float32 score tile (2 MiB)
# and its exp/cotangent temporaries fit the default scoped VMEM of v5p / v6e.
BLOCK_Q = 256  # query positions per tile (x G rows)
BLOCK_K = 512  # keys per tile
BLOCK_Q_BWD = 256
BLOCK_K_BWD = 512


def flash_attention_tpu(q_BLHD, k_BSKD, v_BSKD, kv_mask_BS=None, *, block_q: int = BLOCK_Q,
                        block_k: int = BLOCK_K, block_q_bwd: int = BLOCK_Q_BWD,
                        block_k_bwd: int = BLOCK_K_BWD, interpret: bool = False):
  """Bidirectional GQA attention; shapes and dtypes as `attention.xla_attention`.

  q_BLHD [B, L, H, Dh]; k_BSKD, v_BSKD [B, S, K, Dh]; kv_mask_BS bool [B, S]
  or None. Returns [B, L, H, Dh] in q's dtype. Block sizes are clamped to the
  (8-rounded) sequence lengths; L and S are zero-padded to a tile multiple.
  """
  g = q_BLHD.shape[2] // k_BSKD.shape[2]
  lp, bq, bqb = C.tiles(q_BLHD.shape[1], block_q, block_q_bwd)
  sp, bk, bkb = C.tiles(k_BSKD.shape[1], block_k, block_k_bwd)
  tiles = C.Tiles(bq * g, bk, bqb * g, bkb, q_BLHD.shape[3] ** -0.5, interpret)
  return C.attend_rows(_flash, q_BLHD, k_BSKD, v_BSKD, kv_mask_BS, lp, sp, tiles)


def _params(sem):
  return pltpu.CompilerParams(dimension_semantics=sem)


_PAR, _ARB = pltpu.PARALLEL, pltpu.ARBITRARY


# -- forward -------------------------------------------------------------------

def _fwd_kernel(q_ref, k_ref, v_ref, code_ref, o_ref, m_ref, l_ref, m_sc, l_sc, acc_sc, *,
                scale):
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, f32)
    l_sc[...] = jnp.zeros(l_sc.shape, f32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, f32)

  v = v_ref[...]
  s = C.masked_scores(q_ref[...], k_ref[...], code_ref[...], scale)
  m_prev = m_sc[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  alpha = jnp.exp(m_prev - m_new)  # 0 on the first tile (m_prev = -inf)
  p = jnp.exp(s - m_new)
  l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
  acc_sc[...] = alpha * acc_sc[...] + C.dot(p.astype(v.dtype), v)
  m_sc[...] = m_new

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)
    _store_as_row(m_sc, m_ref)
    _store_as_row(l_sc, l_ref)


def _store_as_row(col_ref, row_ref):
  """Writes a [R, 1] column into a lane-dense [1, R] row, 128 rows at a time.

  An exact transpose (one nonzero per sum) from a diagonal select and a
  sublane reduction, which Mosaic lowers for any R; it runs once per tile.
  """
  r = col_ref.shape[0]
  c = 128 if r % 128 == 0 else r
  eye = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0) == jax.lax.broadcasted_iota(
      jnp.int32, (c, c), 1)
  for i in range(r // c):
    col = col_ref[pl.ds(i * c, c), :]
    row_ref[:, pl.ds(i * c, c)] = jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def _forward(q, k, v, code, t: C.Tiles):
  b, kv, r, dh = q.shape
  sp = k.shape[2]
  br, bk = t.br, t.bk
  row = pl.BlockSpec((None, None, br, dh), lambda b_, h_, i, j: (b_, h_, i, 0))
  stat = pl.BlockSpec((None, None, 1, br), lambda b_, h_, i, j: (b_, h_, 0, i))
  key = pl.BlockSpec((None, None, bk, dh), lambda b_, h_, i, j: (b_, h_, j, 0))
  cod = pl.BlockSpec((None, 1, bk), lambda b_, h_, i, j: (b_, 0, j))
  stat_shape = jax.ShapeDtypeStruct((b, kv, 1, r), f32)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=t.scale),
      grid=(b, kv, r // br, sp // bk),
      in_specs=[row, key, key, cod],
      out_specs=[row, stat, stat],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), stat_shape, stat_shape],
      scratch_shapes=[pltpu.VMEM((br, 1), f32), pltpu.VMEM((br, 1), f32),
                      pltpu.VMEM((br, dh), f32)],
      compiler_params=_params((_PAR, _PAR, _PAR, _ARB)),
      cost_estimate=C.cost_estimate(q, k, br, backward=False),
      interpret=t.interpret,
      name='illada_flash_fwd',
  )(q, k, v, code[:, None, :])


# -- backward ------------------------------------------------------------------

def _dkv_kernel(q_ref, k_ref, v_ref, code_ref, do_ref, m_ref, il_ref, d_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, scale):
  i = pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, f32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, f32)

  q, do = q_ref[...], do_ref[...]
  p_t, ds_t = C.probs_and_dscores_t(q, k_ref[...], v_ref[...], do, code_ref[...], m_ref[...],
                                    il_ref[...], d_ref[...], scale)
  # Rows hold every query head of the group, so these sums are the GQA sums.
  dv_sc[...] += C.dot(p_t.astype(do.dtype), do)
  dk_sc[...] += C.dot(ds_t.astype(q.dtype), q)

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward_kv(q, k, v, code, do, m, inv_l, delta, t: C.Tiles):
  b, kv, r, dh = q.shape
  sp = k.shape[2]
  br, bk = t.br_bwd, t.bk_bwd
  row = pl.BlockSpec((None, None, br, dh), lambda b_, h_, j, i: (b_, h_, i, 0))
  stat = pl.BlockSpec((None, None, 1, br), lambda b_, h_, j, i: (b_, h_, 0, i))
  key = pl.BlockSpec((None, None, bk, dh), lambda b_, h_, j, i: (b_, h_, j, 0))
  cod = pl.BlockSpec((None, bk, 1), lambda b_, h_, j, i: (b_, j, 0))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, scale=t.scale),
      grid=(b, kv, sp // bk, r // br),
      in_specs=[row, key, key, cod, row, stat, stat, stat],
      out_specs=[key, key],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, dh), f32), pltpu.VMEM((bk, dh), f32)],
      compiler_params=_params((_PAR, _PAR, _PAR, _ARB)),
      cost_estimate=C.cost_estimate(q, k, br, backward=True),
      interpret=t.interpret,
      name='illada_flash_dkv',
  )(q, k, v, code[:, :, None], do, m, inv_l, delta)


def _dq_kernel(q_ref, k_ref, v_ref, code_ref, do_ref, m_ref, il_ref, d_ref, dq_ref, dq_sc, *,
               scale):
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, f32)

  k = k_ref[...]
  _, ds_t = C.probs_and_dscores_t(q_ref[...], k, v_ref[...], do_ref[...], code_ref[...],
                                  m_ref[...], il_ref[...], d_ref[...], scale)
  dq_sc[...] += C.dot(ds_t.astype(k.dtype), k, C.TN)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _backward_q(q, k, v, code, do, m, inv_l, delta, t: C.Tiles):
  b, kv, r, dh = q.shape
  sp = k.shape[2]
  br, bk = t.br_bwd, t.bk_bwd
  row = pl.BlockSpec((None, None, br, dh), lambda b_, h_, i, j: (b_, h_, i, 0))
  stat = pl.BlockSpec((None, None, 1, br), lambda b_, h_, i, j: (b_, h_, 0, i))
  key = pl.BlockSpec((None, None, bk, dh), lambda b_, h_, i, j: (b_, h_, j, 0))
  cod = pl.BlockSpec((None, bk, 1), lambda b_, h_, i, j: (b_, j, 0))
  return pl.pallas_call(
      functools.partial(_dq_kernel, scale=t.scale),
      grid=(b, kv, r // br, sp // bk),
      in_specs=[row, key, key, cod, row, stat, stat, stat],
      out_specs=row,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((br, dh), f32)],
      compiler_params=_params((_PAR, _PAR, _PAR, _ARB)),
      cost_estimate=C.cost_estimate(q, k, br, backward=True),
      interpret=t.interpret,
      name='illada_flash_dq',
  )(q, k, v, code[:, :, None], do, m, inv_l, delta)


_flash = C.flash_vjp(_forward, _backward_kv, _backward_q)
