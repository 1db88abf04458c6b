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
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from illada_jax import end_think, prompts, sampling, scoring, sharding
from illada_jax.config import ModelConfig
from illada_jax.sampling import SamplingOptions
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
class Completion:
  """A finished request: `text` is cut at EOS/EOT, `max_new_tokens` and the first stop string
  (then, with `options.after_think`, reduced to what follows the end-of-thinking marker).

  finish_reason: 'eos' (EOS/EOT), 'stop' (a stop string), 'length' (max new
  tokens or the generation limit). token_ids: the ids behind `text` (before
  `after_think`: the whole completion).
  generated: positions the sampler denoised for this request (whole blocks).
  steps: model calls in which the request had masked positions.
  """
  id: Any
  text: str
  token_ids: list[int]
  finish_reason: str
  generated: int
  steps: int


@dataclasses.dataclass
class EngineStats:
  """Counters since the engine was made (seconds are wall time)."""
  compiles: int = 0
  blocks: int = 0  # block programs run
  widenings: int = 0  # pools widened to a larger bucket with requests live
  requests: int = 0
  output_tokens: int = 0  # tokens behind the returned texts
  generated_tokens: int = 0  # positions denoised for finished requests
  wait_seconds: float = 0.  # host blocked on the device
  seconds: float = 0.  # wall time inside `generate`

  @property
  def host_share(self) -> float:
    """Fraction of wall time the host spent outside device waits (dispatch, admission, stops)."""
    return 1. - self.wait_seconds / self.seconds if self.seconds else 0.


# Per-column canvas fields and the value of an idle column (pad token, position 0, hidden,
# counted as prompt, never committed), in `Engine._widen`'s order.
_COLUMN_FIELDS = ('x_BL', 'pos_BL', 'visible_BL', 'prompt_BL', 'step_BL')


@dataclasses.dataclass
class _Live:
  request: Request
  limit_blocks: int
  tokens: list = dataclasses.field(default_factory=list)
  steps: int = 0


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
    for done in engine.generate(requests):   # in completion order
      print(done.id, done.text)

  `params` may live on a mesh: slots are split over its data/fsdp axes
  (`slots` must be divisible by their product). `tokenizer` (with `decode`
  and `vocab_size`) is needed for stop strings; ids >= its `vocab_size`
  (padded embedding rows) are never sampled. `buckets` are the static
  prompt lengths (default: powers of two up to `cfg.max_len`).
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
    self._ends = {t for t in (cfg.eos_token_id, cfg.eot_token_id) if t is not None}

  # -- settings --------------------------------------------------------------
  def options_for(self, options: SamplingOptions) -> SamplingOptions:
    """`options` with the tokenizer's vocabulary limit filled in and a text
    end-of-thinking marker encoded by the tokenizer (when the boost is on).

    Variable length: `gen_length` is capped in whole blocks at the model's window
    (a prompt of one token and as many blocks as fit), so no canvas is built
    beyond it. Raises ValueError (naming the field) for a marker that cannot
    be encoded, or a block that leaves no room for a prompt.
    """
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

  def _program(self, o: SamplingOptions, bucket: int):
    key = (o.program_key(), bucket)
    if key not in self._programs:
      def count():
        self.stats.compiles += 1
      self._programs[key] = block_program(self.cfg, o, bucket, self.mesh, count)
    return self._programs[key]

  def _put(self, tree):
    """Device arrays, the slot axis split over the mesh's batch axes."""
    if self.mesh is None:
      return jax.device_put(tree)
    def place(a):
      names = ('act_batch',) + (None,) * (np.ndim(a) - 1) if np.ndim(a) else ()
      return jax.device_put(a, jax.NamedSharding(self.mesh, sharding.logical_to_spec(names)))
    return jax.tree.map(place, tree)

  # -- generation --------------------------------------------------------------
  def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
    """Runs every request; yields each `Completion` as soon as its request is done.

    Raises ValueError for a request that cannot run (see `check`) before
    anything is computed.
    """
    groups: dict = collections.OrderedDict()
    for req in requests:
      req = dataclasses.replace(req, options=self.options_for(req.options))
      self.check(req)
      key = req.options.program_key()
      groups.setdefault(key, collections.defaultdict(collections.deque))
      groups[key][self.bucket_of(len(req.prompt_ids))].append(req)
    start = time.perf_counter()
    try:
      for group, queues in groups.items():
        yield from self._run_group(group, queues)
    finally:
      self.stats.seconds += time.perf_counter() - start

  def _limit_blocks(self, o: SamplingOptions, p: int) -> int:
    if o.variable_length:
      return min(o.num_blocks, (self.cfg.max_len - p) // o.block_length)
    return o.num_blocks

  def _widen(self, canvas, bucket: int, new: int):
    """The pool's canvas with `new - bucket` idle columns put before every row."""
    key = (bucket, new)
    if key not in self._wideners:
      pad = (self.cfg.pad_token_id, 0, False, True, -1)
      def widen(c):
        cols = lambda a, v: jnp.pad(a, ((0, 0), (new - bucket, 0)), constant_values=v)
        return c.replace(**{f: cols(getattr(c, f), v) for f, v in zip(_COLUMN_FIELDS, pad)})
      self._wideners[key] = jax.jit(widen)
    return self._wideners[key](canvas)

  def _run_group(self, o: SamplingOptions, queues) -> Iterator[Completion]:
    """Continuous batching of one settings group, from its smallest bucket to its largest.

    The pool starts at the smallest bucket with requests. When no waiting
    request fits the current width and slots are free, the canvas is widened
    to the next bucket (idle columns before the prompts: positions and key
    masks are per row, so live rows compute the same tokens) as soon as that
    moves more rows per computed column; the pool drains only once, at the end.
    """
    order = sorted(b for b in queues if queues[b])
    if not order:
      return
    n, w, g = self.slots, o.block_length, o.gen_length
    bucket = order[0]
    canvas = None
    live: list[_Live | None] = [None] * n
    while True:
      free = [s for s in range(n) if live[s] is None]
      fits = [queues[b] for b in order if b <= bucket and queues[b]]
      larger = [b for b in order if b > bucket and queues[b]]
      if free and not fits and larger:
        busy, waiting = n - len(free), sum(len(queues[b]) for b in larger)
        gain = min(len(free), waiting)
        # Rows per column before and after widening: (busy)/(bucket+G) vs (busy+gain)/(new+G).
        if busy == 0 or (busy + gain) * (bucket + g) >= busy * (larger[0] + g):
          if busy:
            canvas = self._widen(canvas, bucket, larger[0])
            self.stats.widenings += 1
          else:
            canvas = None
          bucket = larger[0]
          fits = [queues[b] for b in order if b <= bucket and queues[b]]
      if canvas is None:
        canvas = self._put(block_inputs(self.cfg, o, n, bucket)[0])
      program = self._program(o, bucket)
      admit = np.zeros((n,), bool)
      rows, seeds, temps = [[] for _ in range(n)], np.zeros((n,), np.uint32), np.zeros((n,), np.float32)
      limits = np.zeros((n,), np.int32)
      for s in free:
        source = next((q for q in fits if q), None)
        if source is None:
          break
        req = source.popleft()
        live[s] = _Live(req, self._limit_blocks(req.options, len(req.prompt_ids)))
        admit[s] = True
        rows[s] = req.prompt_ids
        seeds[s] = req.seed % 2 ** 32
        temps[s] = req.options.temperature
        limits[s] = live[s].limit_blocks * w
      if not any(live):
        break
      prompt, mask = prompts.left_pad(rows, self.cfg.pad_token_id, width=bucket)
      active = np.array([x is not None for x in live])
      inputs = self._put((admit, prompt, mask, seeds, temps, limits, active))
      canvas, block_BW, calls_B = program(self.params, canvas, *inputs)
      wait = time.perf_counter()
      block_BW, calls_B = np.asarray(block_BW).tolist(), np.asarray(calls_B).tolist()
      self.stats.wait_seconds += time.perf_counter() - wait
      self.stats.blocks += 1
      for s, x in enumerate(live):
        if x is None:
          continue
        x.tokens.extend(block_BW[s])
        x.steps = calls_B[s]
        done = self._finish(x)
        if done is not None:
          live[s] = None
          self.stats.requests += 1
          self.stats.output_tokens += len(done.token_ids)
          self.stats.generated_tokens += done.generated
          yield done

  def _finish(self, x: _Live) -> Completion | None:
    """The completion if the request is done after its latest block, else None."""
    req, gen = x.request, x.tokens
    end = next((i for i, t in enumerate(gen) if t in self._ends), None)
    ids = gen if end is None else gen[:end]
    limit = req.max_new_tokens
    if limit is not None:
      ids = ids[:limit]
    text = self._decode(ids) if req.stop else None
    cut = None if text is None else prompts.cut_at_stops(text, req.stop)
    if cut is not None and len(cut) < len(text):
      reason, text = 'stop', cut
      ids = self._ids_behind(ids, text)
    elif end is not None and (limit is None or end <= limit):
      reason = 'eos'
    elif ((limit is not None and len(gen) >= limit)
          or len(gen) >= x.limit_blocks * req.options.block_length):
      reason = 'length'
    else:
      return None
    if text is None:
      text = self._decode(ids)
    if req.options.after_think:
      text = end_think.answer(text, req.options.end_think, self.tokenizer)
    return Completion(id=req.id, text=text, token_ids=list(ids), finish_reason=reason,
                      generated=len(gen), steps=x.steps)

  def _decode(self, ids) -> str:
    if self.tokenizer is None:
      return ''
    return self.tokenizer.decode(ids)

  def _ids_behind(self, ids, text: str) -> list:
    """The shortest prefix of `ids` whose text covers `text` (binary search on decoded length)."""
    lo, hi = 0, len(ids)
    while lo < hi:
      mid = (lo + hi) // 2
      if len(self._decode(ids[:mid])) >= len(text):
        hi = mid
      else:
        lo = mid + 1
    return list(ids[:lo])

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
    a request that cannot be scored, before anything is computed.
    """
    groups: dict = collections.OrderedDict()
    for req in requests:
      self.check_score(req)
      prefix, suffix = self._score_row(req.options)
      pair = (req.context_ids, req.continuation_ids)
      length = self.bucket_of(scoring.row_length(self.cfg, pair, prefix, suffix))
      answer = min(length, 1 << max(3, (len(req.continuation_ids) - 1).bit_length()))
      groups.setdefault((req.options, length, answer), []).append(req)
    start = time.perf_counter()
    try:
      for (o, length, answer), reqs in groups.items():
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
    finally:
      self.stats.seconds += time.perf_counter() - start
