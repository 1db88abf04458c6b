"""Ahead-of-time TPU compilation of the Pallas kernel on a CPU host (needs libtpu).

The model's forward+backward with attention_impl='pallas' must lower through
Mosaic and compile for v5p-8 and v6e-8 on a (fsdp, tensor) mesh, with the
kernel shard_mapped over batch and heads; and at L = 8192 with the 8B head
layout the kernel's per-chip temporaries must be O(L) and at most a tenth of
the XLA path's. Compilation only: nothing runs on a TPU.
"""

import importlib.util

import pytest

import illada_jax as ij

pytestmark = [
    pytest.mark.tpu,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='libtpu not installed'),
]

# The 8B attention layout (H=32, K=8, Dh=128) in a narrow 2-layer model at
# L=1024 (4 query tiles x 2 KV tiles), so that compilation takes well under a
# minute on two CPU cores (d_model 1024 at L=2048 took 81 s and 170 s).
_CFG = ij.get_preset('illada_8b').replace(num_layers=2, d_model=512, mlp_hidden=1024,
                                           vocab_size=4096, attention_impl='pallas')


@pytest.mark.parametrize('slice_name,mesh_shape', [('v5p-8', 'fsdp=2,tensor=2'),
                                                   ('v6e-8', 'fsdp=4,tensor=2')])
def test_model_grad_with_pallas_compiles_for_tpu(slice_name, mesh_shape):
  from illada_jax.kernels import aot
  mesh = aot.topology_mesh(slice_name, mesh_shape)
  compiled = aot.compile_model_grad(_CFG, mesh, per_chip_batch=1, length=1024)
  text = compiled.as_text()
  # The forward, its remat recomputation, dK/dV and dQ are Mosaic kernels.
  assert 'illada_flash_fwd' in text and 'illada_flash_dkv' in text and 'illada_flash_dq' in text
  assert compiled.memory_analysis().temp_size_in_bytes < 1 << 30


def test_kernel_memory_is_linear_and_a_tenth_of_xla_at_8k():
  from illada_jax.kernels import aot
  mesh = aot.topology_mesh('v5p-8')  # all four chips on fsdp: one sequence per chip
  temp = lambda impl, length: aot.compile_attention(
      impl, mesh, per_chip_batch=1, length=length, heads=32, kv_heads=8,
      head_dim=128).memory_analysis().temp_size_in_bytes
  q_bytes = lambda length: length * 32 * 128 * 2  # one bf16 [L, H, Dh] activation per chip
  pallas_4k, pallas_8k, xla_8k = temp('pallas', 4096), temp('pallas', 8192), temp('xla', 8192)
  assert pallas_8k <= xla_8k / 10, (pallas_8k, xla_8k)
  # O(L): a few activation-sized buffers (layout copies of q, o, do, dq), where
  # the [H, L, L] scores would be L/4 = 2048 of them at 8k.
  assert pallas_4k <= 4 * q_bytes(4096), pallas_4k
  assert pallas_8k <= 4 * q_bytes(8192), pallas_8k
