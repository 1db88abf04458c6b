"""Per-chip temporary memory of attention 'pallas', 'splash' and 'xla' on TPU, compiled AOT.

No TPU needed (libtpu only): each implementation's forward+backward is
compiled for a TPU topology from this host and `memory_analysis()` gives the
per-chip temporaries. Default: the 8B head layout (H=32, K=8, Dh=128) at
L=8192, bf16, one sequence per chip (the mesh is all-fsdp), on v5p-8 and
v6e-8. `--layer` adds one whole 8B layer (attention + MLP, remat) per
implementation; `--scaling` adds L/2 to show the growth rate.

  python tools/bench_attention.py [--slices v5p-8,v6e-8] [--length 8192]
      [--per-chip-batch 1] [--layer] [--scaling]

Prints one line per figure with its ratio to xla. Compiler memory only: run
time, and VMEM headroom beyond what Mosaic checks, need real hardware.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

IMPLS = ('pallas', 'splash', 'xla')


def _mib(n: int) -> str:
  return f'{n / 2**20:10.1f} MiB'


def _report(what: str, temps: dict[str, int | None]):
  ref = temps.get('xla')
  for impl, t in temps.items():
    if t is None:
      print(f'{what}  {impl:6s}  compile failed', flush=True)
      continue
    ratio = f'{t / ref:8.4f} x xla' if ref else '       n/a'
    print(f'{what}  {impl:6s}  temp {_mib(t)}  {ratio}', flush=True)


def _temp(compile_fn) -> int | None:
  try:
    return compile_fn().memory_analysis().temp_size_in_bytes
  except Exception as e:  # e.g. XLA's quadratic scores do not fit in HBM
    print(f'  ({type(e).__name__}: {str(e).splitlines()[0][:160]})', file=sys.stderr)
    return None


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--slices', default='v5p-8,v6e-8')
  ap.add_argument('--length', type=int, default=8192)
  ap.add_argument('--per-chip-batch', type=int, default=1)
  ap.add_argument('--heads', type=int, default=32)
  ap.add_argument('--kv-heads', type=int, default=8)
  ap.add_argument('--head-dim', type=int, default=128)
  ap.add_argument('--impls', default=','.join(IMPLS))
  ap.add_argument('--layer', action='store_true', help='also one full 8B layer')
  ap.add_argument('--scaling', action='store_true', help='also attention at length / 2')
  args = ap.parse_args(argv)

  import illada_jax as ij
  from illada_jax.kernels import aot

  impls = args.impls.split(',')
  dims = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
              per_chip_batch=args.per_chip_batch)
  lengths = [args.length // 2, args.length] if args.scaling else [args.length]
  for slice_name in args.slices.split(','):
    mesh = aot.topology_mesh(slice_name)
    for length in lengths:
      t0 = time.time()
      temps = {i: _temp(lambda i=i: aot.compile_attention(i, mesh, length=length, **dims))
               for i in impls}
      what = (f'{slice_name} attention fwd+bwd L={length} H={args.heads} K={args.kv_heads} '
              f'Dh={args.head_dim} B/chip={args.per_chip_batch}')
      _report(what, temps)
      print(f'  ({time.time() - t0:.0f} s to compile)', file=sys.stderr)
    if args.layer:
      cfg = ij.get_preset('illada_8b').replace(num_layers=1, vocab_size=8192)
      temps = {i: _temp(lambda i=i: aot.compile_model_grad(
          cfg.replace(attention_impl=i), mesh, per_chip_batch=args.per_chip_batch,
          length=args.length)) for i in impls}
      _report(f'{slice_name} one 8B layer fwd+bwd (remat full, V=8192) L={args.length} '
              f'B/chip={args.per_chip_batch}', temps)


if __name__ == '__main__':
  main()
