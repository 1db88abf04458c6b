"""illada-jax: the iLLaDA / LLaDA masked-diffusion language models in JAX.

Public API:
  ModelConfig, get_preset, init_params, forward, param_count,
  abstract_params, param_shardings, make_mesh, Transformer,
  load_checkpoint, save_checkpoint, SamplingOptions, generate, sample, Engine, Request,
  ScoreRequest, ScoringOptions, mc_log_likelihood, confidence_score, greedy_match,
  rolling_log_likelihood, PromptFormat, sampling_preset, scoring_preset
"""

from illada_jax.checkpoint import load_checkpoint, save_checkpoint
from illada_jax.config import ModelConfig
from illada_jax.model import (Transformer, abstract_params, forward, init_params,
                              param_count, param_shardings)
from illada_jax.engine import Engine, Request, ScoreRequest
from illada_jax.prompts import PromptFormat
from illada_jax.sampling import SamplingOptions, generate, sample
from illada_jax.scoring import (ScoringOptions, confidence_score, greedy_match, mc_log_likelihood,
                                rolling_log_likelihood)
from illada_jax.sharding import make_mesh


def get_preset(name: str) -> ModelConfig:
  """The preset `name` from `configs/models.py` (e.g. 'illada_8b', 'illada_tiny')."""
  from illada_jax.configs import models
  try:
    return models.PRESETS[name]
  except KeyError:
    raise ValueError(f'unknown preset {name!r}; have {sorted(models.PRESETS)}') from None


def sampling_preset(name: str) -> SamplingOptions:
  """The named `SamplingOptions` of `configs/sampling.py` (e.g. 'illada_instruct')."""
  from illada_jax.configs import sampling as presets
  try:
    return presets.PRESETS[name]
  except KeyError:
    raise ValueError(f'unknown sampling preset {name!r}; have {sorted(presets.PRESETS)}') from None


def scoring_preset(name: str) -> ScoringOptions:
  """The named `ScoringOptions` of `configs/scoring.py` (e.g. 'illada_confidence')."""
  from illada_jax.configs import scoring as presets
  try:
    return presets.PRESETS[name]
  except KeyError:
    raise ValueError(f'unknown scoring preset {name!r}; have {sorted(presets.PRESETS)}') from None


__all__ = ['ModelConfig', 'Transformer', 'abstract_params', 'forward', 'get_preset',
           'init_params', 'make_mesh', 'param_count', 'param_shardings',
           'load_checkpoint', 'save_checkpoint', 'SamplingOptions', 'generate', 'sample',
           'Engine', 'Request', 'ScoreRequest', 'ScoringOptions', 'mc_log_likelihood',
           'confidence_score', 'greedy_match', 'rolling_log_likelihood', 'PromptFormat',
           'sampling_preset', 'scoring_preset']
