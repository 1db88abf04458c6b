"""A LoRA run's step directory + its base -> one merged checkpoint directory (for export).

A LoRA step directory (`illada_jax.train` with `lora.rank > 0`) holds the
adapters as its `params` item, `model_config.json`, the tokenizer files and
`lora.json` (`illada_jax.lora.write_info`: the LoRA config and the base
checkpoint it was trained on). `merge_lora_checkpoint` folds the adapters
into that base (`lora.merge`) and writes a plain checkpoint directory that
`load_checkpoint`, `illada-sample` and `illada-convert orbax-to-hf` read.
"""

from __future__ import annotations

import os
import shutil

import jax
import orbax.checkpoint as ocp

from illada_jax import lora as lora_lib
from illada_jax import model as model_lib
from illada_jax.checkpoint import store
from illada_jax.checkpoint._destination import Destination, check_apart
from illada_jax.checkpoint.errors import ConversionError


def _base(step_dir: str, info: dict, cfg, base_dir: str | None):
  """(base params in the layout of `cfg`, their directory or None) for the run's model `cfg`."""
  base_dir = base_dir or info['base']
  if not base_dir:  # the run started from init_params(key(seed)) (train.base_params)
    return model_lib.init_params(cfg, jax.random.key(info['seed'])), None
  try:
    _, params = store.load_checkpoint(base_dir)
  except (FileNotFoundError, ValueError) as e:
    raise ConversionError(f'{step_dir}: base checkpoint {base_dir}: {e}') from e
  if 'layers_0' in params:
    params = model_lib.stack_layers(params, cfg.num_layers)
  shapes = lambda tree: {'/'.join(str(k.key) for k in path): tuple(x.shape)
                         for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, got = shapes(model_lib.abstract_params(cfg.replace(scan_layers=True))), shapes(params)
  for name in sorted(set(want) | set(got)):
    if want.get(name) != got.get(name):
      raise ConversionError(f'{step_dir}: base {base_dir} does not match the run: {name} is '
                            f'{got.get(name, "missing")}, the run trained {want.get(name, "none")}')
  if not cfg.scan_layers:
    params = model_lib.unstack_layers(params, cfg.num_layers)
  return params, base_dir


def merge_lora_checkpoint(step_dir: str | os.PathLike, dst_dir: str | os.PathLike, *,
                          base_dir: str | os.PathLike | None = None,
                          overwrite: bool = False):
  """Writes base + adapters of LoRA step directory `step_dir` as checkpoint `dst_dir`.

  Args:
    step_dir: a LoRA run's step directory (has `lora.json`).
    dst_dir: the new checkpoint directory (`save_checkpoint`: scanned layout, the run's
      `model_config.json`, parameters in its `param_dtype`, tokenizer files
      of `step_dir`, `hf_source.json` of the base when it has one).
    base_dir: the base checkpoint; default the run's `init_from` recorded in
      `lora.json` (a run without one re-creates its seeded initial weights).
    overwrite: replace `dst_dir` if it exists.

  Returns:
    The `ModelConfig` written. Raises ConversionError if `step_dir` is not a
    LoRA step directory, the base is missing or does not match the run
    (naming the tensor), `dst_dir` exists without `overwrite`, or `dst_dir` is, holds
    or is inside `step_dir` or the base. With `overwrite` the old `dst_dir` is
    replaced only once the merged checkpoint is complete.
  """
  step_dir, dst_dir = os.path.abspath(step_dir), os.path.abspath(dst_dir)
  info = lora_lib.read_info(step_dir)
  if info is None:
    raise ConversionError(f'{step_dir}: no {lora_lib.INFO_FILE}; not a LoRA step directory')
  cfg = store.load_config(step_dir)
  base_dir = os.fspath(base_dir) if base_dir else info['base']
  check_apart(step_dir, dst_dir, 'step directory')  # before anything is written or removed
  if base_dir:
    check_apart(base_dir, dst_dir, 'base checkpoint')
    if not os.path.isdir(base_dir):
      raise ConversionError(f'{step_dir}: base checkpoint {base_dir} does not exist '
                            '(pass --base DIR)')
  with Destination(dst_dir, overwrite) as tmp:  # the old dst stays until the merge is whole
    base, base_from = _base(step_dir, info, cfg, base_dir)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            lora_lib.abstract_adapters(cfg, info['lora']))
    adapters = ocp.StandardCheckpointer().restore(store.params_dir(step_dir), abstract)
    # Eagerly, weight by weight: one float32 temporary at a time, not a whole float32 model.
    base = jax.tree.map(lambda x: x.astype(cfg.param_dtype), base)
    merged = lora_lib.merge(info['lora'], base, adapters)
    store.save_checkpoint(tmp, cfg, merged, tokenizer_dir=step_dir)
    if base_from and os.path.isfile(os.path.join(base_from, store.SOURCE_FILE)):
      shutil.copy2(os.path.join(base_from, store.SOURCE_FILE), tmp)
  return cfg
