"""The one scheduler loop: who runs at each block boundary, for offline jobs and the server alike.

`Scheduler.step()` is one block boundary of the engine's pool: it drops
cancelled requests, admits waiting ones into free slots (the pool starts at
its smallest prompt bucket and is widened when the waiting requests no longer
fit), runs the block program once, releases the requests it finished, and,
while the next block computes, hands each request the text its block committed
(the device does not wait on decoding or on the consumers of the events).
`Engine.generate` (jobs, lm-eval) calls `step()` in the caller's thread until
its requests are done; a server calls `Engine.start()`, and a thread calls
`step()` for as long as it runs. Either way there is one loop and one owner
of the device.

A pool serves one settings group at a time: the settings that change the
program (`SamplingOptions.program_key`, except the temperature: a block runs
the sampling program when any live row has T > 0, the argmax one otherwise,
and both give a T = 0 row the same tokens). When the pool is empty, it
switches to the group of the oldest waiting request. Requests are admitted
oldest first among those that fit the pool's bucket.

Nothing here knows about HTTP: a `Handle` carries a request's events (text
deltas, then the `Completion`) to whoever submitted it, through a queue or a
callback run on the scheduler's thread.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import queue
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from illada_jax import end_think, prompts
from illada_jax.handles import Completion, Event, Handle, held_back  # noqa: F401 (API)

# Per-column canvas fields and the value of an idle column (pad token, position 0, hidden,
# counted as prompt, never committed), in `_widen`'s order.
_COLUMN_FIELDS = ('x_BL', 'pos_BL', 'visible_BL', 'prompt_BL', 'step_BL')


@dataclasses.dataclass
class _Live:
  handle: Handle
  limit_blocks: int
  tokens: list = dataclasses.field(default_factory=list)
  steps: int = 0

  @property
  def request(self):
    return self.handle.request


@dataclasses.dataclass
class _Pool:
  """The device pool of one settings group: `slots` rows on a canvas of `bucket + G` columns."""
  key: Any  # the group (program key at temperature 0)
  options: Any  # a request's options of the group, for its program
  bucket: int
  live: list
  canvas: Any = None


@dataclasses.dataclass
class _ScoreJob:
  requests: list
  results: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)


@functools.lru_cache(maxsize=1024)
def group_key(options):
  """The settings group of a request: its program key with the temperature left out."""
  return options.program_key().replace(temperature=0.)


class Scheduler:
  """Waiting queues, the pool, and `step()`: see the module docstring. Thread-safe submit."""

  def __init__(self, engine):
    self.engine = engine
    self._cond = threading.Condition()
    self._groups: dict = {}  # group key -> {bucket: deque[Handle]}
    self._scores: collections.deque = collections.deque()
    self._pool: _Pool | None = None
    self._seq = itertools.count()
    self._thread: threading.Thread | None = None
    self._stopping = False
    self._newest_admitted = -1  # the latest arrival (block count at submit) admitted so far
    self._texts: list = []  # (live, finish reason or None, ids, text): see `_hand_out`

  # -- submission (any thread) ------------------------------------------------------
  def submit(self, handle: Handle) -> Handle:
    """Queues a checked request (`Engine.check`); the loop admits it at a block boundary."""
    bucket = self.engine.bucket_of(len(handle.request.prompt_ids))
    with self._cond:
      handle.seq = next(self._seq)
      handle.submit_block = self.engine.stats.blocks
      queues = self._groups.setdefault(group_key(handle.request.options), {})
      queues.setdefault(bucket, collections.deque()).append(handle)
      self._cond.notify_all()
    return handle

  def submit_scores(self, requests: list) -> _ScoreJob:
    """Queues checked score requests; their `Scored` results (then None) arrive on `.results`."""
    job = _ScoreJob(list(requests))
    with self._cond:
      self._scores.append(job)
      self._cond.notify_all()
    return job

  def waiting(self) -> int:
    """Requests submitted and not yet admitted (cancelled ones until the next boundary),
    score requests included."""
    with self._cond:
      return (sum(len(q) for g in self._groups.values() for q in g.values())
              + sum(len(job.requests) for job in self._scores))

  def busy(self) -> int:
    """Slots holding a live request."""
    pool = self._pool
    return 0 if pool is None else sum(x is not None for x in pool.live)

  def idle(self) -> bool:
    return not self.waiting() and not self.busy() and not self._scores

  # -- the background loop (a server) --------------------------------------------------
  @property
  def running(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  def start(self) -> None:
    if self.running:
      return
    self._stopping = False
    self._thread = threading.Thread(target=self._loop, name='illada-scheduler', daemon=True)
    self._thread.start()

  def stop(self, timeout: float | None = None) -> None:
    """Ends the loop after its current block; unfinished requests end with a RuntimeError."""
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)
      self._thread = None
    self._fail_all(RuntimeError('the engine stopped'))

  def _loop(self) -> None:
    while not self._stopping:
      try:
        worked = self.step()
      except Exception as e:  # noqa: BLE001 (a device error ends the requests it touched)
        self._fail_all(e)
        continue
      if not worked:
        with self._cond:
          if not self._stopping and self.idle():
            self._cond.wait(0.1)

  def _fail_all(self, error: BaseException) -> None:
    self._hand_out()  # what finished before the error is still theirs
    with self._cond:
      handles = [h for g in self._groups.values() for q in g.values() for h in q]
      self._groups.clear()
      pool, self._pool = self._pool, None
      scores, self._scores = list(self._scores), collections.deque()
    if pool is not None:
      handles += [x.handle for x in pool.live if x is not None]
    for h in handles:
      h._emit(Event('', error=error))
    for job in scores:
      job.results.put(error)

  # -- one block boundary ------------------------------------------------------------
  def step(self) -> bool:
    """Runs pending scoring, else one block of the pool; False when there was nothing to do."""
    if self._scores:
      self._hand_out()
      self._run_scores(self._scores.popleft())
      return True
    start = time.perf_counter()
    try:
      with self._cond:
        pool = self._choose_pool()
        if pool is not None:
          self._release_cancelled(pool)
          admitted = self._admit(pool)
      if pool is None or not any(pool.live):
        return self._hand_out() or pool is not None
      self._run_block(pool, admitted)
      return True
    finally:
      self.engine.stats.seconds += time.perf_counter() - start

  def _run_scores(self, job: _ScoreJob) -> None:
    try:
      for scored in self.engine.score_batches(job.requests):
        job.results.put(scored)
      job.results.put(None)
    except Exception as e:  # noqa: BLE001 (handed to the waiting caller)
      job.results.put(e)

  def _drop_cancelled(self) -> None:
    for queues in self._groups.values():
      for b, q in queues.items():
        if any(h.cancelled for h in q):
          keep = collections.deque(h for h in q if not h.cancelled)
          for h in q:
            if h.cancelled:
              h._emit(Event('', completion=self._cancelled(h, [], 0)))
          queues[b] = keep

  def _choose_pool(self) -> _Pool | None:
    """The pool to run this block: the current one while it has live rows or waiting requests
    of its group, else a new one for the group of the oldest waiting request."""
    self._drop_cancelled()
    for key in [k for k, g in self._groups.items() if not any(g.values())]:
      del self._groups[key]
    pool = self._pool
    if pool is not None and (any(pool.live) or pool.key in self._groups):
      return pool
    heads = [(q[0].seq, key, q[0]) for key, g in self._groups.items() for q in g.values() if q]
    if not heads:
      self._pool = None
      return None
    _, key, head = min(heads, key=lambda t: t[0])
    self._pool = _Pool(key, head.request.options, 0, [None] * self.engine.slots)
    return self._pool

  def _release_cancelled(self, pool: _Pool) -> None:
    for s, x in enumerate(pool.live):
      if x is not None and x.handle.cancelled:
        pool.live[s] = None
        x.handle._emit(Event('', completion=self._cancelled(x.handle, x.tokens, x.steps)))

  def _cancelled(self, h: Handle, tokens, steps) -> Completion:
    self.engine.stats.cancelled += 1
    return Completion(h.id, '', [], 'cancelled', len(tokens), steps)

  def _admit(self, pool: _Pool) -> list:
    """Widens or restarts the pool's canvas as the waiting requests need; fills free slots,
    oldest request first. Returns the slots admitted."""
    queues = self._groups.get(pool.key, {})
    order = sorted(b for b in queues if queues[b])
    free = [s for s, x in enumerate(pool.live) if x is None]
    busy = len(pool.live) - len(free)
    if busy == 0:  # an empty pool restarts at the smallest bucket with requests
      if not order:
        return []
      if pool.bucket != order[0]:
        pool.bucket, pool.canvas = order[0], None
    larger = [b for b in order if b > pool.bucket]
    if free and busy and larger:
      new = self._wider(pool, queues, order, larger, len(free), busy)
      if new is not None:
        pool.canvas = self.widen(pool.canvas, pool.bucket, new)
        pool.bucket = new
        self.engine.stats.widenings += 1
    fits = [queues[b] for b in order if b <= pool.bucket]
    admitted = []
    for s in free:
      heads = [q for q in fits if q]
      if not heads:
        break
      h = min(heads, key=lambda q: q[0].seq).popleft()
      o, p = h.request.options, len(h.request.prompt_ids)
      pool.live[s] = _Live(h, self.engine.limit_blocks(o, p))
      admitted.append(s)
      self._newest_admitted = max(self._newest_admitted, h.submit_block)
    return admitted

  def _wider(self, pool: _Pool, queues, order, larger, free: int, busy: int) -> int | None:
    """The bucket to widen the pool to now, or None.

    When no waiting request fits, widen as soon as that moves more rows per
    computed column. A request that does not fit, has waited longer than two
    whole generations of its group (blocks run since it arrived) and has seen
    later arrivals admitted before it widens the pool to its bucket anyway, so
    a stream of short prompts cannot starve a long one. Requests that arrived
    together (an offline `generate`) never age: they run shortest bucket
    first, which computes the fewest columns, and the queue only drains.
    """
    g = pool.options.gen_length
    if not any(queues[b] for b in order if b <= pool.bucket):
      gain = min(free, sum(len(queues[b]) for b in larger))
      # Rows per column before and after widening: busy/(bucket+G) vs (busy+gain)/(new+G).
      if (busy + gain) * (pool.bucket + g) >= busy * (larger[0] + g):
        return larger[0]
    patience = 2 * pool.options.num_blocks
    blocks = self.engine.stats.blocks
    aged = [b for b in larger
            if queues[b][0].submit_block < self._newest_admitted
            and blocks - queues[b][0].submit_block > patience]
    return aged[-1] if aged else None

  def widen(self, canvas, bucket: int, new: int):
    """The pool's canvas with `new - bucket` idle columns put before every row."""
    key = (bucket, new)
    wideners = self.engine._wideners
    if key not in wideners:
      pad = (self.engine.cfg.pad_token_id, 0, False, True, -1)
      def widen(c):
        cols = lambda a, v: jnp.pad(a, ((0, 0), (new - bucket, 0)), constant_values=v)
        return c.replace(**{f: cols(getattr(c, f), v) for f, v in zip(_COLUMN_FIELDS, pad)})
      wideners[key] = jax.jit(widen)
    return wideners[key](canvas)

  def _run_block(self, pool: _Pool, admitted: list) -> None:
    eng, n, bucket = self.engine, len(pool.live), pool.bucket
    w = pool.options.block_length
    admit = np.zeros((n,), bool)
    rows = [()] * n
    seeds, temps = np.zeros((n,), np.uint32), np.zeros((n,), np.float32)
    limits = np.zeros((n,), np.int32)
    for s in admitted:
      x = pool.live[s]
      admit[s], rows[s] = True, x.request.prompt_ids
      seeds[s] = x.request.seed % 2 ** 32
      temps[s] = x.request.options.temperature
      limits[s] = x.limit_blocks * w
    active = np.array([x is not None for x in pool.live])
    sampled = any(x is not None and x.request.options.temperature > 0 for x in pool.live)
    if pool.canvas is None:
      pool.canvas = eng.put(eng.idle_canvas(pool.options, n, bucket))
    prompt, mask = prompts.left_pad(rows, eng.cfg.pad_token_id, width=bucket)
    program = eng.program(pool.options.replace(temperature=float(sampled)), bucket)
    inputs = eng.put((admit, prompt, mask, seeds, temps, limits, active))
    pool.canvas, block_BW, calls_B = program(eng.params, pool.canvas, *inputs)
    wait = time.perf_counter()
    # While the device computes this block, the previous block's texts go out: decoding
    # and handing them over (a server's stream chunks) keeps the device waiting no more.
    self._hand_out()
    block_BW, calls_B = np.asarray(block_BW).tolist(), np.asarray(calls_B).tolist()
    now = time.perf_counter()
    eng.stats.wait_seconds += now - wait
    eng.stats.blocks += 1
    for s, x in enumerate(pool.live):
      if x is None:
        continue
      x.tokens.extend(block_BW[s])
      x.steps = calls_B[s]
      if x.handle.first_block is None:
        x.handle.first_block = now
      reason, ids, text = self._verdict(x)
      if reason is not None:  # its slot is free for the next block's admissions
        pool.live[s] = None
        eng.stats.requests += 1
        eng.stats.output_tokens += len(ids)
        eng.stats.generated_tokens += len(x.tokens)
        self._texts.append((x, reason, ids, text))
      elif x.handle.stream and not x.request.options.after_think:
        self._texts.append((x, None, ids, text))

  # -- text and stops ------------------------------------------------------------------
  def _verdict(self, x: _Live) -> tuple[str | None, list, str | None]:
    """(the finish reason if the request is done after its latest block, else None; the ids
    behind its text so far; that text where it had to be decoded: only stop strings need it
    to tell whether the request is done)."""
    req, gen, eng = x.request, x.tokens, self.engine
    end = next((i for i, t in enumerate(gen) if t in eng.end_ids), None)
    ids = gen if end is None else gen[:end]
    limit = req.max_new_tokens
    if limit is not None:
      ids = ids[:limit]
    text = eng.decode(ids) if req.stop else None
    cut = None if not req.stop else prompts.cut_at_stops(text, req.stop)
    if cut is not None and len(cut) < len(text):
      return 'stop', self._ids_behind(ids, cut), cut
    if end is not None and (limit is None or end <= limit):
      return 'eos', list(ids), text
    if ((limit is not None and len(gen) >= limit)
        or len(gen) >= x.limit_blocks * req.options.block_length):
      return 'length', list(ids), text
    return None, list(ids), text

  def _hand_out(self) -> bool:
    """Emits what the last block's `_verdict`s left: each finished request's completion, and
    each streamed request's new text (all of it but what `held_back` keeps). Runs while the
    next block computes; a request that ended meanwhile (cancelled, failed) gets nothing
    more. Returns whether there was anything."""
    texts, self._texts = self._texts, []
    for x, reason, ids, text in texts:
      if x.handle.done:
        continue
      try:
        self._hand_out_one(x, reason, ids, text)
      except Exception as e:  # noqa: BLE001 (its text failed: that request alone ends)
        x.handle._emit(Event('', error=e))
    return bool(texts)

  def _hand_out_one(self, x: _Live, reason: str | None, ids: list, text: str | None) -> None:
    h, req = x.handle, x.request
    text = self.engine.decode(ids) if text is None else text
    if reason is not None:
      if req.options.after_think:
        text = end_think.answer(text, req.options.end_think, self.engine.tokenizer)
      done = Completion(id=req.id, text=text, token_ids=ids, finish_reason=reason,
                        generated=len(x.tokens), steps=x.steps)
      h._emit(Event(text[len(h._sent):] if h.stream else '', completion=done))
      return
    safe = text[:len(text) - held_back(text, req.stop)]
    if len(safe) > len(h._sent) and safe.startswith(h._sent):
      delta, h._sent = safe[len(h._sent):], safe
      h._emit(Event(delta))

  def _ids_behind(self, ids, text: str) -> list:
    """The shortest prefix of `ids` whose text covers `text` (binary search on decoded length)."""
    lo, hi = 0, len(ids)
    while lo < hi:
      mid = (lo + hi) // 2
      if len(self.engine.decode(ids[:mid])) >= len(text):
        hi = mid
      else:
        lo = mid + 1
    return list(ids[:lo])
