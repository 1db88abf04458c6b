"""safetensors reading (through `safe_open`, O_DIRECT for large tensors) and streamed writing."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from illada_jax.checkpoint import _rawio, safetensors_io
from helpers import BF16, read_hf


def test_pooled_reads_of_unaligned_tensors_equal_plain_reads(tmp_path):
  """Large reads go around the page cache in aligned spans; the bytes must not shift."""
  rng = np.random.default_rng(2)
  tensors = {'a': rng.standard_normal((3,)).astype(BF16),  # leaves later offsets unaligned
             'b': rng.standard_normal((700, 1030)).astype(BF16),
             'c': rng.standard_normal((300, 1024)).astype(np.float32)}
  save_file(tensors, tmp_path / 'model.safetensors')
  entries = safetensors_io.HFSource(tmp_path).entries
  assert entries['b'].offset % 4096 and entries['b'].nbytes > _rawio.BufferPool.MIN_BYTES
  pool = _rawio.BufferPool()
  for name, want in tensors.items():
    got = safetensors_io.read_tensor(entries[name], pool=pool)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
  rows = safetensors_io.read_tensor(entries['c'], rows=(5, 297), pool=pool)  # > MIN_BYTES
  assert rows.tobytes() == tensors['c'][5:297].tobytes()


@pytest.mark.parametrize('direct', [True, False])
def test_safetensors_writer_with_and_without_o_direct(tmp_path, monkeypatch, direct):
  """Sizes that are not multiples of the 4 KiB block and span several staging buffers."""
  if not direct:
    monkeypatch.delattr(os, 'O_DIRECT', raising=False)
  defaults = _rawio.DirectFile.__init__.__defaults__
  monkeypatch.setattr(_rawio.DirectFile.__init__, '__defaults__', (1 << 16,) + defaults[1:])  # 64 KiB
  rng = np.random.default_rng(3)
  arrays = {'x': rng.standard_normal((3,)).astype(BF16),
            'y': rng.standard_normal((300, 77)).astype(np.float32),
            'z': rng.standard_normal((1,)).astype(np.float16)}
  tensors = [safetensors_io.OutTensor(n, a.dtype, a.shape, lambda a=a: [a[:1], a[1:]])
             for n, a in arrays.items()]
  safetensors_io.write_safetensors(str(tmp_path), tensors, shard_size=50_000)
  back = read_hf(tmp_path)
  assert sorted(back) == sorted(arrays)
  for name, want in arrays.items():
    assert back[name].dtype == want.dtype and back[name].tobytes() == want.tobytes()
  for f in tmp_path.glob('*.safetensors'):  # no block padding left at the end
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], 'little')
    header = json.loads(raw[8:8 + n])
    assert len(raw) == 8 + n + max(e['data_offsets'][1] for k, e in header.items()
                                   if k != '__metadata__')
