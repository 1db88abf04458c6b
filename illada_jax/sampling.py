"""Masked-diffusion sampling: the reverse process of SPEC §2.

One block is the unit of work. `denoise_block` fills the current block of
every active row of a `Canvas` (`B` rows of `L` positions):

* fixed schedule: `steps_per_block` steps; step `i` commits
  `k_i = M // S + (i < M % S)` tokens per row, `M` the row's masked count at
  the block's start;
* confidence threshold (`threshold`): every masked position with confidence
  >= tau is committed (at least the most confident one) until the block is
  full (Fast-dLLM);
* approximate KV cache (`cache='prefix'|'dual'`): the K/V of positions
  outside the recomputed window come from the last full pass (at the block's
  start, or every `cache_refresh` steps).

The current block always sits at the same columns `[P, P + W)` of the canvas:
after each block every row is rotated left by `W` (`jnp.roll`), and every
column carries its RoPE position and key-mask bit with it. Attention is fully
bidirectional, so the order of the columns is immaterial. Static slices replace
per-block dynamic ones, and rows that are at different blocks (the continuous
batching engine, `illada_jax.engine`) share one program.

`sample` / `generate` run all blocks of a batch as one jitted program (a
`lax.scan` over blocks). With `variable_length`, block `b` becomes visible
(key mask) only when it is appended and each row stops at its own EOS / EOT.
The LM head runs only on the current block. Candidates are argmax (T = 0) or
float32 Gumbel-max (T > 0); confidences are `softmax(logits)[x0]` or uniform.
With `end_think_boost > 0`, every step of every mode first adds the
end-of-thinking bonus (`illada_jax.end_think`, SPEC §2) to the block's logits.

Random draws are keyed per row: step `i` of block `b` of a row with seed `s`
uses `fold_in(fold_in(jax.random.key(s), b), i)`, so a row's result does not
depend on the rows beside it (SPEC §2, per-request independence).
`sample(seeds=...)` gives rows the seeds that the engine gives requests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from illada_jax import end_think, sharding
from illada_jax.config import ModelConfig
from illada_jax.model import KVCache, build

f32 = jnp.float32
REMASKING = ('low_confidence', 'random')
CACHE_MODES = (None, 'prefix', 'dual')


def _option(default, doc: str):
  return dataclasses.field(default=default, metadata={'help': doc})


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """Every sampling setting, shared by `sample`, the engine, both CLIs and lm-eval.

  Hashable: it selects the compiled program. `block_length` and `steps`
  default at construction (to `gen_length`, and to one token per step).
  Raises ValueError naming the field for inconsistent settings.
  """
  gen_length: int = _option(128, 'tokens to generate (variable length: the upper limit)')
  block_length: int | None = _option(None, 'block size (default: gen_length)')
  steps: int | None = _option(
      None, 'denoising steps in all; with variable_length, per block (default: one token per step)')
  temperature: float = _option(0., 'Gumbel-max sampling temperature (0: argmax)')
  cfg_scale: float = _option(0., 'classifier-free guidance scale w: u + (w + 1) (c - u)')
  remasking: str = _option('low_confidence', f'commit order: one of {REMASKING}')
  logits_eos_inf: bool = _option(False, 'EOS logit -> -inf before choosing candidates')
  confidence_eos_eot_inf: bool = _option(False, 'EOS/EOT candidates are committed last')
  threshold: float | None = _option(None, 'confidence-threshold parallel decoding (Fast-dLLM tau)')
  cache: str | None = _option(None, "approximate block KV cache: 'prefix' or 'dual'")
  cache_refresh: int = _option(0, 'full pass every this many steps of a block (0: block start)')
  variable_length: bool = _option(
      False, 'append one block at a time until EOS/EOT, a stop string or the limit')
  vocab_limit: int | None = _option(
      None, "ids >= this are never candidates (the tokenizer's size: padded embedding rows)")
  end_think: str | tuple[int, ...] | None = _option(
      '</think>', "end-of-thinking marker: text, encoded with the checkpoint's tokenizer "
      '(from Python also a tuple of token ids)')
  end_think_boost: float = _option(
      0., 'end-of-thinking logit boost b: the next marker token at the first masked position '
      'gets + b * progress ** power (0: off; SPEC §2)')
  end_think_power: float = _option(2., 'exponent of the generation progress in the boost')
  after_think: bool = _option(
      False, 'return only the text after the first end-of-thinking marker (the whole text '
      'when the marker never appears); stop strings still apply to the whole text')

  def __post_init__(self):
    put = functools.partial(object.__setattr__, self)
    if self.block_length is None:
      put('block_length', self.gen_length)
    if self.steps is None:
      put('steps', self.block_length if self.variable_length else self.gen_length)
    for name in ('gen_length', 'block_length', 'steps', 'cache_refresh'):
      put(name, int(getattr(self, name)))
    put('temperature', float(self.temperature))
    put('cfg_scale', float(self.cfg_scale))
    if self.threshold is not None:
      put('threshold', float(self.threshold))
    put('end_think_boost', float(self.end_think_boost))
    put('end_think_power', float(self.end_think_power))
    if isinstance(self.end_think, (list, tuple)):
      put('end_think', tuple(int(i) for i in self.end_think))

    def need(ok, field, msg):
      if not ok:
        raise ValueError(f'SamplingOptions.{field}: {msg}')
    need(self.gen_length > 0, 'gen_length', f'must be positive, got {self.gen_length}')
    need(self.block_length > 0, 'block_length', f'must be positive, got {self.block_length}')
    need(self.steps > 0, 'steps', f'must be positive, got {self.steps}')
    need(self.gen_length % self.block_length == 0, 'gen_length',
         f'{self.gen_length} is not a multiple of block_length={self.block_length}')
    if not self.variable_length:
      need(self.steps % self.num_blocks == 0, 'steps',
           f'{self.steps} is not a multiple of the {self.num_blocks} blocks')
    need(self.remasking in REMASKING, 'remasking', f'{self.remasking!r} not in {REMASKING}')
    need(self.cache in CACHE_MODES, 'cache', f'{self.cache!r} not in {CACHE_MODES}')
    need(self.temperature >= 0, 'temperature', f'must be >= 0, got {self.temperature}')
    need(self.cfg_scale >= 0, 'cfg_scale', f'must be >= 0, got {self.cfg_scale}')
    need(self.cache_refresh >= 0, 'cache_refresh', f'must be >= 0, got {self.cache_refresh}')
    need(self.vocab_limit is None or self.vocab_limit > 0, 'vocab_limit', 'must be positive')
    need(self.end_think_boost >= 0, 'end_think_boost', f'must be >= 0, got {self.end_think_boost}')
    need(self.end_think_power > 0, 'end_think_power', f'must be > 0, got {self.end_think_power}')
    need(self.end_think_boost == 0 or bool(self.end_think), 'end_think',
         'the boost needs a marker (text or token ids)')
    need(not self.after_think or bool(self.end_think), 'end_think',
         'after_think needs a marker (text or token ids)')

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps if self.variable_length else self.steps // self.num_blocks

  @property
  def stochastic(self) -> bool:
    return self.temperature > 0

  def program_key(self) -> 'SamplingOptions':
    """The options that select a compiled program: the temperature is data, only T > 0 is not;
    the marker and power matter only with the boost on; `after_think` is text handling."""
    key = dataclasses.replace(self, temperature=float(self.stochastic), after_think=False)
    if self.end_think_boost == 0:
      key = dataclasses.replace(key, end_think=None, end_think_power=2.)
    return key

  def replace(self, **changes) -> 'SamplingOptions':
    return dataclasses.replace(self, **changes)


@struct.dataclass
class SampleOutput:
  """Result of `sample`.

  tokens:      int32 `[B, P + G]`; never-appended positions (variable length) hold EOS.
  commit_step: int32 `[B, P + G]`, the denoising step (model call) that committed
               each position; -1 for the prompt and never-committed positions.
  nfe:         int32 scalar, model calls made.
  done:        bool `[B]`, rows that stopped early on EOS/EOT (variable length).
  """
  tokens: jax.Array
  commit_step: jax.Array
  nfe: jax.Array
  done: jax.Array


@struct.dataclass
class Canvas:
  """The sampler's state: `B` rows of `L` columns, the current block at `[P, P + W)`.

  x_BL int32 tokens; pos_BL int32 RoPE positions; visible_BL bool key mask;
  prompt_BL bool prompt columns (masked in the CFG unconditional pass);
  step_BL int32 model call that committed each column (-1: never);
  blk_B int32 block index per row; seed_B uint32 random seed per row (its
  key is `jax.random.key(seed)`); temp_B float32 temperature per row;
  limit_B int32 generation limit `G` per row in tokens (the end-of-thinking
  boost's progress is measured against it); calls_B int32 model calls in
  which the row had masked positions; nfe int32 scalar model calls.
  """
  x_BL: jax.Array
  pos_BL: jax.Array
  visible_BL: jax.Array
  prompt_BL: jax.Array
  step_BL: jax.Array
  blk_B: jax.Array
  seed_B: jax.Array
  temp_B: jax.Array
  limit_B: jax.Array
  calls_B: jax.Array
  nfe: jax.Array


# -- one denoising step, piece by piece -----------------------------------------

def _model_inputs(cfg: ModelConfig, o: SamplingOptions, c: Canvas):
  """Conditional rows, followed by unconditional (prompt -> MASK) rows under CFG."""
  if o.cfg_scale > 0:
    un_BL = jnp.where(c.prompt_BL, cfg.mask_token_id, c.x_BL)
    two = lambda a, b: jnp.concatenate([a, b])
    return two(c.x_BL, un_BL), two(c.visible_BL, c.visible_BL), two(c.pos_BL, c.pos_BL)
  return c.x_BL, c.visible_BL, c.pos_BL


def _guide(o: SamplingOptions, logits_XWV):
  """`u + (w + 1) (c - u)` over the [cond; uncond] batch halves."""
  if o.cfg_scale > 0:
    c_BWV, u_BWV = jnp.split(logits_XWV, 2)
    return u_BWV + (o.cfg_scale + 1) * (c_BWV - u_BWV)
  return logits_XWV


def block_logits(cfg: ModelConfig, params, o: SamplingOptions, c: Canvas, start: int,
                 width: int):
  """float32 `[B, W, V]` logits of columns `[start, start + W)`; trunk on all, head on W."""
  tokens_XL, visible_XL, pos_XL = _model_inputs(cfg, o, c)
  model = build(cfg)
  h_XLD = model.apply({'params': params}, tokens_XL, visible_XL, pos_XL, method='hidden')
  return _guide(o, model.apply({'params': params}, h_XLD[:, start:start + width],
                               method='logits'))


def candidates(cfg: ModelConfig, o: SamplingOptions, logits_BWV, key_B, temp_B):
  """Candidate tokens `x0` int32 `[B, W]`, confidences f32 `[B, W]`, EOS/EOT flags `[B, W]`.

  `key_B`: one PRNG key per row for this step; `temp_B`: float32 `[B]`
  temperatures (used when `o.stochastic`; a row at 0 takes the argmax). SPEC §2 items 4, 5
  and 7.
  """
  logits_BWV = logits_BWV.astype(f32)
  v = logits_BWV.shape[-1]
  if o.vocab_limit is not None and o.vocab_limit < v:
    logits_BWV = jnp.where(jnp.arange(v) < o.vocab_limit, logits_BWV, -jnp.inf)
  if o.logits_eos_inf:  # every EOS id the checkpoint declares (not EOT, as published)
    logits_BWV = logits_BWV.at[..., jnp.asarray(cfg.eos_token_ids)].set(-jnp.inf)
  keys_B2 = jax.vmap(jax.random.split)(key_B)
  if o.stochastic:
    noise_BWV = jax.vmap(lambda k: jax.random.gumbel(k, logits_BWV.shape[1:], f32))(keys_B2[:, 0])
    t_B11 = jnp.where(temp_B > 0, temp_B, 1.).astype(f32)[:, None, None]
    x0_BW = jnp.argmax(logits_BWV / t_B11 + noise_BWV, axis=-1).astype(jnp.int32)
    # A row at T = 0 in a sampling program takes the argmax, as in the argmax program: a
    # pool mixing temperatures gives each row the tokens it would get alone.
    greedy_BW = jnp.argmax(logits_BWV, axis=-1).astype(jnp.int32)
    x0_BW = jnp.where(temp_B[:, None] > 0, x0_BW, greedy_BW)
  else:
    x0_BW = jnp.argmax(logits_BWV, axis=-1).astype(jnp.int32)
  if o.remasking == 'low_confidence':
    picked_BW = jnp.take_along_axis(logits_BWV, x0_BW[..., None], axis=-1)[..., 0]
    conf_BW = jnp.exp(picked_BW - jax.nn.logsumexp(logits_BWV, axis=-1))
  else:
    conf_BW = jax.vmap(lambda k: jax.random.uniform(k, x0_BW.shape[1:], f32))(keys_B2[:, 1])
  is_end_BW = jnp.zeros(x0_BW.shape, bool)
  if o.confidence_eos_eot_inf:
    is_end_BW = is_end(cfg, x0_BW)
  return x0_BW, conf_BW, is_end_BW


def is_end(cfg: ModelConfig, x):
  """bool, same shape: the token ends a request (any EOS id, EOT: `cfg.end_token_ids`)."""
  out = x == cfg.eos_token_id
  for t in cfg.end_token_ids[1:]:
    out |= x == t
  return out


def commit_rank(conf_BW, eligible_BW, is_end_BW):
  """Rank (0 = first to commit) of each position; ties go to the lower position.

  Eligible candidates rank by confidence, EOS/EOT candidates (confidence -inf)
  after all others, ineligible positions last.
  """
  score_BW = jnp.where(eligible_BW, jnp.where(is_end_BW, -1., conf_BW), -jnp.inf)
  order_BW = jnp.argsort(-score_BW, axis=-1, stable=True)
  return jnp.argsort(order_BW, axis=-1, stable=True)


def _commit(c: Canvas, start: int, x0_BW, commit_BW) -> Canvas:
  w = x0_BW.shape[1]
  x_BW, s_BW = c.x_BL[:, start:start + w], c.step_BL[:, start:start + w]
  x_BL = c.x_BL.at[:, start:start + w].set(jnp.where(commit_BW, x0_BW, x_BW))
  s_BL = c.step_BL.at[:, start:start + w].set(jnp.where(commit_BW, c.nfe, s_BW))
  x_BL = sharding.constrain(x_BL, ('act_batch', 'act_length'))
  return c.replace(x_BL=x_BL, step_BL=s_BL)


def roll(c: Canvas, shift: int) -> Canvas:
  """Rotates every row left by `shift` columns (tokens with their positions and masks)."""
  r = lambda a: jnp.roll(a, -shift, axis=1)
  return c.replace(x_BL=r(c.x_BL), pos_BL=r(c.pos_BL), visible_BL=r(c.visible_BL),
                   prompt_BL=r(c.prompt_BL), step_BL=r(c.step_BL))


def denoise_block(cfg: ModelConfig, params, o: SamplingOptions, c: Canvas, active_B,
                  start: int, window: int | None = None) -> Canvas:
  """Fills columns `[start, start + W)` of the active rows (static `start`).

  `window` is the width recomputed between cache refreshes (`W` for the dual
  cache, the current block plus its visible suffix for the prefix cache).
  Inactive rows are computed but never change.
  """
  S, W = o.steps_per_block, o.block_length
  window = window or W
  b, l = c.x_BL.shape
  rows = b * (2 if o.cfg_scale > 0 else 1)
  model = build(cfg)
  apply = functools.partial(model.apply, {'params': params})
  refresh_every = o.cache_refresh or max(S, W) + 1

  def masked(c):
    return (c.x_BL[:, start:start + W] == cfg.mask_token_id) & active_B[:, None]

  m_B = masked(c).sum(-1, dtype=jnp.int32)

  def full(c, cache):
    tokens_XL, visible_XL, pos_XL = _model_inputs(cfg, o, c)
    h_XLD, cache = apply(tokens_XL, KVCache.zeros(cfg, rows, l), visible_XL, 0, pos_XL,
                         method='hidden_cached')
    return _guide(o, apply(h_XLD[:, start:start + W], method='logits')), cache

  def cached(c, cache):
    tokens_XL, visible_XL, pos_XL = _model_inputs(cfg, o, c)
    cut = lambda a: a[:, start:start + window]
    h_XQD, _ = apply(cut(tokens_XL), cache, visible_XL, start, cut(pos_XL),
                     method='hidden_cached')
    return _guide(o, apply(h_XQD[:, :W], method='logits')), cache

  def cond(state):
    c, i, _ = state
    if o.threshold is None:
      return (i < S) & jnp.any(active_B)
    return jnp.any(masked(c)) & (i < W)

  def body(state):
    c, i, cache = state
    if o.cache:
      logits_BWV, cache = jax.lax.cond(i % refresh_every == 0, full, cached, c, cache)
    else:
      logits_BWV = block_logits(cfg, params, o, c, start, W)
    key_B = jax.vmap(lambda seed, blk: jax.random.fold_in(
        jax.random.fold_in(jax.random.key(seed), blk), i))(c.seed_B, c.blk_B)
    masked_BW = masked(c)
    if o.end_think_boost > 0:
      logits_BWV = end_think.boost(
          logits_BWV.astype(f32), c.x_BL, masked_BW, c.blk_B, c.limit_B, start=start,
          marker=o.end_think, strength=o.end_think_boost, power=o.end_think_power)
    x0_BW, conf_BW, is_end_BW = candidates(cfg, o, logits_BWV, key_B, c.temp_B)
    rank_BW = commit_rank(conf_BW, masked_BW, is_end_BW)
    if o.threshold is None:
      k_B = m_B // S + (i < m_B % S)
      commit_BW = masked_BW & (rank_BW < k_B[:, None])
    else:
      sure_BW = jnp.where(is_end_BW, -jnp.inf, conf_BW) >= o.threshold
      commit_BW = masked_BW & (sure_BW | (rank_BW == 0))
    c = _commit(c, start, x0_BW, commit_BW)
    c = c.replace(nfe=c.nfe + 1, calls_B=c.calls_B + jnp.any(masked_BW, -1))
    return c, i + 1, cache

  cache = KVCache.zeros(cfg, rows, l) if o.cache else ()
  c, _, _ = jax.lax.while_loop(cond, body, (c, jnp.zeros((), jnp.int32), cache))
  return c


def reveal_block(c: Canvas, active_B, start: int, width: int) -> Canvas:
  """Makes columns `[start, start + W)` of the active rows visible (variable length)."""
  cols = c.visible_BL[:, start:start + width] | active_B[:, None]
  return c.replace(visible_BL=c.visible_BL.at[:, start:start + width].set(cols))


# -- a whole batch in one program -----------------------------------------------

def new_canvas(cfg: ModelConfig, o: SamplingOptions, prompt_BP, mask_BP, seed_B, temp_B,
               pos_BP=None, limit_B=None) -> Canvas:
  """`[prompt | MASK * G]`: generated columns visible unless variable length.

  `pos_BP` defaults to `0..P-1` (left padding included, as the reference);
  `limit_B` (each row's generation limit) to `G = o.gen_length`.
  """
  b, p = prompt_BP.shape
  g = o.gen_length
  l = p + g
  if pos_BP is None:
    pos_BP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  pos_BL = jnp.concatenate([pos_BP, pos_BP[:, -1:] + 1 + jnp.arange(g, dtype=jnp.int32)], 1)
  return Canvas(
      x_BL=jnp.concatenate([prompt_BP, jnp.full((b, g), cfg.mask_token_id, jnp.int32)], 1),
      pos_BL=pos_BL,
      visible_BL=jnp.concatenate([mask_BP, jnp.full((b, g), not o.variable_length)], 1),
      prompt_BL=jnp.broadcast_to(jnp.arange(l) < p, (b, l)),
      step_BL=jnp.full((b, l), -1, jnp.int32), blk_B=jnp.zeros((b,), jnp.int32),
      seed_B=seed_B.astype(jnp.uint32), temp_B=temp_B.astype(f32),
      limit_B=(jnp.full((b,), g, jnp.int32) if limit_B is None
               else jnp.asarray(limit_B).astype(jnp.int32)),
      calls_B=jnp.zeros((b,), jnp.int32), nfe=jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sample(cfg: ModelConfig, mesh, o: SamplingOptions, params, prompt_BP, mask_BP, seed_B,
            temp_B):
  with sharding.activation_sharding(mesh):
    b, p = prompt_BP.shape
    n, w = o.num_blocks, o.block_length
    c = new_canvas(cfg, o, prompt_BP, mask_BP, seed_B, temp_B)

    def block(state, window):
      c, done_B = state
      active_B = ~done_B
      if o.variable_length:
        c = reveal_block(c, active_B, p, w)
      c = denoise_block(cfg, params, o, c, active_B, p, window)
      if o.variable_length:
        done_B = done_B | (active_B & jnp.any(is_end(cfg, c.x_BL[:, p:p + w]), -1))
      return roll(c, w).replace(blk_B=c.blk_B + 1), done_B

    state = (c, jnp.zeros((b,), bool))
    if o.cache == 'prefix':  # the recomputed window (block + suffix) shrinks: static per block
      for blk in range(n):
        state = block(state, (n - blk) * w)
    else:
      state, _ = jax.lax.scan(lambda s, _: (block(s, w), None), state, None, length=n)
    c, done_B = state
    c = roll(c, -n * w)  # back to prompt-first order
    gen_L = jnp.arange(c.x_BL.shape[1]) >= p
    tokens_BL = jnp.where(gen_L & ~c.visible_BL, cfg.eos_token_id, c.x_BL)
    return SampleOutput(tokens=tokens_BL, commit_step=c.step_BL, nfe=c.nfe, done=done_B)


def resolve_options(options: SamplingOptions | None, overrides) -> SamplingOptions:
  """`options` with keyword overrides, or `SamplingOptions(**overrides)`."""
  if options is None:
    return SamplingOptions(**overrides)
  return dataclasses.replace(options, **overrides) if overrides else options


def sample(cfg: ModelConfig, params, prompt_BP, attention_mask_BP=None,
           options: SamplingOptions | None = None, *, key=None, seeds=None, tokenizer=None,
           **overrides) -> SampleOutput:
  """Samples a batch of left-padded prompts as one jitted program (SPEC §2).

  Args:
    prompt_BP: int `[B, P]` prompt ids, left-padded.
    attention_mask_BP: `[B, P]` 1 for real prompt tokens (None: all real).
    options: `SamplingOptions`; keyword `overrides` (its field names) build or
      amend it, e.g. `sample(cfg, params, ids, gen_length=64, steps=64)`.
    key: PRNG key from which one uint32 seed per row is drawn (default key 0).
    seeds: optional ints `[B]` (taken mod 2^32): row `r` uses
      `jax.random.key(seeds[r])`, the key the engine gives a request with that seed.
    tokenizer: encodes a text `end_think` marker (needed only when the boost is
      on and the marker is text; `encode(str) -> ids`, `decode(ids) -> str`).
  With `variable_length`, `steps` counts steps per appended block and
  `gen_length` is capped at the model's `max_len` (whole blocks). If `params`
  live on a mesh, the batch is split over its data/fsdp axes (B must be
  divisible by their product) and weights stay where they are.
  The end-of-thinking boost measures progress against that (capped) `gen_length`.
  Raises ValueError if the canvas exceeds `cfg.max_len`, options are
  inconsistent, or the boost's marker is text without a tokenizer.
  """
  o = end_think.resolve(resolve_options(options, overrides), tokenizer)
  end_think.check_ids(o, cfg.vocab_size)
  b, p = np.shape(prompt_BP)
  if o.variable_length:  # blocks are appended up to gen_length or the model's maximum length
    limit = min(o.gen_length, (cfg.max_len - p) // o.block_length * o.block_length)
    if limit <= 0:
      raise ValueError(f'sampling: a prompt of {p} tokens leaves no whole block of '
                       f'{o.block_length} before max_len {cfg.max_len}')
    o = o.replace(gen_length=limit)
  if p + o.gen_length > cfg.max_len:
    raise ValueError(f'sampling: prompt {p} + gen_length {o.gen_length} exceeds max_len '
                     f'{cfg.max_len}')
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  if attention_mask_BP is None:
    attention_mask_BP = jnp.ones(prompt_BP.shape, bool)
  attention_mask_BP = jnp.asarray(attention_mask_BP).astype(bool)
  if seeds is not None:
    seed_B = jnp.asarray(np.asarray(seeds, np.int64) % 2 ** 32, jnp.uint32)
  else:
    seed_B = jax.random.bits(jax.random.key(0) if key is None else key, (b,), jnp.uint32)
  temp_B = jnp.full((b,), o.temperature, f32)
  mesh = sharding.mesh_of(params)
  if mesh is not None:
    batch = jax.NamedSharding(mesh, sharding.logical_to_spec(('act_batch', None)))
    prompt_BP, attention_mask_BP = jax.device_put((prompt_BP, attention_mask_BP), batch)
  return _sample(cfg, mesh, o.program_key(), params, prompt_BP, attention_mask_BP, seed_B, temp_B)


def generate(cfg: ModelConfig, params, prompt_BP, attention_mask_BP=None,
             options: SamplingOptions | None = None, *, key=None, seeds=None, tokenizer=None,
             **overrides):
  """Sampled ids int32 `[B, P + gen_length]`: `sample(...).tokens`."""
  return sample(cfg, params, prompt_BP, attention_mask_BP, options, key=key, seeds=seeds,
                tokenizer=tokenizer, **overrides).tokens
