"""int8 weights (illada_jax.quant) against the float model: demo accuracy and logit errors.

  python tools/int8_accuracy.py [--demo-out /tmp/illada_demo] [--families illada,llada]

1. Demo (`--demo-out`: the directory `illada-demo` or `demo.run` wrote: its
   `demo_result.json`, tokenizer and run checkpoints): the 500 held-out
   problems sampled greedily (T = 0, the demo's settings) with the checkpoint
   as trained (float32), cast to bfloat16, and in int8 (`int8`: projections;
   `int8_head`: the tied head / embedding too). One line each: accuracy, its
   change against the float model, and token agreement (answer-canvas
   positions equal to the float model's, over all problems).
2. Logit errors: the tiny models of both families (random N(0, 0.1) weights,
   norms near 1, the reference-parity tests' scale), batch 4 x 32 with
   padding: max and mean |logit - float32 logit| for bfloat16 weights and
   compute, int8 with bfloat16 compute, int8 with float32 compute.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import illada_jax
from illada_jax import demo, engine, quant, text_tokenizer


def demo_figures(out_dir: str, modes=('int8', 'int8_head')) -> list[dict]:
  """[{'model', 'accuracy', 'agreement'}] for float, bf16 and each int8 mode."""
  with open(os.path.join(out_dir, 'demo_result.json')) as f:
    dcfg = demo.DemoConfig(**{**json.load(f)['config'], 'out': out_dir})
  steps = sorted(glob.glob(os.path.join(out_dir, 'run', 'checkpoints', '*')),
                 key=lambda p: int(os.path.basename(p)))
  cfg, params = illada_jax.load_checkpoint(steps[-1])
  tok = text_tokenizer.load(os.path.join(out_dir, 'tokenizer', 'sp.model'))
  _, test = demo.make_problems(dcfg)
  models = {'float32 (as trained)': (cfg, params),
            'bfloat16': (cfg.replace(param_dtype='bfloat16', compute_dtype='bfloat16'),
                         jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))}
  for mode in modes:
    models[mode] = quant.quantize_params(cfg, params, mode)
  rows, ref = [], None
  for name, (c, p) in models.items():
    ids, acc = _answers(c, p, tok, test, dcfg)
    ref = ids if ref is None else ref
    rows.append({'model': name, 'accuracy': acc, 'agreement': float(np.mean(ids == ref))})
  return rows


def _answers(cfg, params, tok, test, dcfg):
  """(answer canvas ids [n, G], exact-match accuracy) through the engine, as demo.evaluate."""
  p, _ = demo.seq_lengths(dcfg)
  o = demo.sampling_options(dcfg)
  fmt = demo.prompt_format()
  reqs = [engine.Request(id=i, prompt_ids=tuple(fmt.encode(tok, cfg, r['prompt'])), options=o)
          for i, r in enumerate(test)]
  done = {c.id: c for c in engine.Engine(cfg, params, tokenizer=tok, slots=250,
                                         buckets=(p,)).generate(reqs)}
  ids = np.full((len(test), o.gen_length), -1)
  for i, c in done.items():
    ids[i, :len(c.token_ids)] = c.token_ids
  acc = float(np.mean([done[i].text.strip() == r['response'] for i, r in enumerate(test)]))
  return ids, acc


def _tiny(family: str):
  preset = illada_jax.get_preset(f'{family}_tiny')
  cfg = preset.replace(num_layers=2, d_model=64, num_heads=4, head_dim=16, mlp_hidden=96,
                       num_kv_heads=2 if family == 'illada' else 4, max_len=64,
                       param_dtype='float32', compute_dtype='float32')
  key = jax.random.key(0)
  params = illada_jax.init_params(cfg, key)
  flat, tree = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(flat))
  # The parity tests' tensors: matrices ~N(0, 0.1), norm scales ~1 + N(0, 0.2).
  leaves = [(1 + 0.2 * jax.random.normal(k, x.shape)) if path[-1].key == 'scale'
            else 0.1 * jax.random.normal(k, x.shape) for k, (path, x) in zip(keys, flat)]
  return cfg, jax.tree.unflatten(tree, leaves)


def logit_errors(family: str) -> list[dict]:
  """[{'model', 'max', 'mean', 'scale'}]: |logits - float32 logits| on a tiny model."""
  cfg, params = _tiny(family)
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, cfg.vocab_size)
  mask = (jnp.arange(32)[None] >= jnp.array([0, 5, 11, 0])[:, None]).astype(jnp.int32)
  ref = np.asarray(illada_jax.forward(cfg, params, tokens, mask))
  bf = cfg.replace(param_dtype='bfloat16', compute_dtype='bfloat16')
  bf_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  variants = {'bfloat16': (bf, bf_params),
              'int8, bf16 compute': quant.quantize_params(bf, bf_params),
              'int8_head, bf16 compute': quant.quantize_params(bf, bf_params, 'int8_head'),
              'int8, f32 compute': quant.quantize_params(cfg, params)}
  real = np.asarray(mask, bool)
  rows = []
  for name, (c, p) in variants.items():
    err = np.abs(np.asarray(illada_jax.forward(c, p, tokens, mask)) - ref)[real]
    rows.append({'model': name, 'max': float(err.max()), 'mean': float(err.mean()),
                 'scale': float(np.abs(ref[real]).mean())})
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--demo-out', default=None, help='a demo output directory (skip if absent)')
  p.add_argument('--families', default='illada,llada')
  args = p.parse_args(argv)
  for family in args.families.split(','):
    for r in logit_errors(family):
      print(f'{family}_tiny logits, {r["model"]}: max |err| {r["max"]:.4f}, mean {r["mean"]:.5f} '
            f'(mean |logit| {r["scale"]:.3f}) against float32')
  if args.demo_out:
    rows = demo_figures(args.demo_out)
    base = rows[0]['accuracy']
    for r in rows:
      print(f'demo {r["model"]}: accuracy {100 * r["accuracy"]:.1f}% '
            f'({100 * (r["accuracy"] - base):+.1f} points), token agreement with float32 '
            f'{100 * r["agreement"]:.2f}%')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
