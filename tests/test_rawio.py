"""Private fast I/O of the converter: O_DIRECT writer, buffer pool (`_rawio`), zarr3 shard files
(`_zarr3`)."""

import errno
import fcntl
import os

import numpy as np
import pytest

import illada_jax

from illada_jax import checkpoint
from illada_jax.checkpoint import _orbax_stream, _rawio, _zarr3, store
from helpers import make_tensors, tiny_cfg, write_hf


def test_direct_writer_falls_back_when_a_write_refuses_o_direct(tmp_path, monkeypatch):
  pwrite = os.pwrite

  def refuse_direct(fd, data, offset):
    if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, 'O_DIRECT', 0):
      raise OSError(errno.EINVAL, 'Invalid argument')
    return pwrite(fd, data, offset)

  monkeypatch.setattr(os, 'pwrite', refuse_direct)
  data = np.random.default_rng(4).integers(0, 256, 3 * (1 << 16) + 5, np.uint8)
  with _rawio.DirectFile(str(tmp_path / 'f'), buffer_bytes=1 << 16) as f:
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
  with _rawio.DirectFile(str(tmp_path / 'f'), buffer_bytes=1 << 16) as f:
    f.write(b'abc')  # everything after it sits at an odd offset
    for p in parts:
      assert not p.flags.c_contiguous or p.size == 0
      f.write_array(p)
  want = b'abc' + b''.join(np.ascontiguousarray(p).tobytes() for p in parts)
  assert (tmp_path / 'f').read_bytes() == want


def test_buffer_pool_hands_out_a_buffer_again_only_once_released():
  pool = _rawio.BufferPool(per_size=2)
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


def test_direct_shard_reads_equal_tensorstore_reads(tmp_path):
  """Regions within one shard, across inner chunks, partial and at the array's edge."""
  cfg = tiny_cfg('llada').replace(vocab_size=130)  # table shards of 128 rows and of 2
  write_hf(tmp_path / 'hf', cfg, make_tensors(cfg))
  checkpoint.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', mesh='data=1,fsdp=2,tensor=2',
                      progress=False)
  arrays = _orbax_stream.open_stored_arrays(store.params_dir(tmp_path / 'ck'))
  pool = _rawio.BufferPool()
  pool.MIN_BYTES = 0  # pooled (page-aligned) buffers for these tiny reads too
  indices = {'layers/mlp/gate_proj': [0, 1, (1, slice(3, 40))],
             'layers/attn/k_proj': [1, (0, slice(None), 1)],
             'embedder/embedding': [slice(0, 128), slice(7, 61), slice(128, 130),
                                    (slice(100, 120), slice(5, 9))],
             'final_norm/scale': [(), slice(10, 20)]}
  for key, cases in indices.items():
    raw = _zarr3.RawZarr3.open(arrays[key])
    assert raw is not None, key
    for index in cases:
      got = raw.read(index, pool)
      want = arrays[key][index].read().result()
      assert got is not None and got.shape == want.shape, (key, index)
      assert got.tobytes() == want.tobytes(), (key, index)
  # A region over two shards is left to TensorStore.
  assert _zarr3.RawZarr3.open(arrays['layers/mlp/gate_proj']).read(slice(0, 2), pool) is None
  assert _zarr3.RawZarr3.open(arrays['embedder/embedding']).read(slice(120, 130), pool) is None


def test_streaming_save_writes_every_shard_directly(tmp_path, monkeypatch):
  written = []  # every shard goes through write_pieces (write hands its chunks to it)
  write = _zarr3.RawZarr3.write_pieces
  monkeypatch.setattr(_zarr3.RawZarr3, 'write_pieces',
                      lambda self, *args: written.append(write(self, *args)) or written[-1])
  cfg = tiny_cfg('illada')
  tensors = make_tensors(cfg)
  write_hf(tmp_path / 'hf', cfg, tensors)
  checkpoint.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', progress=False)
  assert written == [True] * (9 * cfg.num_layers + 2)  # 9 per layer, embedding, final norm
  _, params = illada_jax.load_checkpoint(tmp_path / 'ck')  # read back by Orbax/TensorStore
  np.testing.assert_array_equal(np.asarray(params['layers']['attn']['o_proj'][1]).reshape(
      -1, cfg.d_model).T, tensors['model.layers.1.self_attn.o_proj.weight'])


def test_direct_shard_reads_refuse_a_corrupt_index(tmp_path):
  cfg = tiny_cfg('illada')
  write_hf(tmp_path / 'hf', cfg, make_tensors(cfg))
  checkpoint.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', progress=False)
  shard = tmp_path / 'ck' / 'params' / 'layers.attn.q_proj' / 'c' / '1' / '0' / '0' / '0'
  data = bytearray(shard.read_bytes())
  data[-10] ^= 1  # inside the index: its CRC-32C no longer matches
  shard.write_bytes(bytes(data))
  arrays = _orbax_stream.open_stored_arrays(store.params_dir(tmp_path / 'ck'))
  raw = _zarr3.RawZarr3.open(arrays['layers/attn/q_proj'])
  assert raw.read(0, _rawio.BufferPool()) is not None
  assert raw.read(1, _rawio.BufferPool()) is None


def test_crc32c_check_value():
  assert _zarr3.crc32c(b'123456789') == 0xE3069283


@pytest.mark.parametrize('direct', [True, False])
def test_direct_writer_writes_aligned_arrays_without_a_copy(tmp_path, monkeypatch, direct):
  if not direct:
    monkeypatch.delattr(os, 'O_DIRECT', raising=False)
  written = []
  pwrite_all = _rawio._pwrite_all
  monkeypatch.setattr(_rawio, '_pwrite_all',
                      lambda fd, data, offset: written.append(data) or pwrite_all(fd, data, offset))
  pool = _rawio.BufferPool()
  a = pool.empty((3 << 20,), np.uint8)  # page-aligned, 3 MiB
  a[:] = np.random.default_rng(6).integers(0, 256, a.shape, np.uint8)
  b = pool.empty((1 << 20,), np.float32)
  b[:] = np.arange(b.size)
  with _rawio.DirectFile(str(tmp_path / 'f'), buffer_bytes=1 << 16) as f:
    f.write(a)  # empty staging buffer: straight from `a`
    f.write(b'h' * 4096)  # staged, like a safetensors header padded to 4 KiB
    f.write(b.view(np.uint8))  # staged until the buffer is full, then straight from `b`
    f.write(b'xyz')
  assert (tmp_path / 'f').read_bytes() == a.tobytes() + b'h' * 4096 + b.tobytes() + b'xyz'
  from_a = [w for w in written if np.shares_memory(w, a)]
  from_b = [w for w in written if np.shares_memory(w, b)]
  if direct:
    assert [w.nbytes for w in from_a] == [a.nbytes] and sum(w.nbytes for w in from_b) > 3 << 20
  else:  # buffered files go through the staging buffer
    assert not from_a and not from_b


def test_whole_shards_of_slabs_and_single_chunks_are_read_without_a_copy(tmp_path, monkeypatch):
  """Small read chunks: tables split into row slabs, layer tensors into blocks of HF rows."""
  monkeypatch.setattr(_orbax_stream, 'READ_CHUNK_BYTES', 2048)
  cfg = tiny_cfg('llada').replace(vocab_size=130)  # table shards of 128 rows and of 2
  write_hf(tmp_path / 'hf', cfg, make_tensors(cfg))
  checkpoint.hf_to_orbax(tmp_path / 'hf', tmp_path / 'ck', progress=False)
  arrays = _orbax_stream.open_stored_arrays(store.params_dir(tmp_path / 'ck'))
  fast = []
  for name in ('_read_slabs', '_read_one_chunk'):
    method = getattr(_zarr3.RawZarr3, name)
    monkeypatch.setattr(_zarr3.RawZarr3, name, lambda *a, method=method, name=name: fast.append(
        (name, method(*a) is not None)) or method(*a))
  pool = _rawio.BufferPool()
  pool.MIN_BYTES = 0
  gate = _zarr3.RawZarr3.open(arrays['layers/mlp/gate_proj'])
  assert gate.inner[:2] == gate.chunk[:2] and gate.inner[2] < gate.chunk[2]  # HF row blocks
  f = gate.inner[2]
  d = _zarr3.RawZarr3.open(arrays['layers/attn/o_proj']).inner[3]
  # (key, index, the read that returns it without a copy, or None: chunk by chunk). An
  # lm_head edge shard is short in its last dimension, so its padding lies between rows.
  for key, index, path in [
      ('embedder/embedding', slice(0, 128), '_read_slabs'),
      ('embedder/embedding', slice(128, 130), '_read_slabs'),
      ('layers/mlp/gate_proj', (1, slice(None), slice(f, 2 * f)), '_read_one_chunk'),
      ('layers/attn/o_proj', (0, slice(None), slice(None), slice(d, 2 * d)), '_read_one_chunk'),
      ('layers/mlp/gate_proj', 1, None),
      ('lm_head', (slice(None), slice(128, 130)), None)]:
    raw = _zarr3.RawZarr3.open(arrays[key])
    fast.clear()
    got = raw.read(index, pool)
    want = arrays[key][index].read().result()
    assert got.shape == want.shape and got.tobytes() == want.tobytes(), (key, index)
    assert [n for n, ok in fast if ok] == ([path] if path else []), (key, index, fast)