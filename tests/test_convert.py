"""HF safetensors <-> Orbax conversion on tiny checkpoints of both families.

HF directories are written here with `safetensors.numpy` and names spelled
out by hand (not taken from `illada_jax.convert`), and the expected logits
come from a plain-numpy forward pass over the original HF tensors, so a
wrong name, transpose, reshape or gate/up swap fails.
"""

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import illada_jax
from illada_jax import convert, rawio
from illada_jax.cli import convert as cli

BF16 = ml_dtypes.bfloat16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FILES = {'tokenizer.json': '{"model": {}}', 'tokenizer_config.json': '{"a": 1}',
                   'special_tokens_map.json': '{}', 'spm.model': 'not really sentencepiece',
                   'generation_config.json': '{"max_length": 8}'}


def tiny_cfg(family: str):
  small = dict(num_layers=2, d_model=64, num_heads=4, head_dim=16, mlp_hidden=96,
               vocab_size=128, max_len=64)
  if family == 'illada':
    return illada_jax.get_preset('illada_tiny').replace(num_kv_heads=2, **small)
  return illada_jax.get_preset('llada_tiny').replace(
      num_kv_heads=4, mask_token_id=120, bos_token_id=121, eos_token_id=122, pad_token_id=122,
      eot_token_id=123, **small)


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
    emb = 'model.embed_tokens.weight' if cfg.family == 'illada' else 'model.transformer.wte.weight'
    out[convert.head_name(cfg)] = out[emb].copy()
  return out


def write_hf(path, cfg, tensors, shards=2, index=True, hf_config=None):
  """A Hugging Face directory: config.json, tokenizer files, 1 file or `shards` + index."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf_config or cfg.to_hf(), f)
  for name, text in TOKENIZER_FILES.items():
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
  src = convert.HFSource(path)
  return {n: convert.read_tensor(e) for n, e in src.entries.items()}


# -- an independent numpy forward pass over the HF tensors --------------------------

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
  emb = g('model.embed_tokens.weight' if llama else 'model.transformer.wte.weight')
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
  head = emb if cfg.tie_embeddings else g(convert.head_name(cfg))
  return x @ head.T


# -- conversion -----------------------------------------------------------------------

@pytest.mark.parametrize('family,head,index', [
    ('illada', False, True), ('illada', True, False), ('llada', True, True)])
def test_round_trip_is_bit_exact(tmp_path, family, head, index):
  cfg = tiny_cfg(family)
  tensors = make_tensors(cfg, head=head)
  src = write_hf(tmp_path / 'hf', cfg, tensors, shards=3, index=index)
  got_cfg = convert.hf_to_orbax(src, tmp_path / 'ck', progress=False)
  assert got_cfg == cfg.replace(param_dtype='bfloat16')
  convert.orbax_to_hf(tmp_path / 'ck', tmp_path / 'back', shard_size='20KB', progress=False)

  back = read_hf(tmp_path / 'back')
  assert sorted(back) == sorted(tensors)
  for name, want in tensors.items():
    got = back[name]
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert got.tobytes() == want.tobytes(), name

  with open(tmp_path / 'back' / 'model.safetensors.index.json') as f:
    idx = json.load(f)
  assert idx['metadata']['total_size'] == sum(t.nbytes for t in tensors.values())
  assert sorted(idx['weight_map']) == sorted(tensors)
  shard_files = set(idx['weight_map'].values())
  assert len(shard_files) > 1 and all((tmp_path / 'back' / s).is_file() for s in shard_files)
  with open(tmp_path / 'back' / 'config.json') as f:
    assert json.load(f) == json.loads(json.dumps(cfg.to_hf()))
  for d in ('ck', 'back'):
    for name, text in TOKENIZER_FILES.items():
      assert (tmp_path / d / name).read_text() == text
  assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]


def test_round_trip_of_wide_tensors_is_bit_exact(tmp_path):
  """MLP matrices over 8 MB with rows not a multiple of 8: the threaded, packed transpose."""
  cfg = tiny_cfg('llada').replace(num_layers=1, d_model=1024, num_heads=16, num_kv_heads=4,
                                  head_dim=64, mlp_hidden=4100)
  tensors = make_tensors(cfg)
  assert tensors['model.transformer.blocks.0.ff_out.weight'].nbytes > 8 << 20
  write_hf(tmp_path / 'hf', cfg, tensors)
  convert.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', progress=False)
  params = illada_jax.load_checkpoint(tmp_path / 'ck')[1]
  np.testing.assert_array_equal(np.asarray(params['layers']['mlp']['down_proj'][0]),
                                tensors['model.transformer.blocks.0.ff_out.weight'].T)
  convert.orbax_to_hf(tmp_path / 'ck', tmp_path / 'back', progress=False)
  back = read_hf(tmp_path / 'back')
  for name, want in tensors.items():
    assert back[name].tobytes() == want.tobytes(), name


@pytest.mark.parametrize('shape,dtype', [
    ((2051, 1030), BF16), ((2053, 2050), BF16), ((1030, 2050), np.float32),
    ((37, 101), np.uint8), ((9, 5), np.float64), ((0, 7), BF16)])
def test_transpose2d_is_bit_exact(shape, dtype):
  """Random bits (NaN payloads included) through the packed transpose, threaded or not."""
  itemsize = np.dtype(dtype).itemsize
  a = np.frombuffer(np.random.default_rng(1).bytes(math.prod(shape) * itemsize),
                    dtype).reshape(shape)
  for pool in (None, rawio.BufferPool()):
    got = convert.transpose2d(a, pool)
    assert got.shape == shape[::-1] and got.dtype == a.dtype and got.flags.c_contiguous
    assert got.tobytes() == np.ascontiguousarray(a.T).tobytes()


def test_pooled_reads_of_unaligned_tensors_equal_plain_reads(tmp_path):
  """Large reads go around the page cache in aligned spans; the bytes must not shift."""
  rng = np.random.default_rng(2)
  tensors = {'a': rng.standard_normal((3,)).astype(BF16),  # leaves later offsets unaligned
             'b': rng.standard_normal((700, 1030)).astype(BF16),
             'c': rng.standard_normal((300, 1024)).astype(np.float32)}
  save_file(tensors, tmp_path / 'model.safetensors')
  entries = convert.HFSource(tmp_path).entries
  assert entries['b'].offset % 4096 and entries['b'].nbytes > rawio.BufferPool.MIN_BYTES
  pool = rawio.BufferPool()
  for name, want in tensors.items():
    got = convert.read_tensor(entries[name], pool=pool)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
  rows = convert.read_tensor(entries['c'], rows=(5, 297), pool=pool)  # > MIN_BYTES
  assert rows.tobytes() == tensors['c'][5:297].tobytes()


@pytest.mark.parametrize('direct', [True, False])
def test_safetensors_writer_with_and_without_o_direct(tmp_path, monkeypatch, direct):
  """Sizes that are not multiples of the 4 KiB block and span several staging buffers."""
  if not direct:
    monkeypatch.delattr(os, 'O_DIRECT', raising=False)
  monkeypatch.setattr(rawio.DirectFile.__init__, '__defaults__', (1 << 16,))  # 64 KiB staging
  rng = np.random.default_rng(3)
  arrays = {'x': rng.standard_normal((3,)).astype(BF16),
            'y': rng.standard_normal((300, 77)).astype(np.float32),
            'z': rng.standard_normal((1,)).astype(np.float16)}
  tensors = [convert.OutTensor(n, a.dtype, a.shape, lambda a=a: [a[:1], a[1:]])
             for n, a in arrays.items()]
  convert.write_safetensors(str(tmp_path), tensors, shard_size=50_000)
  back = read_hf(tmp_path)
  assert sorted(back) == sorted(arrays)
  for name, want in arrays.items():
    assert back[name].dtype == want.dtype and back[name].tobytes() == want.tobytes()
  for f in tmp_path.glob('*.safetensors'):  # no block padding left at the end
    entries = convert.read_header(str(f))
    assert f.stat().st_size == max(e.offset + e.nbytes for e in entries.values())


def test_direct_writer_falls_back_when_a_write_refuses_o_direct(tmp_path, monkeypatch):
  import errno
  import fcntl
  pwrite = os.pwrite

  def refuse_direct(fd, data, offset):
    if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, 'O_DIRECT', 0):
      raise OSError(errno.EINVAL, 'Invalid argument')
    return pwrite(fd, data, offset)

  monkeypatch.setattr(os, 'pwrite', refuse_direct)
  data = np.random.default_rng(4).integers(0, 256, 3 * (1 << 16) + 5, np.uint8)
  with rawio.DirectFile(str(tmp_path / 'f'), buffer_bytes=1 << 16) as f:
    f.write(data[:100])
    f.write(data[100:])
  assert (tmp_path / 'f').read_bytes() == data.tobytes()


@pytest.mark.parametrize('direct', [True, False])
def test_direct_writer_stores_strided_arrays_in_c_order(tmp_path, monkeypatch, direct):
  """Strided slabs larger than the buffer, straddling its end, at odd byte offsets."""
  if not direct:
    monkeypatch.delattr(os, 'O_DIRECT', raising=False)
  rng = np.random.default_rng(5)
  big = rng.standard_normal((70, 300, 6)).astype(np.float32)
  parts = [big[:, 7:250, 1:5],  # 3-D, rows of 3.9 KB: 283 KB across 64 KiB buffers
           big[5, ::3, 2],  # 1-D, stride 72 B
           big[:, 0, :3].astype(np.float16)[:, ::-1],  # negative stride
           big[3:4, :, 0:1].T,  # Fortran order, one column
           big[:0, :, 1:2]]  # empty
  with rawio.DirectFile(str(tmp_path / 'f'), buffer_bytes=1 << 16) as f:
    f.write(b'abc')  # everything after it sits at an odd offset
    for p in parts:
      assert not p.flags.c_contiguous or p.size == 0
      f.write_array(p)
  want = b'abc' + b''.join(np.ascontiguousarray(p).tobytes() for p in parts)
  assert (tmp_path / 'f').read_bytes() == want


def test_buffer_pool_hands_out_a_buffer_again_only_once_released():
  pool = rawio.BufferPool(per_size=2)
  shape = (1 << 19,)  # 1 MiB of int16
  a = pool.empty(shape, np.int16)
  b = pool.empty(shape, np.int16)
  assert a.ctypes.data != b.ctypes.data
  view, address = a[::3], a.ctypes.data
  del a
  c = pool.empty(shape, np.int16)  # `view` still holds a's memory
  assert c.ctypes.data not in (address, b.ctypes.data)
  del view
  d = pool.empty((1 << 18,), np.float32)  # same byte size, other shape and dtype
  assert d.ctypes.data == address and d.shape == (1 << 18,) and d.dtype == np.float32
  small = pool.empty((16,), np.int16)
  assert small.base is None  # below MIN_BYTES: plain numpy


def test_float32_round_trip_and_dtype_option(tmp_path):
  cfg = tiny_cfg('illada')
  tensors = make_tensors(cfg, dtype=np.float32)
  write_hf(tmp_path / 'hf', cfg, tensors)
  got = convert.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', dtype='float32', progress=False)
  assert got.param_dtype == 'float32'
  convert.orbax_to_hf(tmp_path / 'ck', tmp_path / 'back', progress=False)
  back = read_hf(tmp_path / 'back')
  assert all(back[n].dtype == np.float32 and np.array_equal(back[n], t) for n, t in tensors.items())
  # bfloat16 storage of a float32 source rounds each value.
  convert.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck16', progress=False)
  _, params = illada_jax.load_checkpoint(tmp_path / 'ck16')
  assert params['final_norm']['scale'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(params['final_norm']['scale']),
                                tensors['model.norm.weight'].astype(BF16))


@pytest.mark.parametrize('family', ['illada', 'llada'])
def test_logits_from_converted_checkpoint_match_reference(tmp_path, family):
  cfg = tiny_cfg(family)
  tensors = make_tensors(cfg, seed=1)
  write_hf(tmp_path / 'hf', cfg, tensors)
  convert.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', dtype='float32', progress=False)
  got_cfg, params = illada_jax.load_checkpoint(tmp_path / 'ck')
  run_cfg = got_cfg.replace(compute_dtype='float32', remat_policy='none')
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12), dtype=np.int32)
  got = np.asarray(illada_jax.forward(run_cfg, params, jnp.asarray(tokens)))
  want = reference_logits(cfg, tensors, tokens)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_mesh_option_sets_read_chunks_to_device_shards(tmp_path):
  cfg = tiny_cfg('illada')
  write_hf(tmp_path / 'hf', cfg, make_tensors(cfg))
  convert.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', mesh='data=1,fsdp=2,tensor=2',
                      progress=False)

  def inner_chunk(name):
    with open(tmp_path / 'ck' / 'params' / name / 'zarr.json') as f:
      meta = json.load(f)
    return meta['codecs'][0]['configuration']['chunk_shape']

  d, f = cfg.d_model, cfg.mlp_hidden
  assert inner_chunk('layers.mlp.gate_proj') == [1, d // 2, f // 2]  # embed->fsdp, mlp->tensor
  assert inner_chunk('layers.attn.k_proj') == [1, d // 2, 1, cfg.head_dim]
  assert inner_chunk('embedder.embedding') == [cfg.vocab_size // 2, d // 2]


def test_direct_shard_reads_equal_tensorstore_reads(tmp_path):
  """Regions within one shard, across inner chunks, partial and at the array's edge."""
  from illada_jax import checkpoint
  cfg = tiny_cfg('llada').replace(vocab_size=130)  # table shards of 128 rows and of 2
  write_hf(tmp_path / 'hf', cfg, make_tensors(cfg))
  convert.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', mesh='data=1,fsdp=2,tensor=2',
                      progress=False)
  arrays = checkpoint.open_stored_arrays(tmp_path / 'ck')
  pool = rawio.BufferPool()
  pool.MIN_BYTES = 0  # pooled (page-aligned) buffers for these tiny reads too
  indices = {'layers/mlp/gate_proj': [0, 1, (1, slice(3, 40))],
             'layers/attn/k_proj': [1, (0, slice(None), 1)],
             'embedder/embedding': [slice(0, 128), slice(7, 61), slice(128, 130),
                                    (slice(100, 120), slice(5, 9))],
             'final_norm/scale': [(), slice(10, 20)]}
  for key, cases in indices.items():
    raw = rawio.RawZarr3.open(arrays[key])
    assert raw is not None, key
    for index in cases:
      got = raw.read(index, pool)
      want = arrays[key][index].read().result()
      assert got is not None and got.shape == want.shape, (key, index)
      assert got.tobytes() == want.tobytes(), (key, index)
  # A region over two shards is left to TensorStore.
  assert rawio.RawZarr3.open(arrays['layers/mlp/gate_proj']).read(slice(0, 2), pool) is None
  assert rawio.RawZarr3.open(arrays['embedder/embedding']).read(slice(120, 130), pool) is None


def test_streaming_save_writes_every_shard_directly(tmp_path, monkeypatch):
  written = []
  write = rawio.RawZarr3.write
  monkeypatch.setattr(rawio.RawZarr3, 'write',
                      lambda self, index, data: written.append(write(self, index, data)) or
                      written[-1])
  cfg = tiny_cfg('illada')
  tensors = make_tensors(cfg)
  write_hf(tmp_path / 'hf', cfg, tensors)
  convert.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', progress=False)
  assert written == [True] * (9 * cfg.num_layers + 2)  # 9 per layer, embedding, final norm
  _, params = illada_jax.load_checkpoint(tmp_path / 'ck')  # read back by Orbax/TensorStore
  np.testing.assert_array_equal(np.asarray(params['layers']['attn']['o_proj'][1]).reshape(
      -1, cfg.d_model).T, tensors['model.layers.1.self_attn.o_proj.weight'])


def test_direct_shard_reads_refuse_a_corrupt_index(tmp_path):
  from illada_jax import checkpoint
  cfg = tiny_cfg('illada')
  write_hf(tmp_path / 'hf', cfg, make_tensors(cfg))
  convert.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', progress=False)
  shard = tmp_path / 'ck' / 'params' / 'layers.attn.q_proj' / 'c' / '1' / '0' / '0' / '0'
  data = bytearray(shard.read_bytes())
  data[-10] ^= 1  # inside the index: its CRC-32C no longer matches
  shard.write_bytes(bytes(data))
  raw = rawio.RawZarr3.open(checkpoint.open_stored_arrays(tmp_path / 'ck')['layers/attn/q_proj'])
  assert raw.read(0, rawio.BufferPool()) is not None
  assert raw.read(1, rawio.BufferPool()) is None


def test_crc32c_check_value():
  assert rawio.crc32c(b'123456789') == 0xE3069283


# -- bad input ------------------------------------------------------------------------

def _bad_case(tmp_path, case):
  """Builds the broken source of `case`; returns (src, dst, [strings the error must name])."""
  cfg = tiny_cfg('illada')
  tensors = make_tensors(cfg)
  src, dst = tmp_path / 'hf', tmp_path / 'ck'
  hf_config = None
  k0 = 'model.layers.0.self_attn.k_proj.weight'  # [32, 64]: transposing changes the shape
  if case == 'missing_tensor':
    del tensors['model.layers.1.mlp.up_proj.weight']
    expect = ['model.layers.1.mlp.up_proj.weight', 'missing']
  elif case == 'unexpected_tensor':
    tensors['model.layers.0.self_attn.rotary_emb.inv_freq'] = np.ones(8, np.float32)
    expect = ['model.layers.0.self_attn.rotary_emb.inv_freq', 'unexpected', '.safetensors']
  elif case == 'wrong_shape':
    tensors[k0] = np.ascontiguousarray(tensors[k0].T)
    expect = [k0, 'shape', '.safetensors']
  elif case == 'unsupported_dtype':
    tensors['model.norm.weight'] = tensors['model.norm.weight'].astype(np.float64)
    expect = ['model.norm.weight', 'F64', 'dtype']
  elif case == 'config_layers':
    hf_config = {**cfg.to_hf(), 'num_hidden_layers': 3}
    expect = ['model.layers.2.', 'missing', 'config.json']
  elif case == 'config_width':
    hf_config = {**cfg.to_hf(), 'intermediate_size': 128}
    expect = ['mlp.gate_proj.weight', 'shape', 'config.json']
  elif case == 'tied_head_differs':
    tensors['lm_head.weight'] = tensors['model.embed_tokens.weight'] + BF16(1)
    expect = ['lm_head.weight', 'differs']
  write_hf(src, cfg, tensors, hf_config=hf_config)
  if case == 'truncated_shard':
    shard = src / 'model-00002-of-00002.safetensors'
    shard.write_bytes(shard.read_bytes()[:-100])
    expect = ['model-00002-of-00002.safetensors', 'truncated', 'tensor ']
  elif case == 'missing_shard':
    os.remove(src / 'model-00001-of-00002.safetensors')
    expect = ['model.safetensors.index.json', 'model-00001-of-00002.safetensors',
              'does not exist']
  elif case == 'pickle_only':
    for p in src.glob('model*'):
      os.remove(p)
    (src / 'pytorch_model.bin').write_bytes(b'\x80\x04not a real pickle')
    expect = ['pytorch_model.bin', 'safetensors first']
  elif case == 'destination_exists':
    dst.mkdir()
    (dst / 'keep.txt').write_text('mine')
    expect = [str(dst), 'exists', '--overwrite']
  return src, dst, expect


BAD_CASES = ['truncated_shard', 'missing_shard', 'missing_tensor', 'unexpected_tensor',
             'wrong_shape', 'unsupported_dtype', 'config_layers', 'config_width',
             'tied_head_differs', 'pickle_only', 'destination_exists']


@pytest.mark.parametrize('case', BAD_CASES)
def test_bad_input_is_refused_clearly(tmp_path, case, capsys):
  src, dst, expect = _bad_case(tmp_path, case)
  with pytest.raises(convert.ConversionError) as info:
    convert.hf_to_orbax(src, dst, progress=False)
  assert isinstance(info.value, ValueError)
  for s in expect:
    assert s in str(info.value), (s, str(info.value))
  # The CLI: exit status 2, the message on stderr, nothing left behind.
  assert cli.main(['hf-to-orbax', str(src), str(dst), '--quiet']) == 2
  err = capsys.readouterr().err
  assert 'error' in err and expect[0] in err
  if case == 'destination_exists':
    assert os.listdir(dst) == ['keep.txt']
  else:
    assert not dst.exists()
  assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]


def test_overwrite_replaces_destination(tmp_path):
  cfg = tiny_cfg('llada')
  write_hf(tmp_path / 'hf', cfg, make_tensors(cfg))
  (tmp_path / 'ck').mkdir()
  (tmp_path / 'ck' / 'stale.txt').write_text('old')
  assert cli.main(['hf-to-orbax', str(tmp_path / 'hf'), str(tmp_path / 'ck'), '--overwrite',
                   '--quiet']) == 0
  assert not (tmp_path / 'ck' / 'stale.txt').exists()
  assert (tmp_path / 'ck' / 'model_config.json').is_file()
  assert cli.main(['orbax-to-hf', str(tmp_path / 'ck'), str(tmp_path / 'hf'), '--quiet']) == 2
  assert cli.main(['orbax-to-hf', str(tmp_path / 'ck'), str(tmp_path / 'hf'), '--overwrite',
                   '--quiet']) == 0


def test_orbax_to_hf_refuses_non_checkpoint(tmp_path, capsys):
  (tmp_path / 'empty').mkdir()
  assert cli.main(['orbax-to-hf', str(tmp_path / 'empty'), str(tmp_path / 'out')]) == 2
  assert 'model_config.json' in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()
  with pytest.raises(convert.ConversionError, match='shard-size'):
    convert.parse_size('five gigs')
  assert convert.parse_size('5GB') == 5 * 10**9 and convert.parse_size('2MiB') == 2 << 20


def test_tools_script_runs_the_same_cli(tmp_path):
  cfg = tiny_cfg('illada')
  write_hf(tmp_path / 'hf', cfg, make_tensors(cfg))
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  run = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'convert_checkpoint.py'),
                        'hf-to-orbax', str(tmp_path / 'hf'), str(tmp_path / 'ck')],
                       capture_output=True, text=True, env=env, timeout=120)
  assert run.returncode == 0, run.stderr
  assert 'tensors' in run.stderr  # the progress bar
  run = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'convert_checkpoint.py'),
                        'hf-to-orbax', str(tmp_path / 'hf'), str(tmp_path / 'ck')],
                       capture_output=True, text=True, env=env, timeout=120)
  assert run.returncode == 2 and 'exists' in run.stderr


# -- transformers reads what we write -------------------------------------------------

@pytest.mark.torch
def test_transformers_loads_converted_llama_layout(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  cfg = tiny_cfg('illada').replace(tie_embeddings=False)
  tensors = make_tensors(cfg, seed=3)
  write_hf(tmp_path / 'hf', cfg, tensors)
  convert.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', progress=False)
  convert.orbax_to_hf(tmp_path / 'ck', tmp_path / 'back', shard_size='30KB', progress=False)
  with open(tmp_path / 'back' / 'config.json') as f:
    hf = json.load(f)
  hf['model_type'] = 'llama'
  hf['architectures'] = ['LlamaForCausalLM']
  with open(tmp_path / 'back' / 'config.json', 'w') as f:
    json.dump(hf, f)
  model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'back',
                                                        torch_dtype=torch.bfloat16)
  state = model.state_dict()
  for name in ('model.layers.1.mlp.gate_proj.weight', 'model.layers.0.self_attn.k_proj.weight',
               'lm_head.weight'):
    got = state[name].float().numpy()
    np.testing.assert_array_equal(got, tensors[name].astype(np.float32))
