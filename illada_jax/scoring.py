"""Scoring answers with a masked-diffusion LM (SPEC §3), batched over requests.

* `mc_log_likelihood`: LLaDA's Monte-Carlo estimate of `log p(answer | prompt)`.
  Each of `mc_num / batch_size` rounds draws `k ~ U{1..l}` and gives row `j` of
  the round exactly `n_j = round(linspace(k, k + (b-1) l / b, b))` (wrapped into
  `[1, l]`) masked answer positions, chosen at random; the prompt is never
  masked. The estimate is `-mean_rounds mean_rows (l / n_j) * sum masked CE`.
* `confidence_score`: iLLaDA's easiest-first any-order log-likelihood: from
  `[context | MASK * l]`, `l` times add the smallest CE of the true token over
  the still-masked answer positions and reveal that position.
* `greedy_match`: lm-eval's `is_greedy` by suffix greedy prediction: `l` times
  reveal the single most confident argmax over the masked answer positions;
  greedy iff the revealed answer is the target.
* `rolling_log_likelihood`: perplexity tasks. The text is cut into windows of
  at most `max_len` tokens, each scored by the MC estimate with an empty
  prompt, and the window estimates are summed. The MC estimate is an ELBO, a
  lower bound on `log p` in expectation, so its negative is an upper bound on
  the NLL (and the perplexity an upper bound on the model's).

The evaluation harness's options (SPEC §3) apply to every model row: `add_bos`
puts BOS before the context (it belongs to the prompt, so the CFG
unconditional pass masks it), `padd_eos` appends one EOS after the answer
(never masked, its logits unused), in both CFG halves.

All take many `(context, answer)` pairs at once: every pair is one row (MC:
`batch_size` rows) of a right-padded batch whose padding is hidden by the key
mask, so rows of different lengths share one compiled program per length
bucket. The LM head runs only on answer positions. MC masks are drawn from
each pair's own seed (`fold_in(key(seed), round)`, then one uniform per answer
slot from `fold_in(., slot)`), so a pair's estimate depends neither on the
pairs beside it (SPEC §2, per-request independence) nor on the static widths
of its batch.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from illada_jax import sharding
from illada_jax.config import ModelConfig
from illada_jax.model import build

f32 = jnp.float32
_LEN_BUCKET = 32
_ANS_BUCKET = 8


def stratified_mask_counts(k, l, b: int):
  """int32 `[b]`: `round(linspace(k, k + (b-1) l / b, b))` wrapped into `[1, l]`.

  `k`, `l` may be traced scalars; rounding is half-to-even as in the reference.
  """
  k, l = jnp.asarray(k, f32), jnp.asarray(l, f32)
  n_B = jnp.round(k + jnp.arange(b, dtype=f32) * (l / b)).astype(jnp.int32)
  l = l.astype(jnp.int32)
  return (n_B - 1) % l + 1


METHODS = ('mc', 'confidence')


def _option(default, doc: str):
  return dataclasses.field(default=default, metadata={'help': doc})


@dataclasses.dataclass(frozen=True)
class ScoringOptions:
  """How answers are scored (SPEC §3); hashable, it selects the compiled program.

  Shared by the engine, `illada-score` (one flag per field) and the lm-eval
  adapter (one model arg per field). Raises ValueError naming the field for
  inconsistent settings.
  """
  method: str = _option('mc', f'likelihood estimator: one of {METHODS}')
  mc_num: int = _option(128, 'Monte-Carlo samples (a multiple of mc_batch)')
  mc_batch: int = _option(16, 'Monte-Carlo rows per round (one stratified draw of k)')
  cfg_scale: float = _option(0., 'classifier-free guidance scale w: u + (w + 1) (c - u)')
  add_bos: bool | None = _option(
      None, "BOS before the context (None: as the checkpoint's tokenizer_config add_bos_token; "
      'library calls: no BOS)')
  padd_eos: bool = _option(False, 'one EOS appended to every model row, its logits unused')
  check_greedy: bool = _option(
      False, "also compute lm-eval's is_greedy by suffix greedy prediction (l more passes)")
  rolling_window: int | None = _option(
      None, 'lm-eval loglikelihood_rolling: tokens per window (None: max_len less BOS/EOS)')

  def __post_init__(self):
    put = functools.partial(object.__setattr__, self)
    for name in ('mc_num', 'mc_batch'):
      put(name, int(getattr(self, name)))
    put('cfg_scale', float(self.cfg_scale))

    def need(ok, field, msg):
      if not ok:
        raise ValueError(f'ScoringOptions.{field}: {msg}')
    need(self.method in METHODS, 'method', f'{self.method!r} not in {METHODS}')
    need(self.mc_batch > 0 and self.mc_num > 0 and self.mc_num % self.mc_batch == 0, 'mc_num',
         f'{self.mc_num} is not a positive multiple of mc_batch={self.mc_batch}')
    need(self.cfg_scale >= 0, 'cfg_scale', f'must be >= 0, got {self.cfg_scale}')
    need(self.rolling_window is None or int(self.rolling_window) > 0, 'rolling_window',
         f'must be positive, got {self.rolling_window}')

  def replace(self, **changes) -> 'ScoringOptions':
    return dataclasses.replace(self, **changes)


def affixes(cfg: ModelConfig, add_bos: bool | None = False, padd_eos: bool = False):
  """Tokens before the context and after the answer of every model row (SPEC §3).

  Raises ValueError if BOS is asked for and the model has none.
  """
  if add_bos and cfg.bos_token_id is None:
    raise ValueError('ScoringOptions.add_bos: the model has no BOS token '
                     '(ModelConfig.bos_token_id is None)')
  return ((cfg.bos_token_id,) if add_bos else ()), ((cfg.eos_token_id,) if padd_eos else ())


def _pad_to(n: int, bucket: int) -> int:
  return -(-n // bucket) * bucket


def row_length(cfg: ModelConfig, pair, prefix=(), suffix=()) -> int:
  """Tokens in the model row of one `(context, answer)` pair."""
  return len(prefix) + len(pair[0]) + len(pair[1]) + len(suffix)


def _pack(cfg: ModelConfig, pairs, prefix=(), suffix=(), length=None, answer=None):
  """Right-padded rows `[context | answer]` and their answer spans (NumPy).

  `length` / `answer`: static row and answer widths (default: the longest,
  rounded up to 32 / 8).
  """
  rows = [list(prefix) + list(c) + list(a) + list(suffix) for c, a in pairs]
  p_R = np.array([len(prefix) + len(c) for c, _ in pairs], np.int32)
  a_R = np.array([len(a) for _, a in pairs], np.int32)
  if np.any(a_R < 1):
    raise ValueError('scoring: every answer needs at least one token')
  longest = max(map(len, rows))
  if longest > cfg.max_len:
    raise ValueError(f'scoring: a row of {longest} tokens exceeds max_len {cfg.max_len}')
  l = length or min(_pad_to(longest, _LEN_BUCKET), cfg.max_len)
  a_max = answer or _pad_to(int(a_R.max()), _ANS_BUCKET)
  if longest > l or a_R.max() > a_max:
    raise ValueError(f'scoring: rows of {longest} / answers of {a_R.max()} tokens exceed the '
                     f'static sizes {l} / {a_max}')
  tokens_RL = np.full((len(rows), l), cfg.pad_token_id, np.int32)
  valid_RL = np.zeros((len(rows), l), bool)
  for r, row in enumerate(rows):
    tokens_RL[r, :len(row)] = row
    valid_RL[r, :len(row)] = True
  return tokens_RL, valid_RL, p_R, a_R, a_max


def _seeds(key, seeds, n: int):
  if seeds is not None:
    return jnp.asarray(np.asarray(seeds, np.int64) % 2 ** 32, jnp.uint32)
  return jax.random.bits(jax.random.key(0) if key is None else key, (n,), jnp.uint32)


def _answer_logits(cfg: ModelConfig, params, tokens_XL, valid_XL, pos_XA, cfg_scale,
                   prompt_XL=None):
  """float32 `[X, A, V]` logits at `pos` (head on A positions only), guided under CFG.

  The unconditional rows mask the prompt (`prompt_XL`) and keep everything else.
  """
  model = build(cfg)
  if cfg_scale > 0:
    un_XL = jnp.where(prompt_XL, cfg.mask_token_id, tokens_XL)
    tokens_XL = jnp.concatenate([tokens_XL, un_XL])
    valid_XL = jnp.concatenate([valid_XL, valid_XL])
    pos_XA = jnp.concatenate([pos_XA, pos_XA])
  h_XLD = model.apply({'params': params}, tokens_XL, valid_XL, method='hidden')
  h_XAD = jnp.take_along_axis(h_XLD, pos_XA[..., None], axis=1)
  logits_XAV = model.apply({'params': params}, h_XAD, method='logits').astype(f32)
  if cfg_scale > 0:
    c_XAV, u_XAV = jnp.split(logits_XAV, 2)
    logits_XAV = u_XAV + (cfg_scale + 1) * (c_XAV - u_XAV)
  return logits_XAV


def _answer_ce(cfg: ModelConfig, params, tokens_XL, valid_XL, pos_XA, target_XA, cfg_scale,
               prompt_XL=None):
  """float32 `[X, A]` cross-entropy of `target` at `pos`."""
  logits_XAV = _answer_logits(cfg, params, tokens_XL, valid_XL, pos_XA, cfg_scale, prompt_XL)
  picked_XA = jnp.take_along_axis(logits_XAV, target_XA[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_XAV, axis=-1) - picked_XA


def _answer_slots(tokens_RL, p_R, a_R, a_max: int):
  """Positions `[R, A]` of the answer slots, their true tokens, and which slots are real.

  Padding slots point at column 0 for gathers; never scatter through them (`_write`).
  """
  j_A = jnp.arange(a_max)
  valid_RA = j_A[None] < a_R[:, None]
  pos_RA = jnp.where(valid_RA, p_R[:, None] + j_A[None], 0)
  return pos_RA, jnp.take_along_axis(tokens_RL, pos_RA, axis=1), valid_RA


def _write(tokens_XL, pos_XA, where_XA, values_XA):
  """`tokens` with `values` written at the slots where `where_XA` (a subset of the real ones).

  Other slots point out of range and are dropped: a padding slot shares column 0
  with the first answer token of an empty context, and two writes to one column
  in a scatter leave either value.
  """
  rows_XA = jnp.arange(tokens_XL.shape[0])[:, None]
  pos_XA = jnp.where(where_XA, pos_XA, tokens_XL.shape[1])
  return tokens_XL.at[rows_XA, pos_XA].set(values_XA, mode='drop')


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _mc(cfg, mesh, a_max, b, rounds, cfg_scale, params, tokens_RL, valid_RL, p_R, a_R, seed_R):
  with sharding.activation_sharding(mesh):
    r, l = tokens_RL.shape
    pos_RA, target_RA, slot_RA = _answer_slots(tokens_RL, p_R, a_R, a_max)
    prompt_RL = jnp.arange(l)[None] < p_R[:, None]
    key_R = jax.vmap(jax.random.key)(seed_R)

    def one_round(i):
      keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(key_R)

      def draw(key, a, slot_A):  # one request: counts per row and which slots are masked
        key_k, key_perm = jax.random.split(key)
        n_B = stratified_mask_counts(jax.random.randint(key_k, (), 1, a + 1), a, b)
        # One uniform per slot from its own key: the draws do not depend on a_max.
        u_AB = jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(key_perm, j), (b,)))(
            jnp.arange(a_max))
        u_BA = jnp.where(slot_A, u_AB.T, 2.)
        rank_BA = jnp.argsort(jnp.argsort(u_BA, axis=-1), axis=-1)
        return n_B, (rank_BA < n_B[:, None]) & slot_A

      n_RB, masked_RBA = jax.vmap(draw)(keys, a_R, slot_RA)
      rep = lambda x: jnp.repeat(x, b, axis=0)
      tokens_XL = rep(tokens_RL)
      pos_XA = rep(pos_RA)
      masked_XA = masked_RBA.reshape(r * b, a_max)
      tokens_XL = _write(tokens_XL, pos_XA, masked_XA, cfg.mask_token_id)
      ce_XA = _answer_ce(cfg, params, tokens_XL, rep(valid_RL), pos_XA, rep(target_RA),
                         cfg_scale, rep(prompt_RL))
      weight_X = rep(a_R).astype(f32) / n_RB.reshape(-1).astype(f32)
      loss_X = jnp.sum(jnp.where(masked_XA, ce_XA, 0.), axis=-1) * weight_X
      return loss_X.reshape(r, b).mean(axis=-1)

    losses_NR = jax.lax.map(one_round, jnp.arange(rounds))
    return -losses_NR.mean(axis=0)


def mc_log_likelihood(cfg: ModelConfig, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                      *, mc_num: int = 128, batch_size: int = 16, cfg_scale: float = 0.,
                      add_bos: bool | None = False, padd_eos: bool = False, key=None, seeds=None,
                      length: int | None = None, answer: int | None = None) -> np.ndarray:
  """Monte-Carlo `log p(answer | prompt)` per `(prompt_ids, answer_ids)` pair -> float `[R]`.

  `mc_num` must be a multiple of `batch_size`; `mc_num = batch_size = 1` with a
  one-token answer is exact. CFG (`cfg_scale > 0`) reuses the masks with the
  prompt fully masked in the unconditional pass. `add_bos` / `padd_eos`: the
  harness's BOS before the context and EOS after the answer (SPEC §3).
  `seeds` (ints `[R]`) key each pair's masks; by default they are drawn from
  `key`. `length` / `answer`: static row and answer widths (the engine's
  buckets); they do not change the draws.
  Raises ValueError for an empty answer, a row over `max_len`, bad mc sizes,
  or `add_bos` without a BOS id.
  """
  ScoringOptions('mc', mc_num, batch_size, cfg_scale)
  prefix, suffix = affixes(cfg, add_bos, padd_eos)
  tokens_RL, valid_RL, p_R, a_R, a_max = _pack(cfg, pairs, prefix, suffix, length, answer)
  out = _mc(cfg, sharding.mesh_of(params), a_max, batch_size, mc_num // batch_size,
            float(cfg_scale), params, tokens_RL, valid_RL, p_R, a_R,
            _seeds(key, seeds, len(pairs)))
  return np.asarray(out, np.float64)


def _masked_answers(cfg, tokens_RL, p_R, a_R, a_max):
  """The rows with every answer slot masked, plus the slots' positions, targets and prompt mask."""
  pos_RA, target_RA, slot_RA = _answer_slots(tokens_RL, p_R, a_R, a_max)
  tokens_RL = _write(tokens_RL, pos_RA, slot_RA, cfg.mask_token_id)
  prompt_RL = jnp.arange(tokens_RL.shape[1])[None] < p_R[:, None]
  return tokens_RL, pos_RA, target_RA, slot_RA, prompt_RL


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _confidence(cfg, mesh, a_max, cfg_scale, params, tokens_RL, valid_RL, p_R, a_R):
  with sharding.activation_sharding(mesh):
    tokens_RL, pos_RA, target_RA, slot_RA, prompt_RL = _masked_answers(cfg, tokens_RL, p_R, a_R,
                                                                       a_max)

    def body(i, state):
      tokens_RL, masked_RA, total_R = state
      ce_RA = _answer_ce(cfg, params, tokens_RL, valid_RL, pos_RA, target_RA, cfg_scale,
                         prompt_RL)
      ce_RA = jnp.where(masked_RA, ce_RA, jnp.inf)
      j_R = jnp.argmin(ce_RA, axis=-1)  # ties: the lower position
      live_R = i < a_R
      total_R = total_R + jnp.where(live_R, jnp.take_along_axis(ce_RA, j_R[:, None], 1)[:, 0], 0.)
      reveal_RA = (jnp.arange(a_max)[None] == j_R[:, None]) & live_R[:, None]
      tokens_RL = _write(tokens_RL, pos_RA, reveal_RA, target_RA)
      return tokens_RL, masked_RA & ~reveal_RA, total_R

    state = (tokens_RL, slot_RA, jnp.zeros(tokens_RL.shape[:1], f32))
    _, _, total_R = jax.lax.fori_loop(0, jnp.max(a_R), body, state)
    return -total_R


def confidence_score(cfg: ModelConfig, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                     *, add_bos: bool | None = False, padd_eos: bool = False,
                     cfg_scale: float = 0., length: int | None = None,
                     answer: int | None = None) -> np.ndarray:
  """Confidence-based score per `(context_ids, answer_ids)` pair -> float `[R]` (higher is better).

  `l` forward passes for an `l`-token answer. `add_bos` / `padd_eos`: BOS
  before the context, one EOS after the answer (its logits unused); the
  published ARC-C / HellaSwag setting turns both on (SPEC §3). `cfg_scale`:
  guidance as in the harness (prompt masked in the unconditional pass).
  `length` / `answer`: static row and answer widths (the engine's buckets).
  """
  prefix, suffix = affixes(cfg, add_bos, padd_eos)
  tokens_RL, valid_RL, p_R, a_R, a_max = _pack(cfg, pairs, prefix, suffix, length, answer)
  out = _confidence(cfg, sharding.mesh_of(params), a_max, float(cfg_scale), params, tokens_RL,
                    valid_RL, p_R, a_R)
  return np.asarray(out, np.float64)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _greedy(cfg, mesh, a_max, cfg_scale, params, tokens_RL, valid_RL, p_R, a_R):
  with sharding.activation_sharding(mesh):
    tokens_RL, pos_RA, target_RA, slot_RA, prompt_RL = _masked_answers(cfg, tokens_RL, p_R, a_R,
                                                                       a_max)

    def body(i, state):
      tokens_RL, masked_RA = state
      logits_RAV = _answer_logits(cfg, params, tokens_RL, valid_RL, pos_RA, cfg_scale, prompt_RL)
      x0_RA = jnp.argmax(logits_RAV, axis=-1).astype(jnp.int32)
      picked_RA = jnp.take_along_axis(logits_RAV, x0_RA[..., None], axis=-1)[..., 0]
      conf_RA = jnp.exp(picked_RA - jax.nn.logsumexp(logits_RAV, axis=-1))
      j_R = jnp.argmax(jnp.where(masked_RA, conf_RA, -jnp.inf), axis=-1)  # ties: lower position
      reveal_RA = (jnp.arange(a_max)[None] == j_R[:, None]) & (i < a_R)[:, None]
      tokens_RL = _write(tokens_RL, pos_RA, reveal_RA, x0_RA)
      return tokens_RL, masked_RA & ~reveal_RA

    tokens_RL, _ = jax.lax.fori_loop(0, jnp.max(a_R), body, (tokens_RL, slot_RA))
    got_RA = jnp.take_along_axis(tokens_RL, pos_RA, axis=1)
    return jnp.all(~slot_RA | (got_RA == target_RA), axis=-1)


def greedy_match(cfg: ModelConfig, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                 *, add_bos: bool | None = False, padd_eos: bool = False, cfg_scale: float = 0.,
                 length: int | None = None, answer: int | None = None) -> np.ndarray:
  """lm-eval's `is_greedy` per pair -> bool `[R]` (suffix greedy prediction, SPEC §3).

  From `[context | MASK * l]`, `l` times: the argmax at every masked answer
  position, and only the single most confident one (float32 softmax; ties to
  the lower position) is revealed with its argmax. True iff the revealed
  answer equals the given one. Same rows (`add_bos`, `padd_eos`, CFG) as the
  scorers; `l` forward passes.
  """
  prefix, suffix = affixes(cfg, add_bos, padd_eos)
  tokens_RL, valid_RL, p_R, a_R, a_max = _pack(cfg, pairs, prefix, suffix, length, answer)
  out = _greedy(cfg, sharding.mesh_of(params), a_max, float(cfg_scale), params, tokens_RL,
                valid_RL, p_R, a_R)
  return np.asarray(out, bool)


# -- rolling log-likelihood (perplexity) ------------------------------------------

def window_size(cfg: ModelConfig, options: ScoringOptions) -> int:
  """Tokens per rolling window: `options.rolling_window`, or all `max_len` less BOS/EOS.

  Raises ValueError if the window and its BOS/EOS do not fit in `max_len`.
  """
  prefix, suffix = affixes(cfg, options.add_bos, options.padd_eos)
  room = cfg.max_len - len(prefix) - len(suffix)
  size = room if options.rolling_window is None else int(options.rolling_window)
  if not 0 < size <= room:
    raise ValueError(f'ScoringOptions.rolling_window: {size} tokens (+{len(prefix) + len(suffix)} '
                     f'BOS/EOS) do not fit in max_len {cfg.max_len}')
  return size


def rolling_windows(ids: Sequence[int], size: int) -> list[tuple[int, ...]]:
  """`ids` cut into consecutive disjoint windows of `size` tokens (the last may be shorter)."""
  return [tuple(ids[i:i + size]) for i in range(0, len(ids), size)]


def window_seed(seed: int, w: int) -> int:
  """The MC seed of window `w` of a text whose seed is `seed` (uint32)."""
  return zlib.crc32(f'{int(seed) % 2 ** 32}:{w}'.encode())


def rolling_log_likelihood(cfg: ModelConfig, params, docs: Sequence[Sequence[int]],
                           options: ScoringOptions = ScoringOptions(), *, seeds=None
                           ) -> np.ndarray:
  """Rolling log-likelihood per text -> float `[D]` (perplexity tasks; SPEC §3).

  Each text (token ids) is cut into `window_size` windows, each window is
  scored by `mc_log_likelihood` with an empty prompt (`options`' mc_num,
  mc_batch, add_bos, padd_eos; window `w` of text `d` uses seed
  `window_seed(seeds[d], w)`), and the window estimates are summed. The
  expectation of each window's estimate is the masked-diffusion ELBO, a lower
  bound on its log-likelihood: the negated sum estimates an UPPER BOUND on the
  NLL (exact for one-token windows). An empty text scores 0.
  """
  size = window_size(cfg, options)
  seeds = [0] * len(docs) if seeds is None else list(seeds)
  pairs, owner, window_seeds = [], [], []
  for d, ids in enumerate(docs):
    for w, window in enumerate(rolling_windows(list(ids), size)):
      pairs.append(((), window))
      owner.append(d)
      window_seeds.append(window_seed(seeds[d], w))
  out = np.zeros(len(docs), np.float64)
  if pairs:
    ll = mc_log_likelihood(cfg, params, pairs, mc_num=options.mc_num,
                           batch_size=options.mc_batch, cfg_scale=options.cfg_scale,
                           add_bos=options.add_bos, padd_eos=options.padd_eos,
                           seeds=window_seeds)
    np.add.at(out, owner, ll)
  return out


# -- requests of the batch engine (`illada_jax.engine.Engine.score`) ---------------------

@dataclasses.dataclass(frozen=True)
class ScoreRequest:
  """Score `continuation_ids` after `context_ids` (SPEC §3); `seed` keys the MC masks."""
  id: Any
  context_ids: tuple[int, ...]
  continuation_ids: tuple[int, ...]
  options: ScoringOptions = ScoringOptions()
  seed: int = 0


@dataclasses.dataclass
class Scored:
  """`score`: MC estimate of `log p(continuation | context)`, or the confidence score.

  is_greedy: lm-eval's greedy flag (suffix greedy prediction) when the
  request's options ask for it (`check_greedy`), else None.
  """
  id: Any
  score: float
  is_greedy: bool | None = None
