"""int8 weight-only inference through qwix's post-training quantization (PTQ).

`quantize_params(cfg, params)` turns a float parameter tree into one whose
projection weights are `qwix.QArray`s: int8 values of the weight's shape and
one float32 scale per output channel (symmetric absmax: `scale = max|w| /
127.5` over the contracted axes, qwix's bound that fills the top bucket,
`q = clip(round(w / scale), -128, 127)`; per layer with scanned layers),
computed by `qwix.quantize` in float32. It returns the config with
`quantize` set, and that config is all the model, `sample`, the engine and
scoring need: `model.build(cfg)` is then the Transformer under
`qwix.PtqProvider`, which intercepts the projections' `lax.dot_general`
(`model._matmul`, the path LoRA uses) and hands the quantized weight to
qwix's `dot_general`. With float activations that dequantizes the weight to
the compute dtype (`int8 * scale`, scale cast to the compute dtype at use) and
runs a compute-dtype matmul, which XLA fuses: activations and accumulation
stay in the compute dtype, only the weights are stored in int8.

Modes (`ModelConfig.quantize`):

  'int8'       every attention and MLP projection; the embedding and the LM
               head keep the parameter dtype (the default choice: the head is
               where a rounding error moves every logit, and the embedding is
               a gather, not a matmul).
  'int8_head'  also the LM head: the untied `lm_head` (per vocabulary column),
               or with tied weights the shared table (per vocabulary row),
               whose embedding rows are then dequantized after the gather.

Measured on the demo model and the tiny models of both families: README
("int8 weights"). A quantized tree stores each quantized weight as
`{'qvalue', 'scale'}` in a checkpoint (`to_storage` / `from_storage`), so
`load_checkpoint` restores it without re-quantizing.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from illada_jax import sharding
from illada_jax.config import QUANTIZE_MODES, ModelConfig

Params = Any

# Weight name -> the logical axes its matmul contracts (model.py's specs).
CONTRACTED = {
    'q_proj': ('embed',), 'k_proj': ('embed',), 'v_proj': ('embed',),
    'o_proj': ('q_heads', 'head_dim'),
    'gate_proj': ('embed',), 'up_proj': ('embed',), 'down_proj': ('mlp',),
    'lm_head': ('embed',), 'embedding': ('embed',),
}
_PROJECTIONS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
SCALE_DTYPE = jnp.float32
STORAGE_KEYS = ('qvalue', 'scale')


def quantized_names(cfg: ModelConfig) -> tuple[str, ...]:
  """Leaf names (last path element) that `cfg.quantize` stores in int8."""
  if cfg.quantize == 'none':
    return ()
  head = ('embedding',) if cfg.tie_embeddings else ('lm_head',)
  return _PROJECTIONS + (head if cfg.quantize == 'int8_head' else ())


def _check_mode(mode: str) -> None:
  if mode not in QUANTIZE_MODES or mode == 'none':
    raise ValueError(f'quantize={mode!r}: choose from {QUANTIZE_MODES[1:]}')


def _channel_axes(names: tuple, leaf: str) -> tuple[int, ...]:
  """Axes with their own scale: every axis the projection does not contract."""
  return tuple(i for i, n in enumerate(names) if n not in CONTRACTED[leaf])


def _scale_names(names: tuple, leaf: str) -> tuple:
  return tuple(None if n in CONTRACTED[leaf] else n for n in names)


@functools.partial(jax.jit, static_argnums=(1,))
def quantize_array(w, channel_axes: tuple[int, ...]):
  """`qwix.quantize` of one weight: int8 values, float32 per-channel scales (symmetric).

  The one quantization function of the project (load time, `illada-convert
  quantize`, tests), so every path gives the same bits for the same input.
  """
  import qwix
  # In float32: qwix computes the scale in the input's dtype, and a bfloat16
  # scale would be off by up to 0.4% for the whole channel.
  return qwix.quantize(w.astype(jnp.float32), jnp.int8, channelwise_axes=channel_axes,
                       scale_dtype=SCALE_DTYPE)


def _walk(tree, fn, path=()):
  return {k: _walk(v, fn, path + (k,)) if isinstance(v, dict) else fn(path + (k,), v)
          for k, v in tree.items()}


def quantize_params(cfg: ModelConfig, params: Params, mode: str = 'int8'
                    ) -> tuple[ModelConfig, Params]:
  """`(cfg with quantize=mode, params with int8 projection weights)`; see module docstring.

  Args:
    cfg: the float model's config (`cfg.quantize == 'none'`).
    params: its parameter tree (any float dtype, scanned or not, on a mesh
      or not); leaves are quantized one at a time, each in its own shards.
  Returns:
    The quantized config and tree: the weights named by `quantized_names`
    become `qwix.QArray(qvalue int8 [w.shape], scale float32 [w.shape with
    contracted axes 1])`, every other leaf is kept as it is.
  Raises:
    ValueError: unknown `mode`, or params that are already quantized.
  """
  _check_mode(mode)
  if cfg.quantize != 'none':
    raise ValueError(f'params are already quantized ({cfg.quantize})')
  qcfg = cfg.replace(quantize=mode)
  axes = _logical_axes(cfg, params)
  names = quantized_names(qcfg)

  def convert(path, w):
    if path[-1] not in names:
      return w
    q = quantize_array(w, _channel_axes(_lookup(axes, path), path[-1]))
    mesh = sharding.mesh_of({'w': w})
    if mesh is not None:  # keep the weight's own placement: no gather of the model
      q = jax.device_put(q, _qarray_shardings(_lookup(axes, path), path[-1], mesh))
    return q
  return qcfg, _walk(params, convert)


def _lookup(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _logical_axes(cfg: ModelConfig, params: Params):
  """Logical axes of the float model, in the layout (scanned or not) of `params`."""
  from illada_jax import model
  layout = cfg.replace(quantize='none', scan_layers='layers' in params)
  return model.param_logical_axes(layout)


def _qarray_shardings(names: tuple, leaf: str, mesh, rules=sharding.RULES):
  import qwix
  spec = lambda n: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(n, rules))
  return qwix.QArray(qvalue=spec(names), scale=spec(_scale_names(names, leaf)), qtype=jnp.int8)


def abstract_quantized(cfg: ModelConfig, mesh=None, rules=sharding.RULES) -> Params:
  """`ShapeDtypeStruct` tree of `quantize_params(...)[1]` for a quantized `cfg` (with
  shardings on `mesh`): the restore target of an int8 checkpoint and of AOT compiles."""
  import qwix
  from illada_jax import model
  fcfg = cfg.replace(quantize='none')
  shapes = model.abstract_params(fcfg)
  axes = model.param_logical_axes(fcfg)
  names = quantized_names(cfg)
  wdt = cfg.weight_dtype

  def spec(path, s):
    n = _lookup(axes, path)
    shard = (lambda x: None) if mesh is None else (
        lambda x: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(x, rules)))
    if path[-1] not in names:
      return jax.ShapeDtypeStruct(s.shape, wdt, sharding=shard(n))
    contracted = CONTRACTED[path[-1]]
    scale_shape = tuple(1 if a in contracted else d for a, d in zip(n, s.shape))
    return qwix.QArray(
        qvalue=jax.ShapeDtypeStruct(s.shape, jnp.int8, sharding=shard(n)),
        scale=jax.ShapeDtypeStruct(scale_shape, SCALE_DTYPE, sharding=shard(_scale_names(n, path[-1]))),
        qtype=jnp.int8)
  return _walk(shapes, spec)


def is_qarray(x) -> bool:
  import qwix
  return isinstance(x, qwix.QArray)


def to_storage(params: Params) -> Params:
  """QArray leaves -> `{'qvalue', 'scale'}` dicts (a plain tree Orbax saves as it is)."""
  import qwix
  def conv(x):
    return {'qvalue': x.qvalue, 'scale': x.scale} if isinstance(x, qwix.QArray) else x
  return jax.tree.map(conv, params, is_leaf=is_qarray)


def from_storage(tree: Params) -> Params:
  """Inverse of `to_storage`."""
  import qwix
  def conv(t):
    if isinstance(t, dict) and set(t) == set(STORAGE_KEYS):
      return qwix.QArray(qvalue=t['qvalue'], scale=t['scale'], qtype=jnp.int8)
    if isinstance(t, dict):
      return {k: conv(v) for k, v in t.items()}
    return t
  return conv(tree)


def dequantize_params(params: Params) -> Params:
  """int8 weights back to float (scale dtype): the tree the float model would use."""
  import qwix
  return jax.tree.map(lambda x: qwix.dequantize(x) if is_qarray(x) else x, params,
                      is_leaf=is_qarray)


def nbytes(params: Params) -> int:
  """Bytes of every array in the tree (int8 values and scales included)."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree.leaves(params)))


@functools.lru_cache(maxsize=None)
def quantized_model(cfg: ModelConfig):
  """`Transformer(cfg)` under `qwix.PtqProvider`: the projections named by `cfg.quantize`
  take `QArray` weights. Call it as the Transformer (methods by name)."""
  import qwix
  from illada_jax.model import Transformer
  _check_mode(cfg.quantize)
  # dot_general in the attention / MLP modules: only the projections (the
  # attention itself is an einsum, and Pallas calls are never intercepted).
  rules = [qwix.QuantizationRule(module_path=r'(.*/)?(attn|mlp)', op_names=('dot_general',),
                                 weight_qtype=jnp.int8)]
  if cfg.quantize == 'int8_head':
    # The head's einsum: the root module's (untied) or the embedder's (tied).
    rules.append(qwix.QuantizationRule(module_path='' if not cfg.tie_embeddings else 'embedder',
                                       op_names=('einsum',), weight_qtype=jnp.int8))
  return qwix.quantize_model(Transformer(cfg), qwix.PtqProvider(rules),
                             methods=('__call__', 'hidden', 'hidden_cached', 'logits'))
