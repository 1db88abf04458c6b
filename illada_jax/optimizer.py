"""AdamW with warmup-stable-decay or cosine schedules, clipping and a decay mask.

Gradient accumulation lives in the train step (a scan over micro-batches
inside one jitted step), not here, so the optimizer sees one update per
global batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Hyper-parameters of AdamW and its learning-rate schedule."""
  lr: float = 4e-4  # peak learning rate
  schedule: str = 'wsd'  # 'wsd' (warmup-stable-decay), 'cosine' or 'constant'
  warmup_steps: int = 100
  total_steps: int = 10_000  # schedule length; the train loop may stop earlier
  decay_fraction: float = 0.1  # wsd: the last fraction of total_steps decays to final_lr
  final_lr_fraction: float = 0.1  # end learning rate as a fraction of lr
  b1: float = 0.9
  b2: float = 0.95
  adam_eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0  # global-norm clipping; <= 0 disables
  state_dtype: str = 'float32'  # dtype of the first moment (optax `mu_dtype`)


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Step -> learning rate. WSD: linear warmup, constant, linear decay at the end."""
  warmup = max(int(cfg.warmup_steps), 0)
  total = max(int(cfg.total_steps), warmup + 1)
  final = cfg.lr * cfg.final_lr_fraction
  if cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=total,
        end_value=final)
  if cfg.schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)], [warmup])
  if cfg.schedule == 'wsd':
    decay = max(int(round(cfg.decay_fraction * total)), 1)
    stable = max(total - warmup - decay, 0)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr),
         optax.linear_schedule(cfg.lr, final, decay)],
        [warmup, warmup + stable])
  raise ValueError(f'optimizer.schedule={cfg.schedule!r}; use wsd, cosine or constant')


def decay_mask(params):
  """True where weight decay applies: matrices, not norm scales (any rank-1 leaf).

  Scanned layers give norm scales a leading layer axis `[N, D]`, so norms are
  recognised by their path (`.../scale`), not only by rank.
  """
  def is_decayed(path, x):
    names = [getattr(k, 'key', getattr(k, 'name', '')) for k in path]
    return x.ndim >= 2 and names[-1] != 'scale'
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """`clip_by_global_norm -> adamw(schedule, mask=decay_mask)`."""
  parts = []
  if cfg.clip_norm and cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(
      learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps,
      weight_decay=cfg.weight_decay, mask=decay_mask, mu_dtype=jnp.dtype(cfg.state_dtype)))
  return optax.chain(*parts)
