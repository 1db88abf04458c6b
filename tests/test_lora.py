"""LoRA (qwix adapters): only adapters train, merging equals applying, resume restores them."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from illada_jax import checkpoint, lora, model as model_lib, sharding, train
from illada_jax.cli import convert as convert_cli
from illada_jax.lora import LoraConfig
from illada_jax.optimizer import OptimizerConfig
from helpers import ILLADA, LLADA, TRAIN_MODEL, tiny_config

LORA = LoraConfig(rank=4, alpha=8.0)


def _random_adapters(cfg, lcfg, seed):
  """Adapters with B != 0 (a fresh B is zero and would make every check trivial)."""
  abstract = lora.abstract_adapters(cfg, lcfg)
  leaves, tree = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, s.shape, s.dtype)
                                   for k, s in zip(keys, leaves)])


def _names(tree):
  return {'/'.join(str(k.key) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('cfg', [LLADA, ILLADA], ids=['llada_scanned', 'illada_unscanned'])
def test_merged_weights_give_the_adapted_logits(cfg):
  lcfg = LoraConfig(rank=3, alpha=6.0, targets=('attn', 'mlp'))
  base = model_lib.init_params(cfg, jax.random.key(0))
  adapters = _random_adapters(cfg, lcfg, 1)
  # One adapter pair per projection of every layer, nothing else.
  layers = ['layers'] if cfg.scan_layers else [f'layers_{i}' for i in range(cfg.num_layers)]
  want = {f'{l}/{m}/{w}{s}' for l in layers for m, ws in lora.TARGETS.items() for w in ws
          for s in lora.SUFFIXES}
  assert _names(adapters) == want
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
  mask = jnp.ones((2, 12), bool).at[1, :3].set(False)
  adapted = jax.jit(lambda p, t, m: lora.lora_model(cfg, lcfg).apply({'params': p}, t, m))(
      lora.combine(cfg, base, adapters), tokens, mask)
  plain = model_lib.forward(cfg, base, tokens, mask)
  merged = model_lib.forward(cfg, lora.merge(lcfg, base, adapters), tokens, mask)
  assert float(jnp.max(jnp.abs(adapted - plain))) > 0.1  # the adapters matter
  np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5)


def test_targets_pick_the_modules():
  only_mlp = lora.abstract_adapters(LLADA, LoraConfig(rank=2, targets=('mlp',)))
  assert {n.split('/')[1] for n in _names(only_mlp)} == {'mlp'}
  with pytest.raises(ValueError, match='lora.targets'):
    LoraConfig(rank=2, targets=('embedder',))
  with pytest.raises(ValueError, match='lora.dropout'):
    LoraConfig(rank=2, dropout=0.1)


def test_frozen_base_only_adapters_change():
  cfg = train.TrainConfig(model=TRAIN_MODEL, lora=LORA, batch_size=4, seq_len=8, seed=3,
                          mesh='data=2,fsdp=2,tensor=2', random_length_prob=0.0,
                          optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0, schedule='constant'))
  mesh = sharding.make_mesh(cfg.mesh)
  tx = train.opt_lib.make_optimizer(cfg.optimizer)
  state = train.init_state(cfg, mesh, tx)
  base0, adapters0 = jax.device_get((state['base'], state['params']))
  # No optimizer state for base weights: every moment has an adapter's shape.
  adapter_shapes = {a.shape for a in jax.tree.leaves(adapters0)}
  assert {x.shape for x in jax.tree.leaves(state['opt_state']) if x.ndim} == adapter_shapes
  step = train.jit_train_step(cfg, tx, mesh)
  for i in range(3):
    tokens = jax.random.randint(jax.random.key(i), (4, 8), 6, TRAIN_MODEL.vocab_size)
    state, metrics = step(state, train._global_batch({'tokens': tokens}, mesh, cfg.sharding_rules))
  assert int(state['step']) == 3 and np.isfinite(float(metrics['loss']))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['base']), base0)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), jax.device_get(state['params']),
                         adapters0)
  assert all(jax.tree.leaves(changed)), changed  # A and B of every projection moved


def test_resume_restores_adapters_and_merge_exports_them(tmp_path):
  cfg = tiny_config(str(tmp_path), lora=LORA, steps=4, checkpoint_every=2, grad_accum=1,
                    async_checkpoints=False, random_length_prob=0.0)
  full = train.train(dataclasses.replace(cfg, workdir=str(tmp_path / 'full')))
  part = train.train(dataclasses.replace(cfg, workdir=str(tmp_path / 'part')), stop_after=2)
  rest = train.train(dataclasses.replace(cfg, workdir=str(tmp_path / 'part')))
  assert sorted(rest['losses']) == [3, 4]
  assert {**part['losses'], **rest['losses']} == full['losses']  # bitwise
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(rest['state']['params']),
               jax.device_get(full['state']['params']))
  # The step directory holds adapters only, says so, and merges into a plain checkpoint.
  step_dir = rest['checkpoint_dir']
  assert lora.read_info(step_dir) == {'lora': LORA, 'base': '', 'seed': cfg.seed}
  with pytest.raises(ValueError, match='merge-lora'):
    checkpoint.load_checkpoint(step_dir)
  out = str(tmp_path / 'merged')
  assert convert_cli.main(['merge-lora', step_dir, out]) == 0
  mcfg, merged = checkpoint.load_checkpoint(out)
  assert mcfg == cfg.model
  base = model_lib.init_params(cfg.model, jax.random.key(cfg.seed))  # the run's seeded base
  adapters = jax.device_get(rest['state']['params'])
  tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, cfg.model.vocab_size)
  want = jax.jit(lambda p, t: lora.lora_model(cfg.model, LORA).apply({'params': p}, t))(
      lora.combine(cfg.model, base, adapters), tokens)
  np.testing.assert_allclose(model_lib.forward(mcfg, merged, tokens), want, rtol=1e-5, atol=1e-5)
  assert os.path.exists(os.path.join(out, 'model_config.json'))
  assert convert_cli.main(['merge-lora', step_dir, out]) == 2  # exists, no --overwrite


def test_a_lora_step_dir_is_refused_with_the_merge_hint_everywhere(tmp_path):
  from illada_jax import finetune
  from illada_jax.checkpoint.errors import ConversionError
  step = tmp_path / 'step'
  step.mkdir()
  (step / 'lora.json').write_text('{}')
  with pytest.raises(ConversionError, match='merge-lora'):
    checkpoint.orbax_to_hf(str(step), str(tmp_path / 'hf'))
  with pytest.raises(ValueError, match='merge-lora'):
    finetune.checkpoint_model(LLADA, str(step))
  with pytest.raises(ValueError, match='merge-lora'):
    checkpoint.load_checkpoint(str(step))
  assert not (tmp_path / 'hf').exists()
