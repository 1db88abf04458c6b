"""Scoring answers with a masked-diffusion LM (SPEC §3), batched over requests.

* `mc_log_likelihood`: LLaDA's Monte-Carlo estimate of `log p(answer | prompt)`.
  Each of `mc_num / batch_size` rounds draws `k ~ U{1..l}` and gives row `j` of
  the round exactly `n_j = round(linspace(k, k + (b-1) l / b, b))` (wrapped into
  `[1, l]`) masked answer positions, chosen at random; the prompt is never
  masked. The estimate is `-mean_rounds mean_rows (l / n_j) * sum masked CE`.
* `confidence_score`: iLLaDA's easiest-first any-order log-likelihood: from
  `[BOS context | MASK * l | EOS]`, `l` times add the smallest CE of the true
  token over the still-masked answer positions and reveal that position.

Both take many `(context, answer)` pairs at once: every pair is one row (MC:
`batch_size` rows) of a right-padded batch whose padding is hidden by the key
mask, so rows of different lengths share one compiled program per length
bucket. The LM head runs only on answer positions. MC masks are drawn from
each pair's own seed (`fold_in(key(seed), round)`), so a pair's estimate does
not depend on the pairs beside it (SPEC §2, per-request independence).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from illada_jax import sharding
from illada_jax.config import ModelConfig
from illada_jax.model import Transformer

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


@dataclasses.dataclass(frozen=True)
class ScoringOptions:
  """How answers are scored (SPEC §3); hashable, it selects the compiled program.

  method: 'mc' (Monte-Carlo likelihood) or 'confidence'; mc_num / mc_batch:
  MC samples and rows per round (`mc_num % mc_batch == 0`); cfg_scale: MC
  classifier-free guidance.
  """
  method: str = 'mc'
  mc_num: int = 128
  mc_batch: int = 16
  cfg_scale: float = 0.

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'ScoringOptions.method: {self.method!r} not in {METHODS}')
    if self.mc_batch <= 0 or self.mc_num <= 0 or self.mc_num % self.mc_batch:
      raise ValueError(f'ScoringOptions.mc_num: {self.mc_num} is not a positive multiple of '
                       f'mc_batch={self.mc_batch}')
    object.__setattr__(self, 'cfg_scale', float(self.cfg_scale))


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


def _answer_ce(cfg: ModelConfig, params, tokens_XL, valid_XL, pos_XA, target_XA, cfg_scale,
               prompt_XL=None):
  """float32 `[X, A]` cross-entropy of `target` at `pos` (head on A positions only)."""
  model = Transformer(cfg)
  if cfg_scale > 0:
    un_XL = jnp.where(prompt_XL, cfg.mask_token_id, tokens_XL)
    tokens_XL = jnp.concatenate([tokens_XL, un_XL])
    valid_XL = jnp.concatenate([valid_XL, valid_XL])
    pos_XA = jnp.concatenate([pos_XA, pos_XA])
  h_XLD = model.apply({'params': params}, tokens_XL, valid_XL, method='hidden')
  h_XAD = jnp.take_along_axis(h_XLD, pos_XA[..., None], axis=1)
  logits_XAV = model.apply({'params': params}, h_XAD, method='logits')
  if cfg_scale > 0:
    c_XAV, u_XAV = jnp.split(logits_XAV, 2)
    logits_XAV = u_XAV + (cfg_scale + 1) * (c_XAV - u_XAV)
  picked_XA = jnp.take_along_axis(logits_XAV, target_XA[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_XAV, axis=-1) - picked_XA


def _answer_slots(tokens_RL, p_R, a_R, a_max: int):
  """Positions `[R, A]` of the answer slots, their true tokens, and which slots are real."""
  j_A = jnp.arange(a_max)
  valid_RA = j_A[None] < a_R[:, None]
  pos_RA = jnp.where(valid_RA, p_R[:, None] + j_A[None], 0)
  return pos_RA, jnp.take_along_axis(tokens_RL, pos_RA, axis=1), valid_RA


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
        u_BA = jnp.where(slot_A, jax.random.uniform(key_perm, (b, a_max)), 2.)
        rank_BA = jnp.argsort(jnp.argsort(u_BA, axis=-1), axis=-1)
        return n_B, (rank_BA < n_B[:, None]) & slot_A

      n_RB, masked_RBA = jax.vmap(draw)(keys, a_R, slot_RA)
      rep = lambda x: jnp.repeat(x, b, axis=0)
      tokens_XL = rep(tokens_RL)
      pos_XA = rep(pos_RA)
      masked_XA = masked_RBA.reshape(r * b, a_max)
      rows_XA = jnp.arange(r * b)[:, None]
      tokens_XL = tokens_XL.at[rows_XA, pos_XA].set(
          jnp.where(masked_XA, cfg.mask_token_id, tokens_XL[rows_XA, pos_XA]))
      ce_XA = _answer_ce(cfg, params, tokens_XL, rep(valid_RL), pos_XA, rep(target_RA),
                         cfg_scale, rep(prompt_RL))
      weight_X = rep(a_R).astype(f32) / n_RB.reshape(-1).astype(f32)
      loss_X = jnp.sum(jnp.where(masked_XA, ce_XA, 0.), axis=-1) * weight_X
      return loss_X.reshape(r, b).mean(axis=-1)

    losses_NR = jax.lax.map(one_round, jnp.arange(rounds))
    return -losses_NR.mean(axis=0)


def mc_log_likelihood(cfg: ModelConfig, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                      *, mc_num: int = 128, batch_size: int = 16, cfg_scale: float = 0.,
                      key=None, seeds=None, length: int | None = None,
                      answer: int | None = None) -> np.ndarray:
  """Monte-Carlo `log p(answer | prompt)` per `(prompt_ids, answer_ids)` pair -> float `[R]`.

  `mc_num` must be a multiple of `batch_size`; `mc_num = batch_size = 1` with a
  one-token answer is exact. CFG (`cfg_scale > 0`) reuses the masks with the
  prompt fully masked in the unconditional pass. `seeds` (ints `[R]`) key each
  pair's masks; by default they are drawn from `key`. `length` / `answer`:
  static row and answer widths (the engine's buckets).
  Raises ValueError for an empty answer, a row over `max_len` or bad mc sizes.
  """
  ScoringOptions('mc', mc_num, batch_size, cfg_scale)
  tokens_RL, valid_RL, p_R, a_R, a_max = _pack(cfg, pairs, length=length, answer=answer)
  out = _mc(cfg, sharding.mesh_of(params), a_max, batch_size, mc_num // batch_size,
            float(cfg_scale), params, tokens_RL, valid_RL, p_R, a_R,
            _seeds(key, seeds, len(pairs)))
  return np.asarray(out, np.float64)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _confidence(cfg, mesh, a_max, params, tokens_RL, valid_RL, p_R, a_R):
  with sharding.activation_sharding(mesh):
    pos_RA, target_RA, slot_RA = _answer_slots(tokens_RL, p_R, a_R, a_max)
    rows_RA = jnp.arange(tokens_RL.shape[0])[:, None]
    tokens_RL = tokens_RL.at[rows_RA, pos_RA].set(
        jnp.where(slot_RA, cfg.mask_token_id, tokens_RL[rows_RA, pos_RA]))

    def body(i, state):
      tokens_RL, masked_RA, total_R = state
      ce_RA = _answer_ce(cfg, params, tokens_RL, valid_RL, pos_RA, target_RA, 0.)
      ce_RA = jnp.where(masked_RA, ce_RA, jnp.inf)
      j_R = jnp.argmin(ce_RA, axis=-1)  # ties: the lower position
      live_R = i < a_R
      total_R = total_R + jnp.where(live_R, jnp.take_along_axis(ce_RA, j_R[:, None], 1)[:, 0], 0.)
      reveal_RA = (jnp.arange(a_max)[None] == j_R[:, None]) & live_R[:, None]
      tokens_RL = tokens_RL.at[rows_RA, pos_RA].set(
          jnp.where(reveal_RA, target_RA, tokens_RL[rows_RA, pos_RA]))
      return tokens_RL, masked_RA & ~reveal_RA, total_R

    state = (tokens_RL, slot_RA, jnp.zeros(tokens_RL.shape[:1], f32))
    _, _, total_R = jax.lax.fori_loop(0, jnp.max(a_R), body, state)
    return -total_R


def confidence_score(cfg: ModelConfig, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                     *, add_bos: bool = True, append_eos: bool = True, length: int | None = None,
                     answer: int | None = None) -> np.ndarray:
  """Confidence-based score per `(context_ids, answer_ids)` pair -> float `[R]` (higher is better).

  As the reference: BOS is prepended to the context and one EOS appended after
  the answer (its logit unused); `l` forward passes for an `l`-token answer.
  `length` / `answer`: static row and answer widths (the engine's buckets).
  """
  prefix, suffix = confidence_affixes(cfg, add_bos, append_eos)
  tokens_RL, valid_RL, p_R, a_R, a_max = _pack(cfg, pairs, prefix, suffix, length, answer)
  out = _confidence(cfg, sharding.mesh_of(params), a_max, params, tokens_RL, valid_RL, p_R, a_R)
  return np.asarray(out, np.float64)


def confidence_affixes(cfg: ModelConfig, add_bos: bool = True, append_eos: bool = True):
  """Tokens before the context and after the answer in a confidence-scoring row."""
  return ((cfg.bos_token_id,) if add_bos else ()), ((cfg.eos_token_id,) if append_eos else ())
