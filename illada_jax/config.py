"""`ModelConfig`: one frozen dataclass that describes iLLaDA, LLaDA and any small size.

The two checkpoint families differ only in data (KV heads, MLP width, vocabulary,
tying, token ids, RoPE theta, norm eps), never in code paths; see SPEC §1.
`ModelConfig.from_hf` reads both Hugging Face `config.json` dialects and refuses
anything the model does not implement rather than computing something else;
token ids come from the checkpoint (`illada_jax.token_ids`). `DataConfig`
(where the training data is) lives here too; `data` re-exports it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

from illada_jax import token_ids

ATTENTION_IMPLS = ('xla', 'pallas', 'splash')  # see illada_jax/attention.py
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch', 'save_qkv_attn')
FAMILIES = ('illada', 'llada')
_DTYPES = ('bfloat16', 'float32', 'float16')
QUANTIZE_MODES = ('none', 'int8', 'int8_head')  # see illada_jax/quant.py


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture, token ids and execution choices of a masked-diffusion LM.

  Dimensions follow nanodo's one-letter convention in hot code:
  `N` layers, `D` d_model, `H` heads, `K` kv heads, `Dh` head dim, `F` MLP
  hidden, `V` vocabulary.
  """

  family: str = 'illada'  # checkpoint naming: 'illada' (Llama) or 'llada' (OLMo)
  num_layers: int = 32  # N
  d_model: int = 4096  # D
  num_heads: int = 32  # H
  num_kv_heads: int = 8  # K; H % K == 0, query head h reads KV head h // (H // K)
  head_dim: int = 128  # Dh
  mlp_hidden: int = 14336  # F
  vocab_size: int = 155136  # V
  max_len: int = 8192  # longest sequence the model was trained for
  tie_embeddings: bool = True  # LM head is embedding^T
  rope_theta: float = 500000.0
  norm_eps: float = 1e-6
  mask_token_id: int = 5
  bos_token_id: int | None = 0  # None: the checkpoint has no BOS
  eos_token_id: int = 2
  pad_token_id: int = 1
  eot_token_id: int | None = None  # end-of-turn (LLaDA chat); None if absent
  # More ids that end a request beside eos_token_id (a config.json / generation_config.json
  # list, a tokenizer EOS of its own); `end_token_ids` is the whole set.
  extra_eos_token_ids: tuple[int, ...] = ()
  param_dtype: str = 'bfloat16'  # storage dtype of the parameters
  compute_dtype: str = 'bfloat16'  # activations and matmul inputs
  attention_impl: str = 'xla'  # one of ATTENTION_IMPLS
  remat_policy: str = 'full'  # one of REMAT_POLICIES; applied per layer
  scan_layers: bool = True  # layers run under nn.scan, params get a leading N axis
  quantize: str = 'none'  # one of QUANTIZE_MODES: int8 weights of params (illada_jax.quant)

  def __post_init__(self):
    def need(ok: bool, field: str, msg: str):
      if not ok:
        raise ValueError(f'ModelConfig.{field}: {msg}')

    need(self.family in FAMILIES, 'family', f'{self.family!r} not in {FAMILIES}')
    for f in ('num_layers', 'd_model', 'num_heads', 'num_kv_heads', 'head_dim',
              'mlp_hidden', 'vocab_size', 'max_len'):
      need(int(getattr(self, f)) > 0, f, f'must be positive, got {getattr(self, f)}')
    need(self.num_heads % self.num_kv_heads == 0, 'num_kv_heads',
         f'{self.num_kv_heads} does not divide num_heads={self.num_heads}')
    need(self.head_dim % 2 == 0, 'head_dim', f'RoPE needs an even head_dim, got {self.head_dim}')
    need(self.param_dtype in _DTYPES, 'param_dtype', f'{self.param_dtype!r} not in {_DTYPES}')
    need(self.compute_dtype in _DTYPES, 'compute_dtype', f'{self.compute_dtype!r} not in {_DTYPES}')
    need(self.attention_impl in ATTENTION_IMPLS, 'attention_impl',
         f'{self.attention_impl!r} not in {ATTENTION_IMPLS}')
    need(self.remat_policy in REMAT_POLICIES, 'remat_policy',
         f'{self.remat_policy!r} not in {REMAT_POLICIES}')
    object.__setattr__(self, 'extra_eos_token_ids',  # JSON gives a list
                       tuple(int(i) for i in self.extra_eos_token_ids))
    for i in self.extra_eos_token_ids:
      need(0 <= i < self.vocab_size, 'extra_eos_token_ids', f'{i} outside [0, {self.vocab_size})')
    need(self.quantize in QUANTIZE_MODES, 'quantize',
         f'{self.quantize!r} not in {QUANTIZE_MODES}')
    for f in token_ids.FIELDS:
      v = getattr(self, f)
      need(v is not None or f in ('bos_token_id', 'eot_token_id'), f, 'is required')
      need(v is None or 0 <= v < self.vocab_size, f, f'{v} outside [0, {self.vocab_size})')

  # -- derived ---------------------------------------------------------------
  @property
  def dtype(self) -> jnp.dtype:
    return jnp.dtype(self.compute_dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    """Every EOS id the checkpoint declares, `eos_token_id` first."""
    return (self.eos_token_id, *(i for i in self.extra_eos_token_ids if i != self.eos_token_id))

  @property
  def end_token_ids(self) -> tuple[int, ...]:
    """The ids that end a request in every sampler mode and the engine: all EOS ids, EOT."""
    ends = self.eos_token_ids
    return ends + ((self.eot_token_id,) if self.eot_token_id not in (None, *ends) else ())

  def replace(self, **changes) -> 'ModelConfig':
    return dataclasses.replace(self, **changes)

  # -- serialisation ---------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ModelConfig':
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'ModelConfig: unknown fields {unknown}')
    return cls(**d)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], tokenizer_dir: str | os.PathLike | None = None,
              **overrides) -> 'ModelConfig':
    """Reads a Hugging Face `config.json` dict of either family (SPEC §1).

    iLLaDA uses Llama keys (`model_type` "illada"; "llama" is accepted too),
    LLaDA uses OLMo keys (`model_type` "llada"). Anything the model does not
    implement (RoPE scaling, biases, LayerNorm, other activations, ...) raises
    ValueError naming the key; RoPE is read from `rope_parameters`
    (transformers 5) or `rope_theta` / `rope_scaling` (4.x), and a RoPE type
    other than 'default' raises ValueError naming it. Token ids come from `hf`, then from the
    tokenizer files in `tokenizer_dir` (`token_ids.resolve`; a missing mask
    or EOS id raises ValueError saying where it was looked for). `overrides`
    set execution fields such as `param_dtype` or `attention_impl`.
    """
    model_type = hf.get('model_type')
    if model_type in ('illada', 'llama'):
      cfg = _from_llama_keys(hf)
    elif model_type == 'llada':
      cfg = _from_olmo_keys(hf)
    else:
      raise ValueError(
          f'config.json: model_type={model_type!r} is not supported '
          "(expected 'illada', 'llama' or 'llada')")
    ids = token_ids.resolve(hf, cfg['family'], cfg['vocab_size'], tokenizer_dir)
    return cls(**{**cfg, **ids, **overrides})

  @classmethod
  def from_hf_file(cls, path: str | os.PathLike, **overrides) -> 'ModelConfig':
    """`from_hf` of the `config.json` at `path`, with the tokenizer files beside it."""
    with open(path) as f:
      try:
        hf = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None
    try:
      return cls.from_hf(hf, os.path.dirname(os.path.abspath(path)), **overrides)
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from None

  def to_hf(self) -> dict[str, Any]:
    """The `config.json` dict of this config's family (inverse of `from_hf`)."""
    if self.family == 'illada':
      d = {
          'architectures': ['ILLaDAForCausalLM'], 'model_type': 'illada',
          'hidden_size': self.d_model, 'num_hidden_layers': self.num_layers,
          'num_attention_heads': self.num_heads,
          'num_key_value_heads': self.num_kv_heads, 'head_dim': self.head_dim,
          'intermediate_size': self.mlp_hidden, 'vocab_size': self.vocab_size,
          'max_position_embeddings': self.max_len, 'rope_theta': self.rope_theta,
          'rope_parameters': {'rope_type': 'default', 'rope_theta': self.rope_theta},
          'rms_norm_eps': self.norm_eps, 'tie_word_embeddings': self.tie_embeddings,
          'hidden_act': 'silu', 'attention_bias': False, 'mlp_bias': False,
          'torch_dtype': self.param_dtype, 'dtype': self.param_dtype,
      }
    else:
      d = {
          'architectures': ['LLaDAModelLM'], 'model_type': 'llada',
          'd_model': self.d_model, 'n_layers': self.num_layers,
          'n_heads': self.num_heads, 'n_kv_heads': self.num_kv_heads,
          'mlp_hidden_size': self.mlp_hidden, 'embedding_size': self.vocab_size,
          'vocab_size': self.vocab_size, 'max_sequence_length': self.max_len,
          'rope_theta': self.rope_theta, 'rms_norm_eps': self.norm_eps,
          'weight_tying': self.tie_embeddings, 'include_bias': False,
          'layer_norm_type': 'rms', 'activation_type': 'silu', 'rope': True,
          'alibi': False, 'block_type': 'llama', 'torch_dtype': self.param_dtype,
      }
      if self.d_model // self.num_heads != self.head_dim:
        raise ValueError(f'LLaDA layout needs head_dim == d_model / n_heads, got {self.head_dim}')
    d.update({f: getattr(self, f) for f in token_ids.FIELDS if getattr(self, f) is not None})
    if len(self.eos_token_ids) > 1:
      d['eos_token_id'] = list(self.eos_token_ids)
    return d


# Beside ModelConfig rather than in `data` so that `train` (a TrainConfig holds
# one) imports without Grain: the train step runs on hosts without it.
@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the data is and how it becomes rows."""
  paths: tuple[str, ...] = ()  # files or glob patterns
  format: str = 'auto'  # 'auto' (by extension), 'jsonl', 'parquet', 'arrayrecord', 'text'
  eval_paths: tuple[str, ...] = ()  # held-out files; empty = the train files, another seed
  tokenizer: str = ''  # SentencePiece .model or tokenizer.json (file or directory)
  text_key: str = 'text'  # pretrain field
  prompt_key: str = 'prompt'  # sft fields
  response_key: str = 'response'
  messages_key: str = 'messages'  # chat sft field: [{"role", "content"}, ...] (sft_rows)
  # Jinja chat template for `messages`: a file, or a directory / JSON file whose
  # `chat_template` key holds it; '' = tokenizer_config.json beside `tokenizer`,
  # else the LLaDA format (SPEC §5). The sampler's `--chat` renders the same way.
  chat_template: str = ''
  chat_turns: str = 'all'  # 'all': a row per assistant turn (history as prompt); 'last'
  chat_overlong: str = 'truncate'  # chat row > seq_len: cut the prompt from the left, or 'drop'
  add_bos: bool = True  # BOS at the start of every document / pair SFT row (chat: the template's)
  shuffle: bool = True
  worker_count: int = 0  # Grain worker processes (multiprocess prefetch); 0 = in-process
  prefetch_buffer: int = 4
  train_tokenizer_vocab: int = 0  # > 0: train a SentencePiece of this size if `tokenizer` is missing


def _refuse(hf: Mapping[str, Any], key: str, allowed, what: str):
  """Raises if `hf[key]` is present and not one of `allowed`."""
  if key in hf and hf[key] not in allowed:
    raise ValueError(f'config.json: {key}={hf[key]!r} is not supported ({what})')


def _require(hf: Mapping[str, Any], key: str):
  if key not in hf:
    raise ValueError(f'config.json: required key {key!r} is missing')
  return hf[key]


# RoPE variants the model computes: plain rotate-half RoPE (SPEC §1). transformers
# spells it 'default' (4.x `rope_scaling` may also say it under the key 'type').
ROPE_TYPES = ('default',)
DEFAULT_ROPE_THETA = 10000.0  # transformers' default when a config names none


def _rope_theta(hf: Mapping[str, Any]) -> float:
  """RoPE theta of a config of any transformers version; other RoPE types raise ValueError.

  transformers 5 writes `rope_parameters: {rope_type, rope_theta, ...}` and no
  top-level `rope_theta`; 4.x writes `rope_theta` and `rope_scaling` (None or
  `{rope_type | type, factor, ...}`). Both are read; a type other than
  'default' (linear, dynamic, yarn, longrope, llama3, ...) is refused by name,
  as is a theta that the two spellings give differently.
  """
  thetas = {}
  for key in ('rope_parameters', 'rope_scaling'):
    params = hf.get(key)
    if params is None:
      continue
    if not isinstance(params, Mapping):
      raise ValueError(f'config.json: {key}={params!r} is not an object')
    if params and all(isinstance(v, Mapping) for v in params.values()):
      raise ValueError(f'config.json: {key} per layer type ({sorted(params)}) is not '
                       'implemented (one RoPE for every layer)')
    kind = params.get('rope_type', params.get('type', 'default'))
    if kind not in ROPE_TYPES:
      raise ValueError(f'config.json: {key} rope_type={kind!r} is not implemented '
                       f'(the model computes {ROPE_TYPES[0]!r} RoPE only)')
    if params.get('rope_theta') is not None:
      thetas[f'{key}.rope_theta'] = float(params['rope_theta'])
  if hf.get('rope_theta') is not None:
    thetas['rope_theta'] = float(hf['rope_theta'])
  if len(set(thetas.values())) > 1:
    raise ValueError(f'config.json: RoPE theta given differently: {thetas}')
  return next(iter(thetas.values()), DEFAULT_ROPE_THETA)


def _from_llama_keys(hf: Mapping[str, Any]) -> dict[str, Any]:
  _refuse(hf, 'attention_bias', (False, None), 'the model has no biases')
  _refuse(hf, 'mlp_bias', (False, None), 'the model has no biases')
  _refuse(hf, 'hidden_act', ('silu', 'swish', None), 'the MLP is SwiGLU')
  _refuse(hf, 'attention_dropout', (0, 0.0, None), 'dropout is not implemented')
  _refuse(hf, 'partial_rotary_factor', (1, 1.0, None), 'RoPE rotates the whole head')
  _refuse(hf, 'is_causal', (False, None), 'attention is bidirectional')
  d = int(_require(hf, 'hidden_size'))
  h = int(_require(hf, 'num_attention_heads'))
  return {
      'family': 'illada',
      'num_layers': int(_require(hf, 'num_hidden_layers')),
      'd_model': d,
      'num_heads': h,
      'num_kv_heads': int(hf.get('num_key_value_heads') or h),
      'head_dim': int(hf.get('head_dim') or d // h),
      'mlp_hidden': int(_require(hf, 'intermediate_size')),
      'vocab_size': int(_require(hf, 'vocab_size')),
      'max_len': int(hf.get('max_position_embeddings', 8192)),
      'tie_embeddings': bool(hf.get('tie_word_embeddings', True)),
      'rope_theta': _rope_theta(hf),
      'norm_eps': float(hf.get('rms_norm_eps', 1e-6)),
  }


def _from_olmo_keys(hf: Mapping[str, Any]) -> dict[str, Any]:
  _refuse(hf, 'include_bias', (False, None), 'the model has no biases')
  _refuse(hf, 'bias_for_layer_norm', (False, None), 'the model has no biases')
  _refuse(hf, 'layer_norm_type', ('rms', None), 'only RMSNorm is implemented')
  _refuse(hf, 'layer_norm_with_affine', (True, None), 'RMSNorm has a weight')
  _refuse(hf, 'activation_type', ('silu', 'swiglu', None), 'the MLP is SwiGLU')
  _refuse(hf, 'block_type', ('llama', None), 'only the Llama block is implemented')
  _refuse(hf, 'alibi', (False, None), 'ALiBi is not implemented')
  _refuse(hf, 'rope', (True, None), 'the model uses RoPE')
  _refuse(hf, 'attention_layer_norm', (False, None), 'QK norm is not implemented')
  _refuse(hf, 'clip_qkv', (None,), 'QKV clipping is not implemented')
  _refuse(hf, 'scale_logits', (False, None), 'logit scaling is not implemented')
  _refuse(hf, 'multi_query_attention', (None, False), 'use n_kv_heads')
  d = int(_require(hf, 'd_model'))
  h = int(_require(hf, 'n_heads'))
  return {
      'family': 'llada',
      'num_layers': int(_require(hf, 'n_layers')),
      'd_model': d,
      'num_heads': h,
      'num_kv_heads': int(hf.get('n_kv_heads') or h),
      'head_dim': d // h,
      'mlp_hidden': int(_require(hf, 'mlp_hidden_size')),
      'vocab_size': int(hf.get('embedding_size') or _require(hf, 'vocab_size')),
      'max_len': int(hf.get('max_sequence_length', 4096)),
      'tie_embeddings': bool(hf.get('weight_tying', False)),
      'rope_theta': _rope_theta(hf),
      'norm_eps': float(hf.get('rms_norm_eps', 1e-5)),
  }


def from_strings(cls, values: Mapping[str, Any]):
  """An instance of the dataclass `cls` from text values (CLI flags, lm-eval model_args).

  Each string is converted by its field's annotation (`int`, `float`,
  `bool`, `str`, `X | None`; 'None' or '' give None); other values pass
  through. Raises ValueError naming the field for an unknown name or a bad value.
  """
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kw = {}
  for name, value in values.items():
    if name not in fields:
      raise ValueError(f'{cls.__name__}: unknown field {name!r}; have {sorted(fields)}')
    kw[name] = _typed(str(fields[name].type), value, f'{cls.__name__}.{name}')
  return cls(**kw)


def _typed(annotation: str, value, where: str):
  if not isinstance(value, str):
    return value
  kinds = [k.strip() for k in annotation.split('|')]
  if 'None' in kinds and value.strip() in ('', 'None', 'none', 'null'):
    return None
  kind = next((k for k in kinds if k != 'None'), 'str')
  try:
    if kind == 'bool':
      if value.lower() in ('1', 'true', 'yes'):
        return True
      if value.lower() in ('0', 'false', 'no'):
        return False
      raise ValueError('expected true or false')
    if kind == 'int':
      return int(value)
    if kind == 'float':
      return float(value)
  except ValueError as e:
    raise ValueError(f'{where}: cannot read {value!r} as {kind} ({e})') from None
  return value
