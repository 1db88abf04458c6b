"""Batch inference: the continuous batching engine against static batching, same requests.

The task is built and a model trained here, once (cached under `--workdir`):
spell the alphabet from the first to the second letter after a `|` that
follows 0-32 digits of noise (`907|fk=` -> `fghijk`, then EOS). Prompts are
5-37 tokens (BOS, noise, `|`, two letters, `=`), answers 3-20 letters: each
varies more than 4x, independently of the other. The model is a tiny iLLaDA
(3 layers, d 64) trained with the project's SFT loop on whole canvases, 4000
steps by default (about 8 minutes on 2 CPU cores; `--train-*` flags). The run
prints the task accuracy (exact match on the held-out prompts; target >= 90%).

The settings are LLaDA's semi-autoregressive fixed-length ones (generation
limit `--gen-length`, block `--block-length`, one token per step, greedy).
Not iLLaDA's variable length: a model this small learns from whole canvases
to rely on the masks after the current block, and with only the appended
blocks visible it answers about a quarter of the prompts right (the same
checkpoint: 97% fixed-length, 23% variable length, on 64 held-out prompts).
The engine releases a row after the block in which its EOS appears, which
changes nothing in its answer (blocks are committed left to right).

The held-out prompts are sampled three ways with these settings, B = `--slots`:

  (a) static batches in file order, each left-padded to its longest prompt and
      run through every block (`sampling.sample()`, what `illada-sample` did
      before the engine: one program per distinct padded length)
  (b) static batches after sorting the prompts by length
  (c) the engine (`illada_jax.Engine`), B slots, prompt buckets 16, 24, 32 and 40

Each way runs once to compile, then `--repeats` times, the ways interleaved
so that load spikes on a shared machine hit them alike; the median and the
range over the repeats are printed, and the speed-ups as the median and range
of the per-repeat ratios. Per way: wall seconds, output tokens/s (answer
tokens before EOS), computed tokens/s (positions denoised: whole blocks of
every request), the host's share
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

MIN_LEN, MAX_LEN = 3, 20  # letters in an answer
MAX_NOISE = 32  # digits before the `|`
DEFAULT_TRAIN_STEPS = 4000
VOCAB = 48  # the model's rows: 26 letters, 10 digits, `|`, `=` and the specials, padded


def problems(n: int, seed: int) -> list[dict]:
  """`noise|fk=` -> `fghijk`: the alphabet from the first letter to the second."""
  rng = np.random.default_rng(seed)
  letters, digits = string.ascii_lowercase, list(string.digits)
  out = []
  for _ in range(n):
    noise = ''.join(rng.choice(digits, rng.integers(0, MAX_NOISE + 1)))
    length = int(rng.integers(MIN_LEN, MAX_LEN + 1))
    first = int(rng.integers(0, len(letters) - length + 1))
    answer = letters[first:first + length]
    out.append({'prompt': f'{noise}|{answer[0]}{answer[-1]}=', 'response': answer})
  return out


@dataclasses.dataclass(frozen=True)
class Training:
  """How the task model is trained (each setting names its own cached run)."""
  steps: int = DEFAULT_TRAIN_STEPS
  lr: float = 3e-3
  layers: int = 3
  d_model: int = 64
  batch_size: int = 32

  @property
  def name(self) -> str:
    return (f'run_l{self.layers}_d{self.d_model}_b{self.batch_size}_lr{self.lr:g}'
            f'_s{self.steps}')


def checkpoint_dir(workdir: str, training: Training) -> str:
  return os.path.join(workdir, training.name, 'checkpoints', str(training.steps))


def prepare(workdir: str, training: Training, retrain: bool = False):
  """(model config, params, tokenizer, held-out problems, checkpoint dir); trains on first use."""
  data_dir = os.path.join(workdir, 'data')
  test = problems(2000, seed=1)
  held = {p['prompt'] for p in test}
  ckpt = checkpoint_dir(workdir, training)
  if retrain or not os.path.exists(os.path.join(ckpt, 'model_config.json')):
    train = [p for p in problems(60000, seed=0) if p['prompt'] not in held]
    data_lib.write_jsonl(os.path.join(data_dir, 'train.jsonl'), train)
    tok = text_tokenizer.train_sentencepiece(
        [p['prompt'] + p['response'] for p in train[:5000]],
        os.path.join(workdir, 'tokenizer', 'sp'), vocab_size=VOCAB, model_type='char',
        add_dummy_prefix=False)
    # BOS, noise, '|', two letters, '=', the answer and its EOS: 58, padded with EOS to 64.
    seq_len = 64
    t = training
    cfg = train_lib.TrainConfig(
        model=model_config(VOCAB, t.layers, t.d_model), objective='sft',
        data=data_lib.DataConfig(paths=(os.path.join(data_dir, 'train.jsonl'),),
                                 tokenizer=tok.path),
        optimizer=OptimizerConfig(lr=t.lr, schedule='wsd', warmup_steps=100,
                                  total_steps=t.steps, decay_fraction=0.2, weight_decay=0.01,
                                  final_lr_fraction=0.05),
        batch_size=t.batch_size, seq_len=seq_len, steps=t.steps, seed=0,
        workdir=os.path.join(workdir, t.name), log_every=100, eval_every=0,
        checkpoint_every=250, keep_checkpoints=1, loss_chunk=64)
    if retrain and os.path.isdir(cfg.workdir):  # else a run cut short resumes
      import shutil
      shutil.rmtree(cfg.workdir)
    print(f'# training the task model ({t}, once; cached in {cfg.workdir})', flush=True)
    train_lib.train(cfg)
  cfg, params = checkpoint.load_checkpoint(ckpt)
  return cfg, params, prompts.load_tokenizer(ckpt), test, ckpt


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


def exact_match(answers: dict, truth: dict) -> float:
  """Fraction of requests whose answer ids equal the reference ids (before EOS)."""
  return float(np.mean([answers[i] == truth[i] for i in truth]))


def spread(xs) -> str:
  return f'median {np.median(xs):.3f}, {min(xs):.3f}-{max(xs):.3f}'


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--workdir', default='/tmp/illada_bench_engine')
  ap.add_argument('--requests', type=int, default=512)
  ap.add_argument('--slots', type=int, default=64)
  ap.add_argument('--block-length', type=int, default=4)
  ap.add_argument('--gen-length', type=int, default=24, help='generation limit (whole blocks)')
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--train-steps', type=int, default=DEFAULT_TRAIN_STEPS)
  ap.add_argument('--train-lr', type=float, default=Training.lr)
  ap.add_argument('--train-layers', type=int, default=Training.layers)
  ap.add_argument('--train-d-model', type=int, default=Training.d_model)
  ap.add_argument('--train-batch-size', type=int, default=Training.batch_size)
  ap.add_argument('--retrain', action='store_true')
  ap.add_argument('--accuracy-only', action='store_true',
                  help='train if needed, print the task accuracy, stop')
  args = ap.parse_args(argv)

  training = Training(steps=args.train_steps, lr=args.train_lr, layers=args.train_layers,
                      d_model=args.train_d_model, batch_size=args.train_batch_size)
  cfg, params, tok, test, ckpt = prepare(args.workdir, training, args.retrain)
  test = test[:args.requests]
  o = sampling.SamplingOptions(gen_length=args.gen_length, block_length=args.block_length)
  fmt = prompts.PromptFormat.from_checkpoint(ckpt)
  reqs = [engine.Request(i, tuple(fmt.encode(tok, cfg, p['prompt'])), o)
          for i, p in enumerate(test)]
  plen = [len(r.prompt_ids) for r in reqs]
  b = args.slots
  eng = engine.Engine(cfg, params, tokenizer=tok, slots=b, buckets=(16, 24, 32, 40))
  truth = {i: list(tok.encode(t['response'])) for i, t in enumerate(test)}
  t0 = time.perf_counter()
  ref = with_engine(eng, reqs)
  ref.cold = time.perf_counter() - t0
  acc = exact_match(ref.answers, truth)
  print(f'# task accuracy: {acc:.1%} of {len(reqs)} held-out prompts answered exactly '
        f'(target >= 90%); model {training.name}', flush=True)
  if args.accuracy_only:
    return
  file_order = [reqs[i:i + b] for i in range(0, len(reqs), b)]
  by_len = sorted(reqs, key=lambda r: len(r.prompt_ids))
  sorted_batches = [by_len[i:i + b] for i in range(0, len(reqs), b)]
  ways = {'(a) static, file order': lambda: static(cfg, params, file_order, o),
          '(b) static, sorted by length': lambda: static(cfg, params, sorted_batches, o),
          '(c) engine': lambda: with_engine(eng, reqs)}
  lengths = [len(a) for a in ref.answers.values()]
  print(f'# {len(reqs)} requests: prompts {min(plen)}-{max(plen)} tokens, answers '
        f'{min(lengths)}-{max(lengths)} tokens, fixed length, block {o.block_length}, limit '
        f'{o.gen_length}, {b} slots / rows per batch; {jax.device_count()} '
        f'{jax.devices()[0].platform} device(s); load average {os.getloadavg()[0]:.1f}',
        flush=True)
  runs: dict[str, list[Outcome]] = {name: [] for name in ways}
  cold = {'(c) engine': ref.cold}
  for name, fn in list(ways.items())[:2]:
    t0 = time.perf_counter()
    fn()  # compiles
    cold[name] = time.perf_counter() - t0
  for _ in range(args.repeats):  # interleaved: a load spike hits every way alike
    for name, fn in ways.items():
      runs[name].append(fn())
  print(f'# {args.repeats} interleaved repeats after a compiling run; load average '
        f'{os.getloadavg()[0]:.1f}', flush=True)
  out_tokens = sum(lengths)
  for name, rs in runs.items():
    same = min(sum(r.answers[i] == ref.answers[i] for i in ref.answers) for r in rs)
    secs = [r.seconds for r in rs]
    print(f'{name}: wall {spread(secs)} s (first run with compiles {cold[name]:.1f} s), output '
          f'tok/s median {out_tokens / np.median(secs):.0f}, computed tok/s median '
          f'{rs[0].computed / np.median(secs):.0f}, host share '
          f'{spread([1 - r.wait / r.seconds for r in rs])}, {rs[0].compiles} programs, '
          f'{same}/{len(reqs)} answers equal to (c)', flush=True)
  engine_secs = [r.seconds for r in runs['(c) engine']]
  for name in list(runs)[:2]:
    ratios = [r.seconds / e for r, e in zip(runs[name], engine_secs)]
    print(f'(c) engine vs {name}: output tokens/s {spread(ratios)}x over the repeats '
          f'(target >= {2 if name.startswith("(a)") else 1.3}x)', flush=True)


if __name__ == '__main__':
  main()
