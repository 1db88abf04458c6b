"""`illada-sample`: generate text from a checkpoint with the continuously batched engine.

  illada-sample --ckpt DIR --prompt "Once upon a time" --gen-length 64
  illada-sample --ckpt DIR --prompts in.jsonl --out out.jsonl --variable-length \\
      --block-length 32 --threshold 0.9 --cache dual --stop "Question:"
  illada-sample --ckpt DIR --prompts in.jsonl --chat --preset illada_instruct   # published

`--preset NAME` takes named settings from `configs/sampling.py` (flags override
its fields); `illada_instruct` is the published iLLaDA-Instruct setting with
the end-of-thinking boost (`--end-think`, `--end-think-boost`, `--end-think-power`).

Prompts file: one JSON object per line with `prompt` (a string) or `messages`
(a chat), and optionally `id` (default: the line number), `stop`,
`max_new_tokens`, `seed`, `temperature`. Prompts are encoded as the checkpoint
records (BOS, chat template: `illada_jax.prompts`). With `--out` the job is
resumable: rerun the same command after an interruption and it skips what is
already written. Multi-host: `--coordinator HOST:PORT --num-processes N
--process-id I` (or `--distributed` on a TPU pod); each process holds the
model on its own devices (`--mesh` applies to them) and takes every N-th record.
`--show-denoising` replays the canvas step by step (MASK shown as `░`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from illada_jax.cli import _common

MASK_GLYPH = '░'


def render_canvas(tok, tokens_L, step_L, s: int, start: int) -> str:
  """The generated part of a row after step `s`: committed pieces, MASK as a glyph."""
  pieces = []
  for t, k in zip(tokens_L[start:], step_L[start:]):
    pieces.append(tok.decode([int(t)]) if 0 <= k <= s else MASK_GLYPH)
  return ''.join(pieces)


def show_denoising(tok, out, start: int, prompts_text, stream=None, delay=0.05):
  """Replays each step's canvas (rebuilt from final tokens and commit steps)."""
  stream = stream or sys.stdout
  tokens, steps = np.asarray(out.tokens), np.asarray(out.commit_step)
  tty = stream.isatty()
  for s in range(int(out.nfe)):
    frame = [f'step {s + 1}/{int(out.nfe)}']
    for r, text in enumerate(prompts_text):
      frame.append(f'[{r}] {text!r} -> ' + render_canvas(tok, tokens[r], steps[r], s, start))
    if tty:
      stream.write('\x1b[2J\x1b[H')
    stream.write('\n'.join(frame) + '\n')
    stream.flush()
    if tty:
      time.sleep(delay)


def build_parser() -> argparse.ArgumentParser:
  from illada_jax.sampling import SamplingOptions
  p = _common.Parser(prog='illada-sample', description=__doc__.splitlines()[0])
  p.add_argument('--ckpt', required=True, help='checkpoint directory (illada-convert output)')
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--prompt', nargs='+', help='one or more prompt strings')
  src.add_argument('--prompts', help='JSONL file with "prompt" or "messages" per line')
  p.add_argument('--out', default=None, help='JSONL results (resumable); default: stdout')
  p.add_argument('--chat', action='store_true', help='wrap plain prompts in the chat format')
  p.add_argument('--tokenizer', default=None, help='tokenizer file (default: from --ckpt)')
  p.add_argument('--stop', nargs='*', default=[], help='stop strings (matched on the text)')
  p.add_argument('--max-new-tokens', type=_common.positive_int, default=None,
                 help='cut completions to this')
  p.add_argument('--seed', type=int, default=0, help='job seed (per-request seeds derive from it)')
  p.add_argument('--slots', type=_common.positive_int, default=64,
                 help='requests denoised at once')
  p.add_argument('--buckets', default=None, help='prompt-length buckets, e.g. 64,256,1024')
  p.add_argument('--mesh', default=None, help='e.g. data=2,fsdp=2,tensor=2 (local devices)')
  p.add_argument('--on-error', choices=('skip', 'stop'), default='skip',
                 help='a bad record: write an error record and go on, or stop')
  p.add_argument('--no-progress', action='store_true')
  _common.add_restart(p)
  p.add_argument('--show-denoising', action='store_true',
                 help='replay the denoising of --prompt strings (fixed-step sampler)')
  from illada_jax.configs.sampling import PRESETS
  _common.add_options(p, SamplingOptions, 'sampling options (illada_jax.SamplingOptions)', PRESETS)
  _common.add_quantize(p)
  _common.add_distributed(p)
  return p


def main(argv=None) -> int:
  return _common.guarded('illada-sample', _main, argv)


def _main(argv) -> int:
  args = build_parser().parse_args(argv)
  _common.init_distributed(args)
  import jax
  from illada_jax import job_requests, jobs, prompts, sampling, usage
  from illada_jax.configs.sampling import PRESETS
  options = _common.options_from(args, sampling.SamplingOptions, PRESETS)
  cfg = _common.check_engine_args(args, '--prompts', args.prompts)
  usage.generation_fits(cfg, options)
  if args.prompts:
    records = jobs.read_records(args.prompts)
    if not records:
      return _common.no_records('illada-sample', '--prompts', args.prompts, args.out)
  else:
    records = [jobs.Record(f'--prompt {i}', i, {'prompt': p}) for i, p in enumerate(args.prompt, 1)]
  producer = _common.produced_by(args, options, chat=args.chat, stop=list(args.stop),
                                 max_new_tokens=args.max_new_tokens, seed=args.seed)
  if args.out and not args.restart:  # another checkpoint or setting: refused before loading
    jobs.check_producer(args.out, producer)
  eng, tok, fmt = _common.open_engine(args, 'illada-sample')
  prepare, execute = job_requests.generation_requests(
      eng, tok, fmt, options, chat=args.chat, stop=tuple(args.stop),
      max_new_tokens=args.max_new_tokens, seed=args.seed)
  with tempfile.TemporaryDirectory() as tmp:
    out = args.out or os.path.join(tmp, 'out.jsonl')
    summary = jobs.run(records, out, prepare, execute, on_error=args.on_error,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       barrier=_common.barrier('illada-sample'), progress=not args.no_progress,
                       restart=args.restart, produced_by=producer)
    if not args.out:
      with open(out, encoding='utf-8') as f:
        sys.stdout.write(f.read())
  if args.show_denoising and args.prompt:
    rows = [fmt.encode(tok, eng.cfg, p, chat=args.chat) for p in args.prompt]
    ids, mask = prompts.left_pad(rows, eng.cfg.pad_token_id)
    out = sampling.sample(eng.cfg, eng.params, ids, mask, eng.options_for(options))
    show_denoising(tok, out, ids.shape[1], [p[:40] for p in args.prompt])
  if summary.errors:  # written as error records; a rerun retries them
    print(f'illada-sample: {summary.errors} record(s) failed (see "error" in the output)', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
