"""Continuous batching for masked-diffusion sampling: the engine behind jobs and lm-eval.

A pool of `slots` rows shares one static canvas of `P + G` columns (`P` a
prompt-length bucket, `G` the generation length of the settings group).
Advancing every slot by one block is one jitted program (`block_program`):
it writes newly admitted prompts into their slots, denoises each active
slot's current block (`sampling.denoise_block`) and rotates the rows so that
the next block comes to the same columns. Between programs the host only
admits requests into free slots, checks stops (EOS/EOT, stop strings in the
decoded text, max new tokens, the length limit) and hands finished requests
out; a request leaves as soon as it is done, and a long one never holds the
others back (SGLang's diffusion-LM scheduler releases early the same way).
A pool starts at its smallest prompt bucket and is widened to the next one
when the waiting requests no longer fit, so it drains only once.

Programs are keyed by (settings group, bucket): settings that change the
program (`SamplingOptions.program_key`) group requests; stop strings, max new
tokens, seed and temperature are per-request data. Each slot keeps its own
RoPE positions (`0..p-1` for its prompt), key mask and seed, so a request's
tokens do not depend on its batch companions, its slot, or when it was
admitted (SPEC §2, per-request independence).

Who runs at each block boundary is decided by `illada_jax.scheduler`, the one
loop behind offline generation (`generate`, jobs, lm-eval) and the server
(`start` + `submit`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import queue
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from illada_jax import end_think, sampling, scoring, sharding
from illada_jax.config import ModelConfig
from illada_jax.sampling import SamplingOptions
from illada_jax.scheduler import Completion, Event, Handle, Scheduler  # noqa: F401 (engine API)
from illada_jax.scoring import ScoreRequest, Scored, ScoringOptions  # noqa: F401 (engine API)

DEFAULT_SLOTS = 64


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
  """Powers of two from `smallest` up to (and including) `max_len`."""
  out, b = [], smallest
  while b < max_len:
    out.append(b)
    b *= 2
  return tuple(out) + (max_len,)


@dataclasses.dataclass(frozen=True)
class Request:
  """One generation request.

  prompt_ids: the prompt's token ids, as the model should see them (BOS and
    chat template already applied).
  options: the sampling settings; requests with equal `options.program_key()`
    share programs.
  stop: stop strings, matched on the decoded text after every block.
  max_new_tokens: the completion is cut to this many tokens (None: the
    generation length).
  seed: the request's random stream (`jax.random.key(seed)`, mod 2^32).
  """
  id: Any
  prompt_ids: tuple[int, ...]
  options: SamplingOptions
  stop: tuple[str, ...] = ()
  max_new_tokens: int | None = None
  seed: int = 0


@dataclasses.dataclass
class EngineStats:
  """Counters since the engine was made (seconds are wall time)."""
  compiles: int = 0
  blocks: int = 0  # block programs run
  widenings: int = 0  # pools widened to a larger bucket with requests live
  requests: int = 0  # finished (not cancelled) generation requests
  cancelled: int = 0
  output_tokens: int = 0  # tokens behind the returned texts
  generated_tokens: int = 0  # positions denoised for finished requests
  wait_seconds: float = 0.  # from a block's dispatch to its results (work done meanwhile too)
  seconds: float = 0.  # wall time inside scheduler steps (idle waits of a server excluded)

  @property
  def host_share(self) -> float:
    """Fraction of wall time with no block on the device (admission, dispatch, finish checks):
    the host work between blocks. Work done while a block computes is not counted."""
    return 1. - self.wait_seconds / self.seconds if self.seconds else 0.


def _block_program(cfg: ModelConfig, mesh, o: SamplingOptions, bucket: int, count: Callable,
                   params, c: sampling.Canvas, admit_B, prompt_BP, mask_BP, seed_B, temp_B,
                   limit_B, active_B):
  count()  # runs once per trace: the compile counter
  with sharding.activation_sharding(mesh):
    w = o.block_length
    pad_B = bucket - mask_BP.sum(-1, dtype=jnp.int32)
    pos_BP = jnp.arange(bucket, dtype=jnp.int32)[None] - pad_B[:, None]  # prompt starts at 0
    fresh = sampling.new_canvas(cfg, o, prompt_BP, mask_BP, seed_B, temp_B, pos_BP, limit_B)
    pick = lambda new, old: (jnp.where(admit_B.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
                             if new.ndim else old)
    c = jax.tree.map(pick, fresh, c)
    if o.variable_length:
      c = sampling.reveal_block(c, active_B, bucket, w)
    c = sampling.denoise_block(cfg, params, o, c, active_B, bucket)
    block_BW = c.x_BL[:, bucket:bucket + w]
    return sampling.roll(c, w).replace(blk_B=c.blk_B + 1), block_BW, c.calls_B


def block_program(cfg: ModelConfig, options: SamplingOptions, bucket: int, mesh=None,
                  on_compile: Callable = lambda: None):
  """The jitted program that advances every slot of a pool by one block.

  `(params, canvas, admit_B, prompt_BP, mask_BP, seed_B, temp_B, limit_B, active_B)
  -> (canvas, block_BW, calls_B)`: rows with `admit_B` restart from the
  left-padded prompt `prompt_BP` / `mask_BP` (`P = bucket`) with their seed,
  temperature and generation limit in tokens (SPEC §2: it differs by prompt
  length under variable length; the end-of-thinking boost reads it); then the
  current block of every `active_B` row is denoised and returned (int32
  `[B, W]`), and the canvas (donated) is rotated by one block.
  `options.gen_length` is the canvas's `G`.
  """
  o = options.program_key()
  fn = functools.partial(_block_program, cfg, mesh, o, bucket, on_compile)
  return jax.jit(fn, donate_argnums=(1,))


def empty_canvas(cfg: ModelConfig, options: SamplingOptions, slots: int, bucket: int
                 ) -> sampling.Canvas:
  """An all-inactive pool canvas (NumPy; placed by the caller)."""
  return jax.tree.map(np.asarray, sampling.new_canvas(
      cfg, options, jnp.zeros((slots, bucket), jnp.int32), jnp.zeros((slots, bucket), bool),
      jnp.zeros((slots,), jnp.uint32), jnp.zeros((slots,), jnp.float32)))


def block_inputs(cfg: ModelConfig, options: SamplingOptions, slots: int, bucket: int):
  """NumPy zeros for `block_program`'s inputs after `params`: an idle pool."""
  n = slots
  return (empty_canvas(cfg, options, n, bucket), np.zeros((n,), bool),
          np.zeros((n, bucket), np.int32), np.zeros((n, bucket), bool),
          np.zeros((n,), np.uint32), np.zeros((n,), np.float32), np.zeros((n,), np.int32),
          np.zeros((n,), bool))


def abstract_block_inputs(cfg: ModelConfig, options: SamplingOptions, slots: int, bucket: int,
                          mesh=None):
  """`jax.ShapeDtypeStruct`s of `block_program`'s inputs after `params`, slots split over
  the mesh's batch axes: with `model.abstract_params`, enough to compile ahead of time."""
  def spec(a):
    if mesh is None:
      return jax.ShapeDtypeStruct(np.shape(a), a.dtype)
    names = ('act_batch',) + (None,) * (np.ndim(a) - 1) if np.ndim(a) else ()
    return jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=jax.NamedSharding(
        mesh, sharding.logical_to_spec(names)))
  return jax.tree.map(spec, block_inputs(cfg, options, slots, bucket))


class Engine:
  """Continuously batched generation over a fixed pool of slots.

    engine = Engine(cfg, params, tokenizer=tok, slots=64)
    for done in engine.generate(requests):   # offline, in completion order
      print(done.id, done.text)

    engine.start()                           # online: a thread runs the scheduler
    handle = engine.submit(request, stream=True)
    for event in handle: print(event.text, end='')   # block by block
    engine.stop()

  `params` may live on a mesh: slots are split over its data/fsdp axes
  (`slots` must be divisible by their product). `tokenizer` (with `decode`
  and `vocab_size`) is needed for stop strings and streaming; ids >= its
  `vocab_size` (padded embedding rows) are never sampled. `buckets` are the
  static prompt lengths (default: powers of two up to `cfg.max_len`).
  """

  def __init__(self, cfg: ModelConfig, params, *, tokenizer=None, slots: int = DEFAULT_SLOTS,
               buckets: Sequence[int] | None = None):
    self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
    self.mesh = sharding.mesh_of(params)
    multiple = 1 if self.mesh is None else self.mesh.shape['data'] * self.mesh.shape['fsdp']
    if slots <= 0 or slots % multiple:
      raise ValueError(f'engine: slots={slots} must be a positive multiple of the mesh '
                       f'batch axes (data x fsdp = {multiple})')
    self.slots = slots
    self.buckets = tuple(sorted(set(buckets or default_buckets(cfg.max_len))))
    self.stats = EngineStats()
    self._programs: dict = {}
    self._wideners: dict = {}
    self._resolved: dict = {}  # options_for's results: requests share a handful of options
    self.end_ids = frozenset(cfg.end_token_ids)  # every EOS id the checkpoint declares, EOT
    self.scheduler = Scheduler(self)

  # -- settings --------------------------------------------------------------
  def options_for(self, options: SamplingOptions) -> SamplingOptions:
    """`options` with the tokenizer's vocabulary limit filled in and a text
    end-of-thinking marker encoded by the tokenizer (when the boost is on).

    Variable length: `gen_length` is capped in whole blocks at the model's window
    (a prompt of one token and as many blocks as fit), so no canvas is built
    beyond it. Raises ValueError (naming the field) for a marker that cannot
    be encoded, or a block that leaves no room for a prompt.
    """
    if options not in self._resolved:
      self._resolved[options] = self._resolve(options)
    return self._resolved[options]

  def _resolve(self, options: SamplingOptions) -> SamplingOptions:
    if options.variable_length and options.gen_length >= self.cfg.max_len:
      cap = (self.cfg.max_len - 1) // options.block_length * options.block_length
      if cap <= 0:
        raise ValueError(f'SamplingOptions.block_length: {options.block_length} leaves no '
                         f'room for a prompt within max_len {self.cfg.max_len}')
      options = options.replace(gen_length=cap)
    options = end_think.resolve(options, self.tokenizer)
    end_think.check_ids(options, self.cfg.vocab_size)
    size = getattr(self.tokenizer, 'vocab_size', None)
    if options.vocab_limit is None and size is not None and size < self.cfg.vocab_size:
      return options.replace(vocab_limit=size)
    return options

  def bucket_of(self, prompt_len: int) -> int:
    """The smallest bucket that holds `prompt_len` tokens; ValueError if none does."""
    for b in self.buckets:
      if prompt_len <= b:
        return b
    raise ValueError(f'prompt of {prompt_len} tokens is longer than the largest bucket '
                     f'{self.buckets[-1]} (model max_len {self.cfg.max_len})')

  def check(self, request: Request) -> None:
    """Raises ValueError (naming the reason) if the request cannot run."""
    p, o = len(request.prompt_ids), request.options
    if p == 0:
      raise ValueError('empty prompt')
    self.bucket_of(p)
    if o.variable_length:
      if (self.cfg.max_len - p) // o.block_length <= 0:
        raise ValueError(f'prompt of {p} tokens leaves no whole block of {o.block_length} '
                         f'before max_len {self.cfg.max_len}')
    elif p + o.gen_length > self.cfg.max_len:
      raise ValueError(f'prompt of {p} tokens + gen_length {o.gen_length} exceeds max_len '
                       f'{self.cfg.max_len}')
    elif o.cache == 'prefix':
      # The prefix window (block + visible suffix) would differ per row. Under variable
      # length nothing after the block is visible, and prefix runs as dual.
      raise ValueError("cache='prefix' needs variable_length in the engine; use cache='dual', "
                       'or sample() for fixed-length prefix caching')
    if request.stop and self.tokenizer is None:
      raise ValueError('stop strings need a tokenizer')
    if o.after_think and self.tokenizer is None:
      raise ValueError('SamplingOptions.after_think needs a tokenizer')

  def limit_blocks(self, o: SamplingOptions, prompt_len: int) -> int:
    """Blocks a request may generate: all of them, or under variable length those that fit
    before `max_len` (SPEC §2)."""
    if o.variable_length:
      return min(o.num_blocks, (self.cfg.max_len - prompt_len) // o.block_length)
    return o.num_blocks

  def program(self, o: SamplingOptions, bucket: int):
    """The (cached) jitted block program of `o`'s settings at prompt bucket `bucket`."""
    key = (o.program_key(), bucket)
    if key not in self._programs:
      def count():
        self.stats.compiles += 1
      self._programs[key] = block_program(self.cfg, o, bucket, self.mesh, count)
    return self._programs[key]

  def idle_canvas(self, o: SamplingOptions, slots: int, bucket: int):
    return block_inputs(self.cfg, o, slots, bucket)[0]

  def put(self, tree):
    """Device arrays, the slot axis split over the mesh's batch axes."""
    if self.mesh is None:  # jit places host arrays itself, faster than a device_put first
      return tree
    def place(a):
      names = ('act_batch',) + (None,) * (np.ndim(a) - 1) if np.ndim(a) else ()
      return jax.device_put(a, jax.NamedSharding(self.mesh, sharding.logical_to_spec(names)))
    return jax.tree.map(place, tree)

  def decode(self, ids) -> str:
    return '' if self.tokenizer is None else self.tokenizer.decode(ids)

  def warmup(self, options: SamplingOptions, max_bucket: int | None = None) -> int:
    """Compiles and runs once, on an idle pool, the block programs of `options`' settings
    group for every bucket up to `max_bucket` (argmax and sampling) and the widenings
    between them. Returns the block programs compiled."""
    before = self.stats.compiles
    o = self.options_for(options)
    buckets = [b for b in self.buckets if b <= (max_bucket or self.buckets[-1])]
    for i, bucket in enumerate(buckets):
      for t in (0., 1.):
        # A pool's first block gets a placed canvas, later ones the program's own output:
        # both kinds of argument are compiled here.
        canvas, *rest = self.put(block_inputs(self.cfg, o, self.slots, bucket))
        program = self.program(o.replace(temperature=t), bucket)
        for _ in range(2):
          canvas = jax.block_until_ready(program(self.params, canvas, *rest))[0]
        for wider in buckets[i + 1:]:  # the pool's widenings, compiled on first use else
          jax.block_until_ready(self.scheduler.widen(canvas, bucket, wider))
    return self.stats.compiles - before

  # -- generation --------------------------------------------------------------
  def prepare(self, request: Request) -> Request:
    """The request with `options_for` applied, checked (ValueError naming the reason)."""
    request = dataclasses.replace(request, options=self.options_for(request.options))
    self.check(request)
    return request

  def submit(self, request: Request, *, stream: bool = False, on_event=None) -> Handle:
    """Queues one request (thread-safe) and returns its `Handle` (see `scheduler.Handle`).

    It runs once a scheduler steps: `start()`'s thread, or a `generate` call.
    Raises ValueError (naming the reason) for a request that cannot run.
    """
    handle = Handle(self.prepare(request), stream=stream, on_event=on_event)
    return self.scheduler.submit(handle)

  def start(self) -> None:
    """Runs the scheduler on a background thread (a server): submitted requests run as
    soon as slots free up, at block boundaries."""
    self.scheduler.start()

  def stop(self, timeout: float | None = None) -> None:
    """Stops the background scheduler; requests still queued or live end with an error."""
    self.scheduler.stop(timeout)

  def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
    """Runs every request; yields each `Completion` as soon as its request is done.

    Raises ValueError for a request that cannot run (see `check`) before
    anything is computed. The requests go through the scheduler: on this
    thread, or on `start()`'s thread when it runs. Requests not yet done when
    the caller stops iterating are cancelled.
    """
    reqs = [self.prepare(r) for r in requests]
    done: queue.SimpleQueue = queue.SimpleQueue()
    def deliver(event):
      if event.completion is not None or event.error is not None:
        done.put(event)
    handles = [self.scheduler.submit(Handle(r, on_event=deliver)) for r in reqs]
    left = len(handles)
    try:
      while left:
        if done.empty() and not self.scheduler.running:
          if not self.scheduler.step() and done.empty():
            raise RuntimeError('engine: the scheduler has nothing to run but requests are not done')
          continue
        event = done.get()
        left -= 1
        if event.error is not None:
          raise event.error
        yield event.completion
    finally:
      for h in handles:
        if not h.done:
          h.cancel()
      if not self.scheduler.running:
        self.scheduler.step()  # frees the cancelled rows now

  # -- scoring -----------------------------------------------------------------
  def _score_row(self, o: ScoringOptions) -> tuple[tuple, tuple]:
    return scoring.affixes(self.cfg, o.add_bos, o.padd_eos)

  def check_score(self, request: ScoreRequest) -> None:
    """Raises ValueError (naming the reason) if the request cannot be scored."""
    if not request.continuation_ids:
      raise ValueError('empty continuation')
    prefix, suffix = self._score_row(request.options)
    self.bucket_of(scoring.row_length(
        self.cfg, (request.context_ids, request.continuation_ids), prefix, suffix))

  def score(self, requests: Iterable[ScoreRequest]) -> Iterator[Scored]:
    """Scores every request in static batches bucketed by row and answer length.

    Rows per call: `slots` (confidence) or `slots // mc_batch` requests of
    `mc_batch` rows (MC); a short batch is filled with copies whose scores
    are dropped. With `check_greedy`, the same batch also gets its
    `is_greedy` flags. Yields results batch by batch. Raises ValueError for
    a request that cannot be scored, before anything is computed. Runs on
    the scheduler's thread between blocks when it runs, else on this one.
    """
    reqs = list(requests)
    for req in reqs:
      self.check_score(req)
    if not self.scheduler.running:
      yield from self.score_batches(reqs)
      return
    job = self.scheduler.submit_scores(reqs)
    while (item := job.results.get()) is not None:
      if isinstance(item, BaseException):
        raise item
      yield item

  def score_batches(self, reqs: list[ScoreRequest]) -> Iterator[Scored]:
    """`score`'s computation on checked requests (called by the scheduler)."""
    groups: dict = collections.OrderedDict()
    for req in reqs:
      prefix, suffix = self._score_row(req.options)
      pair = (req.context_ids, req.continuation_ids)
      length = self.bucket_of(scoring.row_length(self.cfg, pair, prefix, suffix))
      answer = min(length, 1 << max(3, (len(req.continuation_ids) - 1).bit_length()))
      groups.setdefault((req.options, length, answer), []).append(req)
    start = time.perf_counter()
    try:
      for (o, length, answer), group in groups.items():
        yield from self._score_group(o, length, answer, group)
    finally:
      self.stats.seconds += time.perf_counter() - start

  def _score_group(self, o: ScoringOptions, length: int, answer: int, reqs: list):
    per_call = max(1, self.slots // o.mc_batch) if o.method == 'mc' else self.slots
    self.stats.compiles += 1  # one static signature per (options, length, answer)
    for lo in range(0, len(reqs), per_call):
      part = reqs[lo:lo + per_call]
      full = part + [part[-1]] * (per_call - len(part))
      pairs = [(r.context_ids, r.continuation_ids) for r in full]
      rows = dict(add_bos=o.add_bos, padd_eos=o.padd_eos, cfg_scale=o.cfg_scale,
                  length=length, answer=answer)
      if o.method == 'mc':
        out = scoring.mc_log_likelihood(
            self.cfg, self.params, pairs, mc_num=o.mc_num, batch_size=o.mc_batch,
            seeds=[r.seed for r in full], **rows)
      else:
        out = scoring.confidence_score(self.cfg, self.params, pairs, **rows)
      greedy = [None] * len(part)
      if o.check_greedy:
        greedy = [bool(g) for g in scoring.greedy_match(self.cfg, self.params, pairs, **rows)]
      self.stats.blocks += 1
      for r, value, g in zip(part, out, greedy):
        self.stats.requests += 1
        yield Scored(r.id, float(value), g)
