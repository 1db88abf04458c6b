"""Flags shared by the CLIs: one-line usage errors, options dataclasses as flags, multi-host
start, checks before loading, checkpoint loading."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys

from illada_jax.usage import UsageError


class Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one line on stderr (exit 2), not usage + error."""

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


ACCELERATOR_DEVICES = ('/dev/accel*', '/dev/vfio/*', '/dev/nvidia[0-9]*', '/dev/kfd')


def quiet_platforms(env=os.environ, patterns=ACCELERATOR_DEVICES) -> None:
  """Sets `JAX_PLATFORMS=cpu` on a machine without accelerator device files (TPU, GPU)
  unless the user chose platforms: an installed libtpu then stays unloaded instead of
  printing its errors on every command. Call before JAX starts its backends."""
  import glob
  if 'JAX_PLATFORMS' not in env and not any(glob.glob(p) for p in patterns):
    env['JAX_PLATFORMS'] = 'cpu'
    if env is os.environ and 'jax' in sys.modules:  # imported already: read its flag at import
      import jax
      if not jax.config.jax_platforms:
        jax.config.update('jax_platforms', 'cpu')


def guarded(prog: str, main, argv=None, resumable: bool = True) -> int:
  """Runs `main(argv)`: a user mistake (`UsageError`, and the libraries' bad-input errors
  `JobError`, `ConversionError`) becomes one line on stderr and exit 2; an interrupt
  (SIGINT, or SIGTERM raised as one) one line and exit 130 / 143; other errors keep their
  traceback (`resumable`: the interrupt line says that finished work is kept). With several
  processes, a failure is reported to the others and the process leaves at once
  (`illada_jax.multiprocess`)."""
  from illada_jax import multiprocess
  from illada_jax.jobs import JobError
  from illada_jax.checkpoint.errors import ConversionError
  global _PROG
  _PROG = prog
  quiet_platforms()
  previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
  code, reason = None, None
  try:
    return main(argv)
  except (UsageError, JobError, ConversionError) as e:
    reason = ' '.join(str(e).split('\n'))
    print(f'{prog}: error: {reason}', file=sys.stderr, flush=True)
    code = 2
  except multiprocess.GroupFailed as e:
    print(f'{prog}: stopping: {e}', file=sys.stderr, flush=True)
    code = 1
  except KeyboardInterrupt as e:
    name, signum = (e.name, e.signum) if isinstance(e, Interrupted) else ('SIGINT', 2)
    reason = f'stopped by {name}'
    kept = '; what was finished is kept (rerun to resume)' if resumable else ''
    print(f'{prog}: {reason}{kept}', file=sys.stderr, flush=True)
    code = 128 + signum
  except BaseException as e:  # an internal error: its traceback, and the other processes told
    if not multiprocess.active() or isinstance(e, SystemExit):
      raise
    import traceback
    traceback.print_exc()
    reason, code = f'{type(e).__name__}: {e}', 1
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  if multiprocess.active():  # the whole job stops; no shutdown barrier waiting for the failed
    if reason is not None:
      multiprocess.report_failure(reason)
    multiprocess.exit_now(code)
  return code


_PROG = 'illada'


class Interrupted(KeyboardInterrupt):
  """SIGTERM raised like Ctrl-C's KeyboardInterrupt, so both unwind (and clean up) alike."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum, self.name = signum, signal.Signals(signum).name


def _raise_interrupt(signum, frame):
  del frame
  raise Interrupted(signum)


def _main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def positive_int(text: str) -> int:
  """argparse type: a positive integer."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}') from None
  if value <= 0:
    raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
  return value


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
    else:  # a doc that names its default already is not given a second one
      shown = doc if 'default' in doc else f'{doc} (default: {f.default})'
      group.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                         help=shown if doc else None)


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
  try:
    return from_strings(cls, {**defaults, **base, **given})
  except ValueError as e:  # names the field: say the flag instead
    import re
    flag = lambda m: '--' + m.group(1).replace('_', '-')
    raise UsageError(re.sub(r'\b[A-Z]\w*Options\.(\w+)', flag, str(e))) from None


def add_distributed(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--coordinator', default=None, help='HOST:PORT of process 0 (multi-host)')
  parser.add_argument('--num-processes', type=positive_int, default=None)
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
    from illada_jax import multiprocess

    def stop(reason):
      print(f'{_PROG}: stopping: {reason}', file=sys.stderr, flush=True)
      multiprocess.exit_now(1)
    multiprocess.watch(stop)


def local_mesh(spec: str | None):
  """A mesh over this process's devices (None without `spec`): each process holds a model copy."""
  if not spec:
    return None
  import jax
  from illada_jax import sharding
  return sharding.make_mesh(spec, devices=jax.local_devices())


def barrier(name: str):
  """A cross-process barrier (a no-op with one process) that stops when another process
  failed, and after `multiprocess.DEFAULT_BARRIER_TIMEOUT_S` (`illada_jax.multiprocess`)."""
  from illada_jax import multiprocess
  return multiprocess.barrier(name)


def check_engine_args(args: argparse.Namespace, input_flag: str, input_path: str | None):
  """The checkpoint's `ModelConfig` after checking, without loading weights: `--ckpt`,
  `--tokenizer`, the input file, `--out`, `--buckets`, `--mesh` (against this process's
  devices) and `--slots` (a multiple of the mesh's batch axes). Raises UsageError."""
  import jax
  from illada_jax import usage
  cfg = usage.checkpoint_dir('--ckpt', args.ckpt)
  if args.tokenizer:
    usage.readable_path('--tokenizer', args.tokenizer)
  elif not (os.path.isfile(os.path.join(args.ckpt, 'tokenizer.json'))
            or any(n.endswith('.model') for n in os.listdir(args.ckpt))):
    raise UsageError(f'--ckpt {args.ckpt}: no tokenizer.json or SentencePiece .model there; '
                     'pass --tokenizer')
  if input_path is not None:
    usage.readable_file(input_flag, input_path)
  if args.out:
    usage.writable_file('--out', args.out)
    usage.apart('--out', args.out, {input_flag: input_path, '--ckpt': args.ckpt})
  elif jax.process_count() > 1:
    raise UsageError('several processes need --out')
  buckets = usage.int_list('--buckets', args.buckets)
  if buckets and max(buckets) > cfg.max_len:
    raise UsageError(f'--buckets {args.buckets}: {max(buckets)} is longer than the model\'s '
                     f'max_len {cfg.max_len}')
  sizes = usage.mesh_fits('--mesh', args.mesh, len(jax.local_devices()))
  multiple = sizes['data'] * sizes['fsdp'] if sizes else 1
  if args.slots % multiple:
    raise UsageError(f'--slots {args.slots}: must be a multiple of the mesh batch axes '
                     f'(data x fsdp = {multiple})')
  return cfg


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
  `--slots`, `--buckets` (checked first by `check_engine_args`)."""
  del prog
  from illada_jax import engine, prompts, usage
  tok = prompts.load_tokenizer(args.ckpt, args.tokenizer)  # before the weights: cheap
  fmt = prompts.PromptFormat.from_checkpoint(args.ckpt)
  cfg, params = load_model(args)
  buckets = usage.int_list('--buckets', args.buckets)
  return engine.Engine(cfg, params, tokenizer=tok, slots=args.slots, buckets=buckets), tok, fmt


def no_records(prog: str, flag: str, path: str, out: str | None) -> int:
  """An input file without records: a warning, an empty `out`, a summary of 0; exit 0."""
  from illada_jax.jobs import JobSummary
  print(f'{prog}: warning: {flag} {path} holds no records', file=sys.stderr)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    open(out, 'a').close()
  print(JobSummary().line(), file=sys.stderr, flush=True)
  return 0


def add_restart(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--restart', action='store_true',
                      help='start --out over: needed when the checkpoint or a setting changed '
                           'since it was written (refused otherwise)')


def produced_by(args: argparse.Namespace, options, **settings) -> dict:
  """What a job's output records about its making: the checkpoint's identity and every
  setting that changes a result (the options' fields and `settings`)."""
  from illada_jax import jobs
  fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
  tok = os.path.realpath(args.tokenizer) if args.tokenizer else None
  return {'checkpoint': jobs.checkpoint_identity(args.ckpt),
          'settings': {**fields, **settings, 'tokenizer': tok}}
