"""Named mesh, logical axis rules, and the activation-sharding context.

Every parameter and main activation carries logical axis names (MaxText's
vocabulary); `RULES` maps them onto the mesh axes `data`, `fsdp` and `tensor`.
Changing the parallelism means editing `RULES` (or passing other rules), never
the model. Outside an `activation_sharding` context `constrain` is a no-op, so
the model runs unchanged on one device.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical name -> mesh axis (or tuple of axes, or None for replicated).
# Parameters: FSDP shards the model dimension, tensor parallelism shards
# heads, MLP hidden and vocabulary. Activations: the batch is split over
# data and fsdp; head/MLP/vocab dimensions follow their weights.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ('layers', None),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('q_heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('norm', None),
    # activations
    ('act_batch', ('data', 'fsdp')),
    ('act_length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('act_head_dim', None),
)


def logical_to_spec(names: Sequence[str | None], rules=RULES) -> P:
  """PartitionSpec for a tuple of logical axis names; unknown names replicate."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in names:
    axes = table.get(name) if name is not None else None
    # A mesh axis may appear once per spec; a later repeat is replicated.
    flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if any(a in used for a in flat):
      axes = None
    else:
      used.update(flat)
    out.append(axes)
  return P(*out)


def parse_mesh_shape(text: str | Mapping[str, int] | None) -> dict[str, int]:
  """'data=1,fsdp=4,tensor=2' -> {'data': 1, 'fsdp': 4, 'tensor': 2}.

  Missing axes are 1, except that one axis may be -1 ("all remaining
  devices"); with nothing given, every device goes to `fsdp`.
  """
  if text is None or text == '':
    return {'data': 1, 'fsdp': -1, 'tensor': 1}
  if isinstance(text, Mapping):
    items = dict(text)
  else:
    items = {}
    for part in text.split(','):
      if '=' not in part:
        raise ValueError(f'mesh: expected axis=size, got {part!r} in {text!r}')
      k, v = part.split('=', 1)
      items[k.strip()] = int(v)
  bad = sorted(set(items) - set(MESH_AXES))
  if bad:
    raise ValueError(f'mesh: unknown axes {bad}; the axes are {MESH_AXES}')
  return {a: int(items.get(a, 1)) for a in MESH_AXES}


def make_mesh(shape: str | Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A `(data, fsdp, tensor)` mesh over `devices` (default: all devices)."""
  sizes = parse_mesh_shape(shape)
  devices = list(jax.devices() if devices is None else devices)
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f'mesh: only one axis may be -1, got {fill}')
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if len(devices) % known:
      raise ValueError(f'mesh: {len(devices)} devices not divisible by {known}')
    sizes[fill[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f'mesh: {sizes} needs {math.prod(sizes.values())} devices, '
                     f'have {len(devices)}')
  dims = tuple(sizes[a] for a in MESH_AXES)
  # Auto axes: shardings propagate through the model by GSPMD from the
  # parameters and the logical constraints, not through explicit types.
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(dims, MESH_AXES, devices=devices, axis_types=axis_types)
  return Mesh(np.asarray(devices).reshape(dims), MESH_AXES, axis_types=axis_types)


def param_shardings(logical_tree, mesh: Mesh, rules=RULES):
  """NamedShardings for a pytree whose leaves are logical-name tuples."""
  return jax.tree.map(
      lambda names: NamedSharding(mesh, logical_to_spec(names, rules)),
      logical_tree, is_leaf=lambda x: isinstance(x, tuple))


def logical_axes(boxed_tree):
  """Logical-name tuples of a pytree of `nn.Partitioned` (e.g. from init)."""
  return jax.tree.map(
      lambda b: tuple(b.names) if isinstance(b, nn.Partitioned) else (None,) * b.ndim,
      boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


# -- activation constraints ---------------------------------------------------
_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules=RULES):
  """While tracing inside this context, `constrain` shards activations on `mesh`."""
  prev = getattr(_ACTIVE, 'value', None)
  _ACTIVE.value = None if mesh is None else (mesh, rules)
  try:
    yield
  finally:
    _ACTIVE.value = prev


def active() -> tuple[Mesh, tuple] | None:
  """`(mesh, rules)` of the innermost `activation_sharding` context, or None outside one."""
  return getattr(_ACTIVE, 'value', None)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op without a mesh."""
  current = active()
  if current is None:
    return x
  mesh, rules = current
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


def mesh_of(tree) -> Mesh | None:
  """The mesh of the first NamedSharding-placed leaf of `tree`, if any."""
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None
