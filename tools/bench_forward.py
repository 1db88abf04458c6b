"""Forward-pass throughput against the matmul rate measured in the same run.

Measures, in the same run, (1) the matmul rate of this device in each dtype
(FLOP/s of a large square jitted matmul, best of `--repeats`) and (2) the
throughput of a jitted forward pass of a preset, then prints one line per
figure: the forward's model FLOP rate as a fraction of that measured matmul
rate (`of matmul rate`). This is not MFU: MFU divides by the device's
datasheet peak, which a CPU does not have; where `flops.peak_flops` knows the
device's peak for the dtype (TPU kinds, H100/H200, bf16), MFU against it is
printed too. Model FLOPs are `illada_jax.flops.forward_flops_per_token`
(weight matmuls incl. the LM head, attention scores and values; norms, RoPE
and softmax not counted) times the tokens. `int8` in `--dtypes` is the
bfloat16 model with int8 weights (`illada_jax.quant`, qwix PTQ), printed with
its tokens/s against the bfloat16 forward of the same run (on a CPU the
dequantize-then-matmul costs time instead of saving memory bandwidth, so it
may be slower). Dated results: docs/benchmarks.md.

  python tools/bench_forward.py [--preset illada_100m] [--batch 4] [--seq-len 512]
      [--dtypes float32,bfloat16,int8]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import illada_jax
from illada_jax import flops as flops_lib


def best_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def matmul_rate(dtype, n: int, repeats: int) -> float:
  """FLOP/s of an n x n x n matmul in `dtype` with float32 accumulation."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  return 2 * n ** 3 / best_seconds(mm, a, b, repeats=repeats)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--preset', default='illada_100m')
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--seq-len', type=int, default=512)
  p.add_argument('--dtypes', default='float32,bfloat16,int8')
  p.add_argument('--matmul-size', type=int, default=2048)
  p.add_argument('--repeats', type=int, default=5)
  args = p.parse_args(argv)

  base = illada_jax.get_preset(args.preset).replace(remat_policy='none')
  n_params = illada_jax.param_count(base)
  flops = flops_lib.forward_flops_per_token(base, args.seq_len) * args.batch * args.seq_len
  tokens = np.random.default_rng(0).integers(
      0, base.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
  print(f'# {args.preset}: {n_params / 1e6:.1f}M params, batch {args.batch} x '
        f'{args.seq_len} tokens, {flops / 1e9:.1f} GFLOP per forward, '
        f'{jax.device_count()} device(s) {jax.devices()[0].platform}')
  tokens_per_s = {}
  for name in args.dtypes.split(','):
    if name == 'int8':
      from illada_jax import quant
      cfg, params = quant.quantize_params(
          base.replace(param_dtype='bfloat16', compute_dtype='bfloat16'),
          illada_jax.init_params(base.replace(param_dtype='bfloat16'), jax.random.key(0)))
      seconds = best_seconds(lambda p, t: illada_jax.forward(cfg, p, t), params, tokens,
                             repeats=args.repeats)
      tokens_per_s[name] = args.batch * args.seq_len / seconds
      vs = (f', {tokens_per_s[name] / tokens_per_s["bfloat16"]:.2f}x the bfloat16 forward'
            if 'bfloat16' in tokens_per_s else '')
      print(f'forward int8 weights, bfloat16 compute: {tokens_per_s[name]:.0f} tokens/s, '
            f'{seconds * 1e3:.1f} ms, weights {quant.nbytes(params) / 2**20:.0f} MiB{vs}')
      continue
    dtype = jnp.dtype(name)
    rate = matmul_rate(dtype, args.matmul_size, args.repeats)
    cfg = base.replace(param_dtype=name, compute_dtype=name)
    params = illada_jax.init_params(cfg, jax.random.key(0))
    seconds = best_seconds(lambda p, t: illada_jax.forward(cfg, p, t), params, tokens,
                           repeats=args.repeats)
    tokens_per_s[name] = args.batch * args.seq_len / seconds
    achieved = flops / seconds
    print(f'matmul rate {name}: {rate / 1e9:.1f} GFLOP/s ({args.matmul_size}^3, best of '
          f'{args.repeats})')
    peak = flops_lib.peak_flops(jax.devices()[0], name)
    mfu = f', MFU {achieved / peak:.1%} of the datasheet {name} peak' if peak else ''
    print(f'forward {name}: {tokens_per_s[name]:.0f} tokens/s, '
          f'{seconds * 1e3:.1f} ms, {achieved / 1e9:.1f} GFLOP/s, '
          f'{achieved / rate:.3f} of the {name} matmul rate{mfu}')


if __name__ == '__main__':
  main()
