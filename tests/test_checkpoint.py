"""Checkpoint directories: save/load, sharded restore, converted and trained checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import illada_jax
from illada_jax import checkpoint, make_mesh
from illada_jax.checkpoint import _orbax_stream, store
from illada_jax.model import param_shardings
from helpers import (TOKENIZER_FILES, assert_trees_equal, make_tensors, read_hf, tiny_cfg,
                     write_hf)


def test_save_load_round_trip_with_config_and_tokenizer(tmp_path):
  cfg = tiny_cfg('llada')
  params = illada_jax.init_params(cfg, jax.random.key(0))
  write_hf(tmp_path / 'tok', cfg, {})  # only for its tokenizer files
  illada_jax.save_checkpoint(tmp_path / 'ck', cfg, params, tokenizer_dir=tmp_path / 'tok')
  with open(tmp_path / 'ck' / 'model_config.json') as f:
    assert illada_jax.ModelConfig.from_dict(json.load(f)) == cfg
  for name, text in TOKENIZER_FILES.items():
    assert (tmp_path / 'ck' / name).read_text() == text
  got_cfg, got = illada_jax.load_checkpoint(tmp_path / 'ck')
  assert got_cfg == cfg
  assert_trees_equal(got, params)
  with pytest.raises(FileExistsError):
    illada_jax.save_checkpoint(tmp_path / 'ck', cfg, params)


def test_unscanned_config_is_saved_stacked_and_loaded_unstacked(tmp_path):
  cfg = tiny_cfg('illada').replace(scan_layers=False)
  params = illada_jax.init_params(cfg, jax.random.key(1))
  assert 'layers_0' in params
  illada_jax.save_checkpoint(tmp_path / 'ck', cfg, params)
  assert 'layers/mlp/up_proj' in _orbax_stream.stored_arrays(store.params_dir(tmp_path / 'ck'))
  got_cfg, got = illada_jax.load_checkpoint(tmp_path / 'ck')
  assert not got_cfg.scan_layers
  assert_trees_equal(got, params)


def test_restore_onto_8_device_mesh(tmp_path):
  cfg = tiny_cfg('illada')
  tensors = make_tensors(cfg, head=True)
  write_hf(tmp_path / 'hf', cfg, tensors)
  checkpoint.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', progress=False)
  mesh = make_mesh('data=2,fsdp=2,tensor=2')
  got_cfg, params = illada_jax.load_checkpoint(tmp_path / 'ck', mesh=mesh)
  want_shardings = param_shardings(got_cfg, mesh)
  for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    want = jax.tree_util.tree_flatten_with_path(want_shardings)[0]
    want = dict((tuple(k), s) for k, s in want)[tuple(keys)]
    assert leaf.sharding == want, keys
    assert len(leaf.addressable_shards) == 8
  # Shards hold what they should: e.g. FSDP x tensor split of a stacked gate.
  gate = params['layers']['mlp']['gate_proj']
  assert gate.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')
  np.testing.assert_array_equal(
      np.asarray(gate[1]), tensors['model.layers.1.mlp.gate_proj.weight'].T)
  q = np.asarray(params['layers']['attn']['q_proj'])
  want_q = tensors['model.layers.0.self_attn.q_proj.weight'].T.reshape(
      cfg.d_model, cfg.num_heads, cfg.head_dim)
  np.testing.assert_array_equal(q[0], want_q)
  np.testing.assert_array_equal(np.asarray(params['embedder']['embedding']),
                                tensors['model.embed_tokens.weight'])
  for shard in gate.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(gate)[shard.index])


def test_sharded_logits_equal_single_device(tmp_path):
  cfg = tiny_cfg('llada')
  write_hf(tmp_path / 'hf', cfg, make_tensors(cfg, seed=4))
  checkpoint.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', dtype='float32', progress=False)
  cfg1, p1 = illada_jax.load_checkpoint(tmp_path / 'ck')
  cfg8, p8 = illada_jax.load_checkpoint(tmp_path / 'ck', mesh=make_mesh('data=2,fsdp=2,tensor=2'))
  run = cfg1.replace(compute_dtype='float32', remat_policy='none')
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 8)), jnp.int32)
  np.testing.assert_allclose(np.asarray(illada_jax.forward(run, p8, tokens)),
                             np.asarray(illada_jax.forward(run, p1, tokens)), atol=1e-5)


def test_config_mismatch_is_named_on_load(tmp_path):
  cfg = tiny_cfg('illada')
  illada_jax.save_checkpoint(tmp_path / 'ck', cfg, illada_jax.init_params(cfg, jax.random.key(0)))
  with open(tmp_path / 'ck' / 'model_config.json', 'w') as f:
    json.dump(cfg.replace(mlp_hidden=32).to_dict(), f)
  with pytest.raises(ValueError, match='layers/mlp/gate_proj'):
    illada_jax.load_checkpoint(tmp_path / 'ck')


def test_trained_checkpoint_exports_to_hf(tmp_path):
  """A checkpoint written by stock Orbax (OCDBT) converts to HF slice by slice."""
  cfg = tiny_cfg('illada')
  params = illada_jax.init_params(cfg, jax.random.key(2))
  illada_jax.save_checkpoint(tmp_path / 'ck', cfg, params)
  checkpoint.orbax_to_hf(tmp_path / 'ck', tmp_path / 'hf', progress=False)
  t = read_hf(tmp_path / 'hf')
  assert 'lm_head.weight' not in t  # tied, and no source said otherwise
  np.testing.assert_array_equal(
      t['model.layers.1.self_attn.o_proj.weight'],
      np.asarray(params['layers']['attn']['o_proj'][1]).reshape(-1, cfg.d_model).T)
  np.testing.assert_array_equal(t['model.embed_tokens.weight'],
                                np.asarray(params['embedder']['embedding']))
  # ... and back: the same parameters.
  checkpoint.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck2', progress=False)
  _, again = illada_jax.load_checkpoint(tmp_path / 'ck2')
  assert_trees_equal(again, params)
