"""Ahead-of-time TPU compilation from a CPU host (needs libtpu, not a TPU).

`TOPOLOGIES` names the TPU slices used here (descriptor and HBM per chip);
`topology_mesh('v5p-8')` builds a (data, fsdp, tensor) mesh over the devices
of a TPU topology description; `compile_attention` and `compile_model_grad`
lower and compile forward+backward on it, so Mosaic lowering, sharding and
per-chip memory (`compiled.memory_analysis()`) are checked without hardware.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from illada_jax import model, sharding
from illada_jax.attention import attention
from illada_jax.config import ModelConfig

GiB = 2 ** 30

# Slice name -> (topology descriptor of `jax.experimental.topologies`, HBM per
# chip in bytes). v4/v5p names count TensorCores (2 per chip); v5e/v6e names
# count chips.
TOPOLOGIES = {
    'v5p-8': ('v5p:2x2x1', 95 * GiB),
    'v5p-16': ('v5p:2x2x2', 95 * GiB),
    'v5p-32': ('v5p:2x2x4', 95 * GiB),
    'v5p-64': ('v5p:2x4x4', 95 * GiB),
    'v5p-128': ('v5p:4x4x4', 95 * GiB),
    'v5p-256': ('v5p:4x4x8', 95 * GiB),
    'v5p-512': ('v5p:4x8x8', 95 * GiB),
    'v6e-8': ('v6e:2x4', 32 * GiB),
    'v6e-16': ('v6e:4x4', 32 * GiB),
    'v6e-64': ('v6e:8x8', 32 * GiB),
    'v6e-256': ('v6e:16x16', 32 * GiB),
    # One chip: a single-chip host (libtpu's default host is 2x2 chips).
    'v5e-1': ('v5e:1x1', 16 * GiB, {'chips_per_host_bounds': (1, 1, 1)}),
    'v6e-1': ('v6e:1x1', 32 * GiB, {'chips_per_host_bounds': (1, 1, 1)}),
    'v5e-256': ('v5e:16x16', 16 * GiB),  # libtpu 0.0.42 refuses 'v5litepod'
}


def topology_devices(name: str):
  """(devices, HBM bytes per chip or None) of slice `name` or of a raw descriptor ('v5p:4x4x8')."""
  # Compiling only: another process holding libtpu's lockfile must not block us.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies
  desc, hbm, *kwargs = TOPOLOGIES.get(name, (name, None))
  return topologies.get_topology_desc(desc, 'tpu', **(kwargs[0] if kwargs else {})).devices, hbm


def topology_mesh(slice_name: str, mesh_shape: str | None = None):
  """A (data, fsdp, tensor) mesh over the chips of `slice_name` (default: all fsdp)."""
  return sharding.make_mesh(mesh_shape, devices=topology_devices(slice_name)[0])


def _batch_size(mesh, per_chip: int) -> int:
  return per_chip * mesh.shape['data'] * mesh.shape['fsdp']


def compile_attention(impl: str, mesh, *, per_chip_batch: int, length: int, heads: int,
                      kv_heads: int, head_dim: int, dtype=jnp.bfloat16):
  """Compiled fwd+bwd of `attention(impl=...)` alone: grads of sum(out) w.r.t. q, k, v."""
  b = _batch_size(mesh, per_chip_batch)
  spec = sharding.logical_to_spec(('act_batch', 'act_length', 'act_heads', 'act_head_dim'))
  kv_spec = sharding.logical_to_spec(('act_batch', 'act_length', 'act_kv_heads', 'act_head_dim'))
  sd = lambda shape, sp, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, sp))
  args = (sd((b, length, heads, head_dim), spec), sd((b, length, kv_heads, head_dim), kv_spec),
          sd((b, length, kv_heads, head_dim), kv_spec), sd((b, length), P(spec[0], None), bool))

  def fwd_bwd(q, k, v, mask):
    with sharding.activation_sharding(mesh):
      loss = lambda q, k, v: jnp.sum(attention(q, k, v, mask, impl=impl).astype(jnp.float32))
      return jax.grad(loss, (0, 1, 2))(q, k, v)

  shardings = tuple(a.sharding for a in args[:3])
  return jax.jit(fwd_bwd, out_shardings=shardings).lower(*args).compile()


def compile_model_grad(cfg: ModelConfig, mesh, *, per_chip_batch: int, length: int):
  """Compiled parameter gradient of the masked-token cross-entropy of `cfg` on `mesh`."""
  b = _batch_size(mesh, per_chip_batch)
  params = model.abstract_params(cfg, mesh)
  batch = NamedSharding(mesh, sharding.logical_to_spec(('act_batch', 'act_length')))
  tokens = jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=batch)
  mask = jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=batch)

  def grad(params, tokens, mask):
    def loss(p):
      with sharding.activation_sharding(mesh):
        logits = model.Transformer(cfg).apply({'params': p}, tokens, mask)
      logp = jax.nn.log_softmax(logits)
      nll = -jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
      return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)
    return jax.grad(loss)(params)

  out = jax.tree.map(lambda s: s.sharding, params)
  return jax.jit(grad, out_shardings=out).lower(params, tokens, mask).compile()
