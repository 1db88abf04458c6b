"""`illada-demo`: train a tiny iLLaDA on multi-digit addition on this CPU and sample it.

  illada-demo                      # 3-6 minutes on a 2-core CPU
  illada-demo --steps 50 --out /tmp/quick   # a smoke run
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
  from illada_jax.demo import DemoConfig, run
  d = DemoConfig()
  ap = argparse.ArgumentParser(prog='illada-demo', description=__doc__.splitlines()[0])
  ap.add_argument('--steps', type=int, default=d.steps, help='optimizer steps')
  ap.add_argument('--out', default=d.out, help='output directory (data, tokenizer, checkpoints)')
  ap.add_argument('--digits', type=int, default=d.digits, help='digits per operand')
  ap.add_argument('--batch-size', type=int, default=d.batch_size)
  ap.add_argument('--test-size', type=int, default=d.test_size)
  ap.add_argument('--seed', type=int, default=d.seed)
  ap.add_argument('--layers', type=int, default=d.layers, help='model depth')
  ap.add_argument('--d-model', type=int, default=d.d_model, help='model width')
  ap.add_argument('--lr', type=float, default=d.lr, help='peak learning rate')
  ap.add_argument('--gen-length', type=int, default=d.gen_length,
                  help='answer canvas: the sum and its EOS padding')
  ap.add_argument('--no-progress', action='store_true', help='no progress bar')
  args = ap.parse_args(argv)
  import os
  import shutil
  run_dir = os.path.join(args.out, 'run')
  if os.path.isdir(run_dir):  # a fresh run each time (the data is regenerated)
    shutil.rmtree(run_dir)
  cfg = DemoConfig(digits=args.digits, steps=args.steps, batch_size=args.batch_size,
                   test_size=args.test_size, seed=args.seed, out=args.out, layers=args.layers,
                   d_model=args.d_model, lr=args.lr, gen_length=args.gen_length)
  run(cfg, progress_bar=not args.no_progress)
  return 0


if __name__ == '__main__':
  sys.exit(main())
