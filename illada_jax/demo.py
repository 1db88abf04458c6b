"""The built-in demo: a tiny iLLaDA learns multi-digit addition on one CPU.

Everything is generated locally (no download):

1. problems `a+b=` -> `a+b` with `a, b < 10^digits` written with fixed width
   (`076+280=` -> `0356`), a held-out test set
   disjoint from the training set, written as JSONL;
2. a SentencePiece tokenizer trained on that text (one piece per digit;
   MASK at id 5 as in iLLaDA);
3. SFT training of a tiny iLLaDA-architecture model through the ordinary
   training stack (Grain pipeline, AdamW, Orbax checkpoints) — the prompt is
   never masked, the answer and its EOS padding are;
4. greedy low-confidence sampling of the held-out problems with the batch
   engine (`illada_jax.engine`), the exact-match accuracy, and one denoising
   trace (which answer position was filled at which step). The checkpoint
   records that prompts start with BOS, so `illada-sample` on it gives the
   same answers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np

from illada_jax import data as data_lib
from illada_jax import text_tokenizer
from illada_jax.configs.models import ILLADA_TINY
from illada_jax.optimizer import OptimizerConfig
from illada_jax.prompts import PromptFormat, left_pad
from illada_jax.sampling import SamplingOptions
from illada_jax.train import TrainConfig
from illada_jax.util import user_tmp


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  digits: int = 2  # operands are uniform in [0, 10^digits)
  train_size: int = 100_000  # distinct training problems (at most all the others)
  test_size: int = 500  # held-out problems (disjoint from training)
  steps: int = 1200
  batch_size: int = 128
  lr: float = 3e-3
  layers: int = 3
  d_model: int = 96
  seed: int = 0
  out: str = dataclasses.field(default_factory=lambda: user_tmp('illada_demo'))
  # Answer canvas: the sum and its EOS padding, as SFT pads answers. The
  # tail is what long generations decode (and what the fast samplers skip).
  gen_length: int = 16


def model_config(vocab_size: int = 32, layers: int = 3, d_model: int = 96):
  """A tiny iLLaDA (GQA 4/2 heads, SwiGLU, tied head, bidirectional), float32 on CPU."""
  return ILLADA_TINY.replace(
      num_layers=layers, d_model=d_model, num_heads=4, num_kv_heads=2, head_dim=d_model // 4,
      mlp_hidden=8 * d_model // 3 // 32 * 32, vocab_size=vocab_size, max_len=64,
      param_dtype='float32', compute_dtype='float32', remat_policy='none')


def _problem(a: int, b: int, digits: int) -> dict[str, str]:
  # Fixed-width operands and sum: every digit keeps its place, so the model
  # only has to learn the per-column rule and the carries.
  return {'prompt': f'{a:0{digits}d}+{b:0{digits}d}=', 'response': f'{a + b:0{digits + 1}d}'}


def make_problems(cfg: DemoConfig) -> tuple[list[dict], list[dict]]:
  """(train, test) problem lists; test pairs never occur in train."""
  rng = np.random.default_rng(cfg.seed)
  n = 10 ** cfg.digits
  total = n * n
  picks = rng.choice(total, size=min(cfg.train_size + cfg.test_size, total), replace=False)
  pairs = [(int(i // n), int(i % n)) for i in picks]
  test = [_problem(a, b, cfg.digits) for a, b in pairs[:cfg.test_size]]
  train = [_problem(a, b, cfg.digits) for a, b in pairs[cfg.test_size:]]
  return train, test


def seq_lengths(cfg: DemoConfig) -> tuple[int, int]:
  """(prompt length P incl. BOS, answer canvas G: the sum and >= 1 EOS)."""
  p = 1 + 2 * cfg.digits + 2
  if cfg.gen_length < cfg.digits + 2:
    raise ValueError(f'DemoConfig.gen_length={cfg.gen_length}: the {cfg.digits + 1}-digit '
                     f'sum and its EOS need at least {cfg.digits + 2}')
  return p, cfg.gen_length


def train_config(cfg: DemoConfig, vocab_size: int, tokenizer: str) -> TrainConfig:
  p, g = seq_lengths(cfg)
  return TrainConfig(
      model=model_config(vocab_size, cfg.layers, cfg.d_model),
      objective='sft',
      data=data_lib.DataConfig(paths=(os.path.join(cfg.out, 'data', 'train.jsonl'),),
                               eval_paths=(os.path.join(cfg.out, 'data', 'test.jsonl'),),
                               tokenizer=tokenizer),
      optimizer=OptimizerConfig(lr=cfg.lr, schedule='wsd', warmup_steps=min(100, cfg.steps // 10),
                                total_steps=cfg.steps, decay_fraction=0.2, weight_decay=0.01,
                                final_lr_fraction=0.05),
      batch_size=cfg.batch_size, seq_len=p + g, steps=cfg.steps, seed=cfg.seed,
      workdir=os.path.join(cfg.out, 'run'), log_every=50, eval_every=0,
      checkpoint_every=max(cfg.steps // 2, 1), keep_checkpoints=2, loss_chunk=64)


def prepare(cfg: DemoConfig) -> tuple[TrainConfig, Any, list[dict]]:
  """Writes data + tokenizer under `cfg.out`; returns (train config, tokenizer, test set)."""
  train, test = make_problems(cfg)
  data_lib.write_jsonl(os.path.join(cfg.out, 'data', 'train.jsonl'), train)
  data_lib.write_jsonl(os.path.join(cfg.out, 'data', 'test.jsonl'), test)
  texts = [r['prompt'] + r['response'] for r in train[:20000]]
  tok = text_tokenizer.train_sentencepiece(
      texts, os.path.join(cfg.out, 'tokenizer', 'sp'), vocab_size=24, add_dummy_prefix=False)
  vocab = 32
  assert tok.vocab_size <= vocab and tok.mask_id == model_config().mask_token_id
  return train_config(cfg, vocab, tok.path), tok, test


def prompt_format() -> PromptFormat:
  """The demo trains with BOS before every prompt (`DataConfig.add_bos`) and records it."""
  return PromptFormat(add_bos=True)


def encode_prompts(tok, prompts: list[str], width: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded `[B, width]` prompt ids in the demo's format (BOS first) and their key mask."""
  cfg = model_config()
  return left_pad([prompt_format().encode(tok, cfg, p) for p in prompts], tok.eos_id, width)


def decode_answer(tok, ids) -> str:
  ids = [int(i) for i in ids]
  if tok.eos_id in ids:
    ids = ids[:ids.index(tok.eos_id)]
  return tok.decode(ids).strip()


def sampling_options(cfg: DemoConfig) -> SamplingOptions:
  """Greedy low-confidence sampling of the whole answer canvas, one token per step."""
  _, g = seq_lengths(cfg)
  return SamplingOptions(gen_length=g, block_length=g, steps=g)


def evaluate(model_cfg, params, tok, test: list[dict], cfg: DemoConfig, batch: int = 250,
             options: SamplingOptions | None = None) -> dict[str, Any]:
  """Samples the test prompts with the engine (`batch` slots); accuracy and one trace.

  `options` default to `sampling_options(cfg)`; `steps` in the result is the
  mean number of model calls per problem.
  """
  from illada_jax import engine, sampling
  p, g = seq_lengths(cfg)
  options = options or sampling_options(cfg)
  fmt = prompt_format()
  requests = [engine.Request(id=i, prompt_ids=tuple(fmt.encode(tok, model_cfg, r['prompt'])),
                             options=options) for i, r in enumerate(test)]
  eng = engine.Engine(model_cfg, params, tokenizer=tok, slots=batch, buckets=(p,))
  done = {c.id: c for c in eng.generate(requests)}
  outputs = [done[i].text.strip() for i in range(len(test))]
  correct = sum(o == r['response'] for o, r in zip(outputs, test))
  steps = float(np.mean([c.steps for c in done.values()]))
  ids, mask = left_pad([requests[0].prompt_ids], model_cfg.pad_token_id)
  out = sampling.sample(model_cfg, params, ids, mask, options)
  trace = denoising_trace(tok, np.asarray(out.tokens)[0, p:], np.asarray(out.commit_step)[0, p:],
                          model_cfg.mask_token_id)
  return {'accuracy': correct / len(test), 'n': len(test), 'outputs': outputs, 'trace': trace,
          'steps': steps}


def denoising_trace(tok, answer_ids, commit_steps, mask_id: int) -> list[str]:
  """One line per step: the answer canvas with still-masked positions as '_'."""
  lines = []
  last = int(commit_steps.max())
  for s in range(-1, last + 1):
    cells = []
    for t, c in zip(answer_ids, commit_steps):
      if c > s or c < 0 and s < last and t == mask_id:
        cells.append('_')
      else:
        cells.append('<eos>' if int(t) == tok.eos_id else tok.id_to_piece(int(t)).replace('▁', ''))
    lines.append(f'step {s + 1}: ' + ' '.join(c.rjust(5) for c in cells))
  return lines


def run(cfg: DemoConfig, *, progress_bar: bool = True, log=print) -> dict[str, Any]:
  """The whole demo; returns {'accuracy', 'train_seconds', 'final_loss', 'checkpoint', ...}."""
  import jax
  from illada_jax import train as train_lib
  t0 = time.perf_counter()
  tcfg, tok, test = prepare(cfg)
  tcfg = dataclasses.replace(tcfg, progress_bar=progress_bar)
  n_train = min(cfg.train_size, 10 ** (2 * cfg.digits) - cfg.test_size)
  log(f'demo: {cfg.digits}-digit addition, {n_train} training problems, '
      f'{cfg.test_size} held out; tokenizer {tok.vocab_size} pieces; '
      f'model {_count(tcfg.model) / 1e6:.2f}M parameters; {jax.device_count()} device(s)')
  t1 = time.perf_counter()
  out = train_lib.train(tcfg)
  t_train = time.perf_counter() - t1
  params = out['state']['params']
  if jax.device_count() > 1:  # sample on one device: the batch need not divide the mesh
    params = jax.device_put(params, jax.devices()[0])
  t2 = time.perf_counter()
  result = evaluate(tcfg.model, params, tok, test, cfg)
  t_eval = time.perf_counter() - t2
  final_loss = out['losses'][max(out['losses'])] if out['losses'] else float('nan')
  summary = {
      'config': dataclasses.asdict(cfg), 'accuracy': result['accuracy'], 'n_test': result['n'], 'final_loss': final_loss,
      'steps': out['final_step'], 'train_seconds': t_train, 'eval_seconds': t_eval,
      'total_seconds': time.perf_counter() - t0, 'checkpoint': out['checkpoint_dir'],
      'examples': [(r['prompt'], r['response'], o) for r, o in
                   zip(test[:8], result['outputs'][:8])],
      'trace_prompt': test[0]['prompt'], 'trace': result['trace'],
  }
  with open(os.path.join(cfg.out, 'demo_result.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  log(f'\ncheckpoint: {summary["checkpoint"]}')
  o = sampling_options(cfg)  # the model's max_len is short: say the generation length
  log(f'sample it: illada-sample --ckpt {summary["checkpoint"]} --gen-length {o.gen_length} '
      f'--prompt "{test[0]["prompt"]}"')
  log('held-out examples (prompt, truth, model):')
  for p, t, o in summary['examples']:
    log(f'  {p:<12} {t:>6} {o:>6}  {"ok" if o == t else "x"}')
  log(f'\ndenoising trace of {test[0]["prompt"]} (greedy, low-confidence remasking, one '
      'answer token per step):')
  for line in result['trace']:
    log('  ' + line)
  # A uniform guess among the 2 * 10^digits - 1 possible sums.
  chance = 100 / (2 * 10 ** cfg.digits - 1)
  log(f'\naccuracy on {result["n"]} held-out problems: {100 * result["accuracy"]:.1f}% '
      f'(chance: {chance:.2f}%)')
  log(f'train {t_train:.0f}s, sampling {t_eval:.1f}s, total {summary["total_seconds"]:.0f}s')
  return summary


def _count(model_cfg) -> int:
  from illada_jax.model import param_count
  return param_count(model_cfg)
