"""Checkpoint I/O: checkpoint directories and Hugging Face conversion, both families.

Public surface:
  load_checkpoint, save_checkpoint, load_config   checkpoint directories (`store`)
  hf_to_orbax, orbax_to_hf, ConversionError       conversion (`convert`; CLI `illada-convert`)
  merge_lora_checkpoint                           LoRA adapters + base -> checkpoint (`lora_merge`)

Modules: `store` (directory layout, save/load with Orbax), `hf_names` (HF
tensor names of both families <-> the parameter tree), `safetensors_io`
(reading through `safe_open`, streamed writing), `convert` (the two
drivers). Private: `_to_orbax` / `_to_hf` (each direction's steps),
`_blocks` (parameters cut into blocks of HF rows), `_transpose` (layout
changes), `_orbax_stream` (Orbax items written leaf by leaf, read slice by
slice), `_rawio` (O_DIRECT I/O, buffer pool), `_zarr3` (zarr3 shard files).
"""

from illada_jax.checkpoint.convert import hf_to_orbax, orbax_to_hf
from illada_jax.checkpoint.errors import ConversionError
from illada_jax.checkpoint.lora_merge import merge_lora_checkpoint
from illada_jax.checkpoint.store import (CONFIG_FILE, load_checkpoint, load_config,
                                         save_checkpoint)

__all__ = ['CONFIG_FILE', 'ConversionError', 'hf_to_orbax', 'load_checkpoint', 'load_config',
           'merge_lora_checkpoint', 'orbax_to_hf', 'save_checkpoint']
