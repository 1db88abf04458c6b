"""Flags shared by the CLIs: options dataclasses as flags, multi-host start, checkpoint loading."""

from __future__ import annotations

import argparse
import dataclasses


def add_options(parser: argparse.ArgumentParser, cls, title: str,
                presets: dict | None = None, exclude: tuple = ()) -> None:
  """One `--field-name` flag per field of the options dataclass `cls` (parsed by its type;
  booleans as `--x` / `--no-x`), except the fields in `exclude`.

  `presets` (name -> instance) adds `--preset NAME`, whose fields the flags override.
  """
  group = parser.add_argument_group(title)
  if presets:
    group.add_argument('--preset', choices=sorted(presets), default=None,
                       help='named settings (configs/); the flags below override its fields')
  for f in dataclasses.fields(cls):
    flag = '--' + f.name.replace('_', '-')
    doc = f.metadata.get('help', '')
    if f.name in exclude:
      continue
    if str(f.type) in ('bool', 'bool | None'):  # --x / --no-x / neither (the default or preset)
      group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                         help=doc)
    else:
      group.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                         help=f'{doc} (default: {f.default})' if doc else None)


def options_from(args: argparse.Namespace, cls, presets: dict | None = None, **defaults):
  """The options dataclass from the flags given over `--preset` (from `presets`), if any,
  and `defaults` (which fill the others)."""
  from illada_jax.config import from_strings
  given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
           if getattr(args, f.name, None) is not None}
  base = {}
  if presets and getattr(args, 'preset', None):
    preset = presets[args.preset]
    base = {f.name: getattr(preset, f.name) for f in dataclasses.fields(cls)}
  return from_strings(cls, {**defaults, **base, **given})


def add_distributed(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--coordinator', default=None, help='HOST:PORT of process 0 (multi-host)')
  parser.add_argument('--num-processes', type=int, default=None)
  parser.add_argument('--process-id', type=int, default=None)
  parser.add_argument('--distributed', action='store_true',
                      help='call jax.distributed.initialize() with auto-detection (TPU pods)')


def init_distributed(args: argparse.Namespace) -> None:
  """`jax.distributed.initialize` before any device is touched (gloo collectives on CPU)."""
  import jax
  if args.coordinator or args.distributed:
    if jax.config.jax_platforms in (None, '', 'cpu') or 'cpu' in str(jax.config.jax_platforms):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)


def local_mesh(spec: str | None):
  """A mesh over this process's devices (None without `spec`): each process holds a model copy."""
  if not spec:
    return None
  import jax
  from illada_jax import sharding
  return sharding.make_mesh(spec, devices=jax.local_devices())


def barrier(name: str):
  """A cross-process barrier (a no-op with one process)."""
  import jax
  if jax.process_count() == 1:
    return lambda: None
  from jax.experimental import multihost_utils
  counter = iter(range(1 << 30))
  return lambda: multihost_utils.sync_global_devices(f'{name}-{next(counter)}')


def add_quantize(parser: argparse.ArgumentParser) -> None:
  """`--quantize {none,int8,int8_head}`: the weights to serve (`illada_jax.quant`)."""
  from illada_jax.config import QUANTIZE_MODES
  parser.add_argument('--quantize', choices=QUANTIZE_MODES, default=None,
                      help='int8: int8 attention/MLP weights (qwix PTQ), quantized at load '
                           'unless the checkpoint already holds them (illada-convert quantize); '
                           'int8_head: the LM head too; default: as stored')


def load_model(args: argparse.Namespace):
  """`(cfg, params)` of `--ckpt` on `--mesh` (local devices), as `--quantize` asks."""
  import illada_jax
  return illada_jax.load_checkpoint(args.ckpt, mesh=local_mesh(args.mesh),
                                    quantize=getattr(args, 'quantize', None))


def open_engine(args: argparse.Namespace, prog: str):
  """`(engine, tokenizer, prompt format)` from `--ckpt`, `--tokenizer`, `--mesh`, `--quantize`,
  `--slots`, `--buckets`; None (after saying why on stderr) when several processes have no `--out`."""
  import sys
  import jax
  from illada_jax import engine, prompts
  if jax.process_count() > 1 and not args.out:
    print(f'{prog}: several processes need --out', file=sys.stderr)
    return None
  cfg, params = load_model(args)
  tok = prompts.load_tokenizer(args.ckpt, args.tokenizer)
  fmt = prompts.PromptFormat.from_checkpoint(args.ckpt)
  buckets = [int(b) for b in args.buckets.split(',')] if args.buckets else None
  return engine.Engine(cfg, params, tokenizer=tok, slots=args.slots, buckets=buckets), tok, fmt
