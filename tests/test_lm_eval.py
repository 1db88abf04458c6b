"""The lm-eval adapter's scoring (split, is_greedy, rolling bound) and presets, and the
context/continuation split, against hand-computed values and the library."""

import numpy as np
import pytest

from illada_jax import prompts, sampling, scoring

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
