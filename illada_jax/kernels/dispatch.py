"""`attention_impl` 'pallas' and 'splash': kernel choice by platform, mesh sharding.

'pallas' runs the TPU kernel (Mosaic) on TPU, the Triton kernel on GPU
(`cuda`, `rocm`) and the TPU kernel in interpret mode elsewhere (CPU tests).
'splash' runs jax's splash attention (interpret mode off TPU). The choice is
`jax.lax.platform_dependent`: every branch is traced and the one of the
platform being *lowered for* is kept, so `jax.export(..., platforms=['cuda'])`
or an AOT compile for a TPU topology from this CPU contain the real kernel,
whatever the default backend. Shapes the Triton kernel cannot tile (G or Dh
not a power of two) give the XLA reference on GPU instead.

Under `sharding.activation_sharding(mesh)` the kernel call is wrapped in
`jax.shard_map`: batch over the mesh axes of 'act_batch', heads over those of
'act_heads' / 'act_kv_heads', length and head dim replicated. An axis whose
size the mesh does not divide is replicated instead.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from illada_jax import sharding


def _interpret_tpu(q_BLHD, k_BSKD, v_BSKD, kv_mask_BS):
  from illada_jax.kernels.flash_tpu import flash_attention_tpu
  return flash_attention_tpu(q_BLHD, k_BSKD, v_BSKD, kv_mask_BS, interpret=True)


def _local_pallas(q_BLHD, k_BSKD, v_BSKD, kv_mask_BS):
  from illada_jax.attention import xla_attention
  from illada_jax.kernels.flash_gpu import flash_attention_gpu, supports
  from illada_jax.kernels.flash_tpu import flash_attention_tpu
  gpu = flash_attention_gpu if supports(q_BLHD.shape, k_BSKD.shape) else xla_attention
  return jax.lax.platform_dependent(q_BLHD, k_BSKD, v_BSKD, kv_mask_BS, tpu=flash_attention_tpu,
                                    cuda=gpu, rocm=gpu, default=_interpret_tpu)


def _local_splash(q_BLHD, k_BSKD, v_BSKD, kv_mask_BS):
  from illada_jax.kernels.splash import splash_attention
  return jax.lax.platform_dependent(
      q_BLHD, k_BSKD, v_BSKD, kv_mask_BS, tpu=functools.partial(splash_attention, interpret=False),
      default=functools.partial(splash_attention, interpret=True))


def _axes_if_divides(mesh, axes, n: int):
  """`axes` (a mesh axis, tuple of axes or None) if their product divides n, else None."""
  flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
  size = math.prod(mesh.shape[a] for a in flat)
  return axes if flat and n % size == 0 else None


def _sharded(local_fn, mesh, rules, q_BLHD, k_BSKD, v_BSKD, kv_mask_BS):
  b, _, h, _ = q_BLHD.shape
  kv = k_BSKD.shape[2]
  spec = sharding.logical_to_spec(('act_batch', 'act_heads'), rules)
  kv_axes = sharding.logical_to_spec(('act_kv_heads',), rules)[0]
  batch = _axes_if_divides(mesh, spec[0], b)
  heads = _axes_if_divides(mesh, spec[1], h)
  kv_heads = _axes_if_divides(mesh, kv_axes, kv)
  if heads != kv_heads:  # each shard must hold whole GQA groups
    heads = kv_heads = None
  q_spec, kv_spec = P(batch, None, heads, None), P(batch, None, kv_heads, None)
  return jax.shard_map(local_fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(batch, None)),
                       out_specs=q_spec, check_vma=False)(q_BLHD, k_BSKD, v_BSKD, kv_mask_BS)


def _dispatch(local_fn, q_BLHD, k_BSKD, v_BSKD, kv_mask_BS=None):
  if kv_mask_BS is None:
    kv_mask_BS = jnp.ones(k_BSKD.shape[:2], bool)
  active = sharding.active()
  if active is None:
    return local_fn(q_BLHD, k_BSKD, v_BSKD, kv_mask_BS)
  mesh, rules = active
  return _sharded(local_fn, mesh, rules, q_BLHD, k_BSKD, v_BSKD, kv_mask_BS)


pallas_attention = functools.partial(_dispatch, _local_pallas)
pallas_attention.__doc__ = 'Own flash kernel for the platform; contract of `attention`.'
splash_attention = functools.partial(_dispatch, _local_splash)
splash_attention.__doc__ = "jax's splash attention (TPU baseline); contract of `attention`."
