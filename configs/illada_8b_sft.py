"""Chat SFT of iLLaDA-8B from a converted checkpoint, all weights trained (SPEC §4 SFT loss).

The LLaDA guidelines' SFT recipe: rows of 4096 tokens, global batch 256,
AdamW at 2.5e-5 with 50 warmup steps, constant, then a linear decay to a
tenth over the last 10%; weight decay 0.1. Chat records (`messages`) are
rendered with the checkpoint's chat template; the prompt is never masked
and the response's EOS padding is. fsdp over every chip, float32 master
weights and AdamW moments, bfloat16 matmuls, full remat, splash attention.
Per-chip memory and the largest per-device batch on v5p-64 / v6e-64:
README, "TPU plan" (`tools/aot_compile.py --config configs/illada_8b_sft.py`).

  illada-convert hf-to-orbax /path/iLLaDA-8B-Instruct /ckpt/illada-8b
  illada-train --config configs/illada_8b_sft.py --distributed \
      --set init_from=/ckpt/illada-8b --set data.paths="('gs://bucket/chat/*.jsonl',)"
"""

from illada_jax.configs.models import ILLADA_8B
from illada_jax.data import DataConfig
from illada_jax.optimizer import OptimizerConfig
from illada_jax.train_config import TrainConfig
from illada_jax.util import user_tmp

CONFIG = TrainConfig(
    model=ILLADA_8B.replace(param_dtype='float32', compute_dtype='bfloat16', remat_policy='full',
                            attention_impl='splash'),
    objective='sft',
    init_from='',  # the converted checkpoint directory: give it with --set init_from=DIR
    data=DataConfig(paths=(), tokenizer='', worker_count=8),
    optimizer=OptimizerConfig(lr=2.5e-5, schedule='wsd', warmup_steps=50, total_steps=10_000,
                              decay_fraction=0.1, final_lr_fraction=0.1, weight_decay=0.1,
                              clip_norm=1.0),
    batch_size=256, seq_len=4096, steps=10_000, mesh='data=1,fsdp=-1,tensor=1',
    random_length_prob=0.0, workdir=user_tmp('illada_8b_sft'), log_every=10, eval_every=500,
    checkpoint_every=500, keep_checkpoints=3, loss_chunk=256)
