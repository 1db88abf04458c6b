"""`illada-convert`: Hugging Face safetensors <-> Orbax checkpoint directories.

  illada-convert hf-to-orbax SRC_DIR DST_DIR [--dtype bfloat16|float32] [--mesh data=1,fsdp=8,tensor=1] [--overwrite]
  illada-convert orbax-to-hf SRC_DIR DST_DIR [--shard-size 5GB] [--dtype bfloat16] [--overwrite]
  illada-convert merge-lora STEP_DIR DST_DIR [--base BASE_DIR] [--overwrite]
  illada-convert quantize SRC_DIR DST_DIR --int8 [--head] [--overwrite]

SRC_DIR of orbax-to-hf may be a training step directory (<workdir>/checkpoints/<step>);
a LoRA run's step directory is merged into its base first (merge-lora).

Exit status 0 on success, 2 on bad input or usage (message on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys

from illada_jax.cli import _common


def _parser() -> argparse.ArgumentParser:
  p = _common.Parser(prog='illada-convert', description=__doc__.split('\n\n')[0])
  sub = p.add_subparsers(dest='command', required=True)
  a = sub.add_parser('hf-to-orbax', help='Hugging Face directory -> Orbax checkpoint directory')
  a.add_argument('src', metavar='SRC_DIR')
  a.add_argument('dst', metavar='DST_DIR')
  a.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'),
                 help='stored parameter dtype (default bfloat16)')
  a.add_argument('--mesh', default=None,
                 help="mesh the checkpoint will mostly be restored on, e.g. 'data=1,fsdp=8,tensor=1'; "
                      'sets the read chunks to one device shard')
  a.add_argument('--overwrite', action='store_true', help='replace DST_DIR if it exists')
  a.add_argument('--quiet', action='store_true', help='no progress bar')
  b = sub.add_parser('orbax-to-hf', help='Orbax checkpoint directory -> Hugging Face directory')
  b.add_argument('src', metavar='SRC_DIR')
  b.add_argument('dst', metavar='DST_DIR')
  b.add_argument('--shard-size', default='5GB', help='largest safetensors shard (default 5GB)')
  b.add_argument('--dtype', default=None, choices=('bfloat16', 'float32', 'float16'),
                 help='cast the tensors (default: the converted source\'s dtype from '
                      'hf_source.json, else as stored; a run with float32 master weights '
                      'stores float32)')
  b.add_argument('--overwrite', action='store_true', help='replace DST_DIR if it exists')
  b.add_argument('--quiet', action='store_true', help='no progress bar')
  m = sub.add_parser('merge-lora', help="a LoRA run's step directory + its base -> checkpoint "
                                        'directory (then orbax-to-hf exports it)')
  m.add_argument('src', metavar='STEP_DIR')
  m.add_argument('dst', metavar='DST_DIR')
  m.add_argument('--base', default=None,
                 help="base checkpoint directory (default: the run's init_from, from lora.json)")
  m.add_argument('--overwrite', action='store_true', help='replace DST_DIR if it exists')
  q = sub.add_parser('quantize', help='checkpoint directory -> one with int8 weights '
                                      '(illada_jax.quant), streamed tensor by tensor')
  q.add_argument('src', metavar='SRC_DIR')
  q.add_argument('dst', metavar='DST_DIR')
  q.add_argument('--int8', action='store_true', required=True,
                 help='int8 attention/MLP weights, per-output-channel float32 scales')
  q.add_argument('--head', action='store_true', help='the LM head in int8 too (int8_head)')
  q.add_argument('--overwrite', action='store_true', help='replace DST_DIR if it exists')
  q.add_argument('--quiet', action='store_true', help='(no progress bar to hide; accepted for '
                                                      'symmetry with the other commands)')
  return p


def main(argv: list[str] | None = None) -> int:
  return _common.guarded('illada-convert', _main, argv)


def _main(argv) -> int:
  args = _parser().parse_args(argv)
  # Conversion is host work: keep JAX off any accelerator (and its memory).
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from absl import logging as absl_logging
  from illada_jax import checkpoint  # after parsing: --help stays fast
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's notes would break the progress bar
  if args.command == 'quantize':  # ConversionError: one line, exit 2 (`_common.guarded`)
    from illada_jax.checkpoint.quantized import quantize_checkpoint
    cfg = quantize_checkpoint(args.src, args.dst, 'int8_head' if args.head else 'int8',
                              overwrite=args.overwrite)
  elif args.command == 'merge-lora':
    cfg = checkpoint.merge_lora_checkpoint(args.src, args.dst, base_dir=args.base,
                                           overwrite=args.overwrite)
  elif args.command == 'hf-to-orbax':
    cfg = checkpoint.hf_to_orbax(args.src, args.dst, dtype=args.dtype, mesh=args.mesh,
                                 overwrite=args.overwrite, progress=not args.quiet)
  else:
    cfg = checkpoint.orbax_to_hf(args.src, args.dst, shard_size=args.shard_size,
                                 overwrite=args.overwrite, progress=not args.quiet,
                                 dtype=args.dtype)
  print(f'illada-convert: wrote {args.dst} ({cfg.family}, {cfg.num_layers} layers, '
        f'd_model {cfg.d_model})', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
