"""Pre-training iLLaDA-8B on a TPU pod (the AOT plan of tools/aot_compile.py).

fsdp over every chip; float32 master weights and AdamW moments (12 bytes per
parameter, 0.7 GiB per chip on 128 chips), bfloat16 matmuls, full remat per
layer, splash attention, chunked LM head + CE.

  illada-train --config configs/illada_8b_pretrain.py --distributed \
      --set data.paths="('gs://bucket/shards/*.arrayrecord',)" --set data.tokenizer=/path/tokenizer.json
"""

from illada_jax.configs.models import ILLADA_8B
from illada_jax.data import DataConfig
from illada_jax.optimizer import OptimizerConfig
from illada_jax.train_config import TrainConfig
from illada_jax.util import user_tmp

CONFIG = TrainConfig(
    model=ILLADA_8B.replace(param_dtype='float32', compute_dtype='bfloat16', remat_policy='full',
                            attention_impl='splash'),
    objective='pretrain',
    data=DataConfig(paths=(), tokenizer='', worker_count=8),
    optimizer=OptimizerConfig(lr=4e-4, schedule='wsd', warmup_steps=2000, total_steps=500_000,
                              decay_fraction=0.1, weight_decay=0.1, clip_norm=1.0),
    batch_size=2048, seq_len=8192, steps=500_000, mesh='data=1,fsdp=-1,tensor=1',
    workdir=user_tmp('illada_8b'), log_every=10, eval_every=1000, checkpoint_every=1000,
    keep_checkpoints=3, loss_chunk=256)
