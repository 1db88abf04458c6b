"""`illada-sample`, `illada-score` and the lm-eval adapter end to end on a tiny word-level checkpoint."""

import json
import os

import numpy as np
import pytest

import illada_jax
from illada_jax import engine, prompts, sampling, scoring
from illada_jax.cli import sample as sample_cli
from illada_jax.cli import score as score_cli

from helpers import WORD_CFG as CFG
from helpers import word_checkpoint, write_jsonl

OPTS = sampling.SamplingOptions(gen_length=8, block_length=4, steps=8)
FLAGS = ['--gen-length', '8', '--block-length', '4', '--steps', '8', '--no-progress']


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  return word_checkpoint(str(tmp_path_factory.mktemp('ckpt')))


def alone_text(path, params, ids, options=OPTS, max_new=None):
  """The completion of `sample()` on one prompt, decoded as the engine does."""
  tok = prompts.load_tokenizer(path)
  out = sampling.sample(CFG, params, np.asarray([ids]), options=options)
  gen = prompts.completion_ids(CFG, np.asarray(out.tokens)[0, len(ids):])
  return tok.decode(gen[:max_new])


def test_chat_format_is_the_llada_one():
  text = prompts.chat_text([{'role': 'user', 'content': '  hi  '}])
  assert text == ('<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>'
                  '<|start_header_id|>assistant<|end_header_id|>\n\n')


def test_sample_cli_prints_each_prompts_own_completion(ckpt, capsys):
  path, params = ckpt
  assert sample_cli.main(['--ckpt', path, '--prompt', 'w1 w2 w3', 'w7', *FLAGS, '--slots', '2',
                          '--show-denoising']) == 0
  lines = capsys.readouterr().out.splitlines()
  recs = [json.loads(line) for line in lines if line.startswith('{')]
  assert [(r['id'], r['prompt']) for r in recs] == [(1, 'w1 w2 w3'), (2, 'w7')]
  assert recs[0]['completion'] == alone_text(path, params, [7, 8, 9])
  assert recs[1]['completion'] == alone_text(path, params, [13])
  frames = [line for line in lines if line.startswith('step ')]
  assert len(frames) == 8 and frames[-1] == 'step 8/8'


def test_prompts_follow_the_format_the_checkpoint_records(tmp_path):
  path, params = word_checkpoint(str(tmp_path), prompt_format={'add_bos_token': True})
  assert prompts.PromptFormat.from_checkpoint(path).add_bos
  out = tmp_path / 'out.jsonl'
  inp = write_jsonl(tmp_path / 'in.jsonl', [{'prompt': 'w1 w2'}])
  assert sample_cli.main(['--ckpt', path, '--prompts', inp, '--out', str(out), *FLAGS]) == 0
  got = json.loads(out.read_text())['completion']
  with_bos = alone_text(path, params, [CFG.bos_token_id, 7, 8])
  assert got == with_bos != alone_text(path, params, [7, 8])


def test_score_cli_scores_every_choice(ckpt, tmp_path, capsys):
  path, params = ckpt
  data = write_jsonl(tmp_path / 'items.jsonl', [
      {'context': 'w1 w2', 'choices': ['w3', 'w4 w5', 'w9'], 'answer': 0},
      {'id': 'b', 'context': 'w6', 'continuation': 'w7'}])
  assert score_cli.main(['--ckpt', path, '--input', data, '--method', 'confidence',
                         '--no-progress']) == 0
  captured = capsys.readouterr()
  first, second = [json.loads(line) for line in captured.out.splitlines()]
  want = scoring.confidence_score(CFG, params, [([7, 8], [9]), ([7, 8], [10, 11]),
                                                ([7, 8], [15]), ([12], [13])])
  np.testing.assert_allclose(first['scores'], want[:3], rtol=1e-5)
  assert first['prediction'] == int(np.argmax(want[:3]))
  assert first['correct'] == (first['prediction'] == 0)
  assert second['id'] == 'b' and 'prediction' not in second
  np.testing.assert_allclose(second['scores'], want[3:], rtol=1e-5)
  assert f'({int(first["correct"])}/1, method=confidence)' in captured.err


class _Req:
  def __init__(self, *args):
    self.args = args


def test_lm_eval_requests_keep_their_own_until_and_max_gen_toks(ckpt):
  pytest.importorskip('lm_eval')
  from lm_eval.api.registry import get_model
  from illada_jax import lm_eval_adapter  # noqa: F401  (registers the model)
  path, params = ckpt
  make = lambda bs: get_model('illada_jax').create_from_arg_string(
      f'ckpt={path},gen_length=16,block_length=4,steps=16,batch_size={bs}')
  a_words = alone_text(path, params, [7, 8, 9], OPTS.replace(gen_length=16, steps=16)).split()
  stop = a_words[4]  # B stops on a word that A writes: pooled stops would cut A too
  assert stop not in a_words[:4]
  reqs = [_Req('w1 w2 w3', {'until': ['w50'], 'max_gen_toks': 16}),
          _Req('w1 w2 w3', {'until': [stop], 'max_gen_toks': 16}),
          _Req('w7', {'until': [], 'max_gen_toks': 5})] * 3
  results = [make(bs).generate_until(reqs) for bs in (1, 4, 32)]
  assert results[0] == results[1] == results[2]
  a, b, c = results[0][:3]
  assert a.split() == [w for w in a_words if w != 'w50'][:16] and len(a.split()) > 4
  assert b == ' '.join(a_words[:4]) + ' '  # cut before B's own stop
  assert len(c.split()) == 5  # max_gen_toks
  assert c == alone_text(path, params, [13], OPTS.replace(gen_length=16, steps=16), max_new=5)


def test_lm_eval_loglikelihood_equals_the_scorers_at_any_batch_size(ckpt):
  pytest.importorskip('lm_eval')
  from lm_eval.api.registry import get_model
  from illada_jax import lm_eval_adapter  # noqa: F401
  path, params = ckpt
  reqs = [_Req('w1 w2', ' w3'), _Req('w1 w2', ' w4 w5'), _Req('w9 w8 w7 w6', ' w3')]
  conf = [get_model('illada_jax').create_from_arg_string(
      f'ckpt={path},method=confidence,batch_size={bs}').loglikelihood(reqs) for bs in (1, 4)]
  want = scoring.confidence_score(CFG, params, [([7, 8], [9]), ([7, 8], [10, 11]),
                                                ([15, 14, 13, 12], [9])])
  np.testing.assert_allclose([g for g, _ in conf[0]], want, rtol=1e-5)
  # Other batch shapes round differently in the last float32 bits, nothing more.
  np.testing.assert_allclose(conf[1], conf[0], rtol=1e-6)
  mc = [get_model('illada_jax').create_from_arg_string(
      f'ckpt={path},mc_num=4,mc_batch=2,batch_size={bs}').loglikelihood(reqs) for bs in (2, 8)]
  np.testing.assert_allclose(mc[1], mc[0], rtol=1e-6)  # masks come from each request's content
  one = get_model('illada_jax').create_from_arg_string(f'ckpt={path},mc_num=1,mc_batch=1')
  np.testing.assert_allclose(one.loglikelihood(reqs[:1])[0][0], scoring.mc_log_likelihood(
      CFG, params, [([7, 8], [9])], mc_num=1, batch_size=1)[0], rtol=1e-5)


def test_chat_prompt_uses_the_checkpoint_template(ckpt, tmp_path):
  path, _ = ckpt
  tok = prompts.load_tokenizer(path)
  plain = prompts.PromptFormat.from_checkpoint(path).encode(tok, CFG, 'w1 w2', chat=True)
  assert plain[0] == CFG.bos_token_id  # LLaDA format: BOS, then the rendered messages
  template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }} <|eot_id|> {% endfor %}"
              "{% if add_generation_prompt %}w9{% endif %}")
  fmt = prompts.PromptFormat(chat_template=template)
  ids = fmt.encode(tok, CFG, [{'role': 'user', 'content': 'w1 w2'}])
  assert ids == [0, 7, 8, 4, 15]
  fmt.write(str(tmp_path))
  assert prompts.PromptFormat.from_checkpoint(str(tmp_path)) == fmt


@pytest.mark.slow
def test_the_demo_checkpoint_through_illada_sample_scores_what_the_demo_reports(short_demo,
                                                                                 tmp_path):
  """The step directory records BOS-first prompts and carries its tokenizer."""
  cfg, result = short_demo
  from illada_jax import demo
  _, test = demo.make_problems(cfg)
  inp = write_jsonl(tmp_path / 'in.jsonl', [{'prompt': r['prompt']} for r in test])
  out = tmp_path / 'out.jsonl'
  p, g = demo.seq_lengths(cfg)
  assert sample_cli.main(['--ckpt', result['checkpoint'], '--prompts', inp, '--out', str(out),
                          '--gen-length', str(g), '--slots', '250', '--buckets', str(p),
                          '--no-progress']) == 0
  got = [json.loads(line)['completion'].strip() for line in open(out)]
  assert got[:8] == [e[2] for e in result['examples']]
  accuracy = np.mean([a == r['response'] for a, r in zip(got, test)])
  assert accuracy == result['accuracy'] >= 0.8


def test_failed_records_exit_1_and_a_rerun_retries_them(ckpt, tmp_path):
  """A job-wide mistake (a generation that leaves no prompt of these records room within
  max_len 64) makes every record an error: exit 1; the rerun with a good setting replaces
  the errors instead of skipping them (an output of errors only may change settings)."""
  path, params = ckpt
  data = write_jsonl(tmp_path / 'in.jsonl', [{'prompt': 'w1 w2'}, {'prompt': 'w3 w4'}])
  out = tmp_path / 'out.jsonl'
  bad = ['--gen-length', '64', '--variable-length', '--block-length', '64', '--no-progress']
  assert sample_cli.main(['--ckpt', path, '--prompts', data, '--out', str(out), *bad]) == 2
  assert not out.exists()  # refused before anything ran
  bad = ['--gen-length', '63', '--steps', '63', '--no-progress']  # 2 + 63 > 64
  assert sample_cli.main(['--ckpt', path, '--prompts', data, '--out', str(out), *bad]) == 1
  assert all('error' in json.loads(line) for line in out.read_text().splitlines())
  assert sample_cli.main(['--ckpt', path, '--prompts', data, '--out', str(out), *FLAGS]) == 0
  recs = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['id'] for r in recs] == [1, 2]
  assert recs[0]['completion'] == alone_text(path, params, [7, 8])
