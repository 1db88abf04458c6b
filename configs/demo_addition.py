"""The demo's training run as an `illada-train` config (2-digit addition, SFT).

`illada-demo` writes the data and tokenizer to $TMPDIR/illada_demo-$USER first; then

  illada-train --config configs/demo_addition.py --set steps=1000 --set optimizer.total_steps=1000
"""

import os

from illada_jax.demo import DemoConfig, train_config
from illada_jax.util import user_tmp

CONFIG = train_config(DemoConfig(), vocab_size=32,
                      tokenizer=os.path.join(user_tmp('illada_demo'), 'tokenizer', 'sp.model'))
