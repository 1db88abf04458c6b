"""What a resumed training run must share with the run that wrote its checkpoints.

A run records the settings its checkpoints depend on in `<workdir>/run_settings.json`
when it starts fresh. Resuming with any of them changed is refused
(`UsageError` naming the setting and both values) before anything is built:

* the data position (`DATA_POSITION`: batch size, sequence length, objective,
  seed, process count, the data files and every data setting that shapes
  the row stream): the saved Grain iterator state indexes a stream these
  define; `TrainConfig.restart_data=True` keeps the weights, optimizer and
  step and starts the data iterator afresh (and records the new settings);
* the weights (`model.*` but the execution choices in `EXECUTION`, `lora.*`):
  the checkpoint's tree would not match; a new workdir is the only way.

Everything else (total steps, schedule, logging, eval and checkpoint
cadence, attention kernel, remat) may change between runs (docs/training.md).
"""

from __future__ import annotations

import dataclasses
import json
import os

from illada_jax.usage import UsageError

SETTINGS_FILE = 'run_settings.json'
DATA_POSITION = ('batch_size', 'seq_len', 'objective', 'seed', 'processes', 'data.')
# Model fields that change how the same weights run, not the weights.
EXECUTION = ('compute_dtype', 'attention_impl', 'remat_policy')
# Data settings that do not change which rows come out, or in which order.
DATA_HARMLESS = ('worker_count', 'prefetch_buffer', 'eval_paths', 'train_tokenizer_vocab')


def settings(cfg, processes: int) -> dict:
  """The settings of TrainConfig `cfg` a resume depends on, flat (`data.paths`, `model.d_model`)."""
  out = {'batch_size': cfg.batch_size, 'seq_len': cfg.seq_len, 'objective': cfg.objective,
         'seed': cfg.seed, 'processes': processes}
  for f in dataclasses.fields(cfg.data):
    if f.name not in DATA_HARMLESS:
      out[f'data.{f.name}'] = getattr(cfg.data, f.name)
  for f in dataclasses.fields(cfg.model):
    if f.name not in EXECUTION:
      out[f'model.{f.name}'] = getattr(cfg.model, f.name)
  for f in dataclasses.fields(cfg.lora):
    out[f'lora.{f.name}'] = getattr(cfg.lora, f.name)
  return json.loads(json.dumps(out))  # tuples -> lists, as stored


def _path(workdir: str) -> str:
  return os.path.join(workdir, SETTINGS_FILE)


def check(cfg, processes: int) -> bool:
  """Raises UsageError if `cfg` cannot resume the checkpoints in `cfg.workdir`.

  Returns True if the data position must restart (`cfg.restart_data` with a
  changed data setting). A workdir without checkpoints or without a
  settings file (written by an older version) passes.
  """
  path = _path(cfg.workdir)
  ckpts = os.path.join(cfg.workdir, 'checkpoints')
  if not (os.path.isfile(path) and os.path.isdir(ckpts) and any(
      name.isdigit() for name in os.listdir(ckpts))):
    return False
  with open(path, encoding='utf-8') as f:
    old = json.load(f)
  new = settings(cfg, processes)
  changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  fixed = [k for k in changed if not k.startswith(DATA_POSITION)]
  if fixed:
    k = fixed[0]
    raise UsageError(f'resuming {cfg.workdir}: {k} was {old.get(k)!r}, now {new.get(k)!r}; '
                     'its checkpoints hold other weights: use a new workdir')
  if changed and not cfg.restart_data:
    k = changed[0]
    raise UsageError(f'resuming {cfg.workdir}: {k} was {old.get(k)!r}, now {new.get(k)!r}; '
                     'the saved data position belongs to the old value: set restart_data=true '
                     'to keep the weights and restart the data, or use a new workdir')
  return bool(changed)


def record(cfg, processes: int) -> None:
  """Writes the run's settings into its workdir (process 0 calls it), atomically."""
  os.makedirs(cfg.workdir, exist_ok=True)
  path = _path(cfg.workdir)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(settings(cfg, processes), f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(path + '.tmp', path)
