"""`illada-train --config configs/NAME.py [--set key=value ...]`: run or resume training.

Multi-host: pass `--coordinator HOST:PORT --num-processes N --process-id I`
(or nothing on a TPU pod, where JAX discovers its peers) to call
`jax.distributed.initialize` before any device is touched. On CPU the
collectives go through gloo.
"""

from __future__ import annotations

import sys

from illada_jax.cli import _common


def parse_args(argv=None):
  ap = _common.Parser(prog='illada-train', description=__doc__.splitlines()[0])
  ap.add_argument('--config', required=True,
                  help='a python file defining CONFIG = TrainConfig(...), or a module name '
                       'under illada_jax.configs')
  ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                  help="override a (dotted) field, e.g. --set optimizer.lr=1e-3 "
                       "--set model.num_layers=2; repeatable")
  ap.add_argument('--stop-after', type=_common.positive_int, default=None,
                  help='checkpoint and stop at this step (the schedule keeps its length)')
  _common.add_distributed(ap)
  return ap.parse_args(argv)


def main(argv=None) -> int:
  return _common.guarded('illada-train', _main, argv)


def _main(argv) -> int:
  args = parse_args(argv)
  from illada_jax import train_config
  from illada_jax.usage import UsageError
  cfg = train_config.load_config(args.config)  # settings first: no JAX backend yet
  for item in args.set:
    key, sep, value = item.partition('=')
    if not sep:
      raise UsageError(f'--set expects KEY=VALUE, got {item!r}')
    cfg = train_config.override(cfg, key.strip(), value.strip())
  _common.init_distributed(args)
  import jax
  cfg = train_config.check(cfg, jax.device_count(), jax.process_count())
  from illada_jax import train
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
