"""`illada-sample`: generate text from a checkpoint with the masked-diffusion sampler.

  illada-sample --ckpt DIR --prompt "Once upon a time" --gen-length 64 --steps 64
  illada-sample --ckpt DIR --prompts in.jsonl --chat --threshold 0.9 --cache dual --out out.jsonl

Prompts file: one JSON object per line with `prompt` (a string) or `messages`
(a chat). Prompts are tokenized with the checkpoint's tokenizer, left-padded
into batches, sampled, cut at the first EOS/EOT (and `--stop` strings), and
printed or written as JSONL. `--show-denoising` replays the canvas step by
step in the terminal (MASK shown as `░`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

import illada_jax
from illada_jax import chat, sampling, sharding

MASK_GLYPH = '░'


def read_prompts(args) -> list:
  if args.prompts:
    out = []
    with open(args.prompts) as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          rec = json.loads(line)
          if 'messages' not in rec and 'prompt' not in rec:
            raise ValueError(f'{args.prompts}:{n}: expected a "prompt" or "messages" field')
          out.append(rec.get('messages', rec.get('prompt')))
    return out
  return list(args.prompt)


def render_canvas(tok, cfg, tokens_L, step_L, s: int, start: int) -> str:
  """The generated part of a row after step `s`: committed pieces, MASK as a glyph."""
  pieces = []
  for t, k in zip(tokens_L[start:], step_L[start:]):
    pieces.append(tok.decode([int(t)]) if 0 <= k <= s else MASK_GLYPH)
  return ''.join(pieces)


def show_denoising(tok, cfg, out, starts, prompts_text, stream=None, delay=0.05):
  """Replays each step's canvas (rebuilt from final tokens and commit steps)."""
  stream = stream or sys.stdout
  tokens, steps = np.asarray(out.tokens), np.asarray(out.commit_step)
  tty = stream.isatty()
  for s in range(int(out.nfe)):
    frame = [f'step {s + 1}/{int(out.nfe)}']
    for r, text in enumerate(prompts_text):
      frame.append(f'[{r}] {text!r} -> ' + render_canvas(tok, cfg, tokens[r], steps[r], s,
                                                         starts))
    if tty:
      stream.write('\x1b[2J\x1b[H')
    stream.write('\n'.join(frame) + '\n')
    stream.flush()
    if tty:
      time.sleep(delay)


def sample_texts(cfg, params, tok, prompts, *, chat_mode=False, ckpt_dir=None, batch_size=8,
                 stops=(), seed=0, on_batch=None, **sample_kwargs) -> list[dict]:
  """Samples every prompt; returns one record per prompt (`completion`, ids, nfe)."""
  mesh = sharding.mesh_of(params)
  multiple = 1 if mesh is None else mesh.shape['data'] * mesh.shape['fsdp']
  records = []
  key = jax.random.key(seed)
  for lo in range(0, len(prompts), batch_size):
    batch = prompts[lo:lo + batch_size]
    rows = [chat.prompt_ids(tok, cfg, p, chat=chat_mode, ckpt_dir=ckpt_dir) for p in batch]
    ids, mask = chat.left_pad(rows, cfg.pad_token_id, multiple)
    start = time.perf_counter()
    out = sampling.sample(cfg, params, ids, mask, key=jax.random.fold_in(key, lo),
                          **sample_kwargs)
    tokens = np.asarray(jax.block_until_ready(out.tokens))
    seconds = time.perf_counter() - start
    if on_batch is not None:
      on_batch(out, ids.shape[1], batch)
    for r, p in enumerate(batch):
      gen = chat.completion_ids(cfg, tokens[r, ids.shape[1]:])
      text = chat.cut_at_stops(tok.decode(gen), stops)
      records.append({'prompt': p, 'completion': text, 'completion_ids': gen,
                      'nfe': int(out.nfe), 'seconds': seconds})
  return records


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--ckpt', required=True, help='checkpoint directory (illada-convert output)')
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--prompt', nargs='+', help='one or more prompt strings')
  src.add_argument('--prompts', help='JSONL file with "prompt" or "messages" per line')
  p.add_argument('--chat', action='store_true', help='wrap prompts in the chat template')
  p.add_argument('--tokenizer', default=None, help='tokenizer file (default: from --ckpt)')
  p.add_argument('--gen-length', type=int, default=128)
  p.add_argument('--steps', type=int, default=None, help='default: gen-length')
  p.add_argument('--block-length', type=int, default=None, help='default: gen-length')
  p.add_argument('--temperature', type=float, default=0.)
  p.add_argument('--cfg-scale', type=float, default=0.)
  p.add_argument('--remasking', default='low_confidence', choices=sampling.REMASKING)
  p.add_argument('--logits-eos-inf', action='store_true')
  p.add_argument('--confidence-eos-eot-inf', action='store_true')
  p.add_argument('--threshold', type=float, default=None, help='parallel decoding threshold')
  p.add_argument('--cache', choices=('prefix', 'dual'), default=None)
  p.add_argument('--cache-refresh', type=int, default=0)
  p.add_argument('--variable-length', action='store_true',
                 help='append blocks until EOS; --steps counts steps per block')
  p.add_argument('--stop', nargs='*', default=[], help='stop strings (cut the text)')
  p.add_argument('--batch-size', type=int, default=8)
  p.add_argument('--mesh', default=None, help='e.g. data=2,fsdp=2,tensor=2')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=None, help='write JSONL here instead of printing')
  p.add_argument('--show-denoising', action='store_true')
  return p


def main(argv=None):
  args = build_parser().parse_args(argv)
  mesh = sharding.make_mesh(args.mesh) if args.mesh else None
  cfg, params = illada_jax.load_checkpoint(args.ckpt, mesh=mesh)
  tok = chat.load_tokenizer(args.ckpt, args.tokenizer)
  prompts = read_prompts(args)
  block = args.block_length or args.gen_length
  steps = args.steps or (block if args.variable_length else args.gen_length)
  stop_ids = [tok.encode(s) for s in args.stop if s] if args.variable_length else []

  def on_batch(out, start, batch):
    if args.show_denoising:
      show_denoising(tok, cfg, out, start, [str(p)[:40] for p in batch])

  records = sample_texts(
      cfg, params, tok, prompts, chat_mode=args.chat, ckpt_dir=args.ckpt,
      batch_size=args.batch_size, stops=args.stop, seed=args.seed, on_batch=on_batch,
      gen_length=args.gen_length, block_length=block, steps=steps,
      temperature=args.temperature, cfg_scale=args.cfg_scale, remasking=args.remasking,
      logits_eos_inf=args.logits_eos_inf, confidence_eos_eot_inf=args.confidence_eos_eot_inf,
      threshold=args.threshold, cache=args.cache, cache_refresh=args.cache_refresh,
      variable_length=args.variable_length, stop_ids=stop_ids)
  if args.out:
    with open(args.out, 'w') as f:
      for rec in records:
        f.write(json.dumps(rec) + '\n')
    print(f'wrote {len(records)} completions to {args.out}', file=sys.stderr)
  else:
    for rec in records:
      print(json.dumps({'prompt': rec['prompt'], 'completion': rec['completion'],
                        'nfe': rec['nfe']}))


if __name__ == '__main__':
  main()
