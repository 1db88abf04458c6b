"""Layout, padding and block math shared by the TPU and GPU flash kernels.

The kernels see attention as multi-head attention over the K KV heads, with
the G = H / K query heads of a group folded into the query rows:

  q_BLHD [B, L, H, Dh] -> q_BKRD [B, K, R, Dh],  R = Lp * G, row = pos * G + g
  k_BSKD [B, S, K, Dh] -> k_BKSD [B, K, Sp, Dh]  (a transpose, never a repeat)

so one query tile of `block_q` positions is `block_q * G` rows of the same KV
head, and every KV tile is loaded once for the whole group. The key-padding
mask becomes int32 key codes `[B, Sp]`: 1 visible, 0 hidden by the caller's
mask, -1 beyond S (tile padding). Queries are never masked.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# MASK_VALUE: the XLA path's finite score of a hidden key, so that a query
# whose keys are all hidden gets a uniform distribution over the S real keys,
# as in XLA.
from illada_jax.attention import MASK_VALUE
from illada_jax.util import round_up

f32 = jnp.float32

# Contract the last dim of both operands (A @ B^T) / the first dim (A^T @ B).
NT = (((1,), (1,)), ((), ()))
TN = (((0,), (0,)), ((), ()))


NN = (((1,), (0,)), ((), ()))


def dot(a, b, dims=NN):
  """float32-accumulating matmul with the precision fixed by the input dtype.

  Explicit so that a global `jax_default_matmul_precision` does not leak into
  the kernels: Mosaic refuses fp32 contract precision on bf16 operands, while
  float32 operands should stay exact.
  """
  prec = jax.lax.Precision.HIGHEST if a.dtype == f32 else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=f32)


def to_rows(q_BLHD, num_kv_heads: int, lp: int):
  """[B, L, H, Dh] -> [B, K, Lp * G, Dh] with zero rows for positions >= L."""
  b, l, h, dh = q_BLHD.shape
  g = h // num_kv_heads
  q_BLHD = jnp.pad(q_BLHD, ((0, 0), (0, lp - l), (0, 0), (0, 0)))
  q_BKLGD = q_BLHD.reshape(b, lp, num_kv_heads, g, dh).transpose(0, 2, 1, 3, 4)
  return q_BKLGD.reshape(b, num_kv_heads, lp * g, dh)


def from_rows(x_BKRD, l: int, num_heads: int):
  """Inverse of `to_rows`: [B, K, Lp * G, Dh] -> [B, L, H, Dh]."""
  b, k, r, dh = x_BKRD.shape
  g = num_heads // k
  x_BLKGD = x_BKRD.reshape(b, k, r // g, g, dh).transpose(0, 2, 1, 3, 4)
  return x_BLKGD[:, :l].reshape(b, l, num_heads, dh)


def to_kv(k_BSKD, sp: int):
  """[B, S, K, Dh] -> [B, K, Sp, Dh] (zero keys beyond S)."""
  s = k_BSKD.shape[1]
  return jnp.pad(k_BSKD, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)


def key_codes(kv_mask_BS, b: int, s: int, sp: int):
  """int32 [B, Sp]: 1 visible key, 0 hidden by `kv_mask_BS`, -1 tile padding."""
  vis = jnp.ones((b, s), jnp.int32) if kv_mask_BS is None else kv_mask_BS.astype(jnp.int32)
  return jnp.pad(vis, ((0, 0), (0, sp - s)), constant_values=-1)


def tiles(n: int, block: int, block_bwd: int, align: int = 8):
  """(padded length, forward block, backward block) for a sequence of n.

  Short sequences are one tile (n rounded up to `align`); otherwise the
  blocks are kept and must divide each other (powers of two do).
  """
  if n <= min(block, block_bwd):
    n8 = round_up(n, align)
    return n8, n8, n8
  lo, hi = sorted((block, block_bwd))
  if hi % lo:
    raise ValueError(f'block sizes {block} and {block_bwd} must divide each other')
  npad = round_up(n, hi)
  return npad, min(block, npad), min(block_bwd, npad)


def masked_scores(q, k, code_1S, scale: float):
  """float32 `scale * q @ k^T` [R, bk] with hidden keys at MASK_VALUE, padding at -inf."""
  s = dot(q, k, NT) * scale
  s = jnp.where(code_1S > 0, s, MASK_VALUE)
  return jnp.where(code_1S >= 0, s, -jnp.inf)


def probs_and_dscores_t(q, k, v, do, code_S1, m_1R, inv_l_1R, delta_1R, scale: float):
  """Transposed probabilities p^T and score cotangents ds^T (float32 [bk, R]).

  Keys on sublanes, query rows on lanes, so the per-row statistics are
  lane-dense [1, R] rows. `p = exp(s - m) / l` uses the forward's running max
  and sum separately (not their log-sum-exp), which keeps a row with no
  visible key exact: its log-sum-exp would round to MASK_VALUE and lose
  log(S). Hidden keys get no score gradient, like the `where` of the XLA
  reference.
  """
  s_t = dot(k, q, NT) * scale
  s_t = jnp.where(code_S1 > 0, s_t, MASK_VALUE)
  s_t = jnp.where(code_S1 >= 0, s_t, -jnp.inf)
  p_t = jnp.exp(s_t - m_1R) * inv_l_1R
  dp_t = dot(v, do, NT)
  ds_t = jnp.where(code_S1 > 0, p_t * (dp_t - delta_1R), 0.0)
  return p_t, ds_t


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Static tiling of one flash call (rows = query positions x G)."""
  br: int  # query rows per forward tile (block_q * G)
  bk: int  # keys per forward tile
  br_bwd: int
  bk_bwd: int
  scale: float
  interpret: bool


def flash_vjp(forward, backward_kv, backward_q):
  """Flash attention on the rows layout as a custom_vjp from three kernel launchers.

  `forward(q, k, v, code, t) -> (o, m, l)` with the running max `m` and sum `l`
  per row in whatever shape the backend stores statistics; the backward
  launchers take `(q, k, v, code, do, m, inv_l, delta, t)` with `delta` (the
  row sums of o * do) in that same shape. Residuals are O(L): no scores.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
  def flash(q, k, v, code, t: Tiles):
    return forward(q, k, v, code, t)[0]

  def flash_fwd(q, k, v, code, t):
    o, m, l = forward(q, k, v, code, t)
    return o, (q, k, v, code, o, m, l)

  def flash_bwd(t, res, do):
    q, k, v, code, o, m, l = res
    delta = jnp.sum(o.astype(f32) * do.astype(f32), axis=-1).reshape(m.shape)
    inv_l = 1.0 / l
    dk, dv = backward_kv(q, k, v, code, do, m, inv_l, delta, t)
    dq = backward_q(q, k, v, code, do, m, inv_l, delta, t)
    return dq, dk, dv, None

  flash.defvjp(flash_fwd, flash_bwd)
  return flash


def attend_rows(flash, q_BLHD, k_BSKD, v_BSKD, kv_mask_BS, lp: int, sp: int, t: Tiles):
  """Runs `flash` (from `flash_vjp`) on [B, L, H, Dh] inputs padded to lp / sp."""
  b, l, h, _ = q_BLHD.shape
  s, kv = k_BSKD.shape[1], k_BSKD.shape[2]
  q_BKRD = to_rows(q_BLHD, kv, lp)
  k_BKSD, v_BKSD = to_kv(k_BSKD, sp), to_kv(v_BSKD.astype(k_BSKD.dtype), sp)
  o_BKRD = flash(q_BKRD, k_BKSD, v_BKSD, key_codes(kv_mask_BS, b, s, sp), t)
  return from_rows(o_BKRD, l, h)


def cost_estimate(q_BKRD, k_BKSD, rows_tile: int, *, backward: bool) -> pl.CostEstimate:
  """`pl.CostEstimate` of one pass over the rows layout, K/V streamed per query tile."""
  b, kv, r, dh = q_BKRD.shape
  flops, trans, nbytes = cost(b, 1, kv, r, k_BKSD.shape[2], dh, q_BKRD.dtype.itemsize,
                              kv_passes=r // rows_tile, backward=backward)
  return pl.CostEstimate(flops=int(flops), transcendentals=int(trans), bytes_accessed=int(nbytes))


def cost(b, h, kv, l, s, dh, itemsize, *, kv_passes: int, backward: bool):
  """(flops, transcendentals, bytes) of one attention pass over [B, H, L, S].

  K/V are streamed `kv_passes` times (once per query tile); queries once.
  """
  mm = 2 * b * h * l * s * dh
  q_bytes = itemsize * b * h * l * dh
  kv_bytes = itemsize * b * kv * s * dh
  if backward:  # dkv pass: q, do read per KV tile; dq pass: K/V per query tile
    return 7 * mm, 2 * b * h * l * s, 4 * q_bytes * 2 + kv_bytes * (2 * kv_passes + 4)
  return 2 * mm, b * h * l * s, 2 * q_bytes + 2 * kv_bytes * kv_passes
