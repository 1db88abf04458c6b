"""Pre-training a tiny iLLaDA on Tiny Shakespeare (CPU-sized).

  illada-train --config configs/shakespeare_tiny.py \
      [--set data.paths="('/path/to/tinyshakespeare.txt',)"] [--set steps=200]

The text is looked for in `../shared/data/tinyshakespeare.txt` beside the
checkout (this file's `../..`); elsewhere, give `data.paths` (training stops
with an error naming that setting if the file is missing).

A 1024-piece SentencePiece tokenizer (MASK at id 5) is trained on the text
on first use and kept next to the checkpoints.
"""

import os

from illada_jax.configs.models import ILLADA_TINY
from illada_jax.data import DataConfig
from illada_jax.optimizer import OptimizerConfig
from illada_jax.train_config import TrainConfig
from illada_jax.util import user_tmp

TEXT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..',
                                     'shared', 'data', 'tinyshakespeare.txt'))

CONFIG = TrainConfig(
    model=ILLADA_TINY.replace(vocab_size=1024, param_dtype='float32', compute_dtype='float32',
                              remat_policy='none'),
    objective='pretrain',
    data=DataConfig(paths=(TEXT,),
                    tokenizer=os.path.join(user_tmp('illada_shakespeare'), 'sp.model'), train_tokenizer_vocab=1024),
    optimizer=OptimizerConfig(lr=1e-3, schedule='wsd', warmup_steps=100, total_steps=2000,
                              weight_decay=0.1),
    batch_size=32, seq_len=256, steps=2000, workdir=user_tmp('illada_shakespeare'),
    log_every=10, eval_every=200, checkpoint_every=500, loss_chunk=128)
