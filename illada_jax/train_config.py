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
from illada_jax.usage import UsageError
from illada_jax.util import user_tmp


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
  # Resume with changed data settings (batch size, files, seq_len, ...): keep the
  # weights, optimizer and step, restart the data iterator (see `resume`).
  restart_data: bool = False
  eps: float = 1e-3  # minimum masking probability
  random_length_prob: float = 0.01  # pre-training only
  loss_chunk: int = 512  # sequence positions per LM-head/CE chunk
  workdir: str = dataclasses.field(default_factory=lambda: user_tmp('illada_run'))  # per user
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
  """The `CONFIG` TrainConfig of a python file (or of module `illada_jax.configs.NAME`).

  Raises UsageError (a ValueError) naming the file for a missing file or
  module, a file that does not run, or one without `CONFIG`.
  """
  if os.path.isfile(path):
    spec = importlib.util.spec_from_file_location('_illada_train_config', path)
    module = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(module)
    except SyntaxError as e:
      raise UsageError(f'--config {path}:{e.lineno}: {e.msg}') from None
    except (ImportError, NameError, ValueError, TypeError, AttributeError) as e:
      raise UsageError(f'--config {path}: {type(e).__name__}: {e}') from None
  elif path.endswith('.py') or os.sep in path or not path.isidentifier():
    raise UsageError(f'--config {path}: no such file')
  else:
    try:
      module = importlib.import_module(f'illada_jax.configs.{path}')
    except ModuleNotFoundError as e:
      if e.name != f'illada_jax.configs.{path}':
        raise
      raise UsageError(f'--config {path}: no such file, nor a module of illada_jax.configs'
                       ) from None
  cfg = getattr(module, 'CONFIG', None)
  if not isinstance(cfg, TrainConfig):
    raise UsageError(f'{path}: defines no CONFIG = TrainConfig(...)')
  return cfg


def _bool(text: str) -> bool:
  if text.lower() in ('1', 'true', 'yes'):
    return True
  if text.lower() in ('0', 'false', 'no'):
    return False
  raise ValueError('expected true or false')


def _int(text: str) -> int:
  value = float(text) if 'e' in text.lower() else int(text)
  if value != int(value):
    raise ValueError('not a whole number')
  return int(value)


def _strings(text: str) -> tuple[str, ...]:
  """`('a', 'b')` or `["a"]` (Python literals), else one or more comma-separated strings."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = None
  if isinstance(value, str):
    return (value,)
  if isinstance(value, (tuple, list)):
    if not all(isinstance(v, str) for v in value):
      raise ValueError('expected strings')
    return tuple(value)
  return tuple(t.strip() for t in text.split(',') if t.strip())


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ValueError('expected a Python literal') from None


_PARSERS = {'bool': _bool, 'int': _int, 'float': float, 'str': lambda t: t,
            'tuple[str, ...]': _strings}


def parse_value(text: str, annotation: str):
  """`text` read as the declared type `annotation` (a field's type, as a string).

  `X | None` reads '', 'None', 'none' and 'null' as None. `str` takes the
  text as it is (quotes around it are removed). Raises ValueError.
  """
  kinds = [k.strip() for k in str(annotation).split('|')]
  if 'None' in kinds and text.strip() in ('', 'None', 'none', 'null'):
    return None
  kind = next((k for k in kinds if k != 'None'), 'str')
  if kind == 'str' and len(text) >= 2 and text[0] == text[-1] and text[0] in '\'"':
    return text[1:-1]
  return _PARSERS.get(kind, _literal)(text)


def override(cfg, key: str, text: str):
  """`override(cfg, 'optimizer.lr', '1e-3')`: a copy with one (nested) field replaced.

  The value is read as the field's declared type. Raises UsageError naming the
  key: an unknown field, a value that is not of the field's type, or one the
  config refuses.
  """
  return _override(cfg, key, key, text)


def _override(cfg, full: str, key: str, text: str):
  head, _, rest = key.partition('.')
  fields = {f.name: f for f in dataclasses.fields(cfg)}
  if head not in fields:
    raise UsageError(f'--set {full}: {type(cfg).__name__} has no field {head!r}; '
                     f'fields: {", ".join(sorted(fields))}')
  current = getattr(cfg, head)
  if rest:
    if not dataclasses.is_dataclass(current):
      raise UsageError(f'--set {full}: {head} is not a nested config')
    return dataclasses.replace(cfg, **{head: _override(current, full, rest, text)})
  if dataclasses.is_dataclass(current):
    raise UsageError(f'--set {full}: {head} is a nested config; set its fields '
                     f'({full}.FIELD=VALUE)')
  annotation = str(fields[head].type)
  try:
    value = parse_value(text, annotation)
  except ValueError as e:
    raise UsageError(f'--set {full}={text}: cannot read it as {annotation} ({e})') from None
  try:
    return dataclasses.replace(cfg, **{head: value})
  except (ValueError, TypeError) as e:
    raise UsageError(f'--set {full}={text}: {e}') from None


def check(cfg: TrainConfig, devices: int, processes: int = 1) -> TrainConfig:
  """Checks a run's settings and files before anything is built; returns `cfg` with the
  model and tokenizer of `init_from` (`finetune.resolve_config`).

  `devices` / `processes` are the run's (`jax.device_count()`, `jax.process_count()`).
  Raises UsageError naming the field (as `--set` spells it) and, for files, the path.
  """
  from illada_jax import finetune, usage
  import glob
  if cfg.objective not in ('pretrain', 'sft'):
    raise UsageError(f'objective={cfg.objective!r}: expected pretrain or sft')
  for name in ('batch_size', 'grad_accum', 'seq_len', 'steps', 'log_every', 'eval_batches',
               'keep_checkpoints', 'loss_chunk'):
    usage.positive(name, getattr(cfg, name))
  for name in ('checkpoint_every', 'eval_every', 'eval_samples'):
    if getattr(cfg, name) < 0:
      raise UsageError(f'{name}={getattr(cfg, name)}: must be >= 0')
  if cfg.batch_size % (cfg.grad_accum * processes):
    raise UsageError(f'batch_size={cfg.batch_size}: must divide by grad_accum x processes '
                     f'({cfg.grad_accum} x {processes})')
  usage.mesh_fits('mesh', cfg.mesh, devices)
  if not cfg.data.paths:
    raise UsageError('data.paths: no data files given (--set data.paths=FILE)')
  for name in ('paths', 'eval_paths'):
    for pattern in getattr(cfg.data, name):
      if not glob.glob(pattern):
        raise UsageError(f'data.{name}: no file matches {pattern!r}')
  tok = cfg.data.tokenizer
  if tok and not os.path.exists(tok) and cfg.data.train_tokenizer_vocab <= 0:
    raise UsageError(f'data.tokenizer {tok}: no such file or directory')
  if cfg.data.chat_template and not os.path.exists(cfg.data.chat_template):
    raise UsageError(f'data.chat_template {cfg.data.chat_template}: no such file')
  if cfg.init_from:
    usage.checkpoint_dir('init_from', cfg.init_from)
    usage.apart('workdir', cfg.workdir, {'init_from checkpoint': cfg.init_from})
  usage.writable_dir('workdir', cfg.workdir)
  try:
    cfg = finetune.resolve_config(cfg)
  except (ValueError, FileNotFoundError) as e:
    raise UsageError(str(e)) from None
  from illada_jax import resume
  resume.check(cfg, processes)
  return cfg
