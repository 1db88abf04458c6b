"""The demo's training run as an `illada-train` config (2-digit addition, SFT).

`illada-demo` writes the data and tokenizer to /tmp/illada_demo first; then

  illada-train --config configs/demo_addition.py --set steps=1000 --set optimizer.total_steps=1000
"""

from illada_jax.demo import DemoConfig, train_config

CONFIG = train_config(DemoConfig(), vocab_size=32,
                      tokenizer='/tmp/illada_demo/tokenizer/sp.model')
