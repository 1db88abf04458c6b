"""`illada-serve`: an OpenAI-compatible HTTP server (completions, chat, streaming, scoring).

  illada-serve --ckpt DIR                                   # 127.0.0.1:8000
  illada-serve --ckpt DIR --preset illada_instruct --slots 64 --port 8000 --api-key KEY
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "DIR-NAME", "prompt": "2+3=", "max_tokens": 8}'

The server runs one settings group, fixed here (`--preset` and the sampling
flags: block length, steps, threshold / cache, CFG, variable length, the
end-of-thinking boost); each request brings its prompt, `max_tokens`,
`temperature`, `seed`, `stop` and `n`. `max_tokens` defaults to the
generation length (`--gen-length`, or what fits after the prompt under
`--variable-length`); `temperature` to the preset's. The block programs of
every prompt bucket compile before `/health` reports ready. SIGINT / SIGTERM
stop admitting, let requests in flight finish (`--grace` seconds) and exit 0.
See docs/serving.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from illada_jax.cli import _common
from illada_jax.usage import UsageError


def build_parser() -> argparse.ArgumentParser:
  from illada_jax.sampling import SamplingOptions
  p = _common.Parser(prog='illada-serve', description=__doc__.splitlines()[0])
  p.add_argument('--ckpt', required=True, help='checkpoint directory (illada-convert output)')
  p.add_argument('--tokenizer', default=None, help='tokenizer file (default: from --ckpt)')
  p.add_argument('--host', default='127.0.0.1', help='address to listen on (default: %(default)s)')
  p.add_argument('--port', type=int, default=8000, help='(default: %(default)s)')
  p.add_argument('--api-key', default=None,
                 help='require "Authorization: Bearer KEY" on every /v1 route')
  p.add_argument('--served-model-name', default=None,
                 help="the `model` clients name (default: the checkpoint directory's name)")
  p.add_argument('--slots', type=int, default=64,
                 help='requests denoised at once (default: %(default)s)')
  p.add_argument('--buckets', default=None, help='prompt-length buckets, e.g. 64,256,1024 '
                 '(default: powers of two from 16, and the model\'s max_len)')
  p.add_argument('--mesh', default=None, help='e.g. fsdp=4,tensor=2 (local devices)')
  p.add_argument('--max-queue', type=int, default=1024,
                 help='waiting requests before 429 (default: %(default)s)')
  p.add_argument('--grace', type=float, default=30.,
                 help='seconds in-flight requests get after SIGTERM (default: %(default)s)')
  p.add_argument('--score-preset', default=None,
                 help='ScoringOptions for /v1/score from configs/scoring.py (default: MC)')
  p.add_argument('--log-level', default='info', choices=('debug', 'info', 'warning', 'error'))
  _common.add_quantize(p)
  from illada_jax.configs.sampling import PRESETS
  _common.add_options(p, SamplingOptions, 'sampling options (the server settings group)', PRESETS,
                      exclude=('after_think',))
  return p


def settings_from(args: argparse.Namespace):
  """(SamplingOptions, ScoringOptions) from the flags; UsageError naming the flag."""
  from illada_jax import sampling, scoring
  from illada_jax.configs.sampling import PRESETS
  from illada_jax.configs.scoring import PRESETS as SCORE_PRESETS
  # The defaults of `SamplingOptions`, as illada-sample has them (and its help says).
  options = _common.options_from(args, sampling.SamplingOptions, PRESETS)
  if args.score_preset is not None and args.score_preset not in SCORE_PRESETS:
    raise UsageError(f'--score-preset {args.score_preset!r}: have {sorted(SCORE_PRESETS)}')
  scoring_opts = SCORE_PRESETS[args.score_preset] if args.score_preset else scoring.ScoringOptions()
  for flag, value, low in (('--slots', args.slots, 1), ('--max-queue', args.max_queue, 1),
                           ('--port', args.port, 0)):
    if value < low:
      raise UsageError(f'{flag} {value}: must be at least {low}')
  if args.port > 65535:
    raise UsageError(f'--port {args.port}: must be at most 65535')
  if args.api_key is not None and not args.api_key.strip():
    raise UsageError('--api-key: empty (no client could send it)')
  return options, scoring_opts


def main(argv=None) -> int:
  return _common.guarded('illada-serve', _main, argv, resumable=False)  # a server keeps nothing


def _check_port(host: str, port: int) -> None:
  """UsageError if `host:port` cannot be listened on (before minutes of loading)."""
  import socket
  try:
    with socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      s.bind((host, port))
  except OSError as e:
    raise UsageError(f'--host {host} --port {port}: cannot listen there ({e.strerror})') from None


def _main(argv) -> int:
  args = build_parser().parse_args(argv)
  try:
    options, scoring_opts = settings_from(args)
  except ValueError as e:  # SamplingOptions names the field
    raise UsageError(str(e)) from None
  cfg = _common.check_engine_args(argparse.Namespace(**vars(args), out=None), '--ckpt', None)
  if not options.variable_length and cfg.max_len - options.gen_length <= 0:
    raise UsageError(f'--gen-length {options.gen_length}: leaves no room for a prompt in the '
                     f'model window of {cfg.max_len} tokens')
  _check_port(args.host, args.port)
  from illada_jax import engine, prompts, usage
  from illada_jax.serve import app as app_lib, manager as manager_lib, metrics, server
  cfg, params = _common.load_model(args)
  tok = prompts.load_tokenizer(args.ckpt, args.tokenizer)
  fmt = prompts.PromptFormat.from_checkpoint(args.ckpt)
  try:
    eng = engine.Engine(cfg, params, tokenizer=tok, slots=args.slots,
                        buckets=usage.int_list('--buckets', args.buckets))
    options = eng.options_for(options)
  except ValueError as e:
    raise UsageError(str(e)) from None
  room = None  # the largest prompt a request can bring
  if not options.variable_length:
    room = cfg.max_len - options.gen_length
    eng.buckets = tuple(sorted(set(eng.buckets) | {room}))  # larger ones serve /v1/score
  name = args.served_model_name or os.path.basename(os.path.normpath(args.ckpt))
  settings = manager_lib.Settings(options, scoring_opts, name, args.max_queue)
  manager = manager_lib.RequestManager(eng, tok, fmt, settings,
                                       metrics.Metrics(eng.scheduler, eng.slots))
  app = app_lib.make_app(manager, api_key=args.api_key,
                         warmup=lambda: eng.warmup(options, max_bucket=room))
  server.serve(app, args.host, args.port, grace=args.grace, log_level=args.log_level)
  return 0


if __name__ == '__main__':
  sys.exit(main())
