"""Compile the real train step (and the batch engine's block program) for a TPU topology, on this CPU.

  python tools/aot_compile.py --preset illada_8b --topology v5p-256 --seq-len 8192 \
      --per-device-batch 16
  python tools/aot_compile.py --preset illada_8b --topology v6e-256 --seq-len 8192 --search
  python tools/aot_compile.py --preset illada_8b --topology v5p-8 --mesh data=4 \
      --per-device-batch 0 --engine --search
  python tools/aot_compile.py --config configs/illada_8b_lora.py --topology v6e-64 --search
  python tools/aot_compile.py --preset llada_8b --topology v5e-1 --mesh data=1 \
      --per-device-batch 0 --engine --search --slots 4 --quantize int8

With `--config`, the run of a config file is compiled as it is (model,
objective, seq_len, LoRA, optimizer, mesh) except for the batch, which is
the per-device batch times the chips; the pre-training flags are ignored.

Nothing runs: `jax.jit(...).lower(abstract inputs).compile()` against the
topology's devices (libtpu is the compiler) catches sharding errors and
out-of-memory before any TPU time is spent. Prints per-chip argument,
output, temporary and peak memory against the chip's HBM. `--search`
doubles then bisects the per-device batch to the largest that fits, and
doubles the engine's slots from `--slots` while its block program fits
(the engine program is built only from public functions:
`engine.block_program`, `engine.abstract_block_inputs`, `model.abstract_params`).

State layout of the plan: fsdp over every chip, float32 master weights and
AdamW moments, bfloat16 matmuls, full remat per layer, splash attention, the
chunked LM head + CE of `illada_jax.loss`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Compile-only use of libtpu: several compiles (or test workers) may load it at once.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from illada_jax import engine, get_preset, sharding  # noqa: E402
from illada_jax import model as model_lib  # noqa: E402
from illada_jax import optimizer as opt_lib  # noqa: E402
from illada_jax import train as train_lib  # noqa: E402
from illada_jax.kernels.aot import GiB, TOPOLOGIES, topology_devices  # noqa: E402
from illada_jax.sampling import SamplingOptions  # noqa: E402


def train_config(args, n_devices: int, per_device_batch: int) -> train_lib.TrainConfig:
  if getattr(args, 'config', None):
    cfg = train_lib.load_config(args.config)
    return dataclasses.replace(cfg, batch_size=per_device_batch * n_devices, grad_accum=1)
  model = get_preset(args.preset).replace(
      param_dtype=args.param_dtype, compute_dtype='bfloat16', remat_policy=args.remat,
      attention_impl=args.attention, scan_layers=True)
  return train_lib.TrainConfig(
      model=model, objective=args.objective,
      optimizer=opt_lib.OptimizerConfig(state_dtype=args.state_dtype),
      batch_size=per_device_batch * n_devices, grad_accum=1, seq_len=args.seq_len,
      mesh=args.mesh, loss_chunk=args.loss_chunk)


def compile_train_step(cfg: train_lib.TrainConfig, devices):
  mesh = sharding.make_mesh(cfg.mesh, devices=devices)
  tx = opt_lib.make_optimizer(cfg.optimizer)
  abstract_state, _ = train_lib.state_shardings(cfg, mesh, tx)
  bs = train_lib.batch_sharding(mesh, cfg.sharding_rules)
  tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32, sharding=bs)
  batch = {'tokens': tokens}
  if cfg.objective == 'sft':
    batch['response_mask'] = tokens
  step = train_lib.jit_train_step(cfg, tx, mesh)
  return step.lower(abstract_state, batch).compile()


def engine_options(gen: int, block: int) -> SamplingOptions:
  """The settings compiled for the engine: variable length, threshold 0.9 + dual cache."""
  return SamplingOptions(gen_length=gen, block_length=block, variable_length=True,
                         threshold=0.9, cache='dual')


def compile_engine_block(model_cfg, devices, mesh_spec: str, slots: int, bucket: int, gen: int,
                         block: int = 32, quantize: str = 'none'):
  """The engine's block program (`engine.block_program`) for bf16 weights (`quantize`:
  int8 weights of `illada_jax.quant`, bf16 compute), public API only."""
  mcfg = model_cfg.replace(param_dtype='bfloat16', compute_dtype='bfloat16', remat_policy='none',
                           quantize=quantize)
  mesh = sharding.make_mesh(mesh_spec, devices=devices)
  o = engine_options(gen, block)
  args = (model_lib.abstract_params(mcfg, mesh),
          *engine.abstract_block_inputs(mcfg, o, slots, bucket, mesh))
  return engine.block_program(mcfg, o, bucket, mesh).lower(*args).compile()


def engine_slots(args, devices, hbm) -> dict | None:
  """Doubles the slot count from `--slots` while the block program fits in HBM; prints each."""
  best, slots = None, args.slots
  while True:
    t = time.perf_counter()
    try:
      mem = memory(compile_engine_block(get_preset(args.preset), devices, args.mesh, slots,
                                        args.prompt_bucket, args.gen, args.block,
                                        args.quantize))
      fits = hbm is None or mem['peak'] * GiB <= hbm
      err = None
    except Exception as e:  # noqa: BLE001  (a compile-time OOM is an answer here)
      mem, fits, err = None, False, f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'
    weights = 'bf16' if args.quantize == 'none' else args.quantize
    what = (f'{args.preset} {args.topology} engine block program ({weights} weights), {slots} '
            f'slots, prompt bucket '
            f'{args.prompt_bucket} + gen {args.gen}, block {args.block}, tau 0.9 + dual cache, '
            f'mesh {args.mesh}')
    if mem is None:
      print(f'{what}: does not compile: {err}', flush=True)
    else:
      hbm_txt = f' / HBM {hbm / GiB:.0f} GiB' if hbm else ''
      print(f'{what}: peak {mem["peak"]:.2f} GiB{hbm_txt} per chip (arguments '
            f'{mem["argument"]:.2f}, temporaries {mem["temp"]:.2f}); '
            f'{"fits" if fits else "does not fit"} '
            f'(compiled in {time.perf_counter() - t:.0f} s)', flush=True)
    if not fits:
      break
    prev, best = best, {'slots': slots, 'memory_gib': mem}
    if not args.search:
      break
    if prev and hbm:
      # Memory grows linearly in slots; a doubling predicted far past HBM is not compiled
      # (libtpu 0.0.42.1 crashed with a stack overflow compiling the 8B program at 512 slots).
      step = (mem['peak'] - prev['memory_gib']['peak']) / (slots - prev['slots'])
      predicted = mem['peak'] + step * slots
      if predicted * GiB > 1.1 * hbm:
        print(f'{2 * slots} slots: predicted peak {predicted:.1f} GiB > HBM '
              f'{hbm / GiB:.0f} GiB (linear in slots), not compiled', flush=True)
        break
    slots *= 2
  if best:
    print(f'picked {best["slots"]} slots: peak {best["memory_gib"]["peak"]:.2f} GiB per chip',
          flush=True)
  return best


def memory(compiled) -> dict[str, float]:
  m = compiled.memory_analysis()
  out = {k: getattr(m, f'{k}_size_in_bytes', 0) / GiB
         for k in ('argument', 'output', 'temp', 'alias', 'generated_code')}
  out['peak'] = getattr(m, 'peak_memory_in_bytes', 0) / GiB
  return out


def try_batch(args, devices, hbm, per_device_batch: int) -> dict:
  cfg = train_config(args, len(devices), per_device_batch)
  t = time.perf_counter()
  try:
    mem = memory(compile_train_step(cfg, devices))
    # XLA:TPU refuses to compile a program that overflows HBM; the peak is its
    # estimate of live bytes. (temp_size counts every temporary buffer, also
    # ones never live together, so args + temp overstates the need.)
    fits = hbm is None or mem['peak'] * GiB <= hbm
    err = None
  except Exception as e:  # noqa: BLE001  (a compile-time OOM is an answer here)
    mem, fits, err = None, False, f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'
  row = {'per_device_batch': per_device_batch, 'fits': fits, 'memory_gib': mem,
         'compile_seconds': time.perf_counter() - t, 'error': err}
  _print_row(args, len(devices), hbm, row)
  return row


def _what(args) -> str:
  """The run compiled: the config file's name, or preset and sequence length."""
  if getattr(args, 'config', None):
    cfg = train_lib.load_config(args.config)
    name = os.path.splitext(os.path.basename(args.config))[0]
    return f'{name} L={cfg.seq_len}'
  return f'{args.preset} L={args.seq_len}'


def _print_row(args, n, hbm, row):
  b = row['per_device_batch']
  if row['memory_gib'] is None:
    print(f'{_what(args)} {args.topology} ({n} chips) per-device batch {b}: '
          f'does not compile: {row["error"]}', flush=True)
    return
  m = row['memory_gib']
  hbm_txt = f' / HBM {hbm / GiB:.0f} GiB' if hbm else ''
  print(f'{_what(args)} {args.topology} ({n} chips) per-device batch {b}: '
        f'args {m["argument"]:.2f} GiB, out {m["output"]:.2f}, temp {m["temp"]:.2f}, '
        f'args+temp {m["argument"] + m["temp"]:.2f}, peak {m["peak"]:.2f} GiB{hbm_txt} -> {"fits" if row["fits"] else "DOES NOT FIT"} '
        f'(compiled in {row["compile_seconds"]:.0f}s)', flush=True)


def search(args, devices, hbm, start: int) -> list[dict]:
  """Largest per-device batch that fits: double from `start`, then bisect."""
  rows = []
  lo, hi = 0, None
  b = start
  while hi is None:
    rows.append(try_batch(args, devices, hbm, b))
    if rows[-1]['fits']:
      lo, b = b, b * 2
    else:
      hi = b
    if b > 4096:
      break
  while hi is not None and hi - lo > 1:
    mid = (lo + hi) // 2
    rows.append(try_batch(args, devices, hbm, mid))
    if rows[-1]['fits']:
      lo = mid
    else:
      hi = mid
  print(f'largest per-device batch that fits: {lo}', flush=True)
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--preset', default='illada_8b')
  ap.add_argument('--config', default=None,
                  help='compile the train step of this TrainConfig file (e.g. '
                       'configs/illada_8b_sft.py) instead of the pre-training flags')
  ap.add_argument('--topology', default='v5p-256',
                  help=f'one of {sorted(TOPOLOGIES)} or a descriptor like v5p:4x4x8')
  ap.add_argument('--seq-len', type=int, default=8192)
  ap.add_argument('--per-device-batch', type=int, default=16, help='0: skip the train step')
  ap.add_argument('--search', action='store_true', help='find the largest per-device batch')
  ap.add_argument('--mesh', default='data=1,fsdp=-1,tensor=1')
  ap.add_argument('--objective', default='pretrain', choices=('pretrain', 'sft'))
  ap.add_argument('--attention', default='splash', help="attention_impl ('xla', 'splash', ...)")
  ap.add_argument('--remat', default='full')
  ap.add_argument('--param-dtype', default='float32')
  ap.add_argument('--state-dtype', default='float32', help='AdamW first-moment dtype')
  ap.add_argument('--loss-chunk', type=int, default=256)
  ap.add_argument('--engine', action='store_true',
                  help="also compile the batch engine's block program (bf16 weights); with "
                       '--search, double --slots while it fits')
  ap.add_argument('--slots', type=int, default=64, help='engine slots (the first tried)')
  ap.add_argument('--quantize', default='none', choices=('none', 'int8', 'int8_head'),
                  help='engine weights: int8 through qwix (illada_jax.quant); default bf16')
  ap.add_argument('--prompt-bucket', type=int, default=1024, help='engine prompt bucket')
  ap.add_argument('--gen', type=int, default=1024, help='engine generation limit')
  ap.add_argument('--block', type=int, default=32, help='engine block length')
  ap.add_argument('--json', default=None, help='append result rows to this JSONL file')
  args = ap.parse_args(argv)

  devices, hbm = topology_devices(args.topology)
  head = f'{args.topology}: {len(devices)} chips ({devices[0].device_kind}), ' \
         f'HBM {hbm / GiB if hbm else "?"} GiB per chip; '
  if args.config:
    c = train_lib.load_config(args.config)
    lora = f'LoRA rank {c.lora.rank} (float32 adapters), ' if c.lora.rank else ''
    print(head + f'{args.config}: {c.objective}, L={c.seq_len}, {lora}params '
          f'{c.model.param_dtype}, AdamW mu {c.optimizer.state_dtype} / nu float32, remat '
          f'{c.model.remat_policy}, attention {c.model.attention_impl}, loss chunk '
          f'{c.loss_chunk}, mesh {c.mesh}', flush=True)
  else:
    print(head + f'params {args.param_dtype}, AdamW mu {args.state_dtype} / nu float32, '
          f'remat {args.remat}, attention {args.attention}, loss chunk {args.loss_chunk}',
          flush=True)
  if args.per_device_batch > 0 and args.search:
    rows = search(args, devices, hbm, args.per_device_batch)
  elif args.per_device_batch > 0:
    rows = [try_batch(args, devices, hbm, args.per_device_batch)]
  else:  # --per-device-batch 0: the engine only
    rows = []
  if args.engine:
    best = engine_slots(args, devices, hbm)
    rows.append({'engine': True, 'fits': best is not None, **(best or {})})
  if args.json:
    with open(args.json, 'a') as f:
      for r in rows:
        f.write(json.dumps({**vars(args), **r}) + '\n')
  return 0 if all(r.get('fits', True) for r in rows if not args.search) else 1


if __name__ == '__main__':
  sys.exit(main())
