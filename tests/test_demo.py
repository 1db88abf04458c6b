"""The built-in demo: its pieces, a smoke run of the CLI, and a short run that must learn."""

import json
import os

import pytest

from illada_jax import checkpoint, demo, text_tokenizer


def test_problems_are_held_out():
  train, test = demo.make_problems(demo.DemoConfig(digits=2, train_size=500, test_size=50))
  assert not {r['prompt'] for r in test} & {r['prompt'] for r in train}
  assert all(int(r['prompt'][:2]) + int(r['prompt'][3:5]) == int(r['response']) for r in train)
  assert all(len(r['prompt']) == 6 and len(r['response']) == 3 for r in train + test)


def test_prompt_encoding_and_trace(tmp_path):
  tok = text_tokenizer.train_sentencepiece(
      [f'{a}+{b}={a + b}' for a in range(0, 100, 3) for b in range(0, 100, 7)],
      str(tmp_path / 'sp'), vocab_size=24, add_dummy_prefix=False)
  ids, mask = demo.encode_prompts(tok, ['12+3=', '5+67='], 7)
  assert ids[0, 1] == tok.bos_id and mask[0].sum() == 6 and mask[1].sum() == 6
  assert demo.decode_answer(tok, tok.encode('15') + [tok.eos_id, tok.eos_id]) == '15'
  import numpy as np
  ans = np.array(tok.encode('15') + [tok.eos_id])
  lines = demo.denoising_trace(tok, ans, np.array([2, 0, 1]), tok.mask_id)
  assert lines[0].split()[2:] == ['_', '_', '_'] and lines[-1].split()[2:] == ['1', '5', '<eos>']


def test_gen_length_sets_the_eos_tail():
  assert demo.seq_lengths(demo.DemoConfig(digits=2, gen_length=4)) == (7, 4)  # BOS ab+cd= | sum EOS
  assert demo.seq_lengths(demo.DemoConfig(digits=2, gen_length=16)) == (7, 16)
  tcfg = demo.train_config(demo.DemoConfig(digits=2, gen_length=16), 32, 'sp.model')
  assert tcfg.seq_len == 23
  with pytest.raises(ValueError, match='gen_length=3'):
    demo.seq_lengths(demo.DemoConfig(digits=2, gen_length=3))


@pytest.mark.slow
def test_demo_cli_short_run(tmp_path, capsys):
  from illada_jax.cli import demo as cli
  out = str(tmp_path / 'demo')
  assert cli.main(['--steps', '20', '--out', out, '--test-size', '16', '--no-progress',
                   '--digits', '2', '--gen-length', '6']) == 0
  text = capsys.readouterr().out
  assert 'accuracy on 16 held-out problems' in text and 'denoising trace' in text
  result = json.load(open(os.path.join(out, 'demo_result.json')))
  assert 0.0 <= result['accuracy'] <= 1.0 and result['steps'] == 20
  assert result['config']['gen_length'] == 6 and len(result['trace'][-1].split()) == 2 + 6
  from illada_jax import checkpoint
  cfg, _ = checkpoint.load_checkpoint(result['checkpoint'])
  assert cfg.num_layers == demo.DemoConfig().layers


@pytest.mark.slow
def test_short_demo_reaches_80_percent_and_threshold_decoding_keeps_it(short_demo):
  cfg, result = short_demo
  assert result['n_test'] == cfg.test_size
  assert result['accuracy'] >= 0.80  # chance: 1 / 199
  model_cfg, params = checkpoint.load_checkpoint(result['checkpoint'])
  tok = text_tokenizer.load(os.path.join(cfg.out, 'tokenizer', 'sp.model'))
  _, test = demo.make_problems(cfg)
  fixed = demo.evaluate(model_cfg, params, tok, test, cfg)
  assert fixed['accuracy'] == result['accuracy']  # the checkpoint is the model evaluated
  assert fixed['steps'] == cfg.gen_length  # one token per step
  # The demo's own evaluation (its prompts and answer parsing), with threshold decoding.
  fast = demo.evaluate(model_cfg, params, tok, test, cfg,
                       options=demo.sampling_options(cfg).replace(threshold=0.9))
  assert fast['steps'] < fixed['steps']  # several tokens per step: threshold decoding ran
  assert abs(fast['accuracy'] - fixed['accuracy']) <= 0.01
