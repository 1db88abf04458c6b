"""The continuous batching engine against `sample()` run on each request alone."""

import jax
import numpy as np
import pytest

from illada_jax import engine, sampling, scheduler, scoring
from illada_jax.sampling import SamplingOptions

from helpers import LLADA, make_params

ENDS = (LLADA.eos_token_id, LLADA.eot_token_id)


def requests(options, n, seed=0, lengths=(3, 19)):
  """`n` requests cycling through prompt `lengths` (few lengths: `alone` compiles per length)."""
  rng = np.random.default_rng(seed)
  return [engine.Request(id=i, prompt_ids=tuple(int(t) for t in rng.integers(
      0, 60, lengths[i % len(lengths)])), options=options, seed=1000 + i) for i in range(n)]


def alone(params, req):
  """Completion ids of `sample()` on the request by itself (cut at the first EOS/EOT)."""
  out = sampling.sample(LLADA, params, np.asarray([req.prompt_ids]), options=req.options,
                        seeds=[req.seed])
  gen = np.asarray(out.tokens)[0, len(req.prompt_ids):].tolist()
  end = next((i for i, t in enumerate(gen) if t in ENDS), len(gen))
  return gen[:end]


MODES = {
    'fixed': SamplingOptions(gen_length=16, block_length=4, steps=8),
    'variable': SamplingOptions(gen_length=16, block_length=4, steps=4, variable_length=True),
    'threshold_dual': SamplingOptions(gen_length=16, block_length=4, variable_length=True,
                                      threshold=0.5, cache='dual'),
    'cfg_dual': SamplingOptions(gen_length=12, block_length=4, steps=6, cfg_scale=0.5,
                                cache='dual'),
}


@pytest.mark.parametrize('mode', list(MODES))
def test_each_request_equals_sample_alone(mode):
  """Prompts of 3 and 19 tokens (two buckets), 2 slots for 6 requests, rows ending early."""
  params = make_params(LLADA, end_boost=0.3)
  reqs = requests(MODES[mode], 6)
  eng = engine.Engine(LLADA, params, slots=2, buckets=(8, 32))
  got = {c.id: c for c in eng.generate(reqs)}
  assert sorted(got) == list(range(6))
  for r in reqs:
    assert got[r.id].token_ids == alone(params, r), r.id
  reasons = {c.finish_reason for c in got.values()}
  assert reasons == {'eos', 'length'}  # some rows stopped early, others ran to the limit
  # Staggered admission: 6 requests through 2 slots took more blocks than one request can.
  assert eng.stats.blocks > MODES[mode].num_blocks


@pytest.mark.parametrize('mode', ['fixed', 'threshold_dual'])
def test_a_pool_widened_with_rows_live_keeps_their_tokens(mode):
  """A (3 tokens, several blocks) and B (3 tokens, one token wanted) start at bucket 8;
  when B leaves, the pool widens to 32 for C (19 tokens) while A is half done."""
  params = make_params(LLADA)
  a, b, c = requests(MODES[mode], 3, lengths=(3, 3, 19))
  b = engine.Request(b.id, b.prompt_ids, b.options, max_new_tokens=1, seed=b.seed)
  eng = engine.Engine(LLADA, params, slots=2, buckets=(8, 32))
  got = {x.id: x for x in eng.generate([a, b, c])}
  assert eng.stats.widenings == 1
  assert got[b.id].token_ids == alone(params, b)[:1]
  for r in (a, c):
    assert got[r.id].token_ids == alone(params, r), r.id


def test_end_think_boost_with_per_request_limits_equals_sample_alone():
  """max_len 64, blocks of 8: a 19-token prompt may generate 40 tokens, a 13-token one 48,
  and the boost's progress is measured against each request's own limit."""
  params = make_params(LLADA)
  marker = (61, 62, 63)
  o = SamplingOptions(gen_length=48, block_length=8, steps=4, variable_length=True,
                      end_think=marker, end_think_boost=200., end_think_power=1.)
  reqs = requests(o, 5, seed=2, lengths=(13, 19))
  eng = engine.Engine(LLADA, params, slots=2, buckets=(32,))
  got = {c.id: c for c in eng.generate(reqs)}
  written = 0
  for r in reqs:
    want = alone(params, r)
    assert got[r.id].token_ids == want, r.id
    written += any(tuple(want[i:i + 3]) == marker for i in range(len(want)))
  assert written >= 3  # the boost wrote the marker
  # Both limits were reached: 48 tokens after 13 prompt tokens, 40 after 19.
  assert {(len(r.prompt_ids), len(got[r.id].token_ids)) for r in reqs
          if got[r.id].finish_reason == 'length'} == {(13, 48), (19, 40)}


def test_random_draws_follow_the_request_not_its_row():
  params = make_params(LLADA)
  o = SamplingOptions(gen_length=12, block_length=4, steps=6, variable_length=True,
                      temperature=0.9, remasking='random')
  reqs = requests(o, 6, seed=3)
  target = reqs[2]
  runs = []
  for slots, order in ((1, [2]), (2, [0, 1, 2, 3]), (4, [5, 4, 3, 2, 1, 0])):
    eng = engine.Engine(LLADA, params, slots=slots, buckets=(32,))
    runs.append({c.id: c.token_ids for c in eng.generate([reqs[i] for i in order])}[2])
  assert runs[0] == runs[1] == runs[2] == alone(params, target)
  other = engine.Request(id=9, prompt_ids=target.prompt_ids, options=o, seed=target.seed + 1)
  diff = next(engine.Engine(LLADA, params, slots=1).generate([other])).token_ids
  assert diff != runs[0]  # the seed, not the position, decides the draws


def test_programs_are_bounded_by_buckets_times_groups():
  params = make_params(LLADA)
  a = SamplingOptions(gen_length=8, block_length=4, steps=4)
  b = SamplingOptions(gen_length=8, block_length=4, steps=4, temperature=0.5)
  c = SamplingOptions(gen_length=8, block_length=4, steps=4, temperature=1.5)  # b's program
  reqs = requests(a, 6, lengths=(3, 12)) + requests(b, 3, lengths=(5,)) + requests(c, 3, 1, (6,))
  reqs = [engine.Request(id=k, prompt_ids=r.prompt_ids, options=r.options, seed=k)
          for k, r in enumerate(reqs)]
  eng = engine.Engine(LLADA, params, slots=2, buckets=(8, 16))
  assert len(list(eng.generate(reqs))) == 12
  # One settings group: a block runs the sampling program when a live row has T > 0,
  # else the argmax one, so at most (bucket, program) pairs compile.
  assert eng.stats.compiles <= 2 * 2
  compiled = eng.stats.compiles
  list(eng.generate(reqs))
  assert eng.stats.compiles == compiled  # nothing recompiles
  assert len({scheduler.group_key(r.options) for r in reqs}) == 1


class _Pieces:
  """A stand-in tokenizer: id i decodes to `PIECES[i]`, `vocab_size` ids in all."""

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size

  def decode(self, ids):
    return ''.join(f'<{i}>' for i in ids)


def test_max_new_tokens_and_padded_vocabulary_rows():
  params = make_params(LLADA)
  # Rows 70.. of the head (not tokenizer ids here) win everywhere unless excluded.
  params['lm_head'] = params['lm_head'].at[:, 70:80].add(50.)
  o = SamplingOptions(gen_length=8, block_length=4, steps=8)
  reqs = requests(o, 3, seed=5)
  raw = list(engine.Engine(LLADA, params, slots=2).generate(reqs))
  assert any(t >= 70 for c in raw for t in c.token_ids)
  eng = engine.Engine(LLADA, params, slots=2, tokenizer=_Pieces(70))
  limited = [engine.Request(id=r.id, prompt_ids=r.prompt_ids, options=o, max_new_tokens=3,
                            seed=r.seed) for r in reqs]
  for c in eng.generate(limited):
    assert all(t < 70 for t in c.token_ids)
    full = alone(params, engine.Request(**{**limited[c.id].__dict__,
                                            'options': o.replace(vocab_limit=70)}))
    assert c.token_ids == full[:3] and c.text == _Pieces(70).decode(full[:3])
    assert c.finish_reason == ('length' if len(full) >= 3 else 'eos')


def test_bad_requests_are_refused_before_anything_runs():
  eng = engine.Engine(LLADA, make_params(LLADA), slots=2, buckets=(8, 16))
  o = SamplingOptions(gen_length=8, block_length=4, steps=4)
  with pytest.raises(ValueError, match='longer than the largest bucket'):
    list(eng.generate([engine.Request(0, tuple(range(17)), o)]))
  with pytest.raises(ValueError, match='exceeds max_len'):
    list(engine.Engine(LLADA, make_params(LLADA), slots=2).generate(
        [engine.Request(0, tuple(range(60)), o)]))
  with pytest.raises(ValueError, match='empty prompt'):
    list(eng.generate([engine.Request(0, (), o)]))
  with pytest.raises(ValueError, match="cache='prefix' needs variable_length"):
    list(eng.generate([engine.Request(0, (1, 2), o.replace(cache='prefix'))]))
  with pytest.raises(ValueError, match='stop strings need a tokenizer'):
    list(eng.generate([engine.Request(0, (1, 2), o, stop=('x',))]))


def test_scoring_through_the_engine_is_independent_of_companions():
  params = make_params(LLADA, seed=1)
  rng = np.random.default_rng(0)
  mc = scoring.ScoringOptions('mc', mc_num=4, mc_batch=2)
  reqs = [engine.ScoreRequest(i, tuple(int(t) for t in rng.integers(0, 60, (3, 11)[i % 2])),
                              tuple(int(t) for t in rng.integers(0, 60, 1 + i % 4)),
                              mc, seed=50 + i) for i in range(7)]
  by_slots = []
  for slots in (2, 8):
    eng = engine.Engine(LLADA, params, slots=slots, buckets=(16, 32))
    by_slots.append({s.id: s.score for s in eng.score(reqs[::-1] if slots == 8 else reqs)})
  want = scoring.mc_log_likelihood(LLADA, params, [(r.context_ids, r.continuation_ids)
                                                   for r in reqs],
                                   mc_num=4, batch_size=2, seeds=[r.seed for r in reqs])
  for r in reqs:
    np.testing.assert_allclose([by_slots[0][r.id], by_slots[1][r.id]], [want[r.id]] * 2,
                               rtol=1e-5)
  conf = [engine.ScoreRequest(r.id, r.context_ids, r.continuation_ids,
                              scoring.ScoringOptions('confidence')) for r in reqs]
  got = {s.id: s.score for s in engine.Engine(LLADA, params, slots=3).score(conf)}
  want = scoring.confidence_score(LLADA, params, [(r.context_ids, r.continuation_ids) for r in reqs])
  np.testing.assert_allclose([got[i] for i in range(7)], want, rtol=1e-5)


def _byte_bpe(path, specials):
  """A byte-level BPE `tokenizer.json` of 300 ids trained here on a little English."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  words = ('question answer the of a number is what and then we add two more so it to be '
           'first second next last step sum total').split()
  rng = np.random.default_rng(0)
  corpus = [' '.join(rng.choice(words, 12)) + ' Question: ' + ' '.join(rng.choice(words, 6))
            for _ in range(400)]
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(path))
  from illada_jax import text_tokenizer
  return text_tokenizer.load(str(path))


def test_stop_strings_are_found_in_the_text_not_by_standalone_ids(tmp_path):
  import illada_jax
  from helpers import SPECIALS
  tok = _byte_bpe(tmp_path / 'tokenizer.json', SPECIALS)
  cfg = illada_jax.get_preset('llada_tiny').replace(
      num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_hidden=96,
      vocab_size=320, max_len=64, mask_token_id=310, bos_token_id=0, eos_token_id=2,
      pad_token_id=1, eot_token_id=4, param_dtype='float32', compute_dtype='float32',
      remat_policy='none')  # ids 300.. are padded embedding rows beyond the tokenizer
  params = jax.tree.map(lambda x: x * 3, illada_jax.init_params(cfg, jax.random.key(0)))
  # Larger head columns for the learned merges (262..299, mostly words) so text has words.
  params['lm_head'] = params['lm_head'].at[:, 262:300].multiply(2.)
  o = SamplingOptions(gen_length=24, block_length=8, steps=8, variable_length=True)
  eng = engine.Engine(cfg, params, tokenizer=tok, slots=2, buckets=(16,))
  reqs = [engine.Request(i, tuple(tok.encode(text)), o, seed=i) for i, text in
          enumerate(['what is the sum', 'first we add two', 'the number is'])]
  free = {c.id: c for c in eng.generate(reqs)}
  assert all(t < 300 for c in free.values() for t in c.token_ids)  # padded rows never sampled
  # A stop string whose standalone ids differ from its ids in the generated text: two
  # tokens, the first with its leading space dropped (byte-level BPE marks it in the id).
  found = None
  for c in free.values():
    ids = c.token_ids
    for k in range(1, len(ids) - 2):
      s = tok.decode(ids[k:k + 2])
      if s.startswith(' ') and len(s) > 3 and all(ch.isalpha() or ch == ' ' for ch in s[1:]):
        found = (c, s[1:])
        break
    if found:
      break
  assert found, 'the random model should write two spaced words somewhere'
  c, stop = found
  standalone = tok.encode(stop)
  assert not any(c.token_ids[j:j + len(standalone)] == standalone
                 for j in range(len(c.token_ids)))  # id matching would miss it
  req = engine.Request(c.id, reqs[c.id].prompt_ids, o, stop=('never there', stop), seed=c.id)
  done = next(engine.Engine(cfg, params, tokenizer=tok, slots=1, buckets=(16,)).generate([req]))
  assert done.finish_reason == 'stop'
  assert done.text == c.text[:c.text.index(stop)]
  assert tok.decode(done.token_ids).startswith(done.text)
  assert done.generated <= c.generated
  # after_think: only the text after the first marker (a word the model wrote), the whole
  # text where it never appears; the ids stay those of the whole completion.
  marker = stop.split()[0]
  think = o.replace(after_think=True, end_think=marker)
  got = {d.id: d for d in eng.generate([engine.Request(r.id, r.prompt_ids, think, seed=r.seed)
                                         for r in reqs])}
  assert eng.stats.compiles == 1  # text handling, not a new program
  for i, d in got.items():
    whole = free[i].text
    assert d.text == (whole.split(marker, 1)[1].lstrip() if marker in whole else whole)
    assert d.token_ids == free[i].token_ids
  assert got[c.id].text != free[c.id].text


def test_every_eos_id_of_the_checkpoint_ends_a_request():
  """An id declared as one more EOS (`extra_eos_token_ids`) ends a request where it appears:
  the sampler's variable-length stop and the engine's cut both see it."""
  params = make_params(LLADA)
  reqs = requests(MODES['variable'], 2)
  first = {c.id: c.token_ids for c in engine.Engine(LLADA, params, slots=2).generate(reqs)}
  extra = first[0][len(first[0]) // 2]  # a token the first request generates mid-way
  cfg = LLADA.replace(extra_eos_token_ids=(extra,))
  got = {c.id: c for c in engine.Engine(cfg, params, slots=2).generate(reqs)}
  for r in reqs:
    ids = first[r.id]
    cut = ids.index(extra) if extra in ids else len(ids)
    assert got[r.id].token_ids == ids[:cut], r.id
  assert got[0].finish_reason == 'eos' and len(got[0].token_ids) < len(first[0])
