"""The lm-eval adapter's scoring (split, is_greedy, rolling bound) and presets, and the
context/continuation split, against hand-computed values and the library."""

import numpy as np
import pytest

from illada_jax import engine, prompts, sampling, scoring

from helpers import WORD_CFG as CFG
from helpers import greedy_by_hand, word_checkpoint

pytest.importorskip('lm_eval')
from lm_eval.api.registry import get_model  # noqa: E402

from illada_jax import lm_eval_adapter  # noqa: E402  (registers the model)


class Pieces:
  """Greedy longest-match tokenizer over a fixed vocabulary (spaces belong to pieces)."""

  VOCAB = ['a', 'b', 'c', ' ', ' b', ' c', 'ab', 'b c']

  def encode(self, text):
    ids, i = [], 0
    while i < len(text):
      piece = max((p for p in self.VOCAB if text.startswith(p, i)), key=len)
      ids.append(self.VOCAB.index(piece))
      i += len(piece)
    return ids


def test_context_continuation_split_as_lm_eval():
  tok = Pieces()
  v = Pieces.VOCAB.index
  # Trailing spaces of the context move to the continuation: ' b' is one piece.
  assert prompts.encode_pair(tok, 'a ', 'b') == ([v('a')], [v(' b')])
  assert prompts.encode_pair(tok, 'a  ', 'c') == ([v('a')], [v(' '), v(' c')])
  # The whole string is encoded; the continuation is what follows the context's tokens.
  # 'a' + 'b c' encodes as 'ab', ' c': the merged 'b' counts as context.
  assert prompts.encode_pair(tok, 'a', 'b c') == ([v('a')], [v(' c')])
  assert prompts.encode_pair(tok, '', 'ab') == ([], [v('ab')])
  # A continuation the joint encoding merges into the context's last token is encoded alone.
  assert prompts.encode_pair(tok, 'a', 'b') == ([v('a')], [Pieces.VOCAB.index('b')])


class _Req:
  def __init__(self, *args):
    self.args = args


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  return word_checkpoint(str(tmp_path_factory.mktemp('ckpt')))


def make(path, args=''):
  return get_model('illada_jax').create_from_arg_string(f'ckpt={path}' + (args and ',' + args))


def test_is_greedy_and_scores_with_the_harness_options(ckpt):
  path, params = ckpt
  ctx = [7, 8, 9]  # 'w1 w2 w3'
  bos, eos = CFG.bos_token_id, CFG.eos_token_id
  want = greedy_by_hand(CFG, params, ctx, 2, 0., (bos,), (eos,))
  assert all(t >= 6 for t in want)  # words, so the continuation has a text form
  words = ' ' + ' '.join(f'w{t - 6}' for t in want)
  other = ' ' + ' '.join(f'w{t - 6}' for t in [want[0], (want[1] - 5) % 58 + 6])
  reqs = [_Req('w1 w2 w3', words), _Req('w1 w2 w3', other), _Req('w1 w2 w3 ', words.strip())]
  lm = make(path, 'method=confidence,add_bos=true,padd_eos=true,batch_size=4')
  got = lm.loglikelihood(reqs)
  assert [g for _, g in got] == [True, False, True]
  cont = [tuple(want), (want[0], (want[1] - 5) % 58 + 6), tuple(want)]
  lib = scoring.confidence_score(CFG, params, [(ctx, c) for c in cont], add_bos=True,
                                 padd_eos=True)
  np.testing.assert_allclose([s for s, _ in got], lib, rtol=1e-5)
  # check_greedy=false skips the greedy passes and reports False.
  off = make(path, 'method=confidence,check_greedy=false').loglikelihood(reqs[:1])
  assert off[0][1] is False
  np.testing.assert_allclose(off[0][0], scoring.confidence_score(CFG, params, [(ctx, want)])[0],
                             rtol=1e-5)


def test_rolling_is_the_windowed_mc_bound(ckpt):
  path, params = ckpt
  text = 'w1 w2 w3 w4 w5 w6 w7'
  ids = list(range(7, 14))
  lm = make(path, 'mc_num=4,mc_batch=2,rolling_window=3,padd_eos=true')
  got = lm.loglikelihood_rolling([_Req(text), _Req('w9')])
  o = scoring.ScoringOptions(mc_num=4, mc_batch=2, rolling_window=3, padd_eos=True,
                             add_bos=False)
  want = scoring.rolling_log_likelihood(
      CFG, params, [ids, [15]], o,
      seeds=[lm_eval_adapter.content_seed(0, text), lm_eval_adapter.content_seed(0, 'w9')])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert want[0] < 0  # (one-token windows are exact: tests/test_scoring.py)


def test_presets_and_end_think_text_reach_generation(ckpt):
  path, params = ckpt
  lm = make(path, 'preset=illada_instruct,gen_length=16,block_length=8,steps=8,'
                  'end_think=w1 w2,end_think_power=1,score_preset=illada_mc1')
  o = lm.options
  assert (o.variable_length, o.end_think, o.end_think_boost, o.end_think_power) == (
      True, 'w1 w2', 100., 1.)
  assert lm.scoring.check_greedy  # on in the adapter, with or without a preset
  assert (lm.scoring.method, lm.scoring.mc_num, lm.scoring.add_bos, lm.scoring.padd_eos) == (
      'mc', 1, True, True)
  [text] = lm.generate_until([_Req('w3 w4', {'until': [], 'max_gen_toks': 16})])
  tok = prompts.load_tokenizer(path)
  out = sampling.sample(CFG, params, np.asarray([[9, 10]]), options=o, tokenizer=tok,
                        seeds=[lm_eval_adapter.content_seed(0, 'w3 w4')])
  gen = prompts.completion_ids(CFG, np.asarray(out.tokens)[0, 2:])
  assert text == tok.decode(gen)
  assert 'w1 w2' in text  # the boost wrote the marker
  with pytest.raises(ValueError, match='unknown model args'):
    make(path, 'end_think_bost=3')


def _lm_eval_cli(tmp_path, model_args, tasks, extra=()):
  """lm-eval's own command line (`python -m illada_jax.lm_eval_adapter` registers the model):
  `(results, {task: [sample records in doc order]})`."""
  import glob
  import json
  import os
  import subprocess
  import sys
  out = tmp_path / f'out_{len(list(tmp_path.glob("out_*")))}'
  env = dict(os.environ, HF_DATASETS_OFFLINE='1', HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='0')
  cmd = [sys.executable, '-m', 'illada_jax.lm_eval_adapter', '--model', 'illada_jax',
         '--model_args', model_args, '--include_path', str(tmp_path / 'tasks'), '--tasks',
         ','.join(tasks), '--batch_size', '4', '--output_path', str(out), '--log_samples',
         *extra]
  run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  [results] = glob.glob(str(out / '**' / 'results_*.json'), recursive=True)
  samples = {}
  for task in tasks:
    [path] = glob.glob(str(out / '**' / f'samples_{task}_*.jsonl'), recursive=True)
    rows = [json.loads(line) for line in open(path)]
    samples[task] = sorted(rows, key=lambda r: r['doc_id'])
  return json.load(open(results))['results'], samples


def _write_task(tmp_path, name, docs, body):
  import json
  d = tmp_path / 'tasks'
  d.mkdir(exist_ok=True)
  data = d / f'{name}.jsonl'
  data.write_text(''.join(json.dumps(x) + '\n' for x in docs))
  (d / f'{name}.yaml').write_text(
      f'task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n'
      f'test_split: test\n{body}')


@pytest.mark.slow
def test_lm_eval_command_line_reports_what_the_library_computes(ckpt, tmp_path):
  """A multiple-choice task (confidence and MC), a generate_until task and a
  loglikelihood_rolling task through lm-eval's CLI: its metrics and per-sample values
  equal the library's on the same inputs."""
  import math
  path, params = ckpt
  tok, fmt = prompts.load_tokenizer(path), prompts.PromptFormat.from_checkpoint(path)
  seed = lm_eval_adapter.content_seed
  # Multiple choice: labels are the library's argmax for docs 0 and 1 and not for doc 2,
  # so accuracy is 2/3 only if lm-eval ranks the choices as the library does.
  mc_docs = [{'context': 'w1 w2 w3', 'choices': ['w4', 'w5 w6', 'w7']},
             {'context': 'w8', 'choices': ['w9 w9', 'w10']},
             {'context': 'w11 w12', 'choices': ['w13', 'w14', 'w15 w16']}]
  conf = scoring.ScoringOptions(method='confidence', add_bos=fmt.add_bos)
  mc = scoring.ScoringOptions(method='mc', mc_num=4, mc_batch=2, add_bos=fmt.add_bos)

  def library_scores(o, doc):
    pairs = [prompts.encode_pair(tok, doc['context'], ' ' + c) for c in doc['choices']]
    rows = dict(add_bos=o.add_bos, padd_eos=o.padd_eos)
    if o.method == 'confidence':
      return list(scoring.confidence_score(CFG, params, pairs, **rows))
    return list(scoring.mc_log_likelihood(
        CFG, params, pairs, mc_num=o.mc_num, batch_size=o.mc_batch,
        seeds=[seed(0, doc['context'], ' ' + c) for c in doc['choices']], **rows))

  by_conf = [library_scores(conf, d) for d in mc_docs]
  labels = [int(np.argmax(by_conf[0])), int(np.argmax(by_conf[1])),
            (int(np.argmax(by_conf[2])) + 1) % 3]
  _write_task(tmp_path, 'ill_mc', [dict(d, label=l) for d, l in zip(mc_docs, labels)],
              'output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
              'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
              'metric_list:\n  - metric: acc\n')
  # generate_until with the task's own `until` and `max_gen_toks`; the first two targets are
  # the library's completions, the third is not.
  o = sampling.SamplingOptions(gen_length=8, block_length=4, steps=8)
  until, max_toks = ['w20'], 6
  gen_ctx = ['w1 w2', 'w3 w4 w5', 'w6']

  def library_text(context):
    ids = fmt.encode(tok, CFG, context)
    out = sampling.sample(CFG, params, np.asarray([ids]), options=o,
                          seeds=[seed(0, context)])
    gen = prompts.completion_ids(CFG, np.asarray(out.tokens)[0, len(ids):])[:max_toks]
    return prompts.cut_at_stops(tok.decode(gen), until)

  texts = [library_text(c) for c in gen_ctx]
  targets = texts[:2] + [texts[2] + ' w0']
  _write_task(tmp_path, 'ill_gen', [{'context': c, 'target': t} for c, t in
                                    zip(gen_ctx, targets)],
              'output_type: generate_until\ndoc_to_text: "{{context}}"\n'
              'doc_to_target: "{{target}}"\ngeneration_kwargs:\n'
              f'  until: {until}\n  max_gen_toks: {max_toks}\n'
              'metric_list:\n  - metric: exact_match\n')
  # Perplexity: windows of 8 tokens, a text of 19 words spans three.
  ppl_docs = [' '.join(f'w{i % 50}' for i in range(3, 22)), 'w1 w2 w3']
  _write_task(tmp_path, 'ill_ppl', [{'text': t} for t in ppl_docs],
              'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
              'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n')
  roll = mc.replace(rolling_window=8)
  ll = scoring.rolling_log_likelihood(CFG, params, [tok.encode(t) for t in ppl_docs], roll,
                                      seeds=[seed(0, t) for t in ppl_docs])

  common = 'gen_length=8,block_length=4,steps=8,mc_num=4,mc_batch=2,rolling_window=8'
  results, samples = _lm_eval_cli(tmp_path, f'ckpt={path},method=confidence,{common}',
                                  ['ill_mc', 'ill_gen', 'ill_ppl'])
  got = [[float(r[0]) for r in s['resps'] for r in r] for s in samples['ill_mc']]
  np.testing.assert_allclose(np.concatenate(got), np.concatenate(by_conf), rtol=1e-5)
  assert results['ill_mc']['acc,none'] == pytest.approx(2 / 3)
  gen = [s['resps'][0][0] for s in samples['ill_gen']]
  assert [s['arguments']['gen_args_0']['arg_0'] for s in samples['ill_gen']] == gen_ctx
  assert gen == texts
  assert results['ill_gen']['exact_match,none'] == pytest.approx(2 / 3)
  got = [float(s['resps'][0][0]) for s in samples['ill_ppl']]
  np.testing.assert_allclose(got, ll, rtol=1e-5)
  words = sum(len(t.split()) for t in ppl_docs)
  assert results['ill_ppl']['word_perplexity,none'] == pytest.approx(
      math.exp(-sum(ll) / words), rel=1e-5)

  by_mc = [library_scores(mc, d) for d in mc_docs]
  results, samples = _lm_eval_cli(tmp_path, f'ckpt={path},method=mc,{common}', ['ill_mc'])
  got = [[float(r[0]) for r in s['resps'] for r in r] for s in samples['ill_mc']]
  np.testing.assert_allclose(np.concatenate(got), np.concatenate(by_mc), rtol=1e-5)
  acc = np.mean([int(np.argmax(s)) == l for s, l in zip(by_mc, labels)])
  assert results['ill_mc']['acc,none'] == pytest.approx(acc)


# -- lm-eval request semantics (module docstring of the adapter) --------------------------

def test_fit_generation_honours_max_gen_toks_up_to_the_window():
  fit = lm_eval_adapter.fit_generation
  o = sampling.SamplingOptions(gen_length=8, block_length=4, steps=8)  # 4 steps per block
  got, keep = fit(o, 64, 10, 30)  # more than gen_length: whole blocks, steps per block kept
  assert (got.gen_length, got.steps, keep) == (32, 32, 10)
  got, keep = fit(o, 64, 10, 3)  # fewer: gen_length is the default canvas
  assert (got.gen_length, got.steps, keep) == (8, 8, 10)
  got, keep = fit(o, 64, 10, 500)  # the window: one prompt token at least
  assert (got.gen_length, keep) == (60, 4)
  got, keep = fit(o, 64, 58, 6)  # a long prompt shrinks the canvas to what the task asks
  assert (got.gen_length, keep) == (8, 56)
  got, keep = fit(o.replace(gen_length=40, steps=40), 64, 100, None)
  assert (got.gen_length, got.steps, keep) == (40, 40, 24)  # then loses its oldest tokens
  v = sampling.SamplingOptions(gen_length=16, block_length=4, variable_length=True, steps=2)
  assert fit(v, 64, 5, 40)[0].steps == 2  # variable length: steps are per block already
  with pytest.raises(ValueError, match='block_length=64 leaves no room'):
    fit(o.replace(gen_length=64, block_length=64, steps=64), 64, 1, None)


@pytest.mark.parametrize('kwargs, default, want', [
    ({}, 0.3, 0.3), ({'do_sample': False, 'temperature': 0.7}, 0.3, 0.),
    ({'temperature': 0.0}, 0.3, 0.), ({'do_sample': True}, 0., 1.),
    ({'do_sample': True, 'temperature': 0.5}, 0., 0.5), ({'temperature': 0.8}, 0., 0.8)])
def test_task_sampling_settings_set_the_request_temperature(kwargs, default, want):
  assert lm_eval_adapter.request_temperature(default, kwargs) == want


def test_generate_until_requests_as_lm_eval_asks(ckpt, monkeypatch):
  """What the adapter hands the engine: temperatures, independent repeats, the task's
  length over gen_length, an over-long context cut from the left, defaults fitted to max_len."""
  path, _ = ckpt
  lm = make(path, 'steps=6')  # no lengths given: fitted to max_len 64
  assert (lm.options.gen_length, lm.options.block_length) == (48, 16)
  seen = []

  def capture(reqs):
    seen.extend(reqs)
    return [engine.Completion(id=r.id, text='x', token_ids=[], finish_reason='eos',
                              generated=0, steps=0) for r in reqs]
  monkeypatch.setattr(lm.engine, 'generate', capture)
  long_ctx = ' '.join(f'w{i % 50}' for i in range(100))
  sample = {'until': ['w9'], 'do_sample': True, 'temperature': 0.9, 'max_gen_toks': 20}
  rep = _Req('w1 w2', sample)
  reqs = [rep, rep, rep, _Req('w1 w2', {'do_sample': False, 'max_gen_toks': 60}),
          _Req(long_ctx, {'max_gen_toks': 8})]
  assert lm.generate_until(reqs) == ['x'] * 5
  assert [r.options.temperature for r in seen] == [0.9, 0.9, 0.9, 0., 0.]
  seeds = [r.seed for r in seen[:3]]
  assert len(set(seeds)) == 3 and seeds[0] == lm_eval_adapter.content_seed(0, 'w1 w2')
  assert seeds == [lm_eval_adapter.repeat_seed(0, 'w1 w2', k) for k in range(3)]
  assert (seen[3].options.gen_length, seen[3].max_new_tokens) == (48, 60)  # window: 63 // 16
  assert seen[3].options.steps == 6  # 2 steps per block, 3 blocks
  # 100 context tokens: the canvas shrinks to the task's 8 tokens (one block of 16), and the
  # context keeps its last 64 - 16 tokens.
  assert (seen[4].options.gen_length, seen[4].options.steps) == (16, 2)
  assert list(seen[4].prompt_ids) == [6 + i % 50 for i in range(100)][-48:]


def test_missing_checkpoint_is_one_clear_error():
  with pytest.raises(ValueError, match='model_args needs ckpt=DIR'):
    get_model('illada_jax').create_from_arg_string('')
  with pytest.raises(ValueError, match='ckpt=/nonexistent is not a directory'):
    get_model('illada_jax').create_from_arg_string('ckpt=/nonexistent')


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }} <|eot_id|> {% endfor %}"
                 "{% if add_generation_prompt %}w9 {% endif %}")


@pytest.mark.slow
def test_lm_eval_command_line_chat_repeats_sampling_and_lengths(tmp_path):
  """Through lm-eval's CLI with --apply_chat_template: the context gets the ids
  `PromptFormat.encode` gives the messages; `repeats: 2` with `do_sample` draw twice,
  independently; `max_gen_toks` over gen_length is honoured; an over-long context is cut."""
  path, params = word_checkpoint(str(tmp_path / 'ck'), {'chat_template': CHAT_TEMPLATE})
  tok, fmt = prompts.load_tokenizer(path), prompts.PromptFormat.from_checkpoint(path)
  o = sampling.SamplingOptions(gen_length=8, block_length=4, steps=8)
  docs = ['w1 w2', ' '.join(f'w{i % 50}' for i in range(70))]
  max_toks = 20

  def library(context):
    messages = [{'role': 'user', 'content': context}]
    text = fmt.render(tok, messages, CFG.bos_token_id, CFG.eos_token_id)
    ids = fmt.encode(tok, CFG, messages)
    opts, keep = lm_eval_adapter.fit_generation(o, CFG.max_len, len(ids), max_toks)
    ids = ids[len(ids) - keep:]
    out = []
    for k in range(2):
      s = sampling.sample(CFG, params, np.asarray([ids]), options=opts.replace(temperature=1.),
                          seeds=[lm_eval_adapter.repeat_seed(0, text, k)])
      gen = prompts.completion_ids(CFG, np.asarray(s.tokens)[0, len(ids):])[:max_toks]
      out.append(tok.decode(gen))
    return text, out

  want = [library(c) for c in docs]
  _write_task(tmp_path, 'ill_chat', [{'context': c, 'target': 'w0'} for c in docs],
              'output_type: generate_until\ndoc_to_text: "{{context}}"\n'
              'doc_to_target: "{{target}}"\nrepeats: 2\ngeneration_kwargs:\n'
              f'  until: []\n  do_sample: true\n  temperature: 1.0\n  max_gen_toks: {max_toks}\n'
              'metric_list:\n  - metric: exact_match\n')
  _, samples = _lm_eval_cli(tmp_path, f'ckpt={path},gen_length=8,block_length=4,steps=8',
                            ['ill_chat'], extra=['--apply_chat_template'])
  for s, (text, outs) in zip(samples['ill_chat'], want):
    assert s['arguments']['gen_args_0']['arg_0'] == text
    assert s['resps'][0] == outs  # the k-th copy's draw in the k-th place
  assert want[0][1][0] != want[0][1][1]  # the two draws differ
  assert max(len(t.split()) for _, outs in want for t in outs) > 8  # longer than gen_length
