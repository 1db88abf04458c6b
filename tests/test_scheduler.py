"""The online side of the one scheduler: submit while it runs, stream, cancel, mixed
temperatures."""

import time

import numpy as np
import pytest

from illada_jax import engine, prompts, sampling, scheduler
from illada_jax.sampling import SamplingOptions

from helpers import LLADA, WORD_CFG, make_params, word_checkpoint

ENDS = (LLADA.eos_token_id, LLADA.eot_token_id)
VARIABLE = SamplingOptions(gen_length=16, block_length=4, steps=4, variable_length=True)


def _requests(options, n, seed=0, lengths=(3, 19), temperatures=(0.,)):
  rng = np.random.default_rng(seed)
  return [engine.Request(id=i, prompt_ids=tuple(int(t) for t in rng.integers(
      0, 60, lengths[i % len(lengths)])),
      options=options.replace(temperature=temperatures[i % len(temperatures)]), seed=100 + i)
      for i in range(n)]


def _alone(cfg, params, req):
  out = sampling.sample(cfg, params, np.asarray([req.prompt_ids]), options=req.options,
                        seeds=[req.seed])
  gen = np.asarray(out.tokens)[0, len(req.prompt_ids):].tolist()
  ends = (cfg.eos_token_id, cfg.eot_token_id)
  end = next((i for i, t in enumerate(gen) if t in ends), len(gen))
  return gen[:end]


def test_held_back_keeps_stop_prefixes_and_unfinished_characters():
  assert scheduler.held_back('a b w3', ['w33']) == 2
  assert scheduler.held_back('a b w3', ['x']) == 0
  assert scheduler.held_back('ab\ufffd', ['zz']) == 1
  assert scheduler.held_back('ab Qu\ufffd', ['Question']) == 3  # 'Qu' and the U+FFFD
  assert scheduler.held_back('', ['a']) == 0


def test_requests_arriving_while_it_runs_with_mixed_temperatures_equal_sample_alone():
  """Requests join a running pool at block boundaries; T = 0 and T > 0 rows share one pool
  (the sampling program runs while any row samples) and each gets its tokens alone."""
  params = make_params(LLADA, end_boost=0.3)
  reqs = _requests(VARIABLE, 6, temperatures=(0., 0.8))
  eng = engine.Engine(LLADA, params, slots=2, buckets=(8, 32))
  eng.start()
  try:
    handles = []
    for r in reqs:
      handles.append(eng.submit(r))
      time.sleep(0.02)
    got = [h.result(timeout=300) for h in handles]
  finally:
    eng.stop()
  for r, c in zip(reqs, got):
    assert c.token_ids == _alone(LLADA, params, r), r.id
  assert {c.finish_reason for c in got} <= {'eos', 'length'}
  assert eng.scheduler.idle() and eng.stats.blocks > VARIABLE.num_blocks


@pytest.fixture(scope='module')
def words(tmp_path_factory):
  path, params = word_checkpoint(str(tmp_path_factory.mktemp('words')))
  return path, params, prompts.load_tokenizer(path)


def test_streamed_text_adds_up_to_the_completion_and_never_shows_a_stop(words):
  path, params, tok = words
  o = SamplingOptions(gen_length=24, block_length=4, steps=24)
  eng = engine.Engine(WORD_CFG, params, tokenizer=tok, slots=2, buckets=(16,))
  reqs = [engine.Request(i, tuple(tok.encode(p)), o, seed=i)
          for i, p in enumerate(['w1 w2 w3', 'w4 w5', 'w7'])]
  free = {c.id: c for c in eng.generate(reqs)}
  # A stop string made of the end of one word and the start of the next.
  text = free[0].text
  words_ = text.split()
  assert len(words_) > 4
  stop = words_[3][1:] + ' ' + words_[4][:2]
  streamed = {}
  for stops in ((), (stop,)):
    reqs_s = [engine.Request(r.id, r.prompt_ids, o, stop=stops, seed=r.seed) for r in reqs]
    for r in reqs_s:
      h = eng.submit(r, stream=True)
      parts = []
      while not h.done:
        eng.scheduler.step()
      for ev in h:
        parts.append(ev.text)
      assert ''.join(parts) == h.completion.text
      if stops:
        assert all(stop not in ''.join(parts[:k]) for k in range(len(parts) + 1))
      streamed[(r.id, stops)] = (parts, h.completion)
  for r in reqs:
    assert streamed[(r.id, ())][1].text == free[r.id].text
  parts, c = streamed[(0, (stop,))]
  assert c.finish_reason == 'stop' and c.text == text[:text.index(stop)]
  assert sum(bool(p) for p in streamed[(0, ())][0]) > 2  # several blocks of text, not one


def test_a_block_s_texts_go_out_while_the_next_block_computes(words):
  """Deltas and completions are emitted after the next block is dispatched (one block in
  flight), so decoding and the consumers never keep the device waiting; only what the last
  block left goes out with nothing in flight. Texts still add up to each completion."""
  path, params, tok = words
  o = SamplingOptions(gen_length=16, block_length=4, steps=4)
  eng = engine.Engine(WORD_CFG, params, tokenizer=tok, slots=2, buckets=(16,))
  dispatched, seen = [0], []
  program = eng.program

  def counting(*args, **kw):
    run = program(*args, **kw)
    def counted(*a):
      dispatched[0] += 1
      return run(*a)
    return counted
  eng.program = counting
  reqs = [engine.Request(i, tuple(tok.encode(p)), o, max_new_tokens=n, seed=i)
          for i, (p, n) in enumerate((('w1 w2', 16), ('w3', 6)))]
  handles = [eng.submit(r, stream=True, on_event=lambda ev, i=i: seen.append(
      (i, dispatched[0] - eng.stats.blocks, ev))) for i, r in enumerate(reqs)]
  while not all(h.done for h in handles):
    eng.scheduler.step()
  assert [ahead for _, ahead, _ in seen] == [1] * (len(seen) - 1) + [0]
  assert [i for i, _, ev in seen if ev.completion is not None] == [1, 0] and len(seen) >= 4
  for i, h in enumerate(handles):
    assert ''.join(ev.text for j, _, ev in seen if j == i) == h.completion.text


def test_a_request_whose_text_fails_to_decode_ends_alone(words):
  """A completion handed out while the next block computes is no longer in the pool: if its
  text cannot be made, that request ends with the error and every other one finishes."""
  path, params, tok = words
  o = SamplingOptions(gen_length=16, block_length=4, steps=4)
  eng = engine.Engine(WORD_CFG, params, tokenizer=tok, slots=2, buckets=(16,))
  decode, calls = eng.decode, []

  def failing_first(ids):
    calls.append(list(ids))
    if len(calls) == 1:
      raise UnicodeDecodeError('utf-8', b'\xff', 0, 1, 'test')
    return decode(ids)
  eng.decode = failing_first
  short = engine.Request('short', tuple(tok.encode('w3')), o, max_new_tokens=4, seed=1)
  long = engine.Request('long', tuple(tok.encode('w1 w2')), o, max_new_tokens=16, seed=2)
  eng.start()
  try:
    hs, hl = eng.submit(short), eng.submit(long)
    with pytest.raises(UnicodeDecodeError):
      hs.result(timeout=120)
    done = hl.result(timeout=120)
  finally:
    eng.stop()
  assert done.finish_reason in ('length', 'eos') and done.text == decode(done.token_ids)
  assert eng.scheduler.idle()


def test_a_cancelled_request_frees_its_slot_at_the_next_block(words):
  path, params, tok = words
  o = SamplingOptions(gen_length=48, block_length=4, steps=48)
  eng = engine.Engine(WORD_CFG, params, tokenizer=tok, slots=1, buckets=(16,))
  long = engine.Request('long', tuple(tok.encode('w1 w2')), o, seed=1)
  short = engine.Request('short', tuple(tok.encode('w3')), o, max_new_tokens=4, seed=2)
  eng.start()
  try:
    h = eng.submit(long, stream=True)
    waiting = eng.submit(short)
    first = next(iter(h))  # one block committed
    assert eng.scheduler.busy() == 1 and not waiting.done
    h.cancel()
    done = waiting.result(timeout=120)  # got the slot the cancelled request left
    assert h.result(timeout=10).finish_reason == 'cancelled'
    assert done.finish_reason in ('length', 'eos') and len(done.token_ids) <= 4
    assert first.completion is None
    assert eng.stats.cancelled == 1 and eng.stats.requests == 1
    time.sleep(0.3)
    assert eng.scheduler.busy() == 0 and eng.scheduler.waiting() == 0
  finally:
    eng.stop()


def test_a_generate_abandoned_midway_cancels_its_requests():
  params = make_params(LLADA)
  eng = engine.Engine(LLADA, params, slots=2, buckets=(32,))
  gen = eng.generate(_requests(VARIABLE, 5))
  next(gen)
  gen.close()
  assert eng.scheduler.idle()
  assert eng.stats.requests + eng.stats.cancelled == 5


def test_requests_that_arrive_together_run_shortest_bucket_first():
  """An offline batch never ages: long prompts wait until no short one is left, however many
  generations that takes (the fewest computed columns)."""
  params = make_params(LLADA)
  eng = engine.Engine(LLADA, params, slots=2, buckets=(8, 16))
  # Rows finish after 1-4 blocks, so a long prompt could widen the pool with rows live.
  reqs = [engine.Request(i, tuple(range(1, 13)) if i % 10 == 0 else (1, 2, 3), VARIABLE, seed=i,
                         max_new_tokens=4 * (1 + i % 4)) for i in range(40)]
  admitted = []  # (request id, blocks run before its admission)
  run_block = eng.scheduler._run_block
  eng.scheduler._run_block = lambda pool, slots: (admitted.extend(
      (pool.live[s].request.id, eng.stats.blocks) for s in slots), run_block(pool, slots))[1]
  done = {c.id: c for c in eng.generate(reqs)}
  longs = [r.id for r in reqs if len(r.prompt_ids) > 8]
  assert sorted(i for i, _ in admitted[-len(longs):]) == longs
  assert admitted[-len(longs)][1] > 2 * VARIABLE.num_blocks  # waited past the patience
  assert all(done[r.id].token_ids == _alone(LLADA, params, r)[:r.max_new_tokens]
             for r in reqs[:2])


def test_a_long_prompt_is_not_starved_by_a_stream_of_short_ones():
  """Short prompts keep arriving, so one always fits the pool's bucket; the long prompt
  still gets in once it has waited two generations, widening the pool with rows live."""
  params = make_params(LLADA)
  eng = engine.Engine(LLADA, params, slots=8, buckets=(8, 16))
  short = lambda i: engine.Request(('s', i), (1, 2, 3), VARIABLE, seed=i)
  for i in range(6):
    eng.submit(short(i))
  eng.scheduler.step()
  long = eng.submit(engine.Request('long', tuple(range(1, 13)), VARIABLE, seed=99))
  for k in range(40):
    eng.submit(short(100 + 2 * k))
    eng.submit(short(101 + 2 * k))
    eng.scheduler.step()
    if long.done:
      break
  assert long.done and eng.stats.widenings >= 1
  assert long.completion.token_ids == _alone(LLADA, params, long.request)
