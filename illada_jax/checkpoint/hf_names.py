"""Hugging Face tensor names <-> the parameter tree, for both families (SPEC §1).

One row of `NAMES` per parameter: its path in the tree (`illada_jax.model`),
its name in an iLLaDA (Llama-style) and in a LLaDA (OLMo-style) checkpoint,
and the `kind` of layout change from the PyTorch `[out, in]` tensor (one
layer of it when the path is under `layers/`, where `{i}` is the layer) to
the parameter:

  kind     HF tensor      parameter slice
  copy     any            the same
  qkv      [X*Dh, D]      [D, X, Dh]    (X = H for q, K for k and v)
  o        [D, H*Dh]      [H, Dh, D]
  linear   [out, in]      [in, out]
  head     [V, D]         [D, V]        (untied LM head only)
"""

from __future__ import annotations

import dataclasses

from illada_jax.config import ModelConfig

# path                      iLLaDA (Llama) name                                LLaDA (OLMo) name                                kind
NAMES = (
    ('embedder/embedding',     'model.embed_tokens.weight',                       'model.transformer.wte.weight',                  'copy'),
    ('layers/attn_norm/scale', 'model.layers.{i}.input_layernorm.weight',          'model.transformer.blocks.{i}.attn_norm.weight', 'copy'),
    ('layers/attn/q_proj',     'model.layers.{i}.self_attn.q_proj.weight',         'model.transformer.blocks.{i}.q_proj.weight',    'qkv'),
    ('layers/attn/k_proj',     'model.layers.{i}.self_attn.k_proj.weight',         'model.transformer.blocks.{i}.k_proj.weight',    'qkv'),
    ('layers/attn/v_proj',     'model.layers.{i}.self_attn.v_proj.weight',         'model.transformer.blocks.{i}.v_proj.weight',    'qkv'),
    ('layers/attn/o_proj',     'model.layers.{i}.self_attn.o_proj.weight',         'model.transformer.blocks.{i}.attn_out.weight',  'o'),
    ('layers/mlp_norm/scale',  'model.layers.{i}.post_attention_layernorm.weight', 'model.transformer.blocks.{i}.ff_norm.weight',   'copy'),
    ('layers/mlp/gate_proj',   'model.layers.{i}.mlp.gate_proj.weight',            'model.transformer.blocks.{i}.ff_proj.weight',   'linear'),  # OLMo ff_proj: the gate
    ('layers/mlp/up_proj',     'model.layers.{i}.mlp.up_proj.weight',              'model.transformer.blocks.{i}.up_proj.weight',   'linear'),
    ('layers/mlp/down_proj',   'model.layers.{i}.mlp.down_proj.weight',            'model.transformer.blocks.{i}.ff_out.weight',    'linear'),  # OLMo ff_out: the down
    ('final_norm/scale',       'model.norm.weight',                                'model.transformer.ln_f.weight',                 'copy'),
    ('lm_head',                'lm_head.weight',                                   'model.transformer.ff_out.weight',               'head'),
)


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF shape (of one layer) by parameter path."""
  d, h, k, dh, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.mlp_hidden, cfg.vocab_size)
  return {
      'embedder/embedding': (v, d), 'layers/attn_norm/scale': (d,),
      'layers/attn/q_proj': (h * dh, d), 'layers/attn/k_proj': (k * dh, d),
      'layers/attn/v_proj': (k * dh, d), 'layers/attn/o_proj': (d, h * dh),
      'layers/mlp_norm/scale': (d,), 'layers/mlp/gate_proj': (f, d),
      'layers/mlp/up_proj': (f, d), 'layers/mlp/down_proj': (d, f),
      'final_norm/scale': (d,), 'lm_head': (v, d),
  }


@dataclasses.dataclass(frozen=True)
class ParamMap:
  """One parameter of the tree and its Hugging Face tensor(s) (a row of `NAMES`)."""
  key: str  # path in the tree, '/'-joined
  hf: str  # HF name; '{i}' stands for the layer index when stacked
  kind: str  # see the module docstring
  hf_shape: tuple[int, ...]  # per layer when stacked

  @property
  def path(self) -> tuple[str, ...]:
    return tuple(self.key.split('/'))

  @property
  def stacked(self) -> bool:
    """Whether the parameter has a leading layer axis (one HF tensor per layer)."""
    return self.key.startswith('layers/')

  def hf_name(self, i: int | None = None) -> str:
    return self.hf.format(i=i)

  def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
    """The parameter's shape (with the leading layer axis when stacked)."""
    a, b = self.hf_shape[0], self.hf_shape[-1]
    per_layer = {
        'copy': self.hf_shape,
        'qkv': (b, a // cfg.head_dim, cfg.head_dim),
        'o': (b // cfg.head_dim, cfg.head_dim, a),
        'linear': (b, a),
        'head': (b, a),
    }[self.kind]
    return ((cfg.num_layers,) if self.stacked else ()) + tuple(per_layer)


def layout(cfg: ModelConfig) -> list[ParamMap]:
  """Every parameter of `cfg` with its HF name and shape, in HF file order."""
  column = 1 if cfg.family == 'illada' else 2
  shapes = _hf_shapes(cfg)
  return [ParamMap(row[0], row[column], row[3], shapes[row[0]]) for row in NAMES
          if row[0] != 'lm_head' or not cfg.tie_embeddings]


def head_name(cfg: ModelConfig) -> str:
  """The HF name of the LM head of `cfg.family` (stored or not)."""
  return NAMES[-1][1 if cfg.family == 'illada' else 2]


def embedding_name(cfg: ModelConfig) -> str:
  """The HF name of the token embedding of `cfg.family`."""
  return NAMES[0][1 if cfg.family == 'illada' else 2]
