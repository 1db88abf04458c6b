"""Monte-Carlo likelihood and confidence scoring against exact and hand-computed values."""

import jax
import numpy as np

import illada_jax
from illada_jax import scoring

from helpers import LLADA, make_params


def log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def logits_of(cfg, params, tokens):
  return np.asarray(illada_jax.forward(cfg, params, np.asarray([tokens], np.int32)))[0]


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
  got = scoring.confidence_score(LLADA, params, [(ctx, ans), ([30], [50])])
  np.testing.assert_allclose(got[0], -total, rtol=1e-5, atol=1e-5)
  # A one-token answer is its plain masked log-probability.
  lp = log_softmax(logits_of(LLADA, params, [bos, 30, m, eos]))
  np.testing.assert_allclose(got[1], lp[2, 50], rtol=1e-5, atol=1e-5)
