"""Fine-tuning from a checkpoint (`init_from`), whole step directories, export back to HF."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

import illada_jax
from illada_jax import checkpoint, data, finetune, prompts, train
from illada_jax.optimizer import OptimizerConfig
from helpers import make_data, make_tensors, tiny_cfg, tiny_config, write_hf, write_jsonl

# The converted checkpoint is bfloat16; the run trains it in float32.
RUN_MODEL = tiny_cfg('illada').replace(param_dtype='float32', compute_dtype='float32',
                                       remat_policy='none')


def _converted(root):
  """A tiny iLLaDA HF directory (with the test SentencePiece model) converted to `root/ck`."""
  _, tok = make_data(root)
  hf = os.path.join(root, 'hf')
  write_hf(hf, RUN_MODEL.replace(param_dtype='bfloat16'), make_tensors(RUN_MODEL, seed=1),
           tokenizer_files={'tokenizer_config.json': json.dumps({'chat_template': 'T'})})
  shutil.copy(tok, os.path.join(hf, 'sp.model'))
  checkpoint.hf_to_orbax(hf, os.path.join(root, 'ck'), progress=False)
  return os.path.join(root, 'ck')


def _sft_records(root):
  """Prompt: two words of the text; response: the next two (short words, so rows fit)."""
  docs = [json.loads(l)['text'] for l in open(make_data(root)[0])]
  words = [w for d in docs for w in d.split() if len(w) <= 5]
  recs = [{'prompt': ' '.join(words[i:i + 2]), 'response': ' '.join(words[i + 2:i + 4])}
          for i in range(0, 800, 4)]
  return write_jsonl(os.path.join(root, 'sft.jsonl'), recs)


def _sft_config(root, **kw):
  base = dict(model=RUN_MODEL, objective='sft', init_from=_converted(root),
              data=data.DataConfig(paths=(_sft_records(root),)),  # tokenizer from the checkpoint
              optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2, total_steps=30,
                                        weight_decay=0.0),
              grad_accum=1, seq_len=32, steps=30, checkpoint_every=10)
  base.update(kw)
  return tiny_config(root, **base)


def test_init_from_first_loss_is_the_converted_models_and_sft_lowers_it(tmp_path):
  cfg = _sft_config(str(tmp_path))
  part = train.train(cfg, stop_after=10)
  # Interrupted, the run resumes from its own step 10, not from init_from again.
  out = train.train(cfg)
  assert sorted(out['losses']) == list(range(11, 31)) and out['final_step'] == 30
  run = finetune.resolve_config(cfg)
  assert run.data.tokenizer.endswith('sp.model') and run.model == RUN_MODEL
  # The same first batch and noise, on the converted parameters cast to float32.
  batch = next(data.make_train_iterator(run.data, batch_size=cfg.batch_size,
                                        seq_len=cfg.seq_len, objective='sft', seed=cfg.seed))
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 0), 0)
  _, stored = checkpoint.load_checkpoint(cfg.init_from)
  assert jax.tree.leaves(stored)[0].dtype == np.dtype('bfloat16')
  params0 = jax.tree.map(lambda x: x.astype(np.float32), stored)
  loss = jax.jit(lambda p, k: train.loss_fn(run, p, batch, k)[0])
  first = float(loss(params0, key))
  assert part['losses'][1] == pytest.approx(first, rel=1e-5)
  final = out['state']['params']
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(final))
  after = float(loss(jax.device_get(final), key))
  assert after < 0.7 * first, (first, after)
  # The step directory is a whole checkpoint: tokenizer, template, BOS rule, HF layout.
  step_dir = out['checkpoint_dir']
  assert checkpoint.load_config(step_dir) == RUN_MODEL
  assert finetune.checkpoint_tokenizer(step_dir).endswith('sp.model')
  fmt = prompts.PromptFormat.from_checkpoint(step_dir)
  assert fmt == prompts.PromptFormat(add_bos=True, chat_template='T')
  assert os.path.exists(os.path.join(step_dir, 'hf_source.json'))


def test_init_from_model_mismatch_names_the_field(tmp_path):
  ck = _converted(str(tmp_path))
  cfg = train.TrainConfig(model=RUN_MODEL.replace(num_kv_heads=4, rope_theta=10.0),
                          init_from=ck)
  with pytest.raises(ValueError, match=r'model\.num_kv_heads: run has 4, checkpoint has 2') as e:
    finetune.resolve_config(cfg)
  assert 'model.rope_theta' in str(e.value)
  with pytest.raises(FileNotFoundError, match='model_config.json'):
    finetune.resolve_config(dataclasses.replace(cfg, init_from=str(tmp_path)))
