"""Sampler throughput on this host: ms per denoising step and tokens/s.

  python tools/bench_sampler.py --preset illada_tiny --batch 4 --gen-length 64

For fixed-step, threshold, and threshold + dual cache decoding it reports
the jitted sampler's time per model call (step) and generated tokens/s, with
two ratios to baselines timed in the same run that do the sampler's model
work, no less: the trunk on the whole `[B, P+G]` canvas (all-visible key
mask, as the sampler passes) and the LM head on the current block's `W`
positions only, as the sampler does.
  vs_forward  step time / one jitted call of that trunk + block head (the
              sampler's own overhead: selection, commit and loop; the
              target for fixed-step is <= 1.05)
  vs_pyloop   step time / the same algorithm driven by a Python loop of
              jitted calls (the trunk + block head above, or the cached
              window pass, then a jitted selection), as the reference does
              in PyTorch
Weights are random, scaled up (`--sharpen`) so confidences are high enough
for the threshold to commit several tokens per step; NFE is reported.
Timings are the minimum over `--repeats`, variants interleaved. On a shared
host, `--single-thread` (one XLA thread; combine with `taskset -c N`) makes
the ratios reproducible. Dated results: docs/benchmarks.md.

  python tools/bench_sampler.py --demo-ckpt /tmp/illada_demo [--demo-batch 25] [--cache-refresh 2]

instead samples the built-in demo's held-out addition problems (training the
demo into that directory first if it has no finished run) with fixed-step
decoding (one token per step, the accuracy reference), then threshold,
threshold + dual cache and threshold + prefix cache for each `--taus`, and
reports exact-match accuracy (answer parsed up to the first EOS), NFE,
ms/step and two throughputs with their ratios to fixed-step: canvas tokens/s
(every generated position, EOS padding included) and answer tokens/s (the
generated tokens before each row's first EOS). The canvas defaults to the
one the demo was trained with: the sum and its EOS tail, as SFT answers are
padded (GSM8K generations are mostly such a tail).
"""

from __future__ import annotations

import os
import sys

if '--single-thread' in sys.argv:  # must precede the first jax import
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false'
                             ' intra_op_parallelism_threads=1').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import illada_jax
from illada_jax import sampling
from illada_jax.model import KVCache, Transformer


FIXED_STEP_TARGET = 1.05  # fixed-step time per step / one baseline model call


def timed(fn, repeats: int) -> float:
  """Fastest of `repeats` timed calls of `fn()` (compiled already).

  The minimum, not the median: on a shared host other processes only ever add time.
  """
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _select(cfg, o, logits_BWV, x_BW, m_B, i, key_B):
  """One step's commit decision (fixed schedule or threshold) on a block's logits."""
  temp_B = jnp.full(x_BW.shape[:1], o.temperature)
  x0_BW, conf_BW, is_end_BW = sampling.candidates(cfg, o, logits_BWV, key_B, temp_B)
  masked_BW = x_BW == cfg.mask_token_id
  rank_BW = sampling.commit_rank(conf_BW, masked_BW, is_end_BW)
  if o.threshold is None:
    s = o.steps_per_block
    commit_BW = masked_BW & (rank_BW < (m_B // s + (i < m_B % s))[:, None])
  else:
    sure_BW = jnp.where(is_end_BW, -jnp.inf, conf_BW) >= o.threshold
    commit_BW = masked_BW & (sure_BW | (rank_BW == 0))
  return jnp.where(commit_BW, x0_BW, x_BW)


@functools.cache
def block_forward(cfg, width: int):
  """Jitted `(params, x_BL, visible_BL, start) -> f32 [B, W, V]`: trunk on all L, head on W.

  The model work of one uncached sampler step, built from the model's own
  `hidden` and `logits` methods (not from the sampler's code), so a baseline
  timed with it shares no code with what it measures beyond the model.
  """
  model = Transformer(cfg)

  def fwd(params, x_BL, visible_BL, start):
    h_BLD = model.apply({'params': params}, x_BL, visible_BL, method='hidden')
    h_BWD = jax.lax.dynamic_slice_in_dim(h_BLD, start, width, axis=1)
    return model.apply({'params': params}, h_BWD, method='logits')

  return jax.jit(fwd)


@functools.cache
def _cache_calls(cfg, b: int, l: int):
  """Jitted (full pass filling a cache, cached window pass, LM head), built once per shape.

  Params are arguments: jit would fold captured weights into the program.
  """
  model = Transformer(cfg)
  fwd_kv = jax.jit(lambda params, x: model.apply(
      {'params': params}, x, KVCache.zeros(cfg, b, l), method='hidden_cached'))
  fwd_win = jax.jit(lambda params, x, lo, cache: model.apply(
      {'params': params}, x, cache, None, lo, method='hidden_cached'))
  head = jax.jit(lambda params, h: model.apply({'params': params}, h, method='logits'))
  return fwd_kv, fwd_win, head


def python_loop(cfg, params, o: sampling.SamplingOptions, prompt_BP, key):
  """The same sampler as a host loop of jitted calls; returns (tokens, nfe).

  Random draws follow the sampler's per-row streams: row seed `bits(key, B)[r]`,
  step `i` of block `blk`: `fold_in(fold_in(key(seed), blk), i)`.
  """
  b, p = prompt_BP.shape
  seeds = jax.random.bits(key, (b,), jnp.uint32)
  w, l = o.block_length, p + o.gen_length
  x = jnp.concatenate([prompt_BP, jnp.full((b, o.gen_length), cfg.mask_token_id, jnp.int32)], 1)
  visible = jnp.ones((b, l), bool)  # the sampler's key mask without variable length
  nfe = 0
  fwd = block_forward(cfg, w)
  fwd_kv, fwd_win, head = _cache_calls(cfg, b, l)
  for blk in range(o.num_blocks):
    lo = p + blk * w
    m_B = jnp.sum(x[:, lo:lo + w] == cfg.mask_token_id, axis=1)
    i = 0
    while True:
      if o.threshold is None and i >= o.steps_per_block:
        break
      # As the jitted loop: at most W calls (a committed x0 may itself be MASK).
      if o.threshold is not None and (i >= w or not bool(jnp.any(x[:, lo:lo + w] == cfg.mask_token_id))):
        break
      if o.cache is None:
        logits = fwd(params, x, visible, lo)
      elif i == 0:
        h, cache = fwd_kv(params, x)
        logits = head(params, h[:, lo:lo + w])
      else:
        h, _ = fwd_win(params, x[:, lo:lo + w], lo, cache)
        logits = head(params, h)
      keys = jax.vmap(lambda seed: jax.random.fold_in(
          jax.random.fold_in(jax.random.key(seed), blk), i))(seeds)
      new = _select(cfg, o, logits, x[:, lo:lo + w], m_B, i, keys)
      x = x.at[:, lo:lo + w].set(new)
      i += 1
      nfe += 1
  return x, nfe


def run(preset='illada_tiny', batch=4, prompt_len=64, gen_length=64, block_length=16,
        threshold=0.9, dtype='float32', sharpen=5.0, repeats=3, seed=0) -> dict:
  cfg = illada_jax.get_preset(preset).replace(param_dtype=dtype, compute_dtype=dtype,
                                              remat_policy='none')
  params = jax.tree.map(lambda x: x * sharpen, illada_jax.init_params(cfg, jax.random.key(seed)))
  rng = np.random.default_rng(seed)
  prompt = rng.integers(10, cfg.vocab_size - 1, (batch, prompt_len))
  prompt = jnp.asarray(prompt + (prompt >= cfg.mask_token_id), jnp.int32)  # no MASK in prompts
  tokens = jnp.concatenate([prompt, jnp.full((batch, gen_length), cfg.mask_token_id,
                                             jnp.int32)], 1)
  key = jax.random.key(seed)

  fwd = block_forward(cfg, block_length)
  visible = jnp.ones(tokens.shape, bool)
  start = jnp.int32(prompt_len)

  def forwards():  # as many back-to-back model calls as the fixed sampler makes
    for _ in range(gen_length):
      out = fwd(params, tokens, visible, start)
    return out

  common = dict(gen_length=gen_length, block_length=block_length, steps=gen_length)
  variants = {'fixed': {}, 'threshold': {'threshold': threshold},
              'threshold+dual_cache': {'threshold': threshold, 'cache': 'dual'},
              'threshold+prefix_cache': {'threshold': threshold, 'cache': 'prefix'}}
  fns, nfes = {'forward': forwards}, {'forward': gen_length}
  for name, extra in variants.items():
    o = sampling.SamplingOptions(**common, **extra)
    fns[name] = functools.partial(
        lambda extra: sampling.sample(cfg, params, prompt, **common, **extra, key=key).tokens, extra)
    nfes[name] = int(sampling.sample(cfg, params, prompt, **common, **extra, key=key).nfe)
    if o.cache != 'prefix':  # the host loop has no prefix variant
      fns['py:' + name] = functools.partial(lambda o: python_loop(cfg, params, o, prompt, key)[0], o)
      nfes['py:' + name] = python_loop(cfg, params, o, prompt, key)[1]
  for fn in fns.values():  # compile everything first
    jax.block_until_ready(fn())
  best = {name: float('inf') for name in fns}
  for _ in range(repeats):  # interleaved, so load spikes hit every variant alike
    for name, fn in fns.items():
      best[name] = min(best[name], timed(fn, 1))
  fwd = best['forward'] / gen_length
  rows = {}
  for name in variants:
    step = best[name] / nfes[name]
    py = 'py:' + name
    step_py = best[py] / nfes[py] if py in best else None
    rows[name] = {'nfe': nfes[name], 'ms_per_step': 1e3 * step,
                  'tokens_per_s': batch * gen_length / best[name], 'vs_forward': step / fwd,
                  'vs_pyloop': step_py and step / step_py,
                  'pyloop_ms_per_step': step_py and 1e3 * step_py}
  return {'preset': preset, 'dtype': dtype, 'batch': batch, 'prompt_len': prompt_len,
          'gen_length': gen_length, 'block_length': block_length, 'threshold': threshold,
          'forward_ms': 1e3 * fwd, 'devices': str(jax.devices()[0].platform),
          'xla_flags': os.environ.get('XLA_FLAGS', ''), 'results': rows}


def _demo_model(out: str, train: dict):
  """(cfg, params, tokenizer, test problems, demo config) of the demo in `out`.

  Trains the demo there first (with `train` overriding `DemoConfig` fields)
  if `out` holds no finished run.
  """
  from illada_jax import demo, text_tokenizer
  result = os.path.join(out, 'demo_result.json')
  if not os.path.isfile(result):
    demo.run(demo.DemoConfig(out=out, **train), progress_bar=False)
  with open(result) as f:
    dcfg = demo.DemoConfig(**json.load(f)['config'])
  ckpts = os.path.join(out, 'run', 'checkpoints')
  last = max((d for d in os.listdir(ckpts) if d.isdigit()), key=int)
  cfg, params = illada_jax.load_checkpoint(os.path.join(ckpts, last))
  tok = text_tokenizer.load(os.path.join(out, 'tokenizer', 'sp.model'))
  with open(os.path.join(out, 'data', 'test.jsonl')) as f:
    test = [json.loads(line) for line in f if line.strip()]
  return cfg, params, tok, test, dcfg


def answer_lengths(gen_BG, eos_id: int) -> np.ndarray:
  """int `[B]`: generated tokens before each row's first EOS (all G if it has none)."""
  is_eos_BG = np.asarray(gen_BG) == eos_id
  return np.where(is_eos_BG.any(axis=1), is_eos_BG.argmax(axis=1), is_eos_BG.shape[1])


def run_demo(out: str, gen_length=None, block_length=None, taus=(0.9, 0.95, 0.99), n=500,
             batch=250, repeats=3, train=None, refresh=()) -> dict:
  """Accuracy and speed of each sampler on the demo's held-out problems.

  `gen_length` and `block_length` default to the demo's trained answer canvas.
  Each `refresh` adds a dual-cache variant with a full pass every that many steps.
  """
  from illada_jax import demo
  cfg, params, tok, test, dcfg = _demo_model(out, train or {})
  p, trained_g = demo.seq_lengths(dcfg)
  gen_length = gen_length or trained_g
  block_length = block_length or gen_length
  test = test[:n]
  batches = []
  for start in range(0, len(test), batch):
    chunk = test[start:start + batch]
    ids, mask = demo.encode_prompts(tok, [r['prompt'] for r in chunk], p)
    batches.append((jnp.asarray(ids), jnp.asarray(mask), chunk))
  common = dict(gen_length=gen_length, block_length=block_length, temperature=0.0,
                remasking='low_confidence')
  variants = {'fixed': dict(steps=gen_length)}
  for tau in taus:
    variants[f'threshold tau={tau}'] = dict(steps=gen_length, threshold=tau)
    variants[f'threshold+dual tau={tau}'] = dict(steps=gen_length, threshold=tau, cache='dual')
    variants[f'threshold+prefix tau={tau}'] = dict(steps=gen_length, threshold=tau,
                                                   cache='prefix')
    for every in refresh:
      variants[f'threshold+dual/{every} tau={tau}'] = dict(
          steps=gen_length, threshold=tau, cache='dual', cache_refresh=every)

  def sample_all(extra):
    return [sampling.sample(cfg, params, ids, mask, **common, **extra) for ids, mask, _ in batches]

  rows = {}
  for name, extra in variants.items():  # compile, and score
    outs = jax.block_until_ready(sample_all(extra))
    correct = nfe = answer_tokens = 0
    for o, (_, _, chunk) in zip(outs, batches):
      tokens = np.asarray(o.tokens)
      nfe += int(o.nfe)
      answer_tokens += int(answer_lengths(tokens[:, p:], tok.eos_id).sum())
      correct += sum(demo.decode_answer(tok, tokens[i, p:]) == r['response']
                     for i, r in enumerate(chunk))
    rows[name] = {'accuracy': correct / len(test), 'nfe': nfe, 'answer_tokens': answer_tokens}
  best = {name: float('inf') for name in variants}
  for _ in range(repeats):  # interleaved, so load spikes hit every variant alike
    for name, extra in variants.items():
      best[name] = min(best[name], timed(lambda: sample_all(extra), 1))
  ref = rows['fixed']
  for name, r in rows.items():
    r.update(ms_per_step=1e3 * best[name] / r['nfe'],
             tokens_per_s=len(test) * gen_length / best[name],
             answer_tokens_per_s=r['answer_tokens'] / best[name], seconds=best[name])
  for name, r in rows.items():
    r.update(speedup=r['tokens_per_s'] / ref['tokens_per_s'],
             answer_speedup=r['answer_tokens_per_s'] / ref['answer_tokens_per_s'],
             nfe_ratio=ref['nfe'] / r['nfe'],
             accuracy_delta_points=100 * (r['accuracy'] - ref['accuracy']))
  return {'demo': out, 'n': len(test), 'batch': batch, 'prompt_len': p,
          'gen_length': gen_length, 'block_length': block_length,
          'devices': str(jax.devices()[0].platform), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'loadavg': os.getloadavg(), 'results': rows}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--preset', default='illada_tiny')
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--prompt-len', type=int, default=64)
  p.add_argument('--gen-length', type=int, default=None,
                 help='default 64, or the trained answer canvas with --demo-ckpt')
  p.add_argument('--block-length', type=int, default=None,
                 help='default 16, or the whole gen length with --demo-ckpt')
  p.add_argument('--threshold', type=float, default=0.9)
  p.add_argument('--dtype', default='float32')
  p.add_argument('--sharpen', type=float, default=5.0)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--json', action='store_true')
  p.add_argument('--single-thread', action='store_true', help='one XLA CPU thread')
  p.add_argument('--demo-ckpt', default=None,
                 help='demo directory (trained there if absent): accuracy + speed per sampler')
  p.add_argument('--taus', default='0.9,0.95,0.99', help='thresholds for --demo-ckpt')
  p.add_argument('--n', type=int, default=500, help='held-out problems for --demo-ckpt')
  p.add_argument('--demo-batch', type=int, default=250)
  p.add_argument('--demo-train-gen-length', type=int, default=None,
                 help='answer canvas to train the demo with, if it is trained here')
  p.add_argument('--demo-train-steps', type=int, default=None)
  p.add_argument('--cache-refresh', default='',
                 help='comma-separated: extra dual-cache variants refreshed every N steps')
  args = p.parse_args(argv)
  if args.demo_ckpt:
    train = {k: v for k, v in (('gen_length', args.demo_train_gen_length),
                               ('steps', args.demo_train_steps)) if v is not None}
    out = run_demo(args.demo_ckpt, args.gen_length, args.block_length,
                   tuple(float(t) for t in args.taus.split(',')), args.n, args.demo_batch,
                   args.repeats, train,
                   tuple(int(n) for n in args.cache_refresh.split(',') if n))
    if args.json:
      print(json.dumps(out, indent=1))
      return
    print(f"demo {out['demo']}: {out['n']} held-out problems, batch {out['batch']}, "
          f"P={out['prompt_len']} G={out['gen_length']} block={out['block_length']} on "
          f"{out['devices']} [{out['xla_flags']}], load average {out['loadavg'][0]:.2f}; NFE summed over batches")
    print('tok/s: canvas positions (EOS padding included); ans tok/s: tokens before the '
          'first EOS; x: ratio to fixed-step in the same run')
    print(f"{'sampler':<28}{'acc %':>7}{'d pts':>7}{'NFE':>7}{'ms/step':>9}{'tok/s':>9}"
          f"{'x tok/s':>9}{'ans tok/s':>11}{'x ans':>7}{'x NFE':>7}")
    for name, r in out['results'].items():
      print(f"{name:<28}{100 * r['accuracy']:>7.1f}{r['accuracy_delta_points']:>+7.1f}"
            f"{r['nfe']:>7}{r['ms_per_step']:>9.2f}{r['tokens_per_s']:>9.0f}"
            f"{r['speedup']:>9.2f}{r['answer_tokens_per_s']:>11.0f}{r['answer_speedup']:>7.2f}"
            f"{r['nfe_ratio']:>7.2f}")
    return
  out = run(args.preset, args.batch, args.prompt_len, args.gen_length or 64,
            args.block_length or 16,
            args.threshold, args.dtype, args.sharpen, args.repeats)
  if args.json:
    print(json.dumps(out, indent=1))
    return
  print(f"{out['preset']} {out['dtype']} B={out['batch']} P={out['prompt_len']} "
        f"G={out['gen_length']} block={out['block_length']} tau={out['threshold']} "
        f"on {out['devices']} [{out['xla_flags']}]: baseline model call (trunk on "
        f"B x {out['prompt_len'] + out['gen_length']}, head on the {out['block_length']}-position "
        f"block) = {out['forward_ms']:.2f} ms (min over back-to-back calls)")
  print(f"{'variant':<24}{'NFE':>5}{'ms/step':>10}{'tok/s':>10}{'vs_forward':>12}"
        f"{'pyloop ms/step':>16}{'vs_pyloop':>11}")
  for name, r in out['results'].items():
    py = (f"{r['pyloop_ms_per_step']:>16.2f}{r['vs_pyloop']:>11.3f}" if r['vs_pyloop']
          else f"{'-':>16}{'-':>11}")
    print(f"{name:<24}{r['nfe']:>5}{r['ms_per_step']:>10.2f}{r['tokens_per_s']:>10.1f}"
          f"{r['vs_forward']:>12.3f}" + py)
  ratio = out['results']['fixed']['vs_forward']
  print(f"target: fixed-step step <= {FIXED_STEP_TARGET} of the baseline model call: "
        f"{ratio:.3f}, {'met' if ratio <= FIXED_STEP_TARGET else 'NOT met'}")


if __name__ == '__main__':
  main()
