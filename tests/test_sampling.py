"""The sampler against a plain NumPy re-statement of the reference loop, and its invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import illada_jax
from illada_jax import end_think, sampling
from illada_jax.model import KVCache

from helpers import ILLADA, LLADA, make_params, padded_prompts


def reference_sample(cfg, params, prompt, mask, *, gen_length, block_length, steps,
                     temperature=0., cfg_scale=0., remasking='low_confidence',
                     logits_eos_inf=False, confidence_eos_eot_inf=False, key=None,
                     margins=None, variable_length=False, end_think=None, end_think_boost=0.,
                     end_think_power=2., tally=None):
  """SPEC §2 step by step in NumPy (float64), full-sequence logits from `forward`.

  Returns the canvas after every step `[steps, B, L]`. The random draws come
  from the same per-row streams as the sampler (row seed `bits(key, B)[r]`,
  step `i` of block `blk`: `fold_in(fold_in(key(seed), blk), i)`), so
  `remasking='random'` is comparable. If `margins` is a list, each decision's
  distance from a tie is appended to it: top-1 minus top-2 logit of every
  committed token, and (low-confidence remasking) the confidence of the last
  committed candidate minus the next one's.

  `variable_length`: `steps` per block; a block is visible only once appended,
  a row stops after the block in which it wrote EOS/EOT, and steps in which no
  row is left are not run. `end_think` (ids) with `end_think_boost > 0`: the
  end-of-thinking bonus, restated from SPEC §2 on the unrotated sequence; if
  `tally` is a dict it counts, per step and row, 'contains' (the marker is
  already in the generated part) or `j` (the length of the marker prefix
  found right before the boosted position).
  """
  key = jax.random.key(0) if key is None else key
  b, p = prompt.shape
  l = p + gen_length
  x = np.concatenate([prompt, np.full((b, gen_length), cfg.mask_token_id)], 1)
  am = np.concatenate([mask, np.full((b, gen_length), 0 if variable_length else 1)], 1)
  nb = gen_length // block_length
  s_per_block = steps if variable_length else steps // nb
  ends = [t for t in (cfg.eos_token_id, cfg.eot_token_id) if t is not None]
  done = np.zeros(b, bool)
  canvases, s = [], 0
  for blk in range(nb):
    lo, hi = p + blk * block_length, p + (blk + 1) * block_length
    if variable_length:
      am[~done, lo:hi] = 1
    m = (x[:, lo:hi] == cfg.mask_token_id).sum(1) * ~done
    for i in range(s_per_block):
      if done.all():
        break
      masked = (x == cfg.mask_token_id) & ~done[:, None]
      if cfg_scale > 0:
        un = x.copy()
        un[:, :p] = cfg.mask_token_id
        lg = np.asarray(illada_jax.forward(cfg, params, np.concatenate([x, un]),
                                           np.concatenate([am, am])), np.float64)
        logits = lg[b:] + (cfg_scale + 1) * (lg[:b] - lg[b:])
      else:
        logits = np.asarray(illada_jax.forward(cfg, params, x, am), np.float64)
      if end_think_boost > 0:
        e = list(end_think)
        for r in range(b):
          open_q = [j for j in range(lo, hi) if masked[r, j]]
          if not open_q:
            continue
          gen = list(x[r, p:])
          if any(gen[t:t + len(e)] == e for t in range(len(gen) - len(e) + 1)):
            if tally is not None:
              tally['contains'] = tally.get('contains', 0) + 1
            continue
          q = open_q[0]
          j = next((j for j in range(len(e) - 1, 0, -1)
                    if q - p >= j and list(x[r, q - j:q]) == e[:j]), 0)
          progress = min(max((q - p + 1) / gen_length, 0.), 1.)
          logits[r, q, e[j]] += end_think_boost * progress ** end_think_power
          if tally is not None:
            tally[j] = tally.get(j, 0) + 1
      if logits_eos_inf:
        logits[:, :, cfg.eos_token_id] = -np.inf
      assert temperature == 0
      x0 = logits.argmax(-1)
      if remasking == 'low_confidence':
        z = np.exp(logits - logits.max(-1, keepdims=True))
        conf = np.take_along_axis(z / z.sum(-1, keepdims=True), x0[..., None], -1)[..., 0]
      else:
        conf = np.full((b, l), np.nan)
        for r, seed in enumerate(jax.random.bits(key, (b,), jnp.uint32)):
          step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), blk), i)
          key_r = jax.random.split(step_key)[1]
          conf[r, lo:hi] = np.asarray(jax.random.uniform(key_r, (block_length,)))
      for r in range(b):
        k = m[r] // s_per_block + (1 if i < m[r] % s_per_block else 0)
        cand = [j for j in range(hi) if masked[r, j]]  # after the block: -inf
        # EOS/EOT candidates have confidence -inf: last, ties to the lower position.
        end = lambda j: confidence_eos_eot_inf and x0[r, j] in ends
        cand.sort(key=lambda j: (1, 0., j) if end(j) else (0, -conf[r, j], j))
        for j in cand[:k]:
          x[r, j] = x0[r, j]
        if margins is not None:
          margins += [np.subtract(*np.sort(logits[r, j])[[-1, -2]]) for j in cand[:k]]
          if (remasking == 'low_confidence' and 0 < k < len(cand) and not end(cand[k - 1])
              and not end(cand[k])):
            margins.append(conf[r, cand[k - 1]] - conf[r, cand[k]])
      canvases.append(x.copy())
      s += 1
    if variable_length:
      done |= np.isin(x[:, lo:hi], ends).any(1)
  return np.stack(canvases)


def canvases_from(out, steps, mask_id, p=None):
  """Canvas after each step, rebuilt from final tokens and commit steps.

  With the prompt width `p`, generated positions never committed (variable
  length: never appended) stay MASK.
  """
  tokens, step = np.asarray(out.tokens), np.asarray(out.commit_step)
  if p is not None:
    step = np.where((step < 0) & (np.arange(step.shape[1]) >= p), np.iinfo(np.int32).max, step)
  return np.stack([np.where(step <= s, tokens, mask_id) for s in range(steps)])


# name: (config, sampler arguments, params seed). Seeds are chosen so that no
# decision is within float noise of a tie (checked in the test).
CASES = {
    'pure_diffusion': (LLADA, dict(gen_length=8, block_length=8, steps=4), 0),
    'semi_ar_uneven': (LLADA, dict(gen_length=12, block_length=4, steps=9), 0),
    'one_per_step': (ILLADA, dict(gen_length=6, block_length=3, steps=6), 0),
    'cfg': (LLADA, dict(gen_length=8, block_length=4, steps=4, cfg_scale=0.5), 0),
    'random_remask': (LLADA, dict(gen_length=8, block_length=4, steps=6, remasking='random',
                                  key=jax.random.key(7)), 0),
    'logits_eos_inf': (LLADA, dict(gen_length=8, block_length=8, steps=4, logits_eos_inf=True), 2),
    'confidence_eos_eot_inf': (LLADA, dict(gen_length=8, block_length=8, steps=4,
                                           confidence_eos_eot_inf=True), 0),
}


@pytest.mark.parametrize('name', list(CASES))
def test_matches_reference_step_by_step(name):
  cfg, kw, seed = CASES[name]
  params = make_params(cfg, seed=seed, end_boost=4. if 'eos' in name else 0.)
  prompt, mask = padded_prompts(cfg)
  out = sampling.sample(cfg, params, prompt, mask, **kw)
  margins = []
  want = reference_sample(cfg, params, prompt, mask, margins=margins, **kw)
  assert min(margins) > 1e-4, min(margins)  # float32 vs float64 noise cannot flip a decision
  got = canvases_from(out, kw['steps'], cfg.mask_token_id)
  for s in range(kw['steps']):
    np.testing.assert_array_equal(got[s], want[s], err_msg=f'step {s}')
  assert int(out.nfe) == kw['steps']
  assert not np.any(np.asarray(out.tokens) == cfg.mask_token_id)
  ends = np.isin(np.asarray(out.tokens)[:, prompt.shape[1]:], [cfg.eos_token_id, cfg.eot_token_id])
  if name == 'logits_eos_inf':
    assert not np.any(np.asarray(out.tokens)[:, prompt.shape[1]:] == cfg.eos_token_id)
  if name == 'confidence_eos_eot_inf':
    assert ends.any()  # the option is exercised: EOS/EOT were committed last
    plain = sampling.generate(cfg, params, prompt, mask, **{**kw, 'confidence_eos_eot_inf': False})
    assert not np.array_equal(np.asarray(plain), np.asarray(out.tokens))


# Marker (ids) and sampler arguments, params seed and EOS/EOT boost. Row 0's prompt ends
# with `61 61`: only generated tokens may count as a written marker prefix (q - P >= j).
BOOST_CASES = {
    # One token per step: partial markers of 1 and 2 tokens before q, then rows that contain it.
    'fixed': (dict(gen_length=12, block_length=4, steps=12, end_think=(61, 62, 63),
                   end_think_boost=60., end_think_power=2.), 2, 0.),
    # A repeated marker token: after `61 61` the next is e_2 (the largest j), not e_1;
    # rows stop on EOS/EOT at different blocks.
    'variable': (dict(gen_length=8, block_length=4, steps=4, variable_length=True,
                      end_think=(61, 61, 62), end_think_boost=200., end_think_power=1.), 1, 0.5),
}


@pytest.mark.parametrize('name', list(BOOST_CASES))
def test_end_think_boost_matches_reference_step_by_step(name):
  kw, seed, end_boost = BOOST_CASES[name]
  params = make_params(LLADA, seed=seed, end_boost=end_boost)
  prompt, mask = padded_prompts(LLADA)
  prompt[0, -2:] = 61
  p = prompt.shape[1]
  out = sampling.sample(LLADA, params, prompt, mask, **kw)
  margins, tally = [], {}
  want = reference_sample(LLADA, params, prompt, mask, margins=margins, tally=tally, **kw)
  assert min(margins) > 1e-4, min(margins)
  got = canvases_from(out, int(out.nfe), LLADA.mask_token_id, p)
  assert got.shape == want.shape
  for s in range(len(want)):
    np.testing.assert_array_equal(got[s], want[s], err_msg=f'step {s}')
  # The rule's branches were all taken: no prefix, 1- and 2-token prefixes, marker written.
  assert {0, 1, 2, 'contains'} <= set(tally), tally
  off = sampling.generate(LLADA, params, prompt, mask, **{**kw, 'end_think_boost': 0.})
  assert not np.array_equal(np.asarray(off), np.asarray(out.tokens))  # the boost changed tokens
  if kw.get('variable_length'):
    assert np.asarray(out.done).any() and not np.asarray(out.done).all()


def test_end_think_text_is_encoded_with_the_tokenizer():
  class Words:  # 'w{i}' is id 60 + i
    def encode(self, text):
      return [60 + int(w[1:]) for w in text.split()]

    def decode(self, ids):
      return ' '.join(f'w{i - 60}' for i in ids)

  params = make_params(LLADA)
  prompt, mask = padded_prompts(LLADA, b=1)
  kw = dict(gen_length=4, block_length=4, steps=4, end_think_boost=50.)
  by_ids = sampling.generate(LLADA, params, prompt, mask, end_think=(61, 62), **kw)
  by_text = sampling.generate(LLADA, params, prompt, mask, end_think='w1 w2', tokenizer=Words(), **kw)
  np.testing.assert_array_equal(by_text, by_ids)
  with pytest.raises(ValueError, match='end_think.*needs a tokenizer'):
    sampling.generate(LLADA, params, prompt, mask, end_think='w1 w2', **kw)
  with pytest.raises(ValueError, match=r'end_think: ids \[95\] outside'):
    sampling.generate(LLADA, params, prompt, mask, end_think=(61, 95), **kw)


def test_commit_counts_per_step():
  params = make_params(LLADA)
  prompt, mask = padded_prompts(LLADA)
  out = sampling.sample(LLADA, params, prompt, mask, gen_length=10, block_length=5, steps=6)
  step = np.asarray(out.commit_step)[:, prompt.shape[1]:]
  counts = np.stack([(step == s).sum(1) for s in range(6)], 1)
  np.testing.assert_array_equal(counts, np.tile([2, 2, 1, 2, 2, 1], (3, 1)))
  for blk in range(2):  # each block is filled by its own 3 steps
    assert set(np.unique(step[:, blk * 5:(blk + 1) * 5])) == {3 * blk, 3 * blk + 1, 3 * blk + 2}


def test_determinism_for_a_fixed_key():
  params = make_params(LLADA)
  prompt, mask = padded_prompts(LLADA)
  kw = dict(gen_length=8, block_length=4, steps=4, temperature=1.0, cfg_scale=0.5)
  a = sampling.generate(LLADA, params, prompt, mask, key=jax.random.key(3), **kw)
  b = sampling.generate(LLADA, params, prompt, mask, key=jax.random.key(3), **kw)
  c = sampling.generate(LLADA, params, prompt, mask, key=jax.random.key(4), **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_rows_are_independent_under_padding():
  params = make_params(ILLADA)
  prompt, mask = padded_prompts(ILLADA, b=3, p=7)
  kw = dict(gen_length=6, block_length=3, steps=4)
  batch = np.asarray(sampling.generate(ILLADA, params, prompt, mask, **kw))
  for r in range(3):
    alone = sampling.generate(ILLADA, params, prompt[r:r + 1], mask[r:r + 1], **kw)
    np.testing.assert_array_equal(batch[r], np.asarray(alone)[0])
    # The same prompt without its left padding: RoPE is relative, padding is invisible.
    real = prompt[r, mask[r] == 1][None]
    unpadded = sampling.generate(ILLADA, params, real, **kw)
    np.testing.assert_array_equal(batch[r, -6:], np.asarray(unpadded)[0, -6:])


def test_sharded_equals_single_device():
  mesh = illada_jax.make_mesh('data=2,fsdp=2,tensor=2')
  cfg = LLADA.replace(vocab_size=96)
  params = make_params(cfg, seed=3)
  sharded = jax.device_put(params, illada_jax.param_shardings(cfg, mesh))
  prompt, mask = padded_prompts(cfg, b=4, p=8)
  kw = dict(gen_length=8, block_length=4, steps=4, cfg_scale=1.0)
  # The mesh sums matmul partials in another order (logits differ by ~4e-5), so
  # token equality is a fair check only if no decision is that close to a tie.
  margins = []
  reference_sample(cfg, params, prompt, mask, margins=margins, **kw)
  assert min(margins) > 1e-3, min(margins)
  want = sampling.generate(cfg, params, prompt, mask, **kw)
  got = sampling.generate(cfg, sharded, prompt, mask, **kw)
  assert got.sharding.spec[0] == ('data', 'fsdp')
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # The cached window pass computes the same values on the mesh (token equality
  # of whole fast runs is left to tie-breaking of float noise, so compare values).
  from illada_jax import sharding
  def window(p, t, m):
    with sharding.activation_sharding(sharding.mesh_of(p)):
      model = illada_jax.Transformer(cfg)
      _, cache = model.apply({'params': p}, t, KVCache.zeros(cfg, *t.shape), m,
                             method='hidden_cached')
      return model.apply({'params': p}, t[:, 6:10], cache, m, 6, method='hidden_cached')[0]
  tokens = np.concatenate([prompt, np.full((4, 8), cfg.mask_token_id, np.int32)], 1)
  full_mask = np.pad(mask, ((0, 0), (0, 8)), constant_values=1)
  np.testing.assert_allclose(jax.jit(window)(sharded, tokens, full_mask),
                             jax.jit(window)(params, tokens, full_mask), atol=1e-3, rtol=1e-4)
  fast = sampling.sample(cfg, sharded, prompt, mask, threshold=0.9, cache='dual', **kw)
  assert fast.tokens.sharding.spec[0] == ('data', 'fsdp')
  assert not np.any(np.asarray(fast.tokens) == cfg.mask_token_id)


def test_variable_length_chains_blocks_and_stops_per_row():
  params = make_params(LLADA)
  prompt, mask = padded_prompts(LLADA, b=2)
  p, w = prompt.shape[1], 4
  full = sampling.sample(LLADA, params, prompt, mask, gen_length=3 * w, block_length=w, steps=2,
                         variable_length=True)
  toks = np.asarray(full.tokens)
  # Block 1 is denoised with nothing after it visible, then block 2 after block 1.
  first = sampling.generate(LLADA, params, prompt, mask, gen_length=w, block_length=w, steps=2)
  np.testing.assert_array_equal(toks[:, :p + w], np.asarray(first))
  second = sampling.generate(LLADA, params, toks[:, :p + w], np.pad(mask, ((0, 0), (0, w)),
                             constant_values=1), gen_length=w, block_length=w, steps=2)
  np.testing.assert_array_equal(toks[:, :p + 2 * w], np.asarray(second))
  # EOS: a row stops at the end of the block in which its first EOS appears.
  eparams = make_params(LLADA, end_boost=1.)
  out = sampling.sample(LLADA, eparams, prompt, mask, gen_length=4 * w, block_length=w, steps=2,
                        variable_length=True)
  gen = np.asarray(out.tokens)[:, p:]
  for r in range(2):
    hits = np.flatnonzero(np.isin(gen[r], [LLADA.eos_token_id, LLADA.eot_token_id]))
    assert hits.size, 'the boosted model should emit EOS/EOT'
    stop_block = hits[0] // w
    assert bool(out.done[r])
    assert np.all(np.asarray(out.commit_step)[r, p + (stop_block + 1) * w:] == -1)
    assert np.all(gen[r, (stop_block + 1) * w:] == LLADA.eos_token_id)


def test_kv_window_equals_full_hidden():
  for cfg in (LLADA, ILLADA):  # scanned and unscanned layer params
    params = make_params(cfg)
    prompt, mask = padded_prompts(cfg, p=12)

    @jax.jit
    def run(params, tokens, mask):
      model = illada_jax.Transformer(cfg)
      hidden = model.apply({'params': params}, tokens, mask, method='hidden')
      h_full, cache = model.apply({'params': params}, tokens, KVCache.zeros(cfg, *tokens.shape),
                                  mask, method='hidden_cached')
      h_win, new_cache = model.apply({'params': params}, tokens[:, 4:9], cache, mask, 4,
                                     method='hidden_cached')
      return hidden, h_full, h_win, cache, new_cache

    hidden, h_full, h_win, cache, new_cache = run(params, prompt, mask)
    np.testing.assert_allclose(h_full, hidden, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(h_win, hidden[:, 4:9], atol=1e-4, rtol=1e-4)
    # Recomputing a window of unchanged tokens rewrites its K/V with the same values.
    for old, new in zip(cache, new_cache):
      assert old.shape == (cfg.num_layers, *prompt.shape, cfg.num_kv_heads, cfg.head_dim)
      np.testing.assert_allclose(new, old, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('cache', [None, 'dual', 'prefix'])
def test_threshold_one_with_fresh_cache_equals_fixed(cache):
  """With the end-of-thinking boost on: threshold and caches add it at every step too."""
  params = make_params(LLADA)
  prompt, mask = padded_prompts(LLADA)
  kw = dict(gen_length=8, block_length=4, end_think=(61, 62), end_think_boost=30.)
  want = sampling.sample(LLADA, params, prompt, mask, steps=8, **kw)
  got = sampling.sample(LLADA, params, prompt, mask, steps=8, threshold=1.0, cache=cache,
                        cache_refresh=1, **kw)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.commit_step), np.asarray(want.commit_step))
  assert int(got.nfe) == 8


def test_cache_once_per_block_and_threshold_parallel():
  params = make_params(LLADA)
  prompt, mask = padded_prompts(LLADA)
  kw = dict(gen_length=8, block_length=4, steps=8)
  fixed = np.asarray(sampling.generate(LLADA, params, prompt, mask, **kw))
  for cache in ('dual', 'prefix'):  # fixed schedule, approximate K/V between refreshes
    out = sampling.sample(LLADA, params, prompt, mask, cache=cache, **kw)
    assert int(out.nfe) == 8
    toks = np.asarray(out.tokens)
    assert not np.any(toks == LLADA.mask_token_id)
    # Step 0 is an exact full pass: its commits equal the uncached sampler's.
    first = np.asarray(out.commit_step) == 0
    np.testing.assert_array_equal(toks[first], fixed[first])
  fast = sampling.sample(LLADA, params, prompt, mask, gen_length=8, block_length=4, steps=8,
                         threshold=0.3, cache='dual')
  assert 2 <= int(fast.nfe) < 8
  assert not np.any(np.asarray(fast.tokens) == LLADA.mask_token_id)


def test_gumbel_candidates_follow_softmax_of_logits_over_temperature():
  o = sampling.SamplingOptions(gen_length=1, block_length=1, steps=1, temperature=0.7,
                               logits_eos_inf=True)
  logits = jnp.asarray([[[1.0, 0.2, -0.5, 0.8, 2.0, 0.0] + [-30.] * 84]])  # EOS id 82 boosted below
  logits = logits.at[0, 0, LLADA.eos_token_id].set(5.)
  temp = jnp.full((1,), 0.7)
  draw = jax.jit(jax.vmap(lambda k: sampling.candidates(LLADA, o, logits, k[None], temp)[0][0, 0]))
  x0 = np.asarray(draw(jax.random.split(jax.random.key(0), 20000)))
  want = np.asarray(jax.nn.softmax(logits[0, 0, :6] / 0.7))
  freq = np.bincount(x0, minlength=90)[:6] / x0.size
  assert not np.any(x0 == LLADA.eos_token_id)  # logits_eos_inf
  np.testing.assert_allclose(freq, want, atol=0.015)


def test_answer_after_the_end_of_thinking_marker():
  class Tok:
    def decode(self, ids):
      return ''.join({7: ' </', 8: 'think>'}[i] for i in ids)
  text = 'so 2+2 is 4 </think> The answer is 4. </think> again'
  assert end_think.answer(text, '</think>', None) == 'The answer is 4. </think> again'
  assert end_think.answer(text, (7, 8), Tok()) == 'The answer is 4. </think> again'
  assert end_think.answer('still thinking', '</think>', None) == 'still thinking'
  with pytest.raises(ValueError, match='after_think needs a marker'):
    sampling.SamplingOptions(after_think=True, end_think=None)
  assert sampling.SamplingOptions(after_think=True).program_key() == sampling.SamplingOptions().program_key()
