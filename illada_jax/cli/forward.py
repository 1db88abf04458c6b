"""`illada-forward`: one forward pass of a preset, with a parameter table and logit stats.

A smoke test of an installation: builds the preset with random weights
(sharded over a mesh if asked), runs a jitted forward on random tokens and
prints what it computed.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import illada_jax
from illada_jax import sharding


def parameter_table(params) -> list[tuple[str, tuple[int, ...], str, int, str]]:
  """(path, shape, dtype, count, partition spec) for every parameter."""
  rows = []
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    spec = getattr(getattr(x, 'sharding', None), 'spec', '')
    rows.append((name, tuple(x.shape), str(x.dtype), int(np.prod(x.shape)), str(spec)))
  return rows


def run(preset: str = 'illada_tiny', batch: int = 2, seq_len: int = 64, mesh: str | None = None,
        seed: int = 0, **overrides) -> dict:
  """Builds `preset`, runs one forward pass; returns the table and logit statistics."""
  cfg = illada_jax.get_preset(preset).replace(**overrides)
  mesh_obj = sharding.make_mesh(mesh) if mesh else None
  params = illada_jax.init_params(cfg, jax.random.key(seed), mesh=mesh_obj)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq_len)).astype(np.int32)
  start = time.perf_counter()
  logits = jax.block_until_ready(illada_jax.forward(cfg, params, tokens))
  seconds = time.perf_counter() - start
  logits = np.asarray(logits)
  return {
      'config': cfg,
      'table': parameter_table(params),
      'param_count': illada_jax.param_count(cfg),
      'logits_shape': logits.shape,
      'logits_stats': {'mean': float(logits.mean()), 'std': float(logits.std()),
                       'min': float(logits.min()), 'max': float(logits.max()),
                       'finite': bool(np.isfinite(logits).all())},
      'seconds_incl_compile': seconds,
  }


def main(argv=None):
  from illada_jax.cli import _common
  _common.quiet_platforms()
  p = _common.Parser(prog='illada-forward', description=__doc__.splitlines()[0])
  p.add_argument('--preset', default='illada_tiny', help='a name from configs/models.py')
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--seq-len', type=int, default=64)
  p.add_argument('--mesh', default=None, help='e.g. data=1,fsdp=4,tensor=2')
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  out = run(args.preset, args.batch, args.seq_len, args.mesh, args.seed)
  width = max(len(r[0]) for r in out['table'])
  print(f"{'parameter':<{width}}  {'shape':<22} {'dtype':<9} {'count':>13}  sharding")
  for name, shape, dtype, count, spec in out['table']:
    print(f'{name:<{width}}  {str(shape):<22} {dtype:<9} {count:>13,}  {spec}')
  print(f"{'total':<{width}}  {'':<22} {'':<9} {out['param_count']:>13,}")
  s = out['logits_stats']
  print(f"logits {out['logits_shape']} float32: mean {s['mean']:+.4f} std {s['std']:.4f} "
        f"min {s['min']:+.3f} max {s['max']:+.3f} finite={s['finite']} "
        f"({out['seconds_incl_compile']:.2f}s incl. compile)")


if __name__ == '__main__':
  main()
