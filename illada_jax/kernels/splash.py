"""The TPU baseline: jax's own splash attention behind our attention contract.

Splash has no GQA mode, so each KV head runs the MQA kernel over its G query
heads (vmapped over batch and KV heads; K/V are not repeated). The key mask
becomes segment ids (queries 1, real keys 1, hidden or padded keys 0) under a
`MultiHeadMask` of `FullMask`s. Splash has no softmax scale: q is scaled
first, in its own dtype. L and S are padded to the block size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from illada_jax.kernels import _common as C

BLOCK = 512  # splash's block for q, kv and both backward passes at L ~ 8k


def splash_attention(q_BLHD, k_BSKD, v_BSKD, kv_mask_BS=None, *, block: int = BLOCK,
                     interpret: bool = False):
  """Bidirectional GQA attention by splash; shapes and dtypes as `xla_attention`."""
  b, l, h, dh = q_BLHD.shape
  s, kv = k_BSKD.shape[1], k_BSKD.shape[2]
  g = h // kv
  lp, bq, _ = C.tiles(l, block, block, align=128)
  sp, bk, _ = C.tiles(s, block, block, align=128)
  q_BLHD = (q_BLHD * dh ** -0.5).astype(q_BLHD.dtype)
  q_BKGLD = C.to_rows(q_BLHD, kv, lp).reshape(b, kv, lp, g, dh).transpose(0, 1, 3, 2, 4)
  k_BKSD, v_BKSD = C.to_kv(k_BSKD, sp), C.to_kv(v_BSKD, sp)
  q_seg_BL = jnp.ones((b, lp), jnp.int32)
  kv_seg_BS = jnp.maximum(C.key_codes(kv_mask_BS, b, s, sp), 0)
  sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                        block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  mask = sm.MultiHeadMask([sm.FullMask((lp, sp))] * g)
  kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)

  def one(q_GLD, k_SD, v_SD, q_seg_L, kv_seg_S):
    return kernel(q_GLD, k_SD, v_SD, segment_ids=sk.SegmentIds(q=q_seg_L, kv=kv_seg_S))

  per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
  o_BKGLD = jax.vmap(per_head)(q_BKGLD, k_BKSD, v_BKSD, q_seg_BL, kv_seg_BS)
  o_BLHD = o_BKGLD.transpose(0, 3, 1, 2, 4)[:, :l].reshape(b, l, h, dh)
  return o_BLHD.astype(q_BLHD.dtype)
