"""Starting a run from released weights (`TrainConfig.init_from`) and whole step directories.

`init_from` names a checkpoint directory (`illada-convert hf-to-orbax`
output, or a step directory `<workdir>/checkpoints/<step>` of another run).

* `resolve_config(cfg)`: the checkpoint fixes the architecture and the
  token ids (`ModelConfig` fields outside `RUN_FIELDS`); the run keeps its
  execution choices (`RUN_FIELDS`: dtypes, attention kernel, remat, scan).
  A config that states no model (only training fields) takes them from the
  checkpoint; one that states a model with a field set differently raises
  ValueError naming it (nothing stated is silently replaced). With
  `data.tokenizer` empty, the checkpoint's tokenizer is used.
* `init_state(cfg, mesh, tx)`: the parameters are restored by Orbax straight
  into the shards of the train state (target shardings from the abstract
  state, values cast to `model.param_dtype`: no host copy of the model);
  the optimizer state is fresh and the step is 0, as in MaxText's
  `load_parameters_path` and the LLaDA SFT guideline.
* `stamp_step_dir(step_dir, cfg)`: a finished step directory gets the
  tokenizer files of the run (with `tokenizer_config.json`: BOS convention
  and chat template), `hf_source.json` of a converted `init_from`, and
  `model_config.json` last (it marks the stamp complete), so
  `illada-sample --ckpt`, `illada-convert orbax-to-hf` and `init_from`
  need nothing else.

A run started from `init_from` that was interrupted resumes from its own
latest step (`train.train` looks at its checkpoints first); `init_from` is
read only when the run has none.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil

import jax

from illada_jax import model as model_lib
from illada_jax.checkpoint import store as ckpt_store
from illada_jax.config import ModelConfig
from illada_jax.prompts import PromptFormat

# Execution choices of the run, not properties of the weights.
RUN_FIELDS = ('param_dtype', 'compute_dtype', 'attention_impl', 'remat_policy', 'scan_layers')


def _architecture(model: ModelConfig) -> dict:
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(ModelConfig)
          if f.name not in RUN_FIELDS}


def checkpoint_model(run: ModelConfig, ckpt_dir: str) -> ModelConfig:
  """The model of checkpoint `ckpt_dir` with the run's `RUN_FIELDS`.

  A run whose config does not state a model (its architecture and ids are
  those of `TrainConfig`'s default) takes the checkpoint's; one that states
  one must match it. Raises FileNotFoundError if `ckpt_dir` has no
  `model_config.json`, ValueError naming every field (outside `RUN_FIELDS`)
  where a stated model differs.
  """
  from illada_jax.train_config import TrainConfig  # its default model: "not stated"
  ckpt_store.check_not_lora(ckpt_dir)
  stored = ckpt_store.load_config(ckpt_dir)
  stated = _architecture(run) != _architecture(TrainConfig().model)
  diffs = [f'model.{f.name}: run has {getattr(run, f.name)!r}, checkpoint has '
           f'{getattr(stored, f.name)!r}'
           for f in dataclasses.fields(ModelConfig)
           if stated and f.name not in RUN_FIELDS
           and getattr(run, f.name) != getattr(stored, f.name)]
  if diffs:
    raise ValueError(f'init_from={ckpt_dir}: the run\'s model does not match the checkpoint\'s '
                     f'{ckpt_store.CONFIG_FILE}: ' + '; '.join(diffs)
                     + ' (set these model fields to the checkpoint\'s values)')
  return stored.replace(**{f: getattr(run, f) for f in RUN_FIELDS})


def checkpoint_tokenizer(ckpt_dir: str) -> str:
  """The tokenizer stored in `ckpt_dir`: the directory (tokenizer.json) or its `.model` file.

  Raises FileNotFoundError naming the directory and the setting to give.
  """
  if os.path.isfile(os.path.join(ckpt_dir, 'tokenizer.json')):
    return ckpt_dir
  models = sorted(glob.glob(os.path.join(glob.escape(ckpt_dir), '*.model')))
  if models:
    return models[0]
  raise FileNotFoundError(f'init_from={ckpt_dir}: no tokenizer.json or SentencePiece .model '
                          'there; set data.tokenizer')


def resolve_config(cfg):
  """`cfg` (a TrainConfig) with the model and tokenizer of `cfg.init_from`; `cfg` if unset."""
  if not cfg.init_from:
    return cfg
  ckpt = os.path.abspath(cfg.init_from)
  model = checkpoint_model(cfg.model, ckpt)
  data = cfg.data
  if not data.tokenizer:
    data = dataclasses.replace(data, tokenizer=checkpoint_tokenizer(ckpt))
  return dataclasses.replace(cfg, init_from=ckpt, model=model, data=data)


def restore_params(cfg, mesh):
  """The weights of `cfg.init_from`, restored by Orbax straight into their shards on `mesh`
  (`cfg.sharding_rules`) and cast to `cfg.model.param_dtype`; no host copy of the model.

  The checkpoint always holds the scanned layout; a run with `scan_layers=False`
  gets it unstacked on device.
  """
  scanned = cfg.model.replace(scan_layers=True)
  target = model_lib.abstract_params(scanned, mesh, cfg.sharding_rules)
  params = ckpt_store.restore_params(cfg.init_from, target)
  if not cfg.model.scan_layers:
    p_shard = model_lib.param_shardings(cfg.model, mesh, cfg.sharding_rules)
    params = jax.jit(lambda p: model_lib.unstack_layers(p, cfg.model.num_layers),
                     out_shardings=p_shard)(params)
  return params


def tokenizer_source(cfg) -> tuple[str | None, str | None]:
  """(directory whose tokenizer files the run's step directories copy, or a single file)."""
  tok = cfg.data.tokenizer
  if not tok or not os.path.exists(tok):
    return None, None
  if os.path.isdir(tok):
    return tok, None
  if cfg.init_from and os.path.dirname(os.path.abspath(tok)) == os.path.abspath(cfg.init_from):
    return cfg.init_from, None  # its tokenizer_config.json (template, BOS) travels too
  return None, tok


def stamp_step_dir(step_dir: str, cfg) -> None:
  """Makes finished step directory `step_dir` a whole checkpoint (module docstring)."""
  src_dir, src_file = tokenizer_source(cfg)
  if src_dir is not None:
    ckpt_store.copy_tokenizer_files(src_dir, step_dir)
  elif src_file is not None:
    shutil.copy2(src_file, os.path.join(step_dir, os.path.basename(src_file)))
  if src_dir is not None or src_file is not None or cfg.data.chat_template:
    # The run's BOS rule and the template its SFT rows were rendered with (data.chat_template);
    # without one, a copied tokenizer_config.json keeps its template and other keys.
    from illada_jax import data as data_lib  # Grain, only where a run stamps
    fmt = data_lib.prompt_format(cfg.data) if cfg.data.chat_template else PromptFormat(
        add_bos=cfg.data.add_bos)
    fmt.write(step_dir)
  if cfg.init_from:
    source = os.path.join(cfg.init_from, ckpt_store.SOURCE_FILE)
    if os.path.isfile(source):  # how to write the weights back in their HF layout
      shutil.copy2(source, os.path.join(step_dir, ckpt_store.SOURCE_FILE))
  ckpt_store.write_config(step_dir, cfg.model)  # last: it marks the stamp done

