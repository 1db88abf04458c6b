"""`illada-score`: score continuations with Monte-Carlo likelihood or confidence (SPEC §3).

  illada-score --ckpt DIR --input items.jsonl --out scores.jsonl --method confidence
  illada-score --ckpt DIR --input items.jsonl --out scores.jsonl --method mc --mc-num 128
  illada-score --ckpt DIR --input items.jsonl --preset illada_confidence   # ARC-C as published

Each JSONL line has a `context` and either a `continuation` (scored alone) or
`choices` (each scored; `prediction` is the best, and `correct` is given when
an integer `answer` is), and optionally `id` (default: the line number) and
`seed`. Context and continuation are encoded separately, as written (the
lm-eval adapter splits the joined text as lm-eval does). `--add-bos` /
`--no-add-bos` (default: the checkpoint's `add_bos_token`) and `--padd-eos`
are the harness's options; `--check-greedy` adds lm-eval's `greedy` flags;
`--preset NAME` takes settings from `configs/scoring.py`. Requests are
bucketed by length and batched by the engine; the job is resumable and runs
on several processes as `illada-sample` does. Prints the accuracy over
graded records at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from illada_jax.cli import _common


def build_parser() -> argparse.ArgumentParser:
  from illada_jax.scoring import ScoringOptions
  p = _common.Parser(prog='illada-score', description=__doc__.splitlines()[0])
  p.add_argument('--ckpt', required=True)
  p.add_argument('--input', required=True, help='JSONL with context + continuation or choices')
  p.add_argument('--out', default=None, help='JSONL results (resumable); default: stdout')
  p.add_argument('--tokenizer', default=None)
  p.add_argument('--seed', type=int, default=0, help='job seed (per-request seeds derive from it)')
  p.add_argument('--slots', type=_common.positive_int, default=64, help='rows scored at once')
  p.add_argument('--buckets', default=None, help='row-length buckets, e.g. 64,256,1024')
  p.add_argument('--mesh', default=None, help='e.g. data=2,fsdp=2,tensor=2 (local devices)')
  p.add_argument('--on-error', choices=('skip', 'stop'), default='skip')
  p.add_argument('--no-progress', action='store_true')
  _common.add_restart(p)
  from illada_jax.configs.scoring import PRESETS
  # rolling_window: rolling log-likelihood is a library / lm-eval request type, not a record kind.
  _common.add_options(p, ScoringOptions, 'scoring options (illada_jax.scoring.ScoringOptions)',
                      PRESETS, exclude=('rolling_window',))
  _common.add_quantize(p)
  _common.add_distributed(p)
  return p


def accuracy(path: str) -> tuple[int, int]:
  """(correct, graded) over the records of a results file."""
  correct = graded = 0
  with open(path, encoding='utf-8') as f:
    for line in f:
      rec = json.loads(line)
      if 'correct' in rec:
        graded += 1
        correct += bool(rec['correct'])
  return correct, graded


def main(argv=None) -> int:
  return _common.guarded('illada-score', _main, argv)


def _main(argv) -> int:
  args = build_parser().parse_args(argv)
  _common.init_distributed(args)
  import jax
  from illada_jax import job_requests, jobs, scoring
  from illada_jax.configs.scoring import PRESETS
  options = _common.options_from(args, scoring.ScoringOptions, PRESETS)
  _common.check_engine_args(args, '--input', args.input)
  records = jobs.read_records(args.input)
  if not records:
    return _common.no_records('illada-score', '--input', args.input, args.out)
  producer = _common.produced_by(args, options, seed=args.seed)
  if args.out and not args.restart:  # another checkpoint or setting: refused before loading
    jobs.check_producer(args.out, producer)
  eng, tok, fmt = _common.open_engine(args, 'illada-score')
  prepare, execute = job_requests.scoring_requests(eng, tok, fmt, options, seed=args.seed)
  with tempfile.TemporaryDirectory() as tmp:
    out = args.out or os.path.join(tmp, 'out.jsonl')
    summary = jobs.run(records, out, prepare, execute, on_error=args.on_error,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       barrier=_common.barrier('illada-score'), progress=not args.no_progress,
                       unit='records', restart=args.restart, produced_by=producer)
    if jax.process_index() == 0:
      if not args.out:
        with open(out, encoding='utf-8') as f:
          sys.stdout.write(f.read())
      correct, graded = accuracy(out)
      if graded:
        print(f'accuracy {correct / graded:.4f} ({correct}/{graded}, method={options.method})',
              file=sys.stderr)
  if summary.errors:  # written as error records; a rerun retries them
    print(f'illada-score: {summary.errors} record(s) failed (see "error" in the output)', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
