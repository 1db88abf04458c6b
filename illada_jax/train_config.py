"""`TrainConfig`: everything a training run needs, and how config files and `--set` give one.

A config file is a Python file defining `CONFIG = TrainConfig(...)`
(`configs/*.py`); `override(cfg, 'optimizer.lr', '1e-3')` applies one
`--set key=value` of `illada-train`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import os

from illada_jax import optimizer as opt_lib
from illada_jax.lora import LoraConfig
from illada_jax import sharding
from illada_jax.config import DataConfig, ModelConfig
from illada_jax.configs import models as presets


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run needs. Config files define one as `CONFIG`."""
  model: ModelConfig = presets.ILLADA_TINY
  objective: str = 'pretrain'  # 'pretrain' or 'sft' (SPEC §4)
  lora: LoraConfig = LoraConfig()  # rank > 0: train low-rank adapters only, base frozen
  data: DataConfig = DataConfig()
  optimizer: opt_lib.OptimizerConfig = opt_lib.OptimizerConfig()
  batch_size: int = 32  # global rows per optimizer step
  grad_accum: int = 1  # micro-batches per step; batch_size % grad_accum == 0
  seq_len: int = 256  # L
  steps: int = 1000  # optimizer steps of the run
  seed: int = 0
  # A checkpoint directory (converter output or a step directory) whose weights
  # start the run (fresh optimizer, step 0); '' = random init. See `finetune`.
  init_from: str = ''
  mesh: str = 'data=1,fsdp=-1,tensor=1'  # see sharding.parse_mesh_shape
  # Logical axis -> mesh axes for parameters, activations and the batch.
  sharding_rules: tuple = sharding.RULES
  eps: float = 1e-3  # minimum masking probability
  random_length_prob: float = 0.01  # pre-training only
  loss_chunk: int = 512  # sequence positions per LM-head/CE chunk
  workdir: str = '/tmp/illada_run'
  log_every: int = 10
  eval_every: int = 0  # 0 = no periodic eval
  eval_batches: int = 4
  # Held-out prompts sampled (greedy) at every eval, logged with their
  # references; 0 = none. See `train_samples`.
  eval_samples: int = 0
  eval_gen_length: int = 32  # tokens generated per sampled prompt
  checkpoint_every: int = 500  # 0 = only at the end / on SIGTERM
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  peak_flops_per_device: float = 0.0  # 0 = guess from the device kind (MFU estimate)
  progress_bar: bool = True


def load_config(path: str) -> TrainConfig:
  """The `CONFIG` TrainConfig of a python file (or of module `illada_jax.configs.NAME`)."""
  if os.path.exists(path):
    spec = importlib.util.spec_from_file_location('_illada_train_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  else:
    module = importlib.import_module(f'illada_jax.configs.{path}')
  cfg = getattr(module, 'CONFIG', None)
  if not isinstance(cfg, TrainConfig):
    raise ValueError(f'{path}: defines no CONFIG = TrainConfig(...)')
  return cfg


def _parse_value(text: str, current):
  if isinstance(current, bool):
    if text.lower() in ('1', 'true', 'yes'):
      return True
    if text.lower() in ('0', 'false', 'no'):
      return False
    raise ValueError(f'expected a boolean, got {text!r}')
  if isinstance(current, int) and not isinstance(current, bool):
    return int(float(text)) if 'e' in text.lower() else int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str) or current is None:
    try:
      v = ast.literal_eval(text)
      return v if current is None or isinstance(v, str) else text
    except (ValueError, SyntaxError):
      return text
  if isinstance(current, (tuple, list)):
    v = ast.literal_eval(text)
    return type(current)(v if isinstance(v, (tuple, list)) else (v,))
  return ast.literal_eval(text)


def override(cfg, key: str, text: str):
  """`override(cfg, 'optimizer.lr', '1e-3')`: a copy with one (nested) field replaced."""
  head, _, rest = key.partition('.')
  names = {f.name for f in dataclasses.fields(cfg)}
  if head not in names:
    raise ValueError(f'--set {key}: {type(cfg).__name__} has no field {head!r}; '
                     f'fields: {sorted(names)}')
  current = getattr(cfg, head)
  if rest:
    if not dataclasses.is_dataclass(current):
      raise ValueError(f'--set {key}: {head} is not a nested config')
    return dataclasses.replace(cfg, **{head: override(current, rest, text)})
  return dataclasses.replace(cfg, **{head: _parse_value(text, current)})
