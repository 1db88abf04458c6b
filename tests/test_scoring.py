"""Monte-Carlo likelihood and confidence scoring against exact and hand-computed values."""

import itertools

import jax
import numpy as np
import pytest

import illada_jax
from illada_jax import scoring

from helpers import ILLADA, LLADA, greedy_by_hand, log_softmax, logits_of, make_params


def test_stratified_counts_follow_the_reference_formula():
  for l, b, k in [(5, 4, 3), (7, 16, 7), (1, 3, 1), (10, 1, 4)]:
    want = np.round(np.linspace(k, k + (b - 1) * l / b, b)).astype(int)
    want = (want - 1) % l + 1
    np.testing.assert_array_equal(scoring.stratified_mask_counts(k, l, b), want)
  np.testing.assert_array_equal(scoring.stratified_mask_counts(3, 5, 4), [3, 4, 1, 2])


def test_mc_is_exact_for_one_token_answers_and_batches_rows():
  params = make_params(LLADA)
  m = LLADA.mask_token_id
  pairs = [([3, 14, 15, 9], [26]), ([5, 35], [8]), ([7] * 9, [40])]
  got = scoring.mc_log_likelihood(LLADA, params, pairs, mc_num=1, batch_size=1)
  for (c, a), g in zip(pairs, got):
    want = log_softmax(logits_of(LLADA, params, c + [m])[len(c)])[a[0]]
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)
  # CFG: u + (w + 1)(c - u) with the prompt masked in the unconditional pass.
  c, a = pairs[0]
  cond = logits_of(LLADA, params, c + [m])[len(c)]
  unc = logits_of(LLADA, params, [m] * (len(c) + 1))[len(c)]
  want = log_softmax(unc + 1.5 * (cond - unc))[a[0]]
  got = scoring.mc_log_likelihood(LLADA, params, [pairs[0]], mc_num=2, batch_size=2, cfg_scale=0.5)
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


def test_mc_two_token_answer_converges_to_the_enumerated_expectation():
  params = make_params(LLADA, seed=1)
  m = LLADA.mask_token_id
  c, a = [11, 12, 13], [21, 22]
  p = len(c)
  # b = 2, l = 2: every round has one row with n = 1 (random slot) and one with n = 2.
  one = [-log_softmax(logits_of(LLADA, params, c + [m if i == j else a[i] for i in range(2)])
                      [p + j])[a[j]] for j in range(2)]
  both_logits = log_softmax(logits_of(LLADA, params, c + [m, m]))
  both = -both_logits[p, a[0]] - both_logits[p + 1, a[1]]
  want = -0.5 * (2 * np.mean(one) + both)
  got = scoring.mc_log_likelihood(LLADA, params, [(c, a)], mc_num=256, batch_size=2,
                                  key=jax.random.key(1))[0]
  spread = abs(one[0] - one[1]) / 2  # the only randomness: which slot the n = 1 row masks
  assert abs(got - want) <= 4 * spread / np.sqrt(128) + 1e-4, (got, want)
  assert spread > 1e-3


def test_confidence_score_by_hand():
  params = make_params(LLADA, seed=2)
  m, bos, eos = LLADA.mask_token_id, LLADA.bos_token_id, LLADA.eos_token_id
  ctx, ans = [31, 32, 33], [41, 42, 43]
  seq = [bos] + ctx + [m, m, m] + [eos]
  start, total, hidden = 1 + len(ctx), 0., [0, 1, 2]
  for _ in range(3):
    lp = log_softmax(logits_of(LLADA, params, seq))
    ce = {j: -lp[start + j, ans[j]] for j in hidden}
    j = min(hidden, key=lambda j: (ce[j], j))
    total += ce[j]
    seq[start + j] = ans[j]
    hidden.remove(j)
  got = scoring.confidence_score(LLADA, params, [(ctx, ans), ([30], [50])], add_bos=True,
                                 padd_eos=True)
  np.testing.assert_allclose(got[0], -total, rtol=1e-5, atol=1e-5)
  # A one-token answer is its plain masked log-probability.
  lp = log_softmax(logits_of(LLADA, params, [bos, 30, m, eos]))
  np.testing.assert_allclose(got[1], lp[2, 50], rtol=1e-5, atol=1e-5)
  # The harness defaults: no BOS, no EOS; CFG masks the context in the unconditional half.
  plain = scoring.confidence_score(LLADA, params, [([30], [50]), ([], [50, 51])], cfg_scale=0.5)
  c = logits_of(LLADA, params, [30, m])[1]
  u = logits_of(LLADA, params, [m, m])[1]
  np.testing.assert_allclose(plain[0], log_softmax(u + 1.5 * (c - u))[50], rtol=1e-5, atol=1e-5)
  # An empty context (its answer starts at column 0, where padding slots also point).
  lp = log_softmax(logits_of(LLADA, params, [m, m]))
  first = min((0, 1), key=lambda j: (-lp[j, 50 + j], j))
  rest = log_softmax(logits_of(LLADA, params, [50, m] if first == 0 else [m, 51]))[1 - first]
  np.testing.assert_allclose(plain[1], lp[first, 50 + first] + rest[51 - first], rtol=1e-5,
                             atol=1e-5)


def test_mc_with_bos_and_eos_in_both_cfg_halves():
  params = make_params(LLADA, seed=3)
  m, bos, eos = LLADA.mask_token_id, LLADA.bos_token_id, LLADA.eos_token_id
  c, a = [3, 14, 15], [26]
  cond = logits_of(LLADA, params, [bos] + c + [m, eos])[4]
  # BOS belongs to the prompt (masked in the unconditional half); the EOS is kept in both.
  unc = logits_of(LLADA, params, [m] * 5 + [eos])[4]
  got = scoring.mc_log_likelihood(LLADA, params, [(c, a)], mc_num=2, batch_size=2, add_bos=True,
                                  padd_eos=True, cfg_scale=2.)
  np.testing.assert_allclose(got[0], log_softmax(unc + 3. * (cond - unc))[26], rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(ValueError, match='add_bos: the model has no BOS'):
    scoring.mc_log_likelihood(LLADA.replace(bos_token_id=None), params, [(c, a)], add_bos=True)


def test_mc_draws_do_not_depend_on_the_static_widths():
  params = make_params(LLADA, seed=1)
  pairs = [([5, 6, 7], [21, 22, 23, 24, 25])]
  kw = dict(mc_num=4, batch_size=2, seeds=[9])
  narrow = scoring.mc_log_likelihood(LLADA, params, pairs, **kw)
  wide = scoring.mc_log_likelihood(LLADA, params, pairs, length=64, answer=32, **kw)
  np.testing.assert_allclose(wide, narrow, rtol=1e-5)


def test_greedy_match_by_hand():
  params = make_params(LLADA, seed=4)
  ctx = [31, 32, 33]
  bos, eos = LLADA.bos_token_id, LLADA.eos_token_id
  for kw, affixes in [({}, ((), ())),
                      (dict(add_bos=True, padd_eos=True, cfg_scale=1.), ((bos,), (eos,)))]:
    want = greedy_by_hand(LLADA, params, ctx, 3, kw.get('cfg_scale', 0.), *affixes)
    other = want[:2] + [(want[2] + 1) % 60]
    got = scoring.greedy_match(LLADA, params, [(ctx, want), (ctx, other), (ctx, want[:1])], **kw)
    one = greedy_by_hand(LLADA, params, ctx, 1, kw.get('cfg_scale', 0.), *affixes)
    np.testing.assert_array_equal(got, [True, False, one == want[:1]])


def test_rolling_with_one_token_windows_is_exact():
  params = make_params(LLADA, seed=5)
  m, eos = LLADA.mask_token_id, LLADA.eos_token_id
  doc = [12, 40, 7, 7, 55]
  o = scoring.ScoringOptions(mc_num=2, mc_batch=2, padd_eos=True, rolling_window=1)
  lp = log_softmax(logits_of(LLADA, params, [m, eos]))[0]
  got = scoring.rolling_log_likelihood(LLADA, params, [doc, [], doc[:2]], o, seeds=[1, 2, 3])
  np.testing.assert_allclose(got, [lp[doc].sum(), 0., lp[doc[:2]].sum()], rtol=1e-5)
  assert scoring.rolling_windows(doc, 2) == [(12, 40), (7, 7), (55,)]
  assert scoring.window_size(LLADA, o.replace(rolling_window=None)) == LLADA.max_len - 1
  with pytest.raises(ValueError, match='rolling_window'):
    scoring.window_size(LLADA, o.replace(rolling_window=LLADA.max_len))


# Vocabulary 6 (MASK 5), three positions: every sequence can be enumerated.
TINY = ILLADA.replace(vocab_size=6, max_len=3, num_layers=1, d_model=32, num_heads=2,
                      num_kv_heads=1, mlp_hidden=48)


def any_order_terms(params, x):
  """log p(x_i | x_S) for every revealed set S (bitmask) and every position i outside it."""
  masks = list(range(8))
  rows = [[x[i] if s >> i & 1 else TINY.mask_token_id for i in range(3)] for s in masks]
  lp = log_softmax(np.asarray(illada_jax.forward(TINY, params, np.asarray(rows, np.int32))))
  return {s: {i: lp[s, i, x[i]] for i in range(3) if not s >> i & 1} for s in masks}


def exact_nll(terms):
  """-log of the any-order model's probability: the mean over the 3! orders of the chain."""
  probs = []
  for order in itertools.permutations(range(3)):
    s, logp = 0, 0.
    for i in order:
      logp += terms[s][i]
      s |= 1 << i
    probs.append(np.exp(logp))
  return -np.log(np.mean(probs))


def negative_elbo(terms):
  """E_{n ~ U{1..3}} (3 / n) E_{|masked| = n} sum of masked CE: its mean and the variance of
  one MC round of three rows with n = 1, 2, 3 (mc_batch 3 draws every n once)."""
  mean, var = 0., 0.
  for n in (1, 2, 3):
    vals = [3 / n * -sum(terms[s][i] for i in range(3) if not s >> i & 1)
            for s in range(8) if 3 - bin(s).count('1') == n]
    mean += np.mean(vals) / 3
    var += np.var(vals) / 9
  return mean, var


def test_rolling_bound_on_an_enumerable_model():
  params = make_params(TINY, seed=0)
  # The any-order model is a distribution over all 6^3 sequences.
  total = sum(np.exp(-exact_nll(any_order_terms(params, x)))
              for x in itertools.product(range(6), repeat=3))
  np.testing.assert_allclose(total, 1., rtol=1e-5)
  doc = [1, 4, 0, 3, 3, 2]  # two windows of max_len = 3 tokens
  bound, var = 0., 0.
  for w in (doc[:3], doc[3:]):
    terms = any_order_terms(params, w)
    mean, v = negative_elbo(terms)
    assert mean > exact_nll(terms) + 1e-3  # an upper bound on the NLL, not equal to it
    bound, var = bound + mean, var + v
  rounds = 400
  o = scoring.ScoringOptions(mc_num=3 * rounds, mc_batch=3)
  got = -scoring.rolling_log_likelihood(TINY, params, [doc], o, seeds=[7])[0]
  assert abs(got - bound) <= 4 * np.sqrt(var / rounds) + 1e-4, (got, bound, np.sqrt(var / rounds))
  assert var > 1e-3
