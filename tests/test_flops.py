"""FLOP counts against the matmuls the forward pass actually traces."""

import math

import jax
import jax.numpy as jnp
import pytest

import illada_jax
from illada_jax import flops


def _dot_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general in `jaxpr`, nested jaxprs (scan bodies) included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    for value in eqn.params.values():
      inner = getattr(value, 'jaxpr', value)
      if isinstance(inner, jax.extend.core.Jaxpr):
        total += _dot_flops(inner) * eqn.params.get('length', 1)
  return total


@pytest.mark.parametrize('preset', ['illada_tiny', 'llada_tiny'])
def test_forward_flops_equal_the_traced_matmuls(preset):
  cfg = illada_jax.get_preset(preset).replace(num_layers=3, d_model=64, num_heads=4,
                                              num_kv_heads=2, head_dim=24, mlp_hidden=96,
                                              vocab_size=2048)
  b, l = 2, 40
  params = illada_jax.abstract_params(cfg)
  traced = jax.make_jaxpr(
      lambda p, t: illada_jax.Transformer(cfg).apply({'params': p}, t))(
          params, jax.ShapeDtypeStruct((b, l), jnp.int32))
  assert flops.forward_flops_per_token(cfg, l) * b * l == _dot_flops(traced.jaxpr)
