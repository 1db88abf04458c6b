"""HF safetensors <-> Orbax conversion on tiny checkpoints of both families.

HF directories are written and read back with the `safetensors` library and
names spelled out by hand (`helpers`, not taken from `illada_jax.checkpoint`),
and the expected logits come from a plain-numpy forward pass over the
original HF tensors, so a wrong name, transpose, reshape or gate/up swap fails.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import illada_jax
from illada_jax import checkpoint
from illada_jax.checkpoint import safetensors_io
from illada_jax.cli import convert as cli
from helpers import (BF16, REPO, TOKENIZER_FILES, make_tensors, read_hf, reference_logits,
                     tiny_cfg, write_hf)


# -- conversion -----------------------------------------------------------------------

@pytest.mark.parametrize('family,head,index', [
    ('illada', False, True), ('illada', True, False), ('llada', True, True)])
def test_round_trip_is_bit_exact(tmp_path, family, head, index):
  cfg = tiny_cfg(family)
  tensors = make_tensors(cfg, head=head)
  src = write_hf(tmp_path / 'hf', cfg, tensors, shards=3, index=index)
  got_cfg = checkpoint.hf_to_orbax(src, tmp_path / 'ck', progress=False)
  assert got_cfg == cfg.replace(param_dtype='bfloat16')
  checkpoint.orbax_to_hf(tmp_path / 'ck', tmp_path / 'back', shard_size='20KB', progress=False)

  back = read_hf(tmp_path / 'back')
  assert sorted(back) == sorted(tensors)
  for name, want in tensors.items():
    got = back[name]
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert got.tobytes() == want.tobytes(), name

  with open(tmp_path / 'back' / 'model.safetensors.index.json') as f:
    idx = json.load(f)
  assert idx['metadata']['total_size'] == sum(t.nbytes for t in tensors.values())
  assert sorted(idx['weight_map']) == sorted(tensors)
  shard_files = set(idx['weight_map'].values())
  assert len(shard_files) > 1 and all((tmp_path / 'back' / s).is_file() for s in shard_files)
  with open(tmp_path / 'back' / 'config.json') as f:
    assert json.load(f) == json.loads(json.dumps(cfg.to_hf()))
  for d in ('ck', 'back'):
    for name, text in TOKENIZER_FILES.items():
      assert (tmp_path / d / name).read_text() == text
  assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]


@pytest.mark.parametrize('family,head', [('illada', True), ('llada', True)])
def test_round_trip_in_small_pieces_is_bit_exact(tmp_path, monkeypatch, family, head):
  """Inner chunks of 2 KB: every tensor and table row block goes through in several pieces."""
  from illada_jax.checkpoint import _orbax_stream
  monkeypatch.setattr(_orbax_stream, 'READ_CHUNK_BYTES', 2048)
  cfg = tiny_cfg(family).replace(vocab_size=130)  # a short last table block
  tensors = make_tensors(cfg, head=head)
  write_hf(tmp_path / 'hf', cfg, tensors)
  checkpoint.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', progress=False)
  _, params = illada_jax.load_checkpoint(tmp_path / 'ck')  # read back by Orbax/TensorStore
  q1 = ('model.layers.1.self_attn.q_proj.weight' if family == 'illada' else
        'model.transformer.blocks.1.q_proj.weight')
  np.testing.assert_array_equal(
      np.asarray(params['layers']['attn']['q_proj'][1]).reshape(cfg.d_model, -1).T, tensors[q1])
  checkpoint.orbax_to_hf(tmp_path / 'ck', tmp_path / 'back', progress=False)
  back = read_hf(tmp_path / 'back')
  assert sorted(back) == sorted(tensors)
  for name, want in tensors.items():
    assert back[name].tobytes() == want.tobytes(), name


def test_round_trip_of_wide_tensors_is_bit_exact(tmp_path):
  """MLP matrices over 8 MB with rows not a multiple of 8: the threaded, packed transpose."""
  cfg = tiny_cfg('llada').replace(num_layers=1, d_model=1024, num_heads=16, num_kv_heads=4,
                                  head_dim=64, mlp_hidden=4100)
  tensors = make_tensors(cfg)
  assert tensors['model.transformer.blocks.0.ff_out.weight'].nbytes > 8 << 20
  write_hf(tmp_path / 'hf', cfg, tensors)
  checkpoint.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', progress=False)
  params = illada_jax.load_checkpoint(tmp_path / 'ck')[1]
  np.testing.assert_array_equal(np.asarray(params['layers']['mlp']['down_proj'][0]),
                                tensors['model.transformer.blocks.0.ff_out.weight'].T)
  checkpoint.orbax_to_hf(tmp_path / 'ck', tmp_path / 'back', progress=False)
  back = read_hf(tmp_path / 'back')
  for name, want in tensors.items():
    assert back[name].tobytes() == want.tobytes(), name


def test_float32_round_trip_and_dtype_option(tmp_path):
  cfg = tiny_cfg('illada')
  tensors = make_tensors(cfg, dtype=np.float32)
  write_hf(tmp_path / 'hf', cfg, tensors)
  got = checkpoint.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', dtype='float32', progress=False)
  assert got.param_dtype == 'float32'
  checkpoint.orbax_to_hf(tmp_path / 'ck', tmp_path / 'back', progress=False)
  back = read_hf(tmp_path / 'back')
  assert all(back[n].dtype == np.float32 and np.array_equal(back[n], t) for n, t in tensors.items())
  # bfloat16 storage of a float32 source rounds each value.
  checkpoint.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck16', progress=False)
  _, params = illada_jax.load_checkpoint(tmp_path / 'ck16')
  assert params['final_norm']['scale'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(params['final_norm']['scale']),
                                tensors['model.norm.weight'].astype(BF16))


@pytest.mark.parametrize('family', ['illada', 'llada'])
def test_logits_from_converted_checkpoint_match_reference(tmp_path, family):
  cfg = tiny_cfg(family)
  tensors = make_tensors(cfg, seed=1)
  write_hf(tmp_path / 'hf', cfg, tensors)
  checkpoint.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', dtype='float32', progress=False)
  got_cfg, params = illada_jax.load_checkpoint(tmp_path / 'ck')
  run_cfg = got_cfg.replace(compute_dtype='float32', remat_policy='none')
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12), dtype=np.int32)
  got = np.asarray(illada_jax.forward(run_cfg, params, jnp.asarray(tokens)))
  want = reference_logits(cfg, tensors, tokens)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_small_llada_checkpoint_without_bos_converts(tmp_path):
  """config.json as the reference's classes write it: no bos_token_id, no eot_token_id."""
  cfg = tiny_cfg('llada')
  hf_config = {k: v for k, v in cfg.to_hf().items() if k not in ('bos_token_id', 'eot_token_id')}
  tensors = make_tensors(cfg, seed=5)
  write_hf(tmp_path / 'hf', cfg, tensors, hf_config=hf_config)
  got = checkpoint.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', dtype='float32', progress=False)
  assert got == cfg.replace(bos_token_id=None, eot_token_id=None, param_dtype='float32')
  loaded, params = illada_jax.load_checkpoint(tmp_path / 'ck')
  assert loaded == got
  run_cfg = loaded.replace(compute_dtype='float32', remat_policy='none')
  tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (1, 9), dtype=np.int32)
  np.testing.assert_allclose(np.asarray(illada_jax.forward(run_cfg, params, jnp.asarray(tokens))),
                             reference_logits(cfg, tensors, tokens), rtol=2e-4, atol=2e-4)
  checkpoint.orbax_to_hf(tmp_path / 'ck', tmp_path / 'back', progress=False)
  with open(tmp_path / 'back' / 'config.json') as f:
    back = json.load(f)
  assert 'bos_token_id' not in back and 'eot_token_id' not in back


def test_mesh_option_sets_read_chunks_to_device_shards(tmp_path):
  cfg = tiny_cfg('illada')
  write_hf(tmp_path / 'hf', cfg, make_tensors(cfg))
  checkpoint.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', mesh='data=1,fsdp=2,tensor=2',
                      progress=False)

  def inner_chunk(name):
    with open(tmp_path / 'ck' / 'params' / name / 'zarr.json') as f:
      meta = json.load(f)
    return meta['codecs'][0]['configuration']['chunk_shape']

  d, f = cfg.d_model, cfg.mlp_hidden
  assert inner_chunk('layers.mlp.gate_proj') == [1, d // 2, f // 2]  # embed->fsdp, mlp->tensor
  assert inner_chunk('layers.attn.k_proj') == [1, d // 2, 1, cfg.head_dim]
  assert inner_chunk('embedder.embedding') == [cfg.vocab_size // 2, d // 2]


# -- bad input ------------------------------------------------------------------------

def _bad_case(tmp_path, case):
  """Builds the broken source of `case`; returns (src, dst, [strings the error must name])."""
  cfg = tiny_cfg('illada')
  tensors = make_tensors(cfg)
  src, dst = tmp_path / 'hf', tmp_path / 'ck'
  hf_config = None
  k0 = 'model.layers.0.self_attn.k_proj.weight'  # [32, 64]: transposing changes the shape
  if case == 'missing_tensor':
    del tensors['model.layers.1.mlp.up_proj.weight']
    expect = ['model.layers.1.mlp.up_proj.weight', 'missing']
  elif case == 'unexpected_tensor':
    tensors['model.layers.0.self_attn.rotary_emb.inv_freq'] = np.ones(8, np.float32)
    expect = ['model.layers.0.self_attn.rotary_emb.inv_freq', 'unexpected', '.safetensors']
  elif case == 'wrong_shape':
    tensors[k0] = np.ascontiguousarray(tensors[k0].T)
    expect = [k0, 'shape', '.safetensors']
  elif case == 'unsupported_dtype':
    tensors['model.norm.weight'] = tensors['model.norm.weight'].astype(np.float64)
    expect = ['model.norm.weight', 'F64', 'dtype']
  elif case == 'config_layers':
    hf_config = {**cfg.to_hf(), 'num_hidden_layers': 3}
    expect = ['model.layers.2.', 'missing', 'config.json']
  elif case == 'config_width':
    hf_config = {**cfg.to_hf(), 'intermediate_size': 128}
    expect = ['mlp.gate_proj.weight', 'shape', 'config.json']
  elif case == 'tied_head_differs':
    tensors['lm_head.weight'] = tensors['model.embed_tokens.weight'] + BF16(1)
    expect = ['lm_head.weight', 'differs']
  write_hf(src, cfg, tensors, hf_config=hf_config)
  if case == 'truncated_shard':
    shard = src / 'model-00002-of-00002.safetensors'
    shard.write_bytes(shard.read_bytes()[:-100])
    expect = ['model-00002-of-00002.safetensors', 'truncated', 'tensor ']
  elif case == 'lfs_pointer':
    shard = src / 'model-00002-of-00002.safetensors'
    shard.write_text('version https://git-lfs.github.com/spec/v1\noid sha256:'
                     f'{"ab" * 32}\nsize 4976698672\n')
    expect = ['model-00002-of-00002.safetensors', 'git-lfs pointer']
  elif case == 'html_page':
    shard = src / 'model-00001-of-00002.safetensors'
    shard.write_text('<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n')
    expect = ['model-00001-of-00002.safetensors', 'not a safetensors file', 'header of']
  elif case == 'missing_shard':
    os.remove(src / 'model-00001-of-00002.safetensors')
    expect = ['model.safetensors.index.json', 'model-00001-of-00002.safetensors',
              'does not exist']
  elif case == 'pickle_only':
    for p in src.glob('model*'):
      os.remove(p)
    (src / 'pytorch_model.bin').write_bytes(b'\x80\x04not a real pickle')
    expect = ['pytorch_model.bin', 'safetensors first']
  elif case == 'destination_exists':
    dst.mkdir()
    (dst / 'keep.txt').write_text('mine')
    expect = [str(dst), 'exists', '--overwrite']
  return src, dst, expect


BAD_CASES = ['truncated_shard', 'lfs_pointer', 'html_page', 'missing_shard', 'missing_tensor', 'unexpected_tensor',
             'wrong_shape', 'unsupported_dtype', 'config_layers', 'config_width',
             'tied_head_differs', 'pickle_only', 'destination_exists']


@pytest.mark.parametrize('case', BAD_CASES)
def test_bad_input_is_refused_clearly(tmp_path, case, capsys):
  src, dst, expect = _bad_case(tmp_path, case)
  with pytest.raises(checkpoint.ConversionError) as info:
    checkpoint.hf_to_orbax(src, dst, progress=False)
  assert isinstance(info.value, ValueError)
  for s in expect:
    assert s in str(info.value), (s, str(info.value))
  # The CLI: exit status 2, the message on stderr, nothing left behind.
  assert cli.main(['hf-to-orbax', str(src), str(dst), '--quiet']) == 2
  err = capsys.readouterr().err
  assert 'error' in err and expect[0] in err
  if case == 'destination_exists':
    assert os.listdir(dst) == ['keep.txt']
  else:
    assert not dst.exists()
  assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]


def test_overwrite_replaces_destination(tmp_path):
  cfg = tiny_cfg('llada')
  write_hf(tmp_path / 'hf', cfg, make_tensors(cfg))
  (tmp_path / 'ck').mkdir()
  (tmp_path / 'ck' / 'stale.txt').write_text('old')
  assert cli.main(['hf-to-orbax', str(tmp_path / 'hf'), str(tmp_path / 'ck'), '--overwrite',
                   '--quiet']) == 0
  assert not (tmp_path / 'ck' / 'stale.txt').exists()
  assert (tmp_path / 'ck' / 'model_config.json').is_file()
  assert cli.main(['orbax-to-hf', str(tmp_path / 'ck'), str(tmp_path / 'hf'), '--quiet']) == 2
  assert cli.main(['orbax-to-hf', str(tmp_path / 'ck'), str(tmp_path / 'hf'), '--overwrite',
                   '--quiet']) == 0


def _tree(path) -> dict:
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob('*')) if p.is_file()}


@pytest.mark.parametrize('direction', ['hf-to-orbax', 'orbax-to-hf'])
def test_destination_overlapping_the_source_is_refused_untouched(tmp_path, capsys, direction):
  cfg = tiny_cfg('llada')
  outer = tmp_path / 'outer'
  src = outer / 'model'
  write_hf(tmp_path / 'hf', cfg, make_tensors(cfg))
  os.makedirs(outer)
  if direction == 'hf-to-orbax':
    os.rename(tmp_path / 'hf', src)
  else:
    assert cli.main(['hf-to-orbax', str(tmp_path / 'hf'), str(src), '--quiet']) == 0
  (tmp_path / 'link').symlink_to(src)
  before = _tree(outer)
  capsys.readouterr()
  for dst, why in [(src, 'is the source'), (tmp_path / 'link', 'is the source'),
                   (outer / 'model' / '..' / 'model', 'is the source'),
                   (src / 'export', 'is inside the source'), (outer, 'contains the source')]:
    assert cli.main([direction, str(src), str(dst), '--overwrite', '--quiet']) == 2, dst
    err = capsys.readouterr().err
    assert f'{dst}: the destination {why} directory' in err, err
    assert _tree(outer) == before and not (src / 'export').exists()
    assert not [d for _, dirs, _ in os.walk(tmp_path) for d in dirs if '.tmp-' in d]
  assert cli.main([direction, str(src), str(tmp_path / 'elsewhere'), '--quiet']) == 0


def test_orbax_to_hf_refuses_non_checkpoint(tmp_path, capsys):
  (tmp_path / 'empty').mkdir()
  assert cli.main(['orbax-to-hf', str(tmp_path / 'empty'), str(tmp_path / 'out')]) == 2
  assert 'model_config.json' in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()
  with pytest.raises(checkpoint.ConversionError, match='shard-size'):
    safetensors_io.parse_size('five gigs')
  assert safetensors_io.parse_size('5GB') == 5 * 10**9
  assert safetensors_io.parse_size('2MiB') == 2 << 20


def test_tools_script_runs_the_same_cli(tmp_path):
  cfg = tiny_cfg('illada')
  write_hf(tmp_path / 'hf', cfg, make_tensors(cfg))
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  run = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'convert_checkpoint.py'),
                        'hf-to-orbax', str(tmp_path / 'hf'), str(tmp_path / 'ck')],
                       capture_output=True, text=True, env=env, timeout=120)
  assert run.returncode == 0, run.stderr
  assert 'tensors' in run.stderr  # the progress bar
  run = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'convert_checkpoint.py'),
                        'hf-to-orbax', str(tmp_path / 'hf'), str(tmp_path / 'ck')],
                       capture_output=True, text=True, env=env, timeout=120)
  assert run.returncode == 2 and 'exists' in run.stderr


# -- transformers reads what we write -------------------------------------------------

@pytest.mark.torch
def test_transformers_loads_converted_llama_layout(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  cfg = tiny_cfg('illada').replace(tie_embeddings=False)
  tensors = make_tensors(cfg, seed=3)
  write_hf(tmp_path / 'hf', cfg, tensors)
  checkpoint.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', progress=False)
  checkpoint.orbax_to_hf(tmp_path / 'ck', tmp_path / 'back', shard_size='30KB', progress=False)
  with open(tmp_path / 'back' / 'config.json') as f:
    hf = json.load(f)
  hf['model_type'] = 'llama'
  hf['architectures'] = ['LlamaForCausalLM']
  with open(tmp_path / 'back' / 'config.json', 'w') as f:
    json.dump(hf, f)
  model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'back',
                                                        torch_dtype=torch.bfloat16)
  state = model.state_dict()
  for name in ('model.layers.1.mlp.gate_proj.weight', 'model.layers.0.self_attn.k_proj.weight',
               'lm_head.weight'):
    got = state[name].float().numpy()
    np.testing.assert_array_equal(got, tensors[name].astype(np.float32))
