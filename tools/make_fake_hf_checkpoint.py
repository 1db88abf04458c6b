"""Writes a Hugging Face directory of random weights with a preset's real names and shapes.

  python tools/make_fake_hf_checkpoint.py illada_8b /tmp/fake_8b [--shard-size 5GB]

Data is a repeated random block of finite bfloat16 values (|x| < 2), so a
15 GB checkpoint is written at disk speed; `config.json` is `cfg.to_hf()`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import ml_dtypes  # noqa: E402

from illada_jax import get_preset  # noqa: E402
from illada_jax.checkpoint.hf_names import head_name, layout  # noqa: E402
from illada_jax.checkpoint.safetensors_io import OutTensor, parse_size, write_safetensors  # noqa: E402
from illada_jax.checkpoint.store import write_json  # noqa: E402

_BLOCK_ELEMS = 32 << 20  # 64 MB of bfloat16


def random_block(seed: int) -> np.ndarray:
  bits = np.frombuffer(np.random.default_rng(seed).bytes(2 * _BLOCK_ELEMS), np.uint16)
  return (bits & np.uint16(0xBFFF)).view(ml_dtypes.bfloat16)  # top exponent bit off: finite


def fake_tensors(cfg, block: np.ndarray, head: bool) -> list[OutTensor]:
  bf16 = np.dtype(ml_dtypes.bfloat16)
  names = []
  for m in layout(cfg):
    for i in (range(cfg.num_layers) if m.stacked else [None]):
      names.append((m.hf_name(i), m.hf_shape))
  if head and cfg.tie_embeddings:
    names.append((head_name(cfg), (cfg.vocab_size, cfg.d_model)))

  def chunks(size, start):
    def gen():
      done = 0
      while done < size:
        a = (start + done) % len(block)
        n = min(size - done, len(block) - a)
        yield block[a:a + n]
        done += n
    return gen

  # A stored tied head must equal the embedding (names[0]): same start offset.
  starts = [0 if n == head_name(cfg) and cfg.tie_embeddings else (k * 7919) % len(block)
            for k, (n, _) in enumerate(names)]
  return [OutTensor(n, bf16, tuple(s), chunks(math.prod(s), a))
          for (n, s), a in zip(names, starts)]


def make(preset: str, out_dir: str, shard_size: str = '5GB', seed: int = 0,
         head: bool = False, **overrides) -> None:
  cfg = get_preset(preset).replace(**overrides)
  os.makedirs(out_dir)
  tensors = fake_tensors(cfg, random_block(seed), head)
  write_safetensors(out_dir, tensors, parse_size(shard_size))
  write_json(os.path.join(out_dir, 'config.json'), cfg.to_hf())
  write_json(os.path.join(out_dir, 'tokenizer_config.json'), {'model_max_length': cfg.max_len})


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('preset')
  p.add_argument('out_dir')
  p.add_argument('--shard-size', default='5GB')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--head', action='store_true', help='store the tied head too')
  p.add_argument('--num-layers', type=int, default=None)
  args = p.parse_args(argv)
  overrides = {} if args.num_layers is None else {'num_layers': args.num_layers}
  t = time.perf_counter()
  make(args.preset, args.out_dir, args.shard_size, args.seed, args.head, **overrides)
  print(f'wrote {args.out_dir} in {time.perf_counter() - t:.1f}s', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
