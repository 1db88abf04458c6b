"""Batch inference: the continuous batching engine against static batching, same requests.

The task is built and a model trained here, once (cached under `--workdir`):
reverse the 3-20 letters after a `|` that follows 0-16 letters of noise
(`kfo|qwe=` -> `ewq`, then EOS). Prompts are 6-39 tokens (BOS, noise, `|`,
letters, `=`), answers 3-20 tokens: each varies more than 4x, independently
of the other. A tiny iLLaDA of the demo's size learns it with the project's
SFT loop on whole (fixed-length) canvases.

The held-out prompts are sampled three ways with the same settings (variable
length, block `--block-length`, one token per step, greedy), B = `--slots`:

  (a) static batches in file order, each left-padded to its longest prompt and
      run until its slowest row ends (what `illada-sample` did before the engine:
      one program per distinct padded length)
  (b) static batches after sorting the prompts by length
  (c) the engine (`illada_jax.Engine`), B slots, prompt buckets 16, 24, 32 and 40

Each way runs once to compile, then `--repeats` times; the fastest is kept.
Per way: wall seconds, output tokens/s (answer tokens before EOS), computed
tokens/s (positions denoised: whole blocks of every request), the host's share
of wall time (outside waits on the device), programs compiled, and whether
every request's answer equals (c)'s. Targets: (c) >= 2x (a) and >= 1.3x (b) in
output tokens/s; host share < 5% at 64 slots.

  python tools/bench_engine.py [--requests 512] [--slots 64] [--workdir /tmp/illada_bench_engine]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import string
import time

import jax
import numpy as np

from illada_jax import checkpoint, data as data_lib, engine, prompts, sampling, text_tokenizer
from illada_jax import train as train_lib
from illada_jax.demo import model_config
from illada_jax.optimizer import OptimizerConfig

MIN_LEN, MAX_LEN = 3, 20  # letters to reverse
MAX_NOISE = 16  # letters before the `|`


def problems(n: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  letters = list(string.ascii_lowercase)
  out = []
  for _ in range(n):
    noise = ''.join(rng.choice(letters, rng.integers(0, MAX_NOISE + 1)))
    s = ''.join(rng.choice(letters, rng.integers(MIN_LEN, MAX_LEN + 1)))
    out.append({'prompt': f'{noise}|{s}=', 'response': s[::-1]})
  return out


def prepare(workdir: str, steps: int, retrain: bool):
  """(model config, params, tokenizer, held-out problems); trains on first use."""
  data_dir = os.path.join(workdir, 'data')
  test = problems(2000, seed=1)
  held = {p['prompt'] for p in test}
  ckpt = os.path.join(workdir, 'run', 'checkpoints', str(steps))
  if retrain or not os.path.exists(os.path.join(ckpt, 'model_config.json')):
    train = [p for p in problems(60000, seed=0) if p['prompt'] not in held]
    data_lib.write_jsonl(os.path.join(data_dir, 'train.jsonl'), train)
    tok = text_tokenizer.train_sentencepiece(
        [p['prompt'] + p['response'] for p in train[:5000]],
        os.path.join(workdir, 'tokenizer', 'sp'), vocab_size=40, model_type='char',
        add_dummy_prefix=False)
    # BOS, noise, '|', letters, '=', the answer and its EOS: 60, padded with EOS to 64.
    seq_len = 64
    cfg = train_lib.TrainConfig(
        model=model_config(40), objective='sft',
        data=data_lib.DataConfig(paths=(os.path.join(data_dir, 'train.jsonl'),),
                                 tokenizer=tok.path),
        optimizer=OptimizerConfig(lr=3e-3, schedule='wsd', warmup_steps=100, total_steps=steps,
                                  decay_fraction=0.2, weight_decay=0.01, final_lr_fraction=0.05),
        batch_size=128, seq_len=seq_len, steps=steps, seed=0,
        workdir=os.path.join(workdir, 'run'), log_every=100, eval_every=0,
        checkpoint_every=250, keep_checkpoints=1, loss_chunk=64)
    if retrain and os.path.isdir(cfg.workdir):
      import shutil
      shutil.rmtree(cfg.workdir)
    print(f'# training the reversal model ({steps} steps, once; cached in {workdir})',
          flush=True)
    train_lib.train(cfg)
  cfg, params = checkpoint.load_checkpoint(ckpt)
  return cfg, params, prompts.load_tokenizer(ckpt), test


@dataclasses.dataclass
class Outcome:
  seconds: float
  wait: float
  answers: list
  computed: int
  compiles: int
  cold: float = 0.  # seconds of the first run, compiles included


def static(cfg, params, batches, o) -> Outcome:
  """`sample()` per batch: left-padded to the batch's longest prompt, run to its slowest row."""
  answers, computed, wait = {}, 0, 0.
  start = time.perf_counter()
  for part in batches:
    ids, mask = prompts.left_pad([r.prompt_ids for r in part], cfg.pad_token_id)
    out = sampling.sample(cfg, params, ids, mask, o)
    t0 = time.perf_counter()
    tokens, step = np.asarray(out.tokens), np.asarray(out.commit_step)
    wait += time.perf_counter() - t0
    p = ids.shape[1]
    for r, req in enumerate(part):
      answers[req.id] = prompts.completion_ids(cfg, tokens[r, p:])
      computed += int((step[r, p:] >= 0).sum())
  return Outcome(time.perf_counter() - start, wait, answers, computed,
                 len({max(len(r.prompt_ids) for r in part) for part in batches}))


def with_engine(eng, reqs) -> Outcome:
  eng.stats = engine.EngineStats(compiles=eng.stats.compiles)
  start = time.perf_counter()
  done = {c.id: c for c in eng.generate(reqs)}
  seconds = time.perf_counter() - start
  return Outcome(seconds, eng.stats.wait_seconds, {i: c.token_ids for i, c in done.items()},
                 sum(c.generated for c in done.values()), eng.stats.compiles)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--workdir', default='/tmp/illada_bench_engine')
  ap.add_argument('--requests', type=int, default=512)
  ap.add_argument('--slots', type=int, default=64)
  ap.add_argument('--block-length', type=int, default=4)
  ap.add_argument('--gen-length', type=int, default=24, help='generation limit (whole blocks)')
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--train-steps', type=int, default=2000)
  ap.add_argument('--retrain', action='store_true')
  args = ap.parse_args(argv)

  cfg, params, tok, test = prepare(args.workdir, args.train_steps, args.retrain)
  test = test[:args.requests]
  o = sampling.SamplingOptions(gen_length=args.gen_length, block_length=args.block_length,
                               variable_length=True)
  fmt = prompts.PromptFormat.from_checkpoint(
      os.path.join(args.workdir, 'run', 'checkpoints', str(args.train_steps)))
  reqs = [engine.Request(i, tuple(fmt.encode(tok, cfg, p['prompt'])), o)
          for i, p in enumerate(test)]
  plen = [len(r.prompt_ids) for r in reqs]
  b = args.slots
  file_order = [reqs[i:i + b] for i in range(0, len(reqs), b)]
  by_len = sorted(reqs, key=lambda r: len(r.prompt_ids))
  sorted_batches = [by_len[i:i + b] for i in range(0, len(reqs), b)]
  eng = engine.Engine(cfg, params, tokenizer=tok, slots=b, buckets=(16, 24, 32, 40))
  ways = {'(a) static, file order': lambda: static(cfg, params, file_order, o),
          '(b) static, sorted by length': lambda: static(cfg, params, sorted_batches, o),
          '(c) engine': lambda: with_engine(eng, reqs)}
  print(f'# {len(reqs)} requests: prompts {min(plen)}-{max(plen)} tokens, variable length, '
        f'block {o.block_length}, limit {o.gen_length}, {b} slots / rows per batch; '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s)', flush=True)
  best = {}
  for name, fn in ways.items():
    t0 = time.perf_counter()
    fn()  # compiles
    cold = time.perf_counter() - t0
    best[name] = min((fn() for _ in range(args.repeats)), key=lambda r: r.seconds)
    best[name].cold = cold
  ref = best['(c) engine']
  truth = {i: list(tok.encode(t['response'])) for i, t in enumerate(test)}
  lengths = [len(a) for a in ref.answers.values()]
  print(f'# answers {min(lengths)}-{max(lengths)} tokens; the engine answers '
        f'{np.mean([ref.answers[i] == truth[i] for i in truth]):.1%} exactly right')
  out_tokens = sum(lengths)
  for name, r in best.items():
    same = sum(r.answers[i] == ref.answers[i] for i in ref.answers)
    line = (f'{name}: {r.seconds:.3f} s (first run with compiles {r.cold:.1f} s), output '
            f'{out_tokens / r.seconds:.0f} tok/s, computed {r.computed / r.seconds:.0f} tok/s, '
            f'host share {1 - r.wait / r.seconds:.1%}, {r.compiles} programs, '
            f'{same}/{len(reqs)} answers equal to (c)')
    print(line, flush=True)
  for name in list(best)[:2]:
    print(f'(c) engine vs {name}: {best[name].seconds / ref.seconds:.2f}x output tokens/s',
          flush=True)


if __name__ == '__main__':
  main()
