"""Low-rank adapters (LoRA) on the attention and MLP projections, through qwix.

A targeted projection `y = x W` becomes

  y = x W + (alpha / r) (x A) B          A: [prod(contracted), r], B: [r, prod(rest)]

(Hu et al. 2021, arXiv 2106.09685): `A` starts He-uniform, `B` at zero, so a
fresh adapter leaves the model unchanged. qwix (`qwix.LoraProvider`)
intercepts the projections' `lax.dot_general` inside the Linen modules
named by `LoraConfig.targets` and adds the `*_lora_a` / `*_lora_b`
parameters beside each weight, e.g. with scanned layers

  layers/attn/q_proj          [N, D, H, Dh]   frozen base weight
  layers/attn/q_proj_lora_a   [N, D, r]       (layers, embed, -)
  layers/attn/q_proj_lora_b   [N, r, H*Dh]    (layers, -, q_heads)

Only adapters are trained: the train state keeps them (float32 masters,
cast to the compute dtype at use like the base weights) apart from the
frozen base, which gets no gradient and no optimizer state. `merge` folds
them into the base for export (`illada-convert merge-lora`).

Why qwix's einsum path is not used: its `LoraProvider.einsum` stores a
debug string on the calling module (`setattr`), which a Linen module refuses
outside `setup` (`SetAttributeFrozenModuleError`, qwix 0.1.8); the model's
projections therefore call `lax.dot_general` (`model._matmul`), the path
qwix supports for Linen.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from illada_jax import sharding
from illada_jax.config import ModelConfig
from illada_jax.model import Transformer

Params = Any

# Module name -> the projections in it that get adapters.
TARGETS = {'attn': ('q_proj', 'k_proj', 'v_proj', 'o_proj'),
           'mlp': ('gate_proj', 'up_proj', 'down_proj')}
SUFFIXES = ('_lora_a', '_lora_b')
INFO_FILE = 'lora.json'  # in a LoRA run's step directory: this config and the base


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Adapters of a fine-tuning run; `rank == 0` trains every parameter instead."""
  rank: int = 0  # r; 0 = no adapters
  alpha: float = 16.0  # updates are scaled by alpha / rank
  targets: tuple[str, ...] = ('attn', 'mlp')  # modules of TARGETS whose projections adapt
  dropout: float = 0.0  # must be 0 (see __post_init__)

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f'lora.rank={self.rank}: must be >= 0 (0 = no adapters)')
    bad = [t for t in self.targets if t not in TARGETS]
    if bad or (self.rank and not self.targets):
      raise ValueError(f'lora.targets={self.targets!r}: choose from {sorted(TARGETS)}')
    if self.rank and self.alpha <= 0:
      raise ValueError(f'lora.alpha={self.alpha}: must be > 0')
    if self.dropout != 0.0:
      # qwix draws LoRA dropout in every call, eval and sampling included.
      raise ValueError(f'lora.dropout={self.dropout}: only 0 is supported')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), 'targets': list(self.targets)}

  @classmethod
  def from_dict(cls, d: dict) -> 'LoraConfig':
    return cls(**{**d, 'targets': tuple(d['targets'])})


def is_adapter_name(name: str) -> bool:
  return name.endswith(SUFFIXES)


@functools.lru_cache(maxsize=None)
def lora_model(cfg: ModelConfig, lcfg: LoraConfig) -> nn.Module:
  """`Transformer(cfg)` whose targeted projections carry adapters (qwix).

  Call it like the Transformer (`apply({'params': combine(base, adapters)}, ...)`,
  methods by name: `method='hidden'`), under `jax.jit`: outside a trace qwix
  finds weights by shape, which is ambiguous for equal-shaped projections.
  """
  import qwix  # imported on use: full fine-tuning and inference do not need it
  if not lcfg.rank:
    raise ValueError('lora.rank=0: no adapters to apply')
  provider = qwix.LoraProvider(module_path=r'(.*/)?(' + '|'.join(lcfg.targets) + ')',
                               rank=lcfg.rank, alpha=lcfg.alpha, dropout=lcfg.dropout)
  return qwix.apply_lora_to_model(Transformer(cfg), provider,
                                  methods=('__call__', 'hidden', 'hidden_cached', 'logits'))


def _adapters_only(tree):
  """The sub-tree of the `*_lora_a` / `*_lora_b` leaves (empty branches dropped)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      sub = _adapters_only(v)
      if sub:
        out[k] = sub
    elif is_adapter_name(k):
      out[k] = v
  return out


def _init_boxed(cfg: ModelConfig, lcfg: LoraConfig, key):
  boxed = lora_model(cfg, lcfg).init(key, jnp.zeros((1, 1), jnp.int32))['params']
  return _adapters_only(boxed)


def abstract_adapters(cfg: ModelConfig, lcfg: LoraConfig, mesh=None, rules=sharding.RULES):
  """float32 `ShapeDtypeStruct` pytree of the adapters (with shardings on a mesh)."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, cfg, lcfg), jax.random.key(0))
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
                        nn.meta.unbox(boxed))
  if mesh is None:
    return shapes
  shard = sharding.param_shardings(sharding.logical_axes(boxed), mesh, rules)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shard)


def init_adapters(cfg: ModelConfig, lcfg: LoraConfig, key, mesh=None, rules=sharding.RULES):
  """Fresh float32 adapters (A He-uniform, B zero), created in their shards on `mesh`."""
  init = lambda k: jax.tree.map(lambda x: x.astype(jnp.float32),
                                nn.meta.unbox(_init_boxed(cfg, lcfg, k)))
  out_shardings = None
  if mesh is not None:
    out_shardings = jax.tree.map(lambda s: s.sharding, abstract_adapters(cfg, lcfg, mesh, rules))
  return jax.jit(init, out_shardings=out_shardings)(key)


def combine(cfg: ModelConfig, base: Params, adapters: Params) -> Params:
  """One tree for `lora_model`: the base plus the adapters cast to the compute dtype."""
  def join(b, a):
    out = dict(b)
    for k, v in a.items():
      out[k] = join(b[k], v) if isinstance(v, dict) else v.astype(cfg.dtype)
    return out
  return join(base, adapters)


def merge(lcfg: LoraConfig, base: Params, adapters: Params) -> Params:
  """`W + (alpha / r) reshape(A @ B)` for every adapted weight, in float32, in W's dtype.

  Works on both layouts (scanned `[N, ...]` or `layers_{i}`): every
  projection contracts its leading weight axes, so `A @ B`
  (`[..., prod(contracted), prod(rest)]`) reshapes to the weight. Raises
  ValueError naming a weight whose adapters do not fit it.
  """
  def fold(b, a, path):
    out = dict(b)
    for k, v in a.items():
      if isinstance(v, dict):
        out[k] = fold(b[k], v, path + (k,))
      elif k.endswith('_lora_a'):
        name = k[:-len('_lora_a')]
        w, lb = b[name], a[name + '_lora_b']
        delta = jnp.matmul(v.astype(jnp.float32), lb.astype(jnp.float32))
        if delta.size != w.size:
          raise ValueError(f"{'/'.join(path + (name,))}: adapters {v.shape} x {lb.shape} "
                           f'do not fit the weight {w.shape}')
        out[name] = (w.astype(jnp.float32) + lcfg.scale * delta.reshape(w.shape)).astype(w.dtype)
    return out
  return fold(base, adapters, ())


def write_info(step_dir: str, lcfg: LoraConfig, *, base: str, seed: int) -> None:
  """Records in a step directory that `params` holds adapters only, and which base they need.

  `base` is the base checkpoint directory (`init_from`), or '' when the run
  started from `init_params(key(seed))`.
  """
  with open(os.path.join(step_dir, INFO_FILE), 'w') as f:
    json.dump({'lora': lcfg.to_dict(), 'base': base, 'seed': seed}, f, indent=2, sort_keys=True)
    f.write('\n')


def read_info(step_dir: str) -> dict | None:
  """`{'lora': LoraConfig, 'base': str, 'seed': int}` of a LoRA step directory, else None."""
  path = os.path.join(step_dir, INFO_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    info = json.load(f)
  return {**info, 'lora': LoraConfig.from_dict(info['lora'])}
