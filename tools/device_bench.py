"""Accelerator measurement kit: each figure beside a baseline measured in the same run.

One command for one accelerator host (an H100/H200-class GPU or a TPU host;
one chip is used) that ends within `--deadline` seconds (default 440, compile
included) and downloads nothing: every model has random weights. Figures,
cheapest and most important first (`FIGURES`):

  matmul          bf16 n^3 matmul (n 8192): the measured ceiling. Every MFU is given
                  against it and against the datasheet bf16 peak (`PEAK_BF16`)
  attention       attention_impl 'pallas' (Triton on GPU, Mosaic on TPU) against 'xla';
                  8B heads (H 32, K 8, Dh 128), bf16, L 2048 x B 8 and L 8192 x B 1: max
                  abs error of the output and of dq/dk/dv against a float32 reference
                  (baseline: XLA bf16's error), median forward and forward+backward time
  train_1b        the project's pre-training step (`train.jit_train_step`) on ~1B
                  parameters (16 x 2048, GQA 16/4, the 8B vocabulary), float32 master
                  weights, bf16 matmuls, full remat, B 16 x L 2048: TFLOP/s, tokens/s, MFU
  forward_8b      iLLaDA-8B, random bf16 weights, B 1 and 32 over the sampler's canvas
                  (prompt 256 + gen 256), LM head on one 32-position block as the
                  sampler applies it: TFLOP/s, tokens/s, MFU
  engine_8b       the batch engine (`illada_jax.Engine`) at 64 slots against static
                  batches of 64 (`illada_jax.sample`, prompts padded to the bucket) on the
                  same 128 requests: prompts of 64-256 tokens, variable length, block 32,
                  threshold 0.9 + dual cache, `max_new_tokens` 32/64/96/128 (random weights
                  never write EOS, so the per-request limits make the lengths vary):
                  output tokens/s, host share of the engine's wall time, blocks run
  sampler_8b_b*   `illada_jax.sample`, prompt 256 + gen 256, block 32, B 1 and 32:
                  threshold 0.9 + dual cache against fixed-step (256 steps) tokens/s, and
                  one fixed-step step against one plain forward (`forward_8b`'s program).
                  Random weights: the step count of threshold decoding depends on them
  int8_8b         int8 weights (`illada_jax.quant`, qwix PTQ, bf16 compute) against the
                  bf16 weights of the same run: `forward_8b`'s forward tokens/s at B 1
                  and 32, and the sampler (threshold 0.9 + dual cache) at B 32

FLOPs are those of the matmuls computed (`model_flops`): no remat recomputation,
no head on positions not needed; a train step is 3 forwards. Each figure prints
`figure case: metric value | baseline value | ratio; extras` and goes to the
JSON file `--out`. A figure's exception prints `FAILED <figure>: <error>` and
the run goes on; figures run in three processes (`GROUPS`), so a compiler crash
costs one group and device memory is freed between groups; a figure that
cannot finish before the deadline prints `SKIPPED (deadline)`, and a group
still running 25 s past it is killed. Compile times are printed.
`--smoke` runs the same code at tiny sizes (on CPU in about 2 minutes).

  python tools/device_bench.py --out /tmp/device_bench.json [--only attention,train_1b]
  JAX_PLATFORMS=cpu python tools/device_bench.py --smoke --out /tmp/db.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

T_START = time.monotonic()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == '__main__':  # a script run; importing the module (tests) changes nothing
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.92')  # read when a backend starts
  sys.path.insert(0, ROOT)  # this checkout's illada_jax, installed or not

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# Datasheet dense bf16 FLOP/s per chip; the first name found in `device_kind` wins.
PEAK_BF16 = (('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H200 NVL', 835e12),
             ('H100', 989e12), ('H200', 989e12), ('TPU v4', 275e12), ('TPU v5 lite', 197e12),
             ('TPU v5e', 197e12), ('TPU v5p', 459e12), ('TPU v5', 459e12),
             ('TPU v6 lite', 918e12), ('TPU v6e', 918e12))
GRACE_S = 25.0  # past the deadline before a group's process is killed


def _import_project():
  """Imports illada_jax from this checkout, also where it is not pip-installed."""
  try:
    import illada_jax  # noqa: F401
  except Exception as e:  # any cause: the figures' own modules may still import
    # The package __init__ also imports checkpoint I/O (Orbax internals) that
    # no figure uses: another Orbax on the host must not cost the run.
    print(f'# illada_jax/__init__ failed ({e}); loading its modules directly', flush=True)
    pkg = types.ModuleType('illada_jax')
    pkg.__path__ = [os.path.join(ROOT, 'illada_jax')]
    sys.modules['illada_jax'] = pkg
  try:
    import illada_jax.configs  # noqa: F401
  except ImportError:  # setup.py maps configs/ to illada_jax.configs; a bare checkout does not
    import configs
    sys.modules['illada_jax.configs'] = configs


@dataclasses.dataclass(frozen=True)
class Sizes:
  matmul_n: int
  heads: tuple  # H, K, Dh
  attention: tuple  # (L, B) cases
  model: object  # the 8B ModelConfig (tiny with --smoke)
  batches: tuple  # forward and sampler batches
  prompt: int
  gen: int
  block: int
  train_model: object
  train_batch: int
  train_len: int
  slots: int  # engine slots
  engine_gen: int  # engine generation limit
  budget: float = 1.0  # scales the seconds each timing loop may spend


def sizes(smoke: bool, attention_impl: str) -> Sizes:
  from illada_jax.configs import models
  big = models.ILLADA_8B.replace(param_dtype='bfloat16', compute_dtype='bfloat16',
                                 remat_policy='none', attention_impl=attention_impl)
  # 1.04B parameters: 16 x 2048, GQA 16/4, Dh 128, SwiGLU 5632, the tied 155136 vocabulary.
  one_b = big.replace(num_layers=16, d_model=2048, num_heads=16, num_kv_heads=4,
                      mlp_hidden=5632, param_dtype='float32', remat_policy='full')
  if not smoke:
    return Sizes(8192, (32, 8, 128), ((2048, 8), (8192, 1)), big, (1, 32), 256, 256, 32,
                 one_b, 16, 2048, 64, 128)
  tiny = dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
              mlp_hidden=128, vocab_size=256, max_len=256)
  return Sizes(256, (4, 2, 16), ((64, 2),), big.replace(**tiny), (1, 2), 8, 16, 8,
               one_b.replace(**tiny), 2, 32, 4, 16, budget=0.1)


class Skip(Exception):
  """A figure or case that cannot finish before the deadline."""


class Run:
  """One process's options, output records and values shared between figures."""

  def __init__(self, args):
    self.args = args
    self.deadline = T_START + args.deadline
    self.sizes = sizes(args.smoke, args.attention)
    self.device = jax.devices()[0]
    self.peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (f for name, f in PEAK_BF16 if name in self.device.device_kind), None)
    self.records, self.events, self.compiles = [], [], []
    self.baselines = {'datasheet_bf16_flops': self.peak}
    self.cache = {}

  def need(self, seconds: float, what: str):
    left = self.deadline - time.monotonic()
    if left < seconds:
      raise Skip(f'{what} needs ~{seconds:.0f} s, {left:.0f} s left')

  def say(self, line: str, event: bool = False):
    print(line, flush=True)
    if event:
      self.events.append(line)
    self.save()

  def save(self):
    """Rewrites `--out` after every line, so a killed process leaves what it had."""
    doc = {'device_kind': self.device.device_kind, 'platform': self.device.platform,
           'jax': jax.__version__, 'baselines': self.baselines, 'records': self.records,
           'events': self.events, 'compile_s': self.compiles}
    with open(self.args.out + '.tmp', 'w') as f:
      json.dump(doc, f, indent=1)
    os.replace(self.args.out + '.tmp', self.args.out)

  def record(self, figure, case, metric, value, unit, baseline, baseline_name, **extra):
    """One figure line: `value` against `baseline` (same unit, this run; None if it failed)."""
    ratio = value / baseline if baseline else None
    self.records.append(dict(figure=figure, case=case, metric=metric, value=value, unit=unit,
                             baseline=baseline, baseline_name=baseline_name, ratio=ratio,
                             **extra))
    tail = ''.join(f'; {k} {_fmt(v)}' for k, v in extra.items())
    self.say(f'{figure} {case}: {metric} {value:.4g} {unit} | {baseline_name} '
             f'{_fmt(baseline)} {unit} | ratio {_fmt(ratio)}{tail}')

  def mfu(self, figure, case, metric, flops, seconds, tokens, **extra):
    """Achieved TFLOP/s against the measured matmul; MFU against the datasheet peak."""
    achieved = flops / seconds
    self.record(figure, case, metric, achieved / 1e12, 'TFLOP/s', matmul_flops(self) / 1e12,
                'measured bf16 matmul', tokens_per_s=tokens / seconds,
                mfu_datasheet=None if self.peak is None else achieved / self.peak,
                ms=seconds * 1e3, **extra)

  def compile(self, name, fn, *args):
    """`fn` (jitted here unless it is already, keeping its donation) compiled for `args`."""
    t0 = time.perf_counter()
    compiled = (fn if hasattr(fn, 'lower') else jax.jit(fn)).lower(*args).compile()
    self.compiles.append({'what': name, 's': time.perf_counter() - t0})
    self.say(f'  compile {name}: {time.perf_counter() - t0:.1f} s')
    return compiled


def _fmt(v) -> str:
  if v is None:
    return 'n/a'
  return f'{v:.4g}' if isinstance(v, float) else str(v)


def _error(e: BaseException) -> str:
  return f'{type(e).__name__}: {e}'.strip().replace('\n', ' ')[:400]


def seconds_per_call(fn, *args, budget_s: float = 1.0, group_s: float = 0.05):
  """(median seconds per call of compiled `fn`, the first call's output).

  The first call warms up and is timed; a call longer than `budget_s / 3`
  is measured by it alone. Shorter calls are issued back to back in groups
  of about `group_s` (dispatch gaps stay out) until `budget_s` is spent.
  """
  t0 = time.perf_counter()
  first_out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  if first > budget_s / 3:
    return first, first_out
  group = max(1, min(20, int(group_s / max(first, 1e-6))))
  samples, end = [], time.perf_counter() + budget_s
  while len(samples) < 3 or (time.perf_counter() < end and len(samples) < 30):
    t0 = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(group)])
    samples.append((time.perf_counter() - t0) / group)
  return statistics.median(samples), first_out


def model_flops(cfg, batch: int, length: int, head_positions: int) -> float:
  """Forward FLOPs of the model's matmuls on `[batch, length]` tokens, the LM head
  (2 D V per position) on only `head_positions` positions of each row.

  `illada_jax.flops.forward_flops_per_token` (PaLM's MFU count: weight matmuls,
  attention scores and values; norms, RoPE, softmax not counted) without the
  head on the positions it skips.
  """
  from illada_jax import flops
  skipped = 2 * batch * (length - head_positions) * cfg.d_model * cfg.vocab_size
  return batch * length * flops.forward_flops_per_token(cfg, length) - skipped


def _normal(key, shape, dtype=jnp.bfloat16):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _tokens(cfg, key, shape):
  """Random ids above the presets' special ids (MASK, BOS, EOS, PAD are all < 16)."""
  return jax.random.randint(key, shape, 16, cfg.vocab_size, jnp.int32)


# -- figures ------------------------------------------------------------------------

def matmul_flops(run: Run) -> float:
  """Measured bf16 matmul FLOP/s (n^3 on random data), once per process."""
  if 'matmul' not in run.cache:
    n = run.sizes.matmul_n
    ka, kb = jax.random.split(jax.random.key(0))
    a, b = _normal(ka, (n, n)), _normal(kb, (n, n))
    mm = run.compile(f'matmul {n}^3', lambda a, b: a @ b, a, b)
    seconds = seconds_per_call(mm, a, b, budget_s=2 * run.sizes.budget)[0]
    run.cache['matmul'] = 2 * n ** 3 / seconds
    run.baselines.update(matmul_bf16_flops=run.cache['matmul'], matmul_n=n)
  return run.cache['matmul']


def matmul(run: Run):
  rate = matmul_flops(run)
  peak = 'unknown' if run.peak is None else f'{rate / run.peak:.3f} of {run.peak / 1e12:.0f}'
  run.say(f'baseline bf16 matmul {run.sizes.matmul_n}^3: {rate / 1e12:.4g} TFLOP/s '
          f'(fraction of the datasheet peak: {peak})')


def attention(run: Run):
  from illada_jax.attention import attention as attend
  h, kv, dh = run.sizes.heads
  for length, batch in run.sizes.attention:
    case = f'L={length} B={batch} H={h} K={kv} Dh={dh}'
    run.need(20, f'attention {case}')
    try:
      _attention_case(run, attend, case, (batch, length, h, dh), (batch, length, kv, dh))
    except Exception as e:  # e.g. the float32 reference out of memory: try the next length
      run.say(f'FAILED attention {case}: {_error(e)}', event=True)
    gc.collect()


def _attention_case(run: Run, attend, case: str, q_shape, kv_shape):
  kq, kk, kv, kc = jax.random.split(jax.random.key(q_shape[1]), 4)
  args = (_normal(kq, q_shape), _normal(kk, kv_shape), _normal(kv, kv_shape),
          _normal(kc, q_shape))  # q, k, v and the output cotangent

  def fwd(impl):
    return lambda q, k, v, ct: attend(q, k, v, impl=impl)

  def fwd_bwd(impl):
    def f(q, k, v, ct):
      out, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, impl=impl), q, k, v)
      return out, *pullback(ct)
    return f

  args32 = [x.astype(jnp.float32) for x in args]
  with jax.default_matmul_precision('highest'):  # no TF32: the reference is float32 throughout
    ref = run.compile(f'attention f32 reference {case}', fwd_bwd('xla'), *args32)(*args32)
  del args32
  res = {}
  for impl in ('xla', 'pallas'):
    try:
      f1 = run.compile(f'attention {impl} fwd {case}', fwd(impl), *args)
      f2 = run.compile(f'attention {impl} fwd+bwd {case}', fwd_bwd(impl), *args)
      got = f2(*args)
      err = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - r))) for g, r in zip(got, ref)]
      ms = lambda fn: 1e3 * seconds_per_call(fn, *args, budget_s=run.sizes.budget)[0]
      grad = float(jnp.max(jnp.asarray(err[1:])))  # a NaN stays NaN (Python's max may drop it)
      res[impl] = dict(out=err[0], grad=grad, got=got, fwd=ms(f1), fwd_bwd=ms(f2))
    except Exception as e:  # e.g. XLA's materialised scores out of memory
      run.say(f'FAILED attention {impl} {case}: {_error(e)}', event=True)
  x, p = res.get('xla'), res.get('pallas')
  if p is None:
    if x is not None:
      run.say(f'  (xla {case}: fwd {x["fwd"]:.4g} ms, fwd+bwd {x["fwd_bwd"]:.4g} ms)')
    return
  name, base = ('xla', x.get) if x else ('xla (failed)', lambda key: None)
  diff = x and float(jnp.max(jnp.asarray([jnp.max(jnp.abs(
      a.astype(jnp.float32) - b.astype(jnp.float32))) for a, b in zip(p['got'], x['got'])])))
  rec = functools.partial(run.record, 'attention', case)
  rec('max abs error vs f32, output', p['out'], 'abs', base('out'), f'{name} bf16',
      max_abs_diff_vs_xla=diff, reference_max_abs=float(jnp.max(jnp.abs(ref[0]))))
  rec('max abs error vs f32, dq dk dv', p['grad'], 'abs', base('grad'), f'{name} bf16')
  rec('pallas fwd', p['fwd'], 'ms', base('fwd'), name)
  rec('pallas fwd+bwd', p['fwd_bwd'], 'ms', base('fwd_bwd'), name)


def train_1b(run: Run):
  from illada_jax import optimizer, sharding, train
  s = run.sizes
  cfg = s.train_model
  case = f'{cfg.num_layers}x{cfg.d_model} V={cfg.vocab_size} B={s.train_batch} L={s.train_len}'
  tcfg = train.TrainConfig(model=cfg, objective='pretrain', batch_size=s.train_batch,
                           seq_len=s.train_len, random_length_prob=0.0)
  # One chip, whatever the host has: the kit's figures are per chip.
  mesh = sharding.make_mesh('data=1,fsdp=1,tensor=1', devices=jax.devices()[:1])
  tx = optimizer.make_optimizer(tcfg.optimizer)
  state = train.init_state(tcfg, mesh, tx)
  tokens = _tokens(cfg, jax.random.key(1), (s.train_batch, s.train_len))
  batch = {'tokens': jax.device_put(tokens, train.batch_sharding(mesh))}
  step = run.compile(f'train step {case}', train.jit_train_step(tcfg, tx, mesh), state, batch)
  t0 = time.perf_counter()
  state, metrics = step(state, batch)  # warm-up; its loss must be finite
  loss, first = float(metrics['loss']), time.perf_counter() - t0
  if not math.isfinite(loss):
    raise FloatingPointError(f'train_1b: loss {loss} after one step')
  n = max(2, min(10, int(5 * s.budget / max(first, 1e-3))))
  run.need(first * n + 5, f'train_1b {n} steps')
  t0 = time.perf_counter()
  for _ in range(n):  # the state is donated: each step consumes the previous one
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - t0) / n
  run.mfu('train_1b', case, 'train step', 3 * model_flops(cfg, s.train_batch, s.train_len,
                                                           s.train_len),
          seconds, s.train_batch * s.train_len, loss=float(metrics['loss']), steps=n,
          params=sum(x.size for x in jax.tree.leaves(state['params'])))


def params_8b(run: Run):
  """Random bf16 parameters of the 8B config, created once per process."""
  if 'params' not in run.cache:
    from illada_jax import model
    t0 = time.perf_counter()
    params = jax.block_until_ready(model.init_params(run.sizes.model, jax.random.key(0)))
    n = sum(x.size for x in jax.tree.leaves(params))
    run.say(f'  init {n:,} random bf16 parameters: {time.perf_counter() - t0:.1f} s')
    run.cache['params'] = params
  return run.cache['params']


def forward_seconds(run: Run, batch: int, cfg=None, params=None) -> float:
  """Seconds of one plain forward over the sampler's canvas, head on one block
  (default: the bf16 8B; `cfg` / `params` of another variant, e.g. int8)."""
  from illada_jax.model import build
  s = run.sizes
  cfg = cfg or s.model
  if ('forward', batch, cfg) not in run.cache:
    model = build(cfg)

    def forward(params, tokens_BL):
      h_BLD = model.apply({'params': params}, tokens_BL, method='hidden')
      h_BWD = jax.lax.dynamic_slice_in_dim(h_BLD, s.prompt, s.block, axis=1)
      return model.apply({'params': params}, h_BWD, method='logits')

    args = (params if params is not None else params_8b(run),
            _tokens(s.model, jax.random.key(batch), (batch, s.prompt + s.gen)))
    tag = '' if cfg.quantize == 'none' else f' {cfg.quantize}'
    fn = run.compile(f'forward{tag} B={batch} L={s.prompt + s.gen}', forward, *args)
    run.cache['forward', batch, cfg] = seconds_per_call(fn, *args, budget_s=2 * s.budget)[0]
  return run.cache['forward', batch, cfg]


def forward_8b(run: Run):
  s = run.sizes
  length = s.prompt + s.gen
  for batch in s.batches:
    run.need(30, f'forward_8b B={batch}')
    run.mfu('forward_8b', f'B={batch} L={length} head on {s.block}', 'forward',
            model_flops(s.model, batch, length, s.block), forward_seconds(run, batch),
            batch * length)


def sampler_8b(run: Run, batch_index: int):
  from illada_jax.sampling import sample
  s = run.sizes
  batch = s.batches[batch_index]
  case = f'B={batch} prompt {s.prompt} + gen {s.gen}, block {s.block}'
  args = (params_8b(run), _tokens(s.model, jax.random.key(7), (batch, s.prompt)))
  step_s = forward_seconds(run, batch)  # also the plain-forward baseline below

  def timed(name, **opts):
    fn = run.compile(f'sample {name} {case}', functools.partial(
        sample, s.model, gen_length=s.gen, block_length=s.block, steps=s.gen, **opts), *args)
    seconds, out = seconds_per_call(fn, *args, budget_s=4 * s.budget)
    return seconds, int(out.nfe)

  # Every fixed step runs the whole canvas; the cached steps cost a fraction of one.
  run.need(1.2 * s.gen * step_s + 40, f'fixed-step sampler {case}')
  fixed_s, fixed_nfe = timed('fixed-step')
  run.record('sampler_8b', case, 'fixed-step step', 1e3 * fixed_s / fixed_nfe, 'ms',
             1e3 * step_s, 'plain forward (head on the block)', nfe=fixed_nfe)
  run.need(0.2 * s.gen * step_s + 40, f'threshold + dual cache sampler {case}')
  fast_s, fast_nfe = timed('threshold 0.9 + dual cache', threshold=0.9, cache='dual')
  run.record('sampler_8b', case, 'threshold 0.9 + dual cache', batch * s.gen / fast_s,
             'tokens/s', batch * s.gen / fixed_s, f'fixed-step ({fixed_nfe} steps)',
             nfe=fast_nfe, weights='random: the step count of threshold decoding depends on them')


def engine_8b(run: Run):
  import numpy as np
  from illada_jax import engine, prompts, sampling
  s = run.sizes
  cfg, params, n = s.model, params_8b(run), 2 * s.slots
  o = sampling.SamplingOptions(gen_length=s.engine_gen, block_length=s.block,
                               variable_length=True, threshold=0.9, cache='dual')
  rng = np.random.default_rng(0)
  limits = [s.engine_gen * (1 + i % 4) // 4 for i in range(n)]
  reqs = [engine.Request(i, tuple(int(t) for t in rng.integers(16, cfg.vocab_size, int(
      rng.integers(s.prompt // 4, s.prompt + 1)))), o, max_new_tokens=limits[i], seed=i)
          for i in range(n)]
  case = (f'{n} requests, {s.slots} slots, prompts {s.prompt // 4}-{s.prompt}, limit '
          f'{s.engine_gen} (max_new {min(limits)}-{max(limits)}), block {s.block}, tau 0.9 + dual')
  run.need(120, f'engine_8b {case}')

  def static():  # the same requests the simple way: batches in order, padded to the bucket
    out = []
    for lo in range(0, n, s.slots):
      part = reqs[lo:lo + s.slots]
      ids, mask = prompts.left_pad([r.prompt_ids for r in part], cfg.pad_token_id, s.prompt)
      toks = np.asarray(sampling.sample(cfg, params, ids, mask, o, seeds=[r.seed for r in part])
                        .tokens)[:, s.prompt:]
      out += [list(t[:r.max_new_tokens]) for t, r in zip(toks, part)]
    return out

  t0 = time.perf_counter()
  static()  # compiles
  run.compiles.append({'what': 'sample (static baseline)', 's': time.perf_counter() - t0})
  t0 = time.perf_counter()
  want = static()
  static_s = time.perf_counter() - t0
  eng = engine.Engine(cfg, params, slots=s.slots, buckets=(s.prompt,))
  t0 = time.perf_counter()
  list(eng.generate(reqs[:s.slots]))  # compiles the block program
  run.compiles.append({'what': 'engine block program', 's': time.perf_counter() - t0})
  eng.stats = engine.EngineStats()
  t0 = time.perf_counter()
  got = {c.id: c.token_ids for c in eng.generate(reqs)}
  engine_s = time.perf_counter() - t0
  tokens = sum(len(w) for w in want)
  same = sum(got[i] == [int(t) for t in want[i]] for i in range(n))
  run.record('engine_8b', case, 'output tokens/s', tokens / engine_s, 'tokens/s',
             tokens / static_s, f'static batches of {s.slots} (sample)',
             host_share=eng.stats.host_share, blocks=eng.stats.blocks,
             same_tokens=f'{same}/{n}', weights='random')


def params_8b_int8(run: Run):
  """The 8B's int8 weights (`illada_jax.quant`, qwix PTQ) from `params_8b`, once per process."""
  if 'qparams' not in run.cache:
    from illada_jax import quant
    t0 = time.perf_counter()
    qcfg, qparams = quant.quantize_params(run.sizes.model, params_8b(run))
    jax.block_until_ready(qparams)
    run.say(f'  int8 weights: {quant.nbytes(qparams) / 2**30:.2f} GiB against '
            f'{quant.nbytes(params_8b(run)) / 2**30:.2f} GiB bf16, quantized in '
            f'{time.perf_counter() - t0:.1f} s')
    run.cache['qparams'] = (qcfg, qparams)
  return run.cache['qparams']


def int8_8b(run: Run):
  """int8 weights against bf16, same run: forward tokens/s at each batch, and the sampler
  (threshold 0.9 + dual cache) at the largest batch."""
  from illada_jax.sampling import sample
  s = run.sizes
  length = s.prompt + s.gen
  qcfg, qparams = params_8b_int8(run)
  for batch in s.batches:
    run.need(40, f'int8_8b forward B={batch}')
    q_s, b_s = forward_seconds(run, batch, qcfg, qparams), forward_seconds(run, batch)
    run.record('int8_8b', f'B={batch} L={length} head on {s.block}', 'forward tokens/s',
               batch * length / q_s, 'tokens/s', batch * length / b_s, 'bf16 weights')
  batch = s.batches[-1]
  case = f'B={batch} prompt {s.prompt} + gen {s.gen}, block {s.block}, tau 0.9 + dual'
  prompt = _tokens(s.model, jax.random.key(7), (batch, s.prompt))
  run.need(0.5 * s.gen * forward_seconds(run, batch) + 80, f'int8_8b sampler {case}')
  seconds = {}
  for name, cfg, params in (('bf16', s.model, params_8b(run)), ('int8', qcfg, qparams)):
    fn = run.compile(f'sample {name} {case}', functools.partial(
        sample, cfg, gen_length=s.gen, block_length=s.block, steps=s.gen, threshold=0.9,
        cache='dual'), params, prompt)
    seconds[name] = seconds_per_call(fn, params, prompt, budget_s=4 * s.budget)[0]
  run.record('int8_8b', case, 'sampler tokens/s', batch * s.gen / seconds['int8'], 'tokens/s',
             batch * s.gen / seconds['bf16'], 'bf16 weights', weights='random')


# (name, function, seconds it needs at least), in run order.
FIGURES = [('matmul', matmul, 10), ('attention', attention, 30), ('train_1b', train_1b, 45),
           ('forward_8b', forward_8b, 45), ('engine_8b', engine_8b, 120),
           ('sampler_8b_b1', functools.partial(sampler_8b, batch_index=0), 40),
           ('sampler_8b_b32', functools.partial(sampler_8b, batch_index=1), 100),
           ('int8_8b', int8_8b, 90)]
# One process each: a compiler crash costs one group, and exiting frees the device.
GROUPS = (('matmul', 'attention'), ('train_1b',),
          ('forward_8b', 'engine_8b', 'sampler_8b_b1', 'sampler_8b_b32', 'int8_8b'))


def run_figures(args) -> int:
  """Child process: the figures named by `--only`, in order, each in its own try."""
  _import_project()
  run = Run(args)
  if args.matmul_flops:  # measured by an earlier group of this run
    run.cache['matmul'] = run.baselines['matmul_bf16_flops'] = args.matmul_flops
  run.say(f'# process {os.getpid()}: {run.device.device_kind} ({run.device.platform}), '
          f'jax {jax.__version__}, datasheet bf16 peak {_fmt(run.peak)} FLOP/s')
  for name, fn, min_s in FIGURES:
    if name not in args.only.split(','):
      continue
    t0 = time.monotonic()
    try:
      run.need(min_s, name)
      fn(run)
    except Skip as e:
      run.say(f'SKIPPED (deadline) {name}: {e}', event=True)
    except Exception as e:  # one figure's failure must not cost the others
      run.say(f'FAILED {name}: {_error(e)}', event=True)
    gc.collect()
    run.say(f'# {name}: {time.monotonic() - t0:.1f} s')
  return 0


def supervise(args) -> int:
  """Parent process: runs each group in a child process and merges their JSON."""
  names = [n for n, _, _ in FIGURES]
  only = args.only.split(',') if args.only else names
  if set(only) - set(names):
    raise SystemExit(f'--only: unknown {sorted(set(only) - set(names))}; have {names}')
  out = args.out or os.path.join(tempfile.gettempdir(), f'device_bench_{os.getpid()}.json')
  doc = {'smoke': args.smoke, 'baselines': {}, 'records': [], 'events': [], 'compile_s': []}
  print(f'# device_bench: {"smoke" if args.smoke else "full"} sizes, deadline '
        f'{args.deadline:.0f} s, model attention {args.attention}', flush=True)

  def note(line):
    print(line, flush=True)
    doc['events'].append(line)

  def write():
    doc['wall_s'] = time.monotonic() - T_START
    with open(out + '.tmp', 'w') as f:
      json.dump(doc, f, indent=1)
    os.replace(out + '.tmp', out)

  for group in GROUPS:
    todo = [n for n in group if n in only]
    if not todo:
      continue
    left = T_START + args.deadline - time.monotonic()
    if left < min(m for n, _, m in FIGURES if n in todo):
      note(f'SKIPPED (deadline) {", ".join(todo)}: {left:.0f} s left')
      continue
    part = f'{out}.{group[0]}.part'
    cmd = [sys.executable, os.path.abspath(__file__), '--child', '--only', ','.join(todo),
           '--out', part, '--deadline', f'{left:.1f}', '--attention', args.attention,
           '--peak-tflops', str(args.peak_tflops),
           '--matmul-flops', str(doc['baselines'].get('matmul_bf16_flops') or 0.0)]
    try:
      rc = subprocess.run(cmd + ['--smoke'] * args.smoke, timeout=left + GRACE_S).returncode
    except subprocess.TimeoutExpired:
      rc = None
      note(f'SKIPPED (deadline) {", ".join(todo)}: killed {GRACE_S:.0f} s past the deadline')
    if os.path.exists(part):
      with open(part) as f:
        got = json.load(f)
      os.remove(part)
      for key in ('records', 'events', 'compile_s'):
        doc[key] += got[key]
      doc['baselines'].update({k: v for k, v in got['baselines'].items() if v})
      doc.update({k: got[k] for k in ('device_kind', 'platform', 'jax')})
    if rc:  # a crash (negative: the signal) or an error outside the figures' try
      note(f'FAILED {", ".join(todo)}: process exited with {rc}')
    write()
  write()
  print(f'# done in {time.monotonic() - T_START:.0f} s: {len(doc["records"])} figure lines, '
        f'{len(doc["events"])} FAILED/SKIPPED lines; JSON in {out}', flush=True)
  return 0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--out', help='JSON file for the figure lines (default: a temporary file)')
  ap.add_argument('--smoke', action='store_true', help='the same code at tiny sizes')
  ap.add_argument('--deadline', type=float, default=440.0, help='seconds for the whole run')
  ap.add_argument('--only', default='', help='comma-separated figure names (see --list)')
  ap.add_argument('--attention', default='xla', help='attention_impl of the model figures')
  ap.add_argument('--peak-tflops', type=float, default=0.0, help='datasheet bf16 peak override')
  ap.add_argument('--list', action='store_true', help='print the figure names and exit')
  ap.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  ap.add_argument('--matmul-flops', type=float, default=0.0, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.list:
    print('\n'.join(name for name, _, _ in FIGURES))
    return 0
  sys.stdout.reconfigure(line_buffering=True)
  return run_figures(args) if args.child else supervise(args)


if __name__ == '__main__':
  sys.exit(main())
