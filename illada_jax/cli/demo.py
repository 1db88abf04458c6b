"""`illada-demo`: train a tiny iLLaDA on multi-digit addition on this CPU and sample it.

  illada-demo                      # 3-6 minutes on a 2-core CPU
  illada-demo --steps 50 --out DIR   # a smoke run
  illada-demo --overwrite          # again, replacing the previous run
"""

from __future__ import annotations

import sys

from illada_jax.cli import _common


def main(argv=None) -> int:
  return _common.guarded('illada-demo', _main, argv)


def _main(argv) -> int:
  from illada_jax import demo, usage
  d = demo.DemoConfig()
  positive = _common.positive_int
  ap = _common.Parser(prog='illada-demo', description=__doc__.splitlines()[0])
  ap.add_argument('--steps', type=positive, default=d.steps, help='optimizer steps')
  ap.add_argument('--out', default=d.out, help='output directory (data, tokenizer, checkpoints)')
  ap.add_argument('--overwrite', action='store_true',
                  help='replace the previous run in --out (refused without)')
  ap.add_argument('--digits', type=positive, default=d.digits, help='digits per operand')
  ap.add_argument('--batch-size', type=positive, default=d.batch_size)
  ap.add_argument('--test-size', type=positive, default=d.test_size)
  ap.add_argument('--seed', type=int, default=d.seed)
  ap.add_argument('--layers', type=positive, default=d.layers, help='model depth')
  ap.add_argument('--d-model', type=positive, default=d.d_model, help='model width')
  ap.add_argument('--lr', type=float, default=d.lr, help='peak learning rate')
  ap.add_argument('--gen-length', type=positive, default=d.gen_length,
                  help='answer canvas: the sum and its EOS padding')
  ap.add_argument('--no-progress', action='store_true', help='no progress bar')
  args = ap.parse_args(argv)
  import os
  import shutil
  usage.writable_dir('--out', args.out)
  run_dir = os.path.join(args.out, 'run')
  if os.path.lexists(run_dir):  # a fresh run each time (the data is regenerated)
    if not args.overwrite:
      raise usage.UsageError(f'--out {args.out}: holds a previous run; pass --overwrite to '
                             'replace it, or another --out')
    shutil.rmtree(run_dir)
  cfg = demo.DemoConfig(digits=args.digits, steps=args.steps, batch_size=args.batch_size,
                        test_size=args.test_size, seed=args.seed, out=args.out,
                        layers=args.layers, d_model=args.d_model, lr=args.lr,
                        gen_length=args.gen_length)
  try:
    demo.seq_lengths(cfg)
  except ValueError as e:
    raise usage.UsageError(str(e)) from None
  demo.run(cfg, progress_bar=not args.no_progress)
  return 0


if __name__ == '__main__':
  sys.exit(main())
