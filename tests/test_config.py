"""ModelConfig: presets, both HF dialects, refusals, round trips."""

import pytest

import illada_jax
from illada_jax import ModelConfig

ILLADA_HF = {
    'architectures': ['ILLaDAForCausalLM'], 'model_type': 'illada',
    'hidden_size': 4096, 'num_hidden_layers': 32, 'num_attention_heads': 32,
    'num_key_value_heads': 8, 'intermediate_size': 14336, 'vocab_size': 155136,
    'max_position_embeddings': 8192, 'rope_theta': 500000.0, 'rms_norm_eps': 1e-6,
    'tie_word_embeddings': True, 'attention_bias': False, 'mlp_bias': False,
    'hidden_act': 'silu', 'rope_scaling': None, 'mask_token_id': 5,
    'bos_token_id': 0, 'eos_token_id': 2, 'pad_token_id': 1,
    # bookkeeping that must be ignored
    'use_cache': False, 'transformers_version': '4.46.0', 'torch_dtype': 'bfloat16',
    'initializer_range': 0.02, 'auto_map': {'AutoModel': 'modeling_illada.ILLaDAModel'},
}

LLADA_HF = {
    'architectures': ['LLaDAModelLM'], 'model_type': 'llada', 'activation_type': 'silu',
    'alibi': False, 'attention_layer_norm': False, 'block_type': 'llama',
    'clip_qkv': None, 'd_model': 4096, 'embedding_size': 126464, 'eos_token_id': 126081,
    'include_bias': False, 'layer_norm_type': 'rms', 'layer_norm_with_affine': True,
    'mask_token_id': 126336, 'max_sequence_length': 4096, 'mlp_hidden_size': 12288,
    'mlp_ratio': 4, 'multi_query_attention': None, 'n_heads': 32, 'n_kv_heads': 32,
    'n_layers': 32, 'pad_token_id': 126081, 'rms_norm_eps': 1e-05, 'rope': True,
    'rope_theta': 500000.0, 'scale_logits': False, 'vocab_size': 126464,
    'weight_tying': False, 'use_cache': False, 'flash_attention': False,
    'transformers_version': '4.46.3', 'init_device': 'meta',
}


def test_from_hf_reads_both_dialects_into_the_presets():
  assert ModelConfig.from_hf(ILLADA_HF) == illada_jax.get_preset('illada_8b')
  assert ModelConfig.from_hf(LLADA_HF) == illada_jax.get_preset('llada_8b')


def test_published_parameter_counts():
  assert illada_jax.param_count(illada_jax.get_preset('illada_8b')) == 7_615_025_152
  assert illada_jax.param_count(illada_jax.get_preset('llada_8b')) == 8_015_581_184


@pytest.mark.parametrize('name', ['illada_8b', 'llada_8b', 'illada_tiny', 'llada_tiny'])
def test_to_hf_from_hf_round_trip(name):
  cfg = illada_jax.get_preset(name)
  assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_overrides_set_execution_fields():
  cfg = ModelConfig.from_hf(ILLADA_HF, param_dtype='float32', scan_layers=False)
  assert cfg.param_dtype == 'float32' and not cfg.scan_layers


def test_eos_list_takes_first_id():
  cfg = ModelConfig.from_hf({**ILLADA_HF, 'eos_token_id': [2, 7]})
  assert cfg.eos_token_id == 2


@pytest.mark.parametrize('hf, key', [
    ({**ILLADA_HF, 'rope_scaling': {'type': 'linear', 'factor': 2.0}}, 'rope_scaling'),
    ({**ILLADA_HF, 'attention_bias': True}, 'attention_bias'),
    ({**ILLADA_HF, 'mlp_bias': True}, 'mlp_bias'),
    ({**ILLADA_HF, 'hidden_act': 'gelu'}, 'hidden_act'),
    ({**LLADA_HF, 'layer_norm_type': 'default'}, 'layer_norm_type'),
    ({**LLADA_HF, 'include_bias': True}, 'include_bias'),
    ({**LLADA_HF, 'alibi': True}, 'alibi'),
    ({**LLADA_HF, 'block_type': 'sequential'}, 'block_type'),
    ({**ILLADA_HF, 'model_type': 'mistral'}, 'model_type'),
    ({k: v for k, v in ILLADA_HF.items() if k != 'hidden_size'}, 'hidden_size'),
    ({**ILLADA_HF, 'num_key_value_heads': 5}, 'num_kv_heads'),
])
def test_from_hf_refuses_what_the_model_does_not_implement(hf, key):
  with pytest.raises(ValueError, match=key):
    ModelConfig.from_hf(hf)


def test_field_validation_names_the_field():
  with pytest.raises(ValueError, match='mask_token_id'):
    illada_jax.get_preset('illada_tiny').replace(mask_token_id=5000)
  with pytest.raises(ValueError, match='attention_impl'):
    illada_jax.get_preset('illada_tiny').replace(attention_impl='flash')
  with pytest.raises(ValueError, match='unknown preset'):
    illada_jax.get_preset('gpt2')


def test_from_dict_round_trip_and_unknown_fields():
  cfg = illada_jax.get_preset('llada_tiny')
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match='unknown fields'):
    ModelConfig.from_dict({**cfg.to_dict(), 'dropout': 0.1})
