"""Model numerics against independent references, and invariants of the forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import illada_jax
from illada_jax import model as model_lib

# Small but with every feature: GQA (4 query heads per KV head), head_dim !=
# d_model / heads, several layers, odd vocabulary.
ILLADA_SMALL = illada_jax.get_preset('illada_tiny').replace(
    num_layers=3, d_model=64, num_heads=8, num_kv_heads=2, head_dim=16, mlp_hidden=96,
    vocab_size=97, rope_theta=10000.0, norm_eps=1e-6, param_dtype='float32',
    compute_dtype='float32', remat_policy='none')
LLADA_SMALL = illada_jax.get_preset('llada_tiny').replace(
    num_layers=2, d_model=64, num_heads=4, num_kv_heads=4, head_dim=16, mlp_hidden=80,
    vocab_size=90, rope_theta=500000.0, norm_eps=1e-5, mask_token_id=80, bos_token_id=81,
    eos_token_id=82, pad_token_id=82, eot_token_id=83, param_dtype='float32',
    compute_dtype='float32', remat_policy='none')


def random_params(cfg, seed=0):
  """Initialised params with norm scales moved away from 1 so they matter."""
  params = illada_jax.init_params(cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  def perturb(path, x):
    if path[-1].key == 'scale':
      return x + jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype)
    return x * 5  # std 0.1: larger activations exercise the norms
  return jax.tree_util.tree_map_with_path(perturb, params)


def padded_batch(cfg, seed=0, b=3, l=11):
  """Tokens `[B, L]` and mask with rows 1 and 2 left-padded by 3 and 7."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (b, l)).astype(np.int32)
  mask = np.ones((b, l), np.int32)
  mask[1, :3] = 0
  mask[2, :7] = 0
  tokens[mask == 0] = cfg.pad_token_id
  return tokens, mask


# -- independent references ---------------------------------------------------

def llada_numpy_forward(sd, cfg, tokens, mask):
  """SPEC §1 restated in float64 NumPy over OLMo-named [out, in] tensors."""
  pre = 'model.transformer.'
  b, l = tokens.shape
  h, dh = cfg.num_heads, cfg.head_dim

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w

  inv_freq = cfg.rope_theta ** (-np.arange(0, dh, 2) / dh)
  ang = np.arange(l)[:, None] * inv_freq[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

  def rope(x):  # [B, L, H, Dh]
    x1, x2 = x[..., :dh // 2], x[..., dh // 2:]
    rot = np.concatenate([-x2, x1], -1)
    return x * cos[None, :, None] + rot * sin[None, :, None]

  x = sd[pre + 'wte.weight'][tokens]
  for i in range(cfg.num_layers):
    p = f'{pre}blocks.{i}.'
    a = rms(x, sd[p + 'attn_norm.weight'])
    q = rope((a @ sd[p + 'q_proj.weight'].T).reshape(b, l, h, dh))
    k = rope((a @ sd[p + 'k_proj.weight'].T).reshape(b, l, h, dh))
    v = (a @ sd[p + 'v_proj.weight'].T).reshape(b, l, h, dh)
    s = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(dh)
    s = np.where(mask[:, None, None, :] > 0, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    att = s / s.sum(-1, keepdims=True)
    o = np.einsum('bhqk,bkhd->bqhd', att, v).reshape(b, l, h * dh)
    x = x + o @ sd[p + 'attn_out.weight'].T
    m = rms(x, sd[p + 'ff_norm.weight'])
    gate, up = m @ sd[p + 'ff_proj.weight'].T, m @ sd[p + 'up_proj.weight'].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ sd[p + 'ff_out.weight'].T
  return rms(x, sd[pre + 'ln_f.weight']) @ sd[pre + 'ff_out.weight'].T


def to_olmo_state_dict(params, cfg):
  """Our scanned params -> OLMo names in PyTorch [out, in] layout, float64."""
  f = lambda a: np.asarray(a, np.float64)
  L = params['layers']
  sd = {'model.transformer.wte.weight': f(params['embedder']['embedding']),
        'model.transformer.ln_f.weight': f(params['final_norm']['scale']),
        'model.transformer.ff_out.weight': f(params['lm_head']).T}
  for i in range(cfg.num_layers):
    p = f'model.transformer.blocks.{i}.'
    flat = lambda w: f(w[i]).reshape(w.shape[1], -1).T  # [D, H, Dh] -> [H*Dh, D]
    sd[p + 'attn_norm.weight'] = f(L['attn_norm']['scale'][i])
    sd[p + 'ff_norm.weight'] = f(L['mlp_norm']['scale'][i])
    sd[p + 'q_proj.weight'] = flat(L['attn']['q_proj'])
    sd[p + 'k_proj.weight'] = flat(L['attn']['k_proj'])
    sd[p + 'v_proj.weight'] = flat(L['attn']['v_proj'])
    sd[p + 'attn_out.weight'] = f(L['attn']['o_proj'][i]).reshape(-1, cfg.d_model).T
    sd[p + 'ff_proj.weight'] = f(L['mlp']['gate_proj'][i]).T
    sd[p + 'up_proj.weight'] = f(L['mlp']['up_proj'][i]).T
    sd[p + 'ff_out.weight'] = f(L['mlp']['down_proj'][i]).T
  return sd


def test_llada_layout_matches_float64_numpy_reference():
  cfg = LLADA_SMALL
  params = random_params(cfg, seed=1)
  tokens, mask = padded_batch(cfg, seed=1)
  got = np.asarray(illada_jax.forward(cfg, params, tokens, mask))
  want = llada_numpy_forward(to_olmo_state_dict(params, cfg), cfg, tokens, mask)
  assert got.dtype == np.float32 and got.shape == (3, 11, cfg.vocab_size)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert np.abs(want).max() > 1.0  # the comparison is not between near-zeros


@pytest.mark.torch
def test_illada_layout_matches_transformers_llama_with_full_mask():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  cfg = ILLADA_SMALL
  params = random_params(cfg, seed=2)
  tokens, mask = padded_batch(cfg, seed=2)

  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=True,
      attention_bias=False, mlp_bias=False, max_position_embeddings=64)
  hf_cfg._attn_implementation = 'eager'
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  t = lambda a: torch.from_numpy(np.asarray(a, np.float32).copy())
  L = params['layers']
  sd = {'model.embed_tokens.weight': t(params['embedder']['embedding']),
        'model.norm.weight': t(params['final_norm']['scale']),
        'lm_head.weight': t(params['embedder']['embedding'])}
  for i in range(cfg.num_layers):
    p = f'model.layers.{i}.'
    sd[p + 'input_layernorm.weight'] = t(L['attn_norm']['scale'][i])
    sd[p + 'post_attention_layernorm.weight'] = t(L['mlp_norm']['scale'][i])
    for name in ('q_proj', 'k_proj', 'v_proj'):
      sd[p + f'self_attn.{name}.weight'] = t(L['attn'][name][i].reshape(cfg.d_model, -1).T)
    sd[p + 'self_attn.o_proj.weight'] = t(L['attn']['o_proj'][i].reshape(-1, cfg.d_model).T)
    for name in ('gate_proj', 'up_proj', 'down_proj'):
      sd[p + f'mlp.{name}.weight'] = t(L['mlp'][name][i].T)
  missing, unexpected = hf.load_state_dict(sd, strict=False)
  assert not unexpected and all('rotary' in m for m in missing), (missing, unexpected)

  # A 4D additive mask is used as-is by transformers: no causal part, padded keys hidden.
  keep = torch.from_numpy(mask.astype(bool))[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
  additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
  with torch.no_grad():
    want = hf(input_ids=torch.from_numpy(tokens.astype(np.int64)),
              attention_mask=additive).logits.numpy()
  got = np.asarray(illada_jax.forward(cfg, params, tokens, mask))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert np.abs(want).max() > 1.0


def test_attention_is_bidirectional():
  """Changing the last token changes the logits at the first position."""
  cfg = ILLADA_SMALL
  params = random_params(cfg)
  tokens = padded_batch(cfg)[0][:1]
  other = tokens.copy()
  other[0, -1] = (other[0, -1] + 1) % cfg.vocab_size
  a = illada_jax.forward(cfg, params, tokens)
  b = illada_jax.forward(cfg, params, other)
  assert np.abs(np.asarray(a[0, 0] - b[0, 0])).max() > 1e-3


def test_padding_invariance_across_rows_and_own_left_padding():
  cfg = ILLADA_SMALL
  params = random_params(cfg, seed=3)
  tokens, mask = padded_batch(cfg, seed=3)
  base = np.asarray(illada_jax.forward(cfg, params, tokens, mask))

  # Other rows change: row 1's real-token logits stay put.
  changed = tokens.copy()
  changed[0] = (changed[0] + 5) % cfg.vocab_size
  changed[2, 7:] = (changed[2, 7:] + 3) % cfg.vocab_size
  out = np.asarray(illada_jax.forward(cfg, params, changed, mask))
  np.testing.assert_allclose(out[1, 3:], base[1, 3:], atol=1e-5, rtol=0)

  # Row 1's own padding changes (values, and two more pad slots in front).
  real = tokens[1, 3:]
  more_pad = np.concatenate([np.full(5, 17, np.int32), real])[None]
  more_mask = np.concatenate([np.zeros(5, np.int32), np.ones(len(real), np.int32)])[None]
  out = np.asarray(illada_jax.forward(cfg, params, more_pad, more_mask))
  np.testing.assert_allclose(out[0, 5:], base[1, 3:], atol=1e-4, rtol=0)
  # ... and without any padding at all.
  out = np.asarray(illada_jax.forward(cfg, params, real[None]))
  np.testing.assert_allclose(out[0], base[1, 3:], atol=1e-4, rtol=0)


def test_padded_keys_are_invisible():
  """Garbage in padded positions does not leak into real positions."""
  cfg = LLADA_SMALL
  params = random_params(cfg, seed=4)
  tokens, mask = padded_batch(cfg, seed=4)
  garbage = tokens.copy()
  garbage[mask == 0] = np.arange((mask == 0).sum()) % cfg.vocab_size
  a = np.asarray(illada_jax.forward(cfg, params, tokens, mask))
  b = np.asarray(illada_jax.forward(cfg, params, garbage, mask))
  np.testing.assert_array_equal(a[mask == 1], b[mask == 1])


def test_scanned_and_unscanned_layers_agree():
  cfg = ILLADA_SMALL
  params = random_params(cfg, seed=5)
  tokens, mask = padded_batch(cfg, seed=5)
  unscanned_cfg = cfg.replace(scan_layers=False)
  unscanned = model_lib.unstack_layers(params, cfg.num_layers)
  assert 'layers_2' in unscanned and unscanned['layers_0']['attn']['q_proj'].ndim == 3
  a = illada_jax.forward(cfg, params, tokens, mask)
  b = illada_jax.forward(unscanned_cfg, unscanned, tokens, mask)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
  restacked = model_lib.stack_layers(unscanned, cfg.num_layers)
  jax.tree.map(np.testing.assert_array_equal, restacked, params)
  # The unscanned tree has exactly the shapes init gives an unscanned model.
  shapes = jax.tree.map(lambda x: x.shape, illada_jax.abstract_params(unscanned_cfg))
  assert shapes == jax.tree.map(lambda x: x.shape, unscanned)


@pytest.mark.parametrize('scan', [True, False])
def test_remat_policies_do_not_change_gradients(scan):
  base = ILLADA_SMALL.replace(scan_layers=scan)
  params = random_params(ILLADA_SMALL, seed=6)
  if not scan:
    params = model_lib.unstack_layers(params, base.num_layers)
  tokens, mask = padded_batch(base, seed=6)

  def loss(cfg, p):
    logits = model_lib.Transformer(cfg).apply({'params': p}, tokens, mask)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)

  grads = {}
  for policy in ('none', 'full', 'dots', 'save_qkv_attn'):
    cfg = base.replace(remat_policy=policy)
    grads[policy] = jax.jit(jax.grad(lambda p: loss(cfg, p)))(params)
  for policy in ('full', 'dots', 'save_qkv_attn'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                 grads[policy], grads['none'])
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads['none'])) > 1e-4


def test_bfloat16_forward_tracks_float32():
  cfg32 = ILLADA_SMALL
  cfg16 = cfg32.replace(param_dtype='bfloat16', compute_dtype='bfloat16')
  params32 = random_params(cfg32, seed=7)
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
  tokens, mask = padded_batch(cfg32, seed=7)
  a = np.asarray(illada_jax.forward(cfg32, params32, tokens, mask))
  b = illada_jax.forward(cfg16, params16, tokens, mask)
  assert b.dtype == jnp.float32
  b = np.asarray(b)
  assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
  assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_rms_norm_casts_before_the_weight():
  """bf16: normalise in f32, round to bf16, then multiply by the bf16 weight."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64)) * 3, jnp.bfloat16)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(64,)), jnp.bfloat16)
  got = model_lib.rms_norm(x, w, 1e-6)
  x32 = np.asarray(x, np.float32)
  normed = (x32 / np.sqrt(np.mean(x32 ** 2, -1, keepdims=True) + 1e-6)).astype(jnp.bfloat16)
  want = (np.asarray(normed, np.float32) * np.asarray(w, np.float32)).astype(jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
