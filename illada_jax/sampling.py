"""Masked-diffusion sampling: the reverse process of SPEC §2, as one jitted program.

`generate` / `sample` run one of three loops over a static canvas
`x = [prompt | MASK * gen_length]` (`B` rows, `L = P + G` positions):

* fixed-step (the reference): one `lax.scan` over all `steps`; block `b`
  covers `[P + b*W, P + (b+1)*W)`; step `i` of a block commits
  `k_i = M // S + (i < M % S)` tokens per row, `M` the row's masked count at
  the block's start.
* variable length (`variable_length=True`): the same step under a
  `while_loop`; block `b` becomes visible (key mask) only when it is appended,
  each row stops at its own EOS/EOT or stop sequence, finished rows keep
  their tokens and receive no more blocks. `steps` then counts steps per block.
* fast (`threshold` and/or `cache`): per block a `while_loop`; with a
  threshold every masked position with confidence >= tau is committed (at
  least the most confident one); with `cache='prefix'|'dual'` the K/V of
  positions outside the recomputed window come from the last full pass
  (refreshed at each block start, or every `cache_refresh` steps).

Every model call computes the trunk on the whole canvas (or a cached window)
but the LM head only on the `W` positions of the current block. Candidates
are argmax (T = 0) or float32 Gumbel-max (T > 0); confidences are
`softmax(logits)[x0]` or uniform; EOS/EOT ids come from the config.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from illada_jax import sharding
from illada_jax.config import ModelConfig
from illada_jax.model import KVCache, Transformer

f32 = jnp.float32
REMASKING = ('low_confidence', 'random')
CACHE_MODES = (None, 'prefix', 'dual')


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """Static sampling settings (hashable: they select the compiled program)."""
  gen_length: int
  block_length: int
  steps: int  # total steps; per block when variable_length
  temperature: float = 0.
  cfg_scale: float = 0.
  remasking: str = 'low_confidence'
  logits_eos_inf: bool = False  # EOS logit -> -inf before choosing candidates
  confidence_eos_eot_inf: bool = False  # EOS/EOT candidates are committed last
  threshold: float | None = None  # confidence-threshold parallel decoding
  cache: str | None = None  # approximate block KV cache: None, 'prefix' or 'dual'
  cache_refresh: int = 0  # full pass every this many steps of a block (0: block start only)
  variable_length: bool = False
  stop_ids: tuple[tuple[int, ...], ...] = ()  # token-id stop sequences (variable length)

  def __post_init__(self):
    def need(ok, msg):
      if not ok:
        raise ValueError(f'sampling: {msg}')
    need(self.gen_length > 0 and self.block_length > 0 and self.steps > 0,
         'gen_length, block_length and steps must be positive')
    need(self.gen_length % self.block_length == 0,
         f'gen_length={self.gen_length} is not a multiple of block_length={self.block_length}')
    if not self.variable_length:
      need(self.steps % self.num_blocks == 0,
           f'steps={self.steps} is not a multiple of the {self.num_blocks} blocks')
    need(self.remasking in REMASKING, f'remasking={self.remasking!r} not in {REMASKING}')
    need(self.cache in CACHE_MODES, f'cache={self.cache!r} not in {CACHE_MODES}')
    need(self.temperature >= 0 and self.cfg_scale >= 0, 'temperature and cfg_scale must be >= 0')
    need(self.cache_refresh >= 0, 'cache_refresh must be >= 0')

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps if self.variable_length else self.steps // self.num_blocks

  @property
  def fast(self) -> bool:
    return self.threshold is not None or self.cache is not None


@struct.dataclass
class SampleOutput:
  """Result of `sample`.

  tokens:      int32 `[B, P + G]`; never-appended positions (variable length) hold EOS.
  commit_step: int32 `[B, P + G]`, the denoising step (model call) that committed
               each position; -1 for the prompt and never-committed positions.
  nfe:         int32 scalar, model calls made.
  done:        bool `[B]`, rows that stopped early on EOS/stop (variable length).
  """
  tokens: jax.Array
  commit_step: jax.Array
  nfe: jax.Array
  done: jax.Array


@struct.dataclass
class _Carry:
  x_BL: jax.Array  # canvas
  step_BL: jax.Array  # commit step, -1 if not committed by the sampler
  visible_BL: jax.Array  # key mask: real prompt tokens and appended blocks
  done_B: jax.Array  # row finished (variable length)
  m_B: jax.Array  # masked positions in the current block at its start
  nfe: jax.Array  # model calls so far


# -- one denoising step, piece by piece -----------------------------------------

def _model_inputs(cfg: ModelConfig, o: SampleOptions, x_BL, prompt_BL, visible_BL):
  """Conditional rows, followed by unconditional (prompt -> MASK) rows under CFG."""
  if o.cfg_scale > 0:
    un_BL = jnp.where(prompt_BL, cfg.mask_token_id, x_BL)
    return jnp.concatenate([x_BL, un_BL]), jnp.concatenate([visible_BL, visible_BL])
  return x_BL, visible_BL


def _guide(o: SampleOptions, logits_XWV):
  """`u + (w + 1) (c - u)` over the [cond; uncond] batch halves."""
  if o.cfg_scale > 0:
    c_BWV, u_BWV = jnp.split(logits_XWV, 2)
    return u_BWV + (o.cfg_scale + 1) * (c_BWV - u_BWV)
  return logits_XWV


def window_logits(cfg: ModelConfig, params, o: SampleOptions, x_BL, prompt_BL, visible_BL,
                  start, width: int):
  """float32 `[B, W, V]` logits of positions `[start, start + W)`; head on W only."""
  tokens_XL, visible_XL = _model_inputs(cfg, o, x_BL, prompt_BL, visible_BL)
  model = Transformer(cfg)
  h_XLD = model.apply({'params': params}, tokens_XL, visible_XL, method='hidden')
  h_XWD = jax.lax.dynamic_slice_in_dim(h_XLD, start, width, axis=1)
  return _guide(o, model.apply({'params': params}, h_XWD, method='logits'))


def candidates(cfg: ModelConfig, o: SampleOptions, logits_BWV, key):
  """Candidate tokens `x0` int32 `[B, W]`, confidences f32 `[B, W]`, EOS/EOT flags `[B, W]`."""
  key_gumbel, key_random = jax.random.split(key)
  logits_BWV = logits_BWV.astype(f32)
  if o.logits_eos_inf:
    logits_BWV = logits_BWV.at[..., cfg.eos_token_id].set(-jnp.inf)
  if o.temperature > 0:
    noise_BWV = jax.random.gumbel(key_gumbel, logits_BWV.shape, f32)
    x0_BW = jnp.argmax(logits_BWV / o.temperature + noise_BWV, axis=-1).astype(jnp.int32)
  else:
    x0_BW = jnp.argmax(logits_BWV, axis=-1).astype(jnp.int32)
  if o.remasking == 'low_confidence':
    picked_BW = jnp.take_along_axis(logits_BWV, x0_BW[..., None], axis=-1)[..., 0]
    conf_BW = jnp.exp(picked_BW - jax.nn.logsumexp(logits_BWV, axis=-1))
  else:
    conf_BW = jax.random.uniform(key_random, x0_BW.shape, f32)
  is_end_BW = jnp.zeros(x0_BW.shape, bool)
  if o.confidence_eos_eot_inf:
    for end_id in (cfg.eos_token_id, cfg.eot_token_id):
      if end_id is not None:
        is_end_BW |= x0_BW == end_id
  return x0_BW, conf_BW, is_end_BW


def commit_rank(conf_BW, eligible_BW, is_end_BW):
  """Rank (0 = first to commit) of each position; ties go to the lower position.

  Eligible candidates rank by confidence, EOS/EOT candidates (confidence -inf)
  after all others, ineligible positions last.
  """
  score_BW = jnp.where(eligible_BW, jnp.where(is_end_BW, -1., conf_BW), -jnp.inf)
  order_BW = jnp.argsort(-score_BW, axis=-1, stable=True)
  return jnp.argsort(order_BW, axis=-1, stable=True)


def _commit(c: _Carry, start, x0_BW, commit_BW, step) -> _Carry:
  w = x0_BW.shape[1]
  x_BW = jax.lax.dynamic_slice_in_dim(c.x_BL, start, w, axis=1)
  s_BW = jax.lax.dynamic_slice_in_dim(c.step_BL, start, w, axis=1)
  x_BL = jax.lax.dynamic_update_slice_in_dim(c.x_BL, jnp.where(commit_BW, x0_BW, x_BW), start, 1)
  s_BL = jax.lax.dynamic_update_slice_in_dim(c.step_BL, jnp.where(commit_BW, step, s_BW), start, 1)
  x_BL = sharding.constrain(x_BL, ('act_batch', 'act_length'))
  return c.replace(x_BL=x_BL, step_BL=s_BL)


def _append_block(c: _Carry, start, width: int) -> _Carry:
  """Makes `[start, start + W)` visible to the rows that are not done."""
  pos_L = jnp.arange(c.x_BL.shape[1])
  in_block_L = (pos_L >= start) & (pos_L < start + width)
  return c.replace(visible_BL=c.visible_BL | (in_block_L[None] & ~c.done_B[:, None]))


def stopped(cfg: ModelConfig, o: SampleOptions, x_BL, first: int, end):
  """bool `[B]`: an EOS/EOT or a stop sequence lies inside `[first, end)`."""
  pos_L = jnp.arange(x_BL.shape[1])
  hit_BL = jnp.zeros(x_BL.shape, bool)
  for end_id in (cfg.eos_token_id, cfg.eot_token_id):
    if end_id is not None:
      hit_BL |= (x_BL == end_id) & (pos_L < end)
  for seq in o.stop_ids:
    match_BL = pos_L + len(seq) <= end
    for j, tok in enumerate(seq):
      shifted_BL = jnp.pad(x_BL[:, j:], ((0, 0), (0, j)), constant_values=-1)
      match_BL = match_BL & (shifted_BL == tok)
    hit_BL |= match_BL
  return jnp.any(hit_BL & (pos_L >= first), axis=-1)


# -- the loops ------------------------------------------------------------------

def _init(cfg: ModelConfig, o: SampleOptions, prompt_BP, mask_BP):
  b, p = prompt_BP.shape
  g = o.gen_length
  x_BL = jnp.concatenate([prompt_BP, jnp.full((b, g), cfg.mask_token_id, jnp.int32)], axis=1)
  prompt_BL = jnp.broadcast_to(jnp.arange(p + g) < p, (b, p + g))
  visible_BL = jnp.concatenate([mask_BP, jnp.full((b, g), not o.variable_length)], axis=1)
  c = _Carry(x_BL=x_BL, step_BL=jnp.full((b, p + g), -1, jnp.int32), visible_BL=visible_BL,
             done_B=jnp.zeros((b,), bool), m_B=jnp.zeros((b,), jnp.int32),
             nfe=jnp.zeros((), jnp.int32))
  return c, prompt_BL


def _fixed_step(cfg, params, o: SampleOptions, p: int, prompt_BL, key, c: _Carry, s):
  """Step `s` of the fixed schedule (SPEC §2 items 2-6)."""
  S, W = o.steps_per_block, o.block_length
  i = s % S
  start = p + (s // S) * W
  if o.variable_length:
    c = _append_block(c, start, W)
  x_BW = jax.lax.dynamic_slice_in_dim(c.x_BL, start, W, axis=1)
  masked_BW = (x_BW == cfg.mask_token_id) & ~c.done_B[:, None]
  m_B = jnp.where(i == 0, masked_BW.sum(-1, dtype=jnp.int32), c.m_B)
  k_B = m_B // S + (i < m_B % S)
  logits_BWV = window_logits(cfg, params, o, c.x_BL, prompt_BL, c.visible_BL, start, W)
  x0_BW, conf_BW, is_end_BW = candidates(cfg, o, logits_BWV, jax.random.fold_in(key, s))
  commit_BW = masked_BW & (commit_rank(conf_BW, masked_BW, is_end_BW) < k_B[:, None])
  c = _commit(c, start, x0_BW, commit_BW, s).replace(m_B=m_B, nfe=s + 1)
  if o.variable_length:
    done_B = c.done_B | ((i == S - 1) & stopped(cfg, o, c.x_BL, p, start + W))
    c = c.replace(done_B=done_B)
  return c


def _fast_block(cfg, params, o: SampleOptions, p: int, prompt_BL, key, c: _Carry, b):
  """Denoises block `b` (static int with a prefix cache) under a while_loop."""
  S, W = o.steps_per_block, o.block_length
  l = c.x_BL.shape[1]
  start = p + b * W
  c = _append_block(c, start, W)
  x_BW = jax.lax.dynamic_slice_in_dim(c.x_BL, start, W, axis=1)
  m_B = ((x_BW == cfg.mask_token_id) & ~c.done_B[:, None]).sum(-1, dtype=jnp.int32)
  c = c.replace(m_B=m_B)
  rows = c.x_BL.shape[0] * (2 if o.cfg_scale > 0 else 1)
  cache = KVCache.zeros(cfg, rows, l) if o.cache else ()
  window = (l - start) if o.cache == 'prefix' else W
  refresh_every = o.cache_refresh or W + 1
  model = Transformer(cfg)

  def masked(c):
    x_BW = jax.lax.dynamic_slice_in_dim(c.x_BL, start, W, axis=1)
    return (x_BW == cfg.mask_token_id) & ~c.done_B[:, None]

  def cond(state):
    c, i, _ = state
    if o.threshold is None:
      return (i < S) & jnp.any(~c.done_B)
    return jnp.any(masked(c)) & (i < W)

  def full(c, cache):
    tokens_XL, visible_XL = _model_inputs(cfg, o, c.x_BL, prompt_BL, c.visible_BL)
    h_XLD, cache = model.apply({'params': params}, tokens_XL, KVCache.zeros(cfg, rows, l),
                               visible_XL, method='hidden_cached')
    h_XWD = jax.lax.dynamic_slice_in_dim(h_XLD, start, W, axis=1)
    return _guide(o, model.apply({'params': params}, h_XWD, method='logits')), cache

  def cached(c, cache):
    tokens_XL, visible_XL = _model_inputs(cfg, o, c.x_BL, prompt_BL, c.visible_BL)
    tokens_XQ = jax.lax.dynamic_slice_in_dim(tokens_XL, start, window, axis=1)
    h_XQD, _ = model.apply({'params': params}, tokens_XQ, cache, visible_XL, start,
                           method='hidden_cached')
    return _guide(o, model.apply({'params': params}, h_XQD[:, :W], method='logits')), cache

  def body(state):
    c, i, cache = state
    if o.cache:
      logits_BWV, cache = jax.lax.cond(i % refresh_every == 0, full, cached, c, cache)
    else:
      logits_BWV = window_logits(cfg, params, o, c.x_BL, prompt_BL, c.visible_BL, start, W)
    x0_BW, conf_BW, is_end_BW = candidates(cfg, o, logits_BWV, jax.random.fold_in(key, c.nfe))
    masked_BW = masked(c)
    rank_BW = commit_rank(conf_BW, masked_BW, is_end_BW)
    if o.threshold is None:
      k_B = c.m_B // S + (i < c.m_B % S)
      commit_BW = masked_BW & (rank_BW < k_B[:, None])
    else:
      sure_BW = jnp.where(is_end_BW, -jnp.inf, conf_BW) >= o.threshold
      commit_BW = masked_BW & (sure_BW | (rank_BW == 0))
    c = _commit(c, start, x0_BW, commit_BW, c.nfe).replace(nfe=c.nfe + 1)
    return c, i + 1, cache

  c, _, _ = jax.lax.while_loop(cond, body, (c, jnp.zeros((), jnp.int32), cache))
  if o.variable_length:
    c = c.replace(done_B=c.done_B | stopped(cfg, o, c.x_BL, p, start + W))
  return c


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sample(cfg: ModelConfig, mesh, o: SampleOptions, params, prompt_BP, mask_BP, key):
  with sharding.activation_sharding(mesh):
    b, p = prompt_BP.shape
    c, prompt_BL = _init(cfg, o, prompt_BP, mask_BP)
    if not o.fast:
      step = functools.partial(_fixed_step, cfg, params, o, p, prompt_BL, key)
      total = o.steps_per_block * o.num_blocks
      if o.variable_length:
        c = jax.lax.while_loop(lambda c: (c.nfe < total) & jnp.any(~c.done_B),
                               lambda c: step(c, c.nfe), c)
      else:
        c, _ = jax.lax.scan(lambda c, s: (step(c, s), None), c, jnp.arange(total))
    else:
      block = functools.partial(_fast_block, cfg, params, o, p, prompt_BL, key)
      if o.cache == 'prefix':  # the recomputed window [start, L) shrinks: static per block
        for blk in range(o.num_blocks):
          c = block(c, blk)
      else:
        c, _ = jax.lax.scan(lambda c, blk: (block(c, blk), None), c, jnp.arange(o.num_blocks))
    gen_L = jnp.arange(c.x_BL.shape[1]) >= p
    tokens_BL = jnp.where(gen_L & ~c.visible_BL, cfg.eos_token_id, c.x_BL)
    return SampleOutput(tokens=tokens_BL, commit_step=c.step_BL, nfe=c.nfe, done=c.done_B)


def sample(cfg: ModelConfig, params, prompt_BP, attention_mask_BP=None, *, gen_length: int,
           block_length: int, steps: int, temperature: float = 0., cfg_scale: float = 0.,
           remasking: str = 'low_confidence', logits_eos_inf: bool = False,
           confidence_eos_eot_inf: bool = False, threshold: float | None = None,
           cache: str | None = None, cache_refresh: int = 0, variable_length: bool = False,
           stop_ids=(), key=None) -> SampleOutput:
  """Runs the sampler selected by the arguments; see the module docstring.

  Args:
    prompt_BP: int `[B, P]` prompt ids, left-padded.
    attention_mask_BP: `[B, P]` 1 for real prompt tokens (None: all real).
    key: PRNG key for Gumbel noise and random remasking (default key 0).
  With `variable_length`, `steps` counts steps per appended block and
  `gen_length` is capped at the model's `max_len` (whole blocks).
  If `params` live on a mesh, the batch is split over its data/fsdp axes
  (B must be divisible by their product) and weights stay where they are.
  """
  p = np.shape(prompt_BP)[1]
  if variable_length:  # blocks are appended up to gen_length or the model's maximum length
    gen_length = min(gen_length, (cfg.max_len - p) // block_length * block_length)
  o = SampleOptions(
      gen_length=gen_length, block_length=block_length, steps=steps,
      temperature=float(temperature), cfg_scale=float(cfg_scale), remasking=remasking,
      logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
      threshold=None if threshold is None else float(threshold), cache=cache,
      cache_refresh=int(cache_refresh), variable_length=variable_length,
      stop_ids=tuple(tuple(int(t) for t in s) for s in stop_ids))
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  if attention_mask_BP is None:
    attention_mask_BP = jnp.ones(prompt_BP.shape, bool)
  attention_mask_BP = jnp.asarray(attention_mask_BP).astype(bool)
  if p + gen_length > cfg.max_len:
    raise ValueError(f'sampling: prompt {prompt_BP.shape[1]} + gen_length {gen_length} '
                     f'exceeds max_len {cfg.max_len}')
  key = jax.random.key(0) if key is None else key
  mesh = sharding.mesh_of(params)
  if mesh is not None:
    batch = jax.NamedSharding(mesh, sharding.logical_to_spec(('act_batch', None)))
    prompt_BP, attention_mask_BP = jax.device_put((prompt_BP, attention_mask_BP), batch)
  return _sample(cfg, mesh, o, params, prompt_BP, attention_mask_BP, key)


def generate(cfg: ModelConfig, params, prompt_BP, attention_mask_BP=None, *, gen_length: int,
             block_length: int, steps: int, temperature: float = 0., cfg_scale: float = 0.,
             remasking: str = 'low_confidence', logits_eos_inf: bool = False,
             confidence_eos_eot_inf: bool = False, key=None, **fast_options):
  """Sampled ids int32 `[B, P + gen_length]`: `sample(...).tokens`.

  `fast_options` are `sample`'s `threshold`, `cache`, `cache_refresh`,
  `variable_length` and `stop_ids`.
  """
  return sample(cfg, params, prompt_BP, attention_mask_BP, gen_length=gen_length,
                block_length=block_length, steps=steps, temperature=temperature,
                cfg_scale=cfg_scale, remasking=remasking, logits_eos_inf=logits_eos_inf,
                confidence_eos_eot_inf=confidence_eos_eot_inf, key=key, **fast_options).tokens
