"""Sharding: mesh construction, logical rules, and sharded == single-device numerics."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import illada_jax
from illada_jax import sharding

CFG = illada_jax.get_preset('illada_tiny').replace(
    num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_hidden=96,
    vocab_size=96, param_dtype='float32', compute_dtype='float32')


def test_parse_and_make_mesh():
  assert sharding.parse_mesh_shape('fsdp=4,tensor=2') == {'data': 1, 'fsdp': 4, 'tensor': 2}
  mesh = illada_jax.make_mesh('data=2,fsdp=2,tensor=2')
  assert mesh.axis_names == ('data', 'fsdp', 'tensor') and mesh.devices.shape == (2, 2, 2)
  assert illada_jax.make_mesh().devices.shape == (1, 8, 1)  # default: all devices FSDP
  assert illada_jax.make_mesh('data=2,fsdp=-1').devices.shape == (2, 4, 1)
  with pytest.raises(ValueError, match='unknown axes'):
    sharding.parse_mesh_shape('model=2')
  with pytest.raises(ValueError, match='needs 16 devices'):
    illada_jax.make_mesh('data=2,fsdp=4,tensor=2')


def test_logical_to_spec_uses_each_mesh_axis_once():
  assert sharding.logical_to_spec(('layers', 'embed', 'q_heads', 'head_dim')) == \
      P(None, 'fsdp', 'tensor', None)
  assert sharding.logical_to_spec(('act_batch', 'act_length', 'act_vocab')) == \
      P(('data', 'fsdp'), None, 'tensor')
  # 'embed' -> fsdp is already taken by the batch axis: replicated instead.
  assert sharding.logical_to_spec(('act_batch', 'embed')) == P(('data', 'fsdp'), None)


def test_every_parameter_has_logical_axes_of_its_rank():
  axes = illada_jax.model.param_logical_axes(illada_jax.get_preset('illada_8b'))
  shapes = illada_jax.abstract_params(illada_jax.get_preset('illada_8b'))
  for names, shape in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                          jax.tree.leaves(shapes)):
    assert len(names) == shape.ndim and all(n is not None for n in names)
  assert axes['layers']['attn']['q_proj'] == ('layers', 'embed', 'q_heads', 'head_dim')


def test_sharded_init_and_forward_equal_single_device():
  mesh = illada_jax.make_mesh('data=2,fsdp=2,tensor=2')
  key = jax.random.key(0)
  sharded = illada_jax.init_params(CFG, key, mesh=mesh)
  single = illada_jax.init_params(CFG, key)
  q = sharded['layers']['attn']['q_proj']
  assert q.sharding.spec == P(None, 'fsdp', 'tensor', None)
  assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)  # D/2, H/2 per device
  assert sharded['embedder']['embedding'].sharding.spec == P('tensor', 'fsdp')
  jax.tree.map(np.testing.assert_array_equal, sharded, single)

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (4, 12)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, :5] = 0
  mask[3, :2] = 0
  got = illada_jax.forward(CFG, sharded, tokens, mask)
  want = illada_jax.forward(CFG, single, tokens, mask)
  assert got.sharding.spec == P(('data', 'fsdp'), None, 'tensor')
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_abstract_params_carry_shardings():
  mesh = illada_jax.make_mesh('data=1,fsdp=4,tensor=2')
  abstract = illada_jax.abstract_params(illada_jax.get_preset('illada_8b'), mesh)
  gate = abstract['layers']['mlp']['gate_proj']
  assert gate.shape == (32, 4096, 14336) and gate.dtype == np.dtype('bfloat16')
  assert gate.sharding.spec == P(None, 'fsdp', 'tensor')
