"""Builders shared by the tests (no test module imports another): tiny Hugging Face
checkpoints, tiny training runs, tiny random models for the sampler, scorers and engine,
a word-level checkpoint and JSONL files.

Hugging Face directories are written with `safetensors.numpy` and names
spelled out here by hand (never taken from `illada_jax.checkpoint`), and read
back with `safetensors.safe_open`, so a symmetric mistake of the converter's
writer and reader cannot pass. `reference_logits` is a float64 NumPy forward
pass over the HF tensors (SPEC §1).
"""

from __future__ import annotations

import glob
import json
import os

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

import illada_jax
from illada_jax import data, text_tokenizer, train_config
from illada_jax.optimizer import OptimizerConfig

BF16 = ml_dtypes.bfloat16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, '..', 'shared')  # beside the checkout
TOKENIZER_FILES = {'tokenizer.json': '{"model": {}}', 'tokenizer_config.json': '{"a": 1}',
                   'special_tokens_map.json': '{}', 'spm.model': 'not really sentencepiece',
                   'generation_config.json': '{"max_length": 8}'}


def assert_trees_equal(a, b):
  """Same structure, dtypes, shapes and values, leaf by leaf."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- tiny Hugging Face checkpoints ---------------------------------------------------

def tiny_cfg(family: str):
  small = dict(num_layers=2, d_model=64, num_heads=4, head_dim=16, mlp_hidden=96,
               vocab_size=128, max_len=64)
  if family == 'illada':
    return illada_jax.get_preset('illada_tiny').replace(num_kv_heads=2, **small)
  return illada_jax.get_preset('llada_tiny').replace(
      num_kv_heads=4, mask_token_id=120, bos_token_id=121, eos_token_id=122, pad_token_id=122,
      eot_token_id=123, **small)


def embedding_name(cfg) -> str:
  return 'model.embed_tokens.weight' if cfg.family == 'illada' else 'model.transformer.wte.weight'


def head_name(cfg) -> str:
  return 'lm_head.weight' if cfg.family == 'illada' else 'model.transformer.ff_out.weight'


def hf_names(cfg, head: bool):
  """{name: shape} of the HF checkpoint, spelled out per family (SPEC §1)."""
  d, h, k, dh, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.mlp_hidden, cfg.vocab_size)
  out = {}
  if cfg.family == 'illada':
    out['model.embed_tokens.weight'] = (v, d)
    for i in range(cfg.num_layers):
      p = f'model.layers.{i}.'
      out.update({p + 'input_layernorm.weight': (d,), p + 'self_attn.q_proj.weight': (h * dh, d),
                  p + 'self_attn.k_proj.weight': (k * dh, d),
                  p + 'self_attn.v_proj.weight': (k * dh, d),
                  p + 'self_attn.o_proj.weight': (d, h * dh),
                  p + 'post_attention_layernorm.weight': (d,),
                  p + 'mlp.gate_proj.weight': (f, d), p + 'mlp.up_proj.weight': (f, d),
                  p + 'mlp.down_proj.weight': (d, f)})
    out['model.norm.weight'] = (d,)
    if head:
      out['lm_head.weight'] = (v, d)
  else:
    out['model.transformer.wte.weight'] = (v, d)
    for i in range(cfg.num_layers):
      p = f'model.transformer.blocks.{i}.'
      out.update({p + 'attn_norm.weight': (d,), p + 'q_proj.weight': (h * dh, d),
                  p + 'k_proj.weight': (k * dh, d), p + 'v_proj.weight': (k * dh, d),
                  p + 'attn_out.weight': (d, h * dh), p + 'ff_norm.weight': (d,),
                  p + 'ff_proj.weight': (f, d), p + 'up_proj.weight': (f, d),
                  p + 'ff_out.weight': (d, f)})
    out['model.transformer.ln_f.weight'] = (d,)
    if head:
      out['model.transformer.ff_out.weight'] = (v, d)
  return out


def make_tensors(cfg, seed=0, head=None, dtype=BF16):
  """Random HF tensors; norms near 1, matrices ~N(0, 0.1). A stored tied head equals the embedding."""
  head = (not cfg.tie_embeddings) if head is None else head
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in hf_names(cfg, head).items():
    scale = 0.1 if len(shape) == 2 else 0.2
    base = 1.0 if len(shape) == 1 else 0.0
    out[name] = (base + scale * rng.standard_normal(shape)).astype(dtype)
  if head and cfg.tie_embeddings:
    out[head_name(cfg)] = out[embedding_name(cfg)].copy()
  return out


def write_hf(path, cfg, tensors, shards=2, index=True, hf_config=None, tokenizer_files=None):
  """A Hugging Face directory: config.json, tokenizer files, 1 file or `shards` + index."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf_config or cfg.to_hf(), f)
  for name, text in (TOKENIZER_FILES if tokenizer_files is None else tokenizer_files).items():
    with open(os.path.join(path, name), 'w') as f:
      f.write(text)
  names = list(tensors)
  if not index:
    save_file(tensors, os.path.join(path, 'model.safetensors'))
    return path
  weight_map = {}
  for k in range(shards):
    part = names[k::shards]
    fname = f'model-{k + 1:05d}-of-{shards:05d}.safetensors'
    save_file({n: tensors[n] for n in part}, os.path.join(path, fname))
    weight_map.update({n: fname for n in part})
  total = sum(t.nbytes for t in tensors.values())
  with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f)
  return path


def read_hf(path):
  """{name: array} of every `*.safetensors` file in `path`, read by `safetensors.safe_open`."""
  out = {}
  for file in sorted(glob.glob(os.path.join(glob.escape(os.fspath(path)), '*.safetensors'))):
    with safe_open(file, 'numpy') as f:
      for name in f.keys():
        assert name not in out, f'{name} stored twice'
        out[name] = f.get_tensor(name)
  return out


def reference_logits(cfg, t, tokens):
  """float64 logits of the HF tensors `t` for int tokens [B, L] (SPEC §1 forward)."""
  g = lambda n: np.asarray(t[n], np.float64)
  llama = cfg.family == 'illada'
  pre = 'model.layers.{}.' if llama else 'model.transformer.blocks.{}.'
  names = (dict(an='input_layernorm', q='self_attn.q_proj', k='self_attn.k_proj',
                v='self_attn.v_proj', o='self_attn.o_proj', mn='post_attention_layernorm',
                gate='mlp.gate_proj', up='mlp.up_proj', down='mlp.down_proj')
           if llama else
           dict(an='attn_norm', q='q_proj', k='k_proj', v='v_proj', o='attn_out', mn='ff_norm',
                gate='ff_proj', up='up_proj', down='ff_out'))
  emb = g(embedding_name(cfg))
  norm = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w
  b, l = tokens.shape
  h, kh, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  inv = cfg.rope_theta ** (-np.arange(0, dh, 2) / dh)
  ang = np.arange(l)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

  def rope(x):  # [B, L, heads, Dh]
    x1, x2 = x[..., :dh // 2], x[..., dh // 2:]
    return x * cos[None, :, None] + np.concatenate([-x2, x1], -1) * sin[None, :, None]

  x = emb[tokens]
  for i in range(cfg.num_layers):
    w = lambda key: g(pre.format(i) + names[key] + '.weight')
    y = norm(x, w('an'))
    q = rope((y @ w('q').T).reshape(b, l, h, dh))
    k = np.repeat(rope((y @ w('k').T).reshape(b, l, kh, dh)), h // kh, axis=2)
    v = np.repeat((y @ w('v').T).reshape(b, l, kh, dh), h // kh, axis=2)
    s = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(dh)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    x = x + np.einsum('bhqk,bkhd->bqhd', p, v).reshape(b, l, h * dh) @ w('o').T
    y = norm(x, w('mn'))
    gate, up = y @ w('gate').T, y @ w('up').T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w('down').T
  x = norm(x, g('model.norm.weight' if llama else 'model.transformer.ln_f.weight'))
  head = emb if cfg.tie_embeddings else g(head_name(cfg))
  return x @ head.T


# -- tiny training runs ---------------------------------------------------------------

SHAKESPEARE = os.path.join(SHARED, 'data', 'tinyshakespeare.txt')

TRAIN_MODEL = illada_jax.get_preset('illada_tiny').replace(
    num_layers=1, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_hidden=64,
    vocab_size=128, param_dtype='float32', compute_dtype='float32', remat_policy='none')


def make_data(root):
  """(docs.jsonl, SentencePiece model) under `root`, made once: Shakespeare if present."""
  text = open(SHAKESPEARE).read()[:60000] if os.path.exists(SHAKESPEARE) else (
      'to be or not to be\n\nthat is the question\n\n' * 500)
  path = os.path.join(root, 'docs.jsonl')
  if not os.path.exists(path):
    data.write_jsonl(path, [{'text': d} for d in text.split('\n\n') if d.strip()])
  tok = os.path.join(root, 'sp')
  if not os.path.exists(tok + '.model'):
    text_tokenizer.train_sentencepiece(text.split('\n'), tok, vocab_size=TRAIN_MODEL.vocab_size)
  return path, tok + '.model'


def tiny_config(root, **kw):
  """A `TrainConfig` of `TRAIN_MODEL` on `make_data(root)`, 8 steps on 8 devices; `kw` overrides."""
  docs, tok = make_data(root)
  base = dict(model=TRAIN_MODEL, data=data.DataConfig(paths=(docs,), tokenizer=tok),
              optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2, total_steps=8),
              batch_size=8, grad_accum=2, seq_len=16, steps=8, mesh='data=2,fsdp=2,tensor=2',
              workdir=os.path.join(root, 'run'), log_every=1, checkpoint_every=3,
              progress_bar=False, loss_chunk=8)
  base.update(kw)
  return train_config.TrainConfig(**base)


def write_train_config(path, cfg) -> str:
  """Writes `cfg` as an `illada-train --config` file (its repr; no test code imported)."""
  with open(path, 'w') as f:
    f.write('from illada_jax.config import ModelConfig\n'
            'from illada_jax.data import DataConfig\n'
            'from illada_jax.lora import LoraConfig\n'
            'from illada_jax.optimizer import OptimizerConfig\n'
            'from illada_jax.train_config import TrainConfig\n\n'
            f'CONFIG = {cfg!r}\n')
  return str(path)


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


def word_tokenizer(path, specials, words, added=(), tokenizer_config=None) -> str:
  """A whitespace word-level `tokenizer.json` in directory `path`; returns `path`.

  Ids: `specials` (special tokens) first, then `added` (plain added tokens,
  matched before pre-tokenisation, e.g. '\\n\\n'), then `words`, in order.
  `tokenizer_config`: a dict written to tokenizer_config.json beside it.
  """
  from tokenizers import Tokenizer, models, pre_tokenizers
  os.makedirs(path, exist_ok=True)
  vocab = {t: i for i, t in enumerate([*specials, *added, *words])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>' if '<unk>' in vocab else None))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(list(specials))
  tok.add_tokens(list(added))
  tok.save(os.path.join(path, 'tokenizer.json'))
  if tokenizer_config is not None:
    with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
      json.dump(tokenizer_config, f)
  return str(path)


# -- a server started for real ----------------------------------------------------------

def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_server(ckpt: str, *flags: str, timeout: float = 600.):
  """`illada-serve --ckpt CKPT FLAGS` on 127.0.0.1 on a free port, as a subprocess, once
  `/health` says ready. Returns `(process, base url)`; the caller terminates it."""
  import subprocess
  import sys
  import time
  import httpx
  port = free_port()
  log = open(os.path.join(os.path.dirname(ckpt.rstrip('/')), f'serve-{port}.log'), 'w')
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  proc = subprocess.Popen([sys.executable, '-m', 'illada_jax.cli.serve', '--ckpt', ckpt,
                           '--port', str(port), '--log-level', 'warning', *flags],
                          stdout=log, stderr=subprocess.STDOUT, env=env)
  url = f'http://127.0.0.1:{port}'
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'illada-serve exited {proc.returncode}: {open(log.name).read()[-2000:]}')
    try:
      if httpx.get(url + '/health', timeout=5).status_code == 200:
        return proc, url
    except httpx.TransportError:
      pass
    time.sleep(0.5)
  proc.kill()
  raise RuntimeError(f'illada-serve not ready after {timeout} s: {open(log.name).read()[-2000:]}')


# -- checkpoints saved by the installed transformers ----------------------------------

def transformers_llama(path, cfg, seed=0, dtype='float32', config_edit=None):
  """A Llama-layout HF directory written by transformers' own `save_pretrained`.

  `cfg` gives the sizes and `rope_theta`; weights are transformers' random
  init under `seed`, in `dtype`. `config_edit(dict) -> dict` rewrites the
  saved `config.json` (e.g. into a 4.x-style one). Returns `path`.
  """
  import torch
  import transformers
  torch.manual_seed(seed)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
      max_position_embeddings=cfg.max_len, bos_token_id=cfg.bos_token_id,
      eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
      mask_token_id=cfg.mask_token_id, initializer_range=0.2)
  model = transformers.LlamaForCausalLM(hf_cfg).to(getattr(torch, dtype))
  model.save_pretrained(path)
  if config_edit is not None:
    with open(os.path.join(path, 'config.json')) as f:
      conf = config_edit(json.load(f))
    with open(os.path.join(path, 'config.json'), 'w') as f:
      json.dump(conf, f)
  return str(path)


def transformers_logits(path, tokens):
  """float32 `[B, L, V]` logits of the HF directory `path` loaded by
  `AutoModelForCausalLM`, attention made bidirectional (a 4D additive mask of zeros)."""
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation='eager').eval()
  b, l = tokens.shape
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)),
                attention_mask=torch.zeros((b, 1, l, l)))
  return out.logits.float().numpy()


CHAT_CORPUS = ['the cat sat on the mat .', 'what is two plus two ?', 'four .',
               'You are a helpful assistant .', 'hello there , how are you ?']


def transformers_tokenizer(path, template=None, specials=('<s>', '</s>', '<unk>', '<pad>'),
                           added=(), **roles):
  """A byte-level BPE tokenizer saved by transformers' own `save_pretrained` in `path`.

  `specials` are special tokens (ids 0.. in order), `added` more of them
  (e.g. '<|im_start|>'); `roles` name them (`bos_token='<s>'`, ...).
  `template` is a string or {name: template}. The BPE is trained on
  `CHAT_CORPUS` (milliseconds). Returns `path`.
  """
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[*specials, *added],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CHAT_CORPUS, trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template,
                                              **roles)
  fast.save_pretrained(path)
  return str(path)
