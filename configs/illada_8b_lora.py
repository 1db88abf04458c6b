"""LoRA chat SFT of iLLaDA-8B: `illada_8b_sft` with rank-16 adapters, the base frozen.

Adapters (rank 16, alpha 32) on every attention and MLP projection
(`illada_jax.lora`, through qwix), trained in float32 with AdamW at 2e-4
and no weight decay; the base stays in bfloat16 and gets no gradient and no
optimizer state. Step directories hold the adapters only; export with

  illada-convert merge-lora $TMPDIR/illada_8b_lora-$USER/checkpoints/STEP /ckpt/merged
  illada-convert orbax-to-hf /ckpt/merged /hf/illada-8b-lora

Per-chip memory and the largest per-device batch on v5p-64 / v6e-64:
README, "TPU plan" (`tools/aot_compile.py --config configs/illada_8b_lora.py`).
"""

import dataclasses
import os

from illada_jax.lora import LoraConfig
from illada_jax.optimizer import OptimizerConfig
from illada_jax.train_config import load_config
from illada_jax.util import user_tmp

# The sibling file by path: a config file may be run from a checkout or from the package.
SFT = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'illada_8b_sft.py'))

CONFIG = dataclasses.replace(
    SFT,
    model=SFT.model.replace(param_dtype='bfloat16'),
    lora=LoraConfig(rank=16, alpha=32.0, targets=('attn', 'mlp')),
    optimizer=OptimizerConfig(lr=2e-4, schedule='wsd', warmup_steps=50, total_steps=SFT.steps,
                              decay_fraction=0.1, final_lr_fraction=0.1, weight_decay=0.0,
                              clip_norm=1.0),
    workdir=user_tmp('illada_8b_lora'))
