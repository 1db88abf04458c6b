"""Builders shared by the tests (no test module imports another)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

import illada_jax

# -- tiny random models for the sampler, scorers and engine ----------------------

# Untied LLaDA layout: a random head gives varied, well-separated predictions.
LLADA = illada_jax.get_preset('llada_tiny').replace(
    num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_hidden=96,
    vocab_size=90, max_len=64, mask_token_id=80, bos_token_id=81, eos_token_id=82,
    pad_token_id=82, eot_token_id=83, param_dtype='float32', compute_dtype='float32',
    remat_policy='none')
# Tied iLLaDA layout (GQA, no EOT), unscanned layers.
ILLADA = illada_jax.get_preset('illada_tiny').replace(
    num_layers=2, d_model=64, num_heads=4, num_kv_heads=1, head_dim=16, mlp_hidden=96,
    vocab_size=70, max_len=64, param_dtype='float32', compute_dtype='float32',
    remat_policy='none', scan_layers=False)


def make_params(cfg, seed=0, end_boost=0.):
  """Random params scaled up (sharper logits); the mask token is never predicted.

  `end_boost` > 0 scales up the EOS/EOT head columns so they win often.
  """
  params = illada_jax.init_params(cfg, jax.random.key(seed))
  params = jax.tree.map(lambda x: x * 5, params)
  emb = params['embedder']['embedding']
  if cfg.tie_embeddings:
    params['embedder']['embedding'] = emb.at[cfg.mask_token_id].set(0.)
  else:
    head = params['lm_head'].at[:, cfg.mask_token_id].set(0.)
    for end_id in (cfg.eos_token_id, cfg.eot_token_id):
      head = head.at[:, end_id].multiply(1. + end_boost)
    params['lm_head'] = head
  return params


def log_softmax(x):
  """float64 log-softmax over the last axis."""
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def logits_of(cfg, params, tokens):
  """float32 `[L, V]` logits of one unpadded row."""
  return np.asarray(illada_jax.forward(cfg, params, np.asarray([tokens], np.int32)))[0]


def greedy_by_hand(cfg, params, ctx, l, cfg_scale=0., prefix=(), suffix=()):
  """Suffix greedy prediction (SPEC §3) in NumPy: the answer it reveals."""
  m = cfg.mask_token_id
  seq = list(prefix) + list(ctx) + [m] * l + list(suffix)
  start = len(prefix) + len(ctx)
  hidden = list(range(l))
  for _ in range(l):
    lg = logits_of(cfg, params, seq).astype(np.float64)
    if cfg_scale > 0:
      u = logits_of(cfg, params, [m] * start + seq[start:]).astype(np.float64)
      lg = u + (cfg_scale + 1) * (lg - u)
    lp = log_softmax(lg)
    best = {j: (lp[start + j].max(), int(lp[start + j].argmax())) for j in hidden}
    j = max(hidden, key=lambda j: (best[j][0], -j))
    seq[start + j] = best[j][1]
    hidden.remove(j)
  return seq[start:start + l]


def padded_prompts(cfg, b=3, p=6, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 60, (b, p)).astype(np.int32)
  mask = np.ones((b, p), np.int32)
  for r in range(1, b):
    mask[r, :r * 2] = 0
  tokens[mask == 0] = cfg.pad_token_id
  return tokens, mask


# -- a tiny checkpoint with a word-level tokenizer -------------------------------

SPECIALS = ['<s>', '<pad>', '</s>', '<unk>', '<|eot_id|>', '<[MASK]>']  # iLLaDA ids 0..5
WORDS = [f'w{i}' for i in range(58)]
WORD_CFG = illada_jax.get_preset('illada_tiny').replace(
    num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_hidden=96,
    vocab_size=64, max_len=64, param_dtype='float32', compute_dtype='float32',
    remat_policy='none')


def word_checkpoint(root: str, prompt_format: dict | None = None):
  """A checkpoint of `WORD_CFG` with a whitespace word-level `tokenizer.json`.

  `w{i}` has id `6 + i`. `prompt_format`: keys written to tokenizer_config.json.
  Returns `(path, params)`.
  """
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok_dir = os.path.join(root, 'tok')
  os.makedirs(tok_dir, exist_ok=True)
  vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(SPECIALS)
  tok.save(os.path.join(tok_dir, 'tokenizer.json'))
  if prompt_format is not None:
    with open(os.path.join(tok_dir, 'tokenizer_config.json'), 'w') as f:
      json.dump(prompt_format, f)
  params = illada_jax.init_params(WORD_CFG, jax.random.key(0))
  params = jax.tree.map(lambda x: x * 5, params)
  params['embedder']['embedding'] = params['embedder']['embedding'].at[
      WORD_CFG.mask_token_id].set(0.)
  path = os.path.join(root, 'model')
  illada_jax.save_checkpoint(path, WORD_CFG, params, tokenizer_dir=tok_dir)
  return path, params


def write_jsonl(path, records) -> str:
  with open(path, 'w') as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + '\n')
  return str(path)


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]
