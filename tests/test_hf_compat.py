"""Checkpoints written by transformers itself: configs of 5.x and 4.x, logits against it;
HF -> Orbax -> HF directories that transformers (or their remote code) loads again."""

import json
import os

import numpy as np
import pytest

import illada_jax
from illada_jax import ModelConfig, checkpoint
from helpers import (WORD_CFG, make_tensors, read_hf, tiny_cfg, transformers_llama,
                     transformers_logits, transformers_tokenizer, write_hf)

pytestmark = pytest.mark.torch
TINY = WORD_CFG.replace(rope_theta=500000.0, tie_embeddings=False, num_layers=2)


def _as_4x(conf):
  """transformers 4.x's spelling of the same config: top-level rope_theta, rope_scaling."""
  rope = conf.pop('rope_parameters')
  conf.update(rope_theta=rope['rope_theta'], rope_scaling=None,
              torch_dtype=conf.pop('dtype', 'float32'), transformers_version='4.46.0')
  return conf


@pytest.mark.parametrize('style', ['5.x', '4.x'])
def test_logits_match_transformers_for_its_own_checkpoints(tmp_path, style):
  src = transformers_llama(tmp_path / 'hf', TINY, seed=1,
                           config_edit=_as_4x if style == '4.x' else None)
  conf = json.load(open(tmp_path / 'hf' / 'config.json'))
  assert ('rope_theta' in conf) == (style == '4.x')  # 5.x: only inside rope_parameters
  cfg = checkpoint.hf_to_orbax(src, tmp_path / 'ck', dtype='float32', progress=False)
  assert cfg.rope_theta == 500000.0
  cfg, params = illada_jax.load_checkpoint(tmp_path / 'ck')
  cfg = cfg.replace(compute_dtype='float32')
  tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 24))
  want = transformers_logits(src, tokens)
  got = np.asarray(illada_jax.forward(cfg, params, tokens))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(want).max() > 1.0
  wrong = np.asarray(illada_jax.forward(cfg.replace(rope_theta=10000.0), params, tokens))
  assert np.abs(wrong - want).max() > 1e-3  # the test sees theta


@pytest.mark.parametrize('key, rope', [
    ('rope_parameters', {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                         'high_freq_factor': 4.0, 'original_max_position_embeddings': 32,
                         'rope_theta': 500000.0}),
    ('rope_parameters', {'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 10000.0}),
    ('rope_scaling', {'type': 'linear', 'factor': 2.0}),
    ('rope_scaling', {'rope_type': 'dynamic', 'factor': 2.0}),
])
def test_rope_types_not_implemented_are_refused_by_name(key, rope):
  hf = {**TINY.to_hf(), key: rope}
  hf.pop('rope_parameters') if key == 'rope_scaling' else None
  kind = rope.get('rope_type', rope.get('type'))
  with pytest.raises(ValueError, match=f"{key} rope_type='{kind}' is not implemented"):
    ModelConfig.from_hf(hf)


def test_rope_theta_from_either_spelling_and_conflicts():
  base = {k: v for k, v in TINY.to_hf().items() if not k.startswith('rope')}
  read = lambda **kw: ModelConfig.from_hf({**base, **kw}).rope_theta
  assert read(rope_parameters={'rope_type': 'default', 'rope_theta': 123.0}) == 123.0
  assert read(rope_theta=321.0, rope_scaling=None) == 321.0
  assert read(rope_scaling={'type': 'default'}) == 10000.0  # transformers' default
  with pytest.raises(ValueError, match='given differently'):
    read(rope_theta=1.0, rope_parameters={'rope_type': 'default', 'rope_theta': 2.0})


# -- HF -> Orbax -> HF keeps the directory usable --------------------------------------

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% endif %}")
CHAT = [{'role': 'user', 'content': 'what is two plus two ?'}]


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_llama_round_trip_loads_in_transformers_with_its_logits_and_chat(tmp_path, dtype):
  import transformers
  src = transformers_llama(tmp_path / 'hf', TINY, seed=2, dtype=dtype)
  transformers_tokenizer(src, TEMPLATE, specials=('<s>', '<pad>', '</s>', '<unk>'),
                         added=('<|im_start|>',), bos_token='<s>', eos_token='</s>',
                         pad_token='<pad>', unk_token='<unk>')
  checkpoint.hf_to_orbax(src, tmp_path / 'ck', dtype=dtype, progress=False)
  checkpoint.orbax_to_hf(tmp_path / 'ck', tmp_path / 'back', progress=False)  # dtype: source's
  back = str(tmp_path / 'back')
  conf, src_conf = (json.load(open(os.path.join(d, 'config.json'))) for d in (back, src))
  assert conf['model_type'] == 'llama' and conf['architectures'] == src_conf['architectures']
  assert conf['rope_parameters'] == src_conf['rope_parameters'] and 'rope_theta' not in conf
  want, got = read_hf(src), read_hf(back)
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes()
  tokens = np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 12))
  np.testing.assert_array_equal(transformers_logits(back, tokens), transformers_logits(src, tokens))
  a, b = (transformers.AutoTokenizer.from_pretrained(d) for d in (src, back))
  assert os.path.isfile(os.path.join(back, 'chat_template.jinja'))
  assert (b.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) ==
          a.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True))


def test_remote_code_layout_keeps_its_loader_keys_code_and_dtype(tmp_path):
  cfg = tiny_cfg('llada')
  hf_conf = {**cfg.to_hf(), 'auto_map': {'AutoModel': 'modeling_llada.LLaDAModelLM'},
             'torch_dtype': 'float32', 'transformers_version': '4.46.3'}
  tensors = make_tensors(cfg, dtype=np.float32)
  src = write_hf(tmp_path / 'hf', cfg, tensors, hf_config=hf_conf)
  (tmp_path / 'hf' / 'modeling_llada.py').write_text('# the remote code\n')
  (tmp_path / 'hf' / 'chat_template.jinja').write_text(TEMPLATE)
  checkpoint.hf_to_orbax(src, tmp_path / 'ck', dtype='float32', progress=False)
  os.remove(tmp_path / 'ck' / 'modeling_llada.py')  # an older checkpoint: from the source dir
  checkpoint.orbax_to_hf(tmp_path / 'ck', tmp_path / 'back', progress=False)
  conf = json.load(open(tmp_path / 'back' / 'config.json'))
  for key in ('model_type', 'architectures', 'auto_map', 'transformers_version'):
    assert conf[key] == hf_conf[key], key
  assert (tmp_path / 'back' / 'modeling_llada.py').read_text() == '# the remote code\n'
  assert (tmp_path / 'back' / 'chat_template.jinja').read_text() == TEMPLATE
  got = read_hf(tmp_path / 'back')
  assert all(got[n].dtype == np.float32 and got[n].tobytes() == t.tobytes()
             for n, t in tensors.items())
