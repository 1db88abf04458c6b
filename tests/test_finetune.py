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
from illada_jax.checkpoint import store
from illada_jax.cli import convert as convert_cli
from illada_jax.optimizer import OptimizerConfig
from helpers import (TRAIN_MODEL, make_data, make_tensors, read_hf, reference_logits, tiny_cfg,
                     tiny_config, write_hf, write_jsonl)

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


@pytest.mark.slow
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
  tok = prompts.load_tokenizer(step_dir)  # what illada-sample --ckpt uses
  assert tok.path.endswith('sp.model') and tok.encode('to be') == data.text_tokenizer.load(
      run.data.tokenizer).encode('to be')
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
  # A config that states only training fields takes the architecture and ids from init_from.
  plain = train.TrainConfig(init_from=ck)
  plain = dataclasses.replace(plain, model=plain.model.replace(param_dtype='float32'))
  got = finetune.resolve_config(plain).model
  stored = store.load_config(ck)
  assert got == stored.replace(**{f: getattr(plain.model, f) for f in finetune.RUN_FIELDS})
  assert got.param_dtype == 'float32'


# -- back to Hugging Face from a train step directory ------------------------------------

def _step_dir(root, model):
  """The final step directory of a 2-step run of `model` from random weights."""
  cfg = tiny_config(root, model=model, steps=2, checkpoint_every=0, async_checkpoints=False,
                    grad_accum=1)
  out = train.train(cfg)
  return out['checkpoint_dir'], jax.device_get(out['state']['params'])


def _tokens(cfg, seed=0):
  return np.random.default_rng(seed).integers(6, cfg.vocab_size, (2, 12)).astype(np.int32)


@pytest.mark.slow
@pytest.mark.torch
def test_step_dir_exports_to_a_llama_layout_transformers_loads(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  step_dir, params = _step_dir(str(tmp_path), TRAIN_MODEL)
  back = str(tmp_path / 'hf')
  assert convert_cli.main(['orbax-to-hf', step_dir, back, '--quiet']) == 0
  assert os.path.exists(os.path.join(back, 'sp.model'))  # the run's tokenizer travels
  with open(os.path.join(back, 'config.json')) as f:
    hf = json.load(f)
  assert hf['torch_dtype'] == 'float32' and hf['tie_word_embeddings'] is True
  # The iLLaDA layout is Llama's; transformers only needs to be told the class.
  hf.update(model_type='llama', architectures=['LlamaForCausalLM'])
  with open(os.path.join(back, 'config.json'), 'w') as f:
    json.dump(hf, f)
  model = transformers.LlamaForCausalLM.from_pretrained(
      back, torch_dtype=torch.float32, attn_implementation='eager').eval()
  tokens = _tokens(TRAIN_MODEL)
  no_mask = torch.zeros((2, 1, 12, 12))  # additive 4D mask used as-is: bidirectional
  with torch.no_grad():
    want = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                 attention_mask=no_mask).logits.numpy()
  got = np.asarray(illada_jax.forward(TRAIN_MODEL, params, tokens))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert want.std() > 0.03  # logits of this size make 1e-5 a tight bound


@pytest.mark.slow
def test_step_dir_exports_llada_layout_with_the_spec_logits(tmp_path):
  cfg = TRAIN_MODEL.replace(family='llada', tie_embeddings=False)
  step_dir, params = _step_dir(str(tmp_path), cfg)
  back = tmp_path / 'hf'
  checkpoint.orbax_to_hf(step_dir, back, progress=False)
  tensors = read_hf(back)
  assert 'model.transformer.ff_out.weight' in tensors
  tokens = _tokens(cfg, seed=1)
  want = reference_logits(cfg, tensors, tokens)  # float64 NumPy, SPEC §1
  got = np.asarray(illada_jax.forward(cfg, params, tokens), np.float64)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert want.std() > 0.03  # logits of this size make 1e-5 a tight bound
  # --dtype bfloat16: the run's float32 weights rounded to nearest even.
  assert convert_cli.main(['orbax-to-hf', step_dir, str(tmp_path / 'bf16'), '--dtype',
                           'bfloat16', '--quiet']) == 0
  small = read_hf(tmp_path / 'bf16')
  assert json.load(open(tmp_path / 'bf16' / 'config.json'))['torch_dtype'] == 'bfloat16'
  assert small.keys() == tensors.keys()
  for name, x in tensors.items():
    assert x.dtype == np.float32 and small[name].dtype == np.dtype('bfloat16')
    np.testing.assert_array_equal(small[name], x.astype(np.dtype('bfloat16')))


def test_step_dir_stamp_carries_a_tokenizer_directory_and_its_template(tmp_path):
  tok_dir = tmp_path / 'tok'
  tok_dir.mkdir()
  for name, text in {'tokenizer.json': '{"x": 1}', 'special_tokens_map.json': '{}',
                     'tokenizer_config.json': json.dumps({'chat_template': 'C',
                                                          'add_bos_token': True}),
                     'unrelated.txt': 'no'}.items():
    (tok_dir / name).write_text(text)
  step_dir = tmp_path / 'step'
  step_dir.mkdir()
  cfg = train.TrainConfig(model=TRAIN_MODEL,
                          data=data.DataConfig(tokenizer=str(tok_dir), add_bos=False))
  finetune.stamp_step_dir(str(step_dir), cfg)
  assert sorted(os.listdir(step_dir)) == ['model_config.json', 'special_tokens_map.json',
                                          'tokenizer.json', 'tokenizer_config.json']
  assert prompts.PromptFormat.from_checkpoint(str(step_dir)) == prompts.PromptFormat(
      add_bos=False, chat_template='C')  # the run's BOS rule, the tokenizer's template
  assert checkpoint.load_config(str(step_dir)) == TRAIN_MODEL
  assert finetune.checkpoint_tokenizer(str(step_dir)) == str(step_dir)
  # A template given for the SFT rows (data.chat_template) is the one recorded.
  (tmp_path / 'chat.jinja').write_text('T{{ messages }}')
  finetune.stamp_step_dir(str(step_dir), dataclasses.replace(cfg, data=dataclasses.replace(
      cfg.data, chat_template=str(tmp_path / 'chat.jinja'))))
  assert prompts.PromptFormat.from_checkpoint(str(step_dir)).chat_template == 'T{{ messages }}'


# -- samples of held-out prompts during training -----------------------------------------

@pytest.mark.slow
def test_eval_samples_are_logged_with_prompt_completion_and_reference(tmp_path):
  root = str(tmp_path)
  sft = _sft_records(root)
  _, tok_path = make_data(root)
  # Untied, one step at warmup's zero learning rate: a random tied model answers
  # its input (MASK) and an SFT-trained one soon EOS; either would end every
  # completion at once.
  cfg = tiny_config(root, objective='sft', data=data.DataConfig(paths=(sft,), tokenizer=tok_path),
                    model=TRAIN_MODEL.replace(tie_embeddings=False),
                    seq_len=32, steps=1, grad_accum=1, eval_every=1, eval_batches=1,
                    eval_samples=3, eval_gen_length=8, checkpoint_every=0,
                    async_checkpoints=False)
  out = train.train(cfg)
  lines = [json.loads(l) for l in open(os.path.join(cfg.workdir, 'metrics.jsonl'))]
  (logged,) = [l for l in lines if 'eval_samples' in l]
  assert logged['step'] == 1
  records = [json.loads(l) for l in open(sft)][:3]
  assert [s['prompt'] for s in logged['eval_samples']] == [r['prompt'] for r in records]
  assert [s['reference'] for s in logged['eval_samples']] == [r['response'] for r in records]
  # Each completion is what the sampler gives that prompt alone, as training encodes it.
  tok = data.text_tokenizer.load(tok_path)
  params = jax.device_get(out['state']['params'])
  for sample, rec in zip(logged['eval_samples'], records):
    ids = [tok.bos_id] + tok.encode(rec['prompt'])
    gen = illada_jax.generate(cfg.model, params, np.asarray([ids], np.int32), gen_length=8,
                              steps=8, vocab_limit=tok.vocab_size)
    want = tok.decode(prompts.completion_ids(cfg.model, np.asarray(gen)[0, len(ids):]))
    assert sample['completion'] == want
  assert any(s['completion'] for s in logged['eval_samples'])  # not only empty answers
  events = [p for p in (tmp_path / 'run' / 'tb').iterdir() if 'tfevents' in p.name]
  assert b'eval_samples/2' in events[0].read_bytes()
