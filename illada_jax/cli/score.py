"""`illada-score`: score continuations with Monte-Carlo likelihood or confidence (SPEC §3).

  illada-score --ckpt DIR --data items.jsonl --method confidence
  illada-score --ckpt DIR --data items.jsonl --method mc --mc-num 128 --batch-size 16

Each JSONL line has a `context` and either a `continuation` (scored alone) or
`choices` (each scored; the best is reported, and accuracy when an integer
`answer` is given). Prints or writes one JSON record per line.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

import illada_jax
from illada_jax import chat, scoring, sharding


def score_pairs(cfg, params, pairs, *, method='mc', mc_num=128, batch_size=16, cfg_scale=0.,
                chunk=32, seed=0) -> np.ndarray:
  """Scores `(context_ids, continuation_ids)` pairs in chunks; float64 `[R]`."""
  out = []
  key = jax.random.key(seed)
  for lo in range(0, len(pairs), chunk):
    part = pairs[lo:lo + chunk]
    if method == 'mc':
      out.append(scoring.mc_log_likelihood(cfg, params, part, mc_num=mc_num,
                                           batch_size=batch_size, cfg_scale=cfg_scale,
                                           key=jax.random.fold_in(key, lo)))
    elif method == 'confidence':
      out.append(scoring.confidence_score(cfg, params, part))
    else:
      raise ValueError(f'unknown scoring method {method!r}')
  return np.concatenate(out) if out else np.zeros((0,))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--ckpt', required=True)
  p.add_argument('--data', required=True, help='JSONL with context + continuation or choices')
  p.add_argument('--method', choices=('mc', 'confidence'), default='mc')
  p.add_argument('--mc-num', type=int, default=128)
  p.add_argument('--batch-size', type=int, default=16, help='MC rows per round')
  p.add_argument('--cfg-scale', type=float, default=0.)
  p.add_argument('--chunk', type=int, default=32, help='pairs per compiled call')
  p.add_argument('--tokenizer', default=None)
  p.add_argument('--mesh', default=None)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=None)
  args = p.parse_args(argv)

  mesh = sharding.make_mesh(args.mesh) if args.mesh else None
  cfg, params = illada_jax.load_checkpoint(args.ckpt, mesh=mesh)
  tok = chat.load_tokenizer(args.ckpt, args.tokenizer)
  items = [json.loads(line) for line in open(args.data) if line.strip()]
  pairs, owner = [], []
  for i, item in enumerate(items):
    ctx = tok.encode(item['context'])
    conts = item['choices'] if 'choices' in item else [item['continuation']]
    for c in conts:
      pairs.append((ctx, tok.encode(c)))
      owner.append(i)
  scores = score_pairs(cfg, params, pairs, method=args.method, mc_num=args.mc_num,
                       batch_size=args.batch_size, cfg_scale=args.cfg_scale,
                       chunk=args.chunk, seed=args.seed)
  records, correct, graded = [], 0, 0
  for i, item in enumerate(items):
    s = [float(x) for x, o in zip(scores, owner) if o == i]
    rec = {'context': item['context'], 'scores': s}
    if 'choices' in item:
      rec['prediction'] = int(np.argmax(s))
      if isinstance(item.get('answer'), int):
        graded += 1
        correct += rec['prediction'] == item['answer']
    records.append(rec)
  lines = [json.dumps(r) for r in records]
  if args.out:
    with open(args.out, 'w') as f:
      f.write('\n'.join(lines) + ('\n' if lines else ''))
  else:
    print('\n'.join(lines))
  if graded:
    print(f'accuracy {correct / graded:.4f} ({correct}/{graded}, method={args.method})',
          file=sys.stderr)


if __name__ == '__main__':
  main()
