"""`illada-train --config configs/NAME.py [--set key=value ...]`: run or resume training.

Multi-host: pass `--coordinator HOST:PORT --num-processes N --process-id I`
(or nothing on a TPU pod, where JAX discovers its peers) to call
`jax.distributed.initialize` before any device is touched. On CPU the
collectives go through gloo.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
  ap = argparse.ArgumentParser(prog='illada-train', description=__doc__.splitlines()[0])
  ap.add_argument('--config', required=True,
                  help='a python file defining CONFIG = TrainConfig(...), or a module name '
                       'under illada_jax.configs')
  ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                  help="override a (dotted) field, e.g. --set optimizer.lr=1e-3 "
                       "--set model.num_layers=2; repeatable")
  ap.add_argument('--stop-after', type=int, default=None,
                  help='checkpoint and stop at this step (the schedule keeps its length)')
  ap.add_argument('--coordinator', default=None, help='HOST:PORT of process 0')
  ap.add_argument('--num-processes', type=int, default=None)
  ap.add_argument('--process-id', type=int, default=None)
  ap.add_argument('--distributed', action='store_true',
                  help='call jax.distributed.initialize() with auto-detection (TPU pods)')
  return ap.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  if args.coordinator or args.distributed:
    if jax.config.jax_platforms in (None, '', 'cpu') or 'cpu' in str(jax.config.jax_platforms):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  from illada_jax import train
  cfg = train.load_config(args.config)
  for item in args.set:
    key, sep, value = item.partition('=')
    if not sep:
      print(f'illada-train: --set expects KEY=VALUE, got {item!r}', file=sys.stderr)
      return 2
    cfg = train.override(cfg, key.strip(), value.strip())
  try:
    out = train.train(cfg, stop_after=args.stop_after)
  except FloatingPointError as e:
    print(f'illada-train: {e}', file=sys.stderr)
    return 3
  if jax.process_index() == 0:
    last = out['losses'].get(out['final_step'])
    print(f"illada-train: {out['stopped']} at step {out['final_step']}"
          + (f', loss {last:.4f}' if last is not None else '')
          + f"; checkpoint {out['checkpoint_dir']}", flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
