"""Pins what `checkpoint._orbax_stream` relies on in Orbax beyond `StandardCheckpointer`.

A streamed item must be indistinguishable from a stock numpy save (same tree
metadata) and restore with the stock API; slice reads must agree on every
item layout Orbax writes (streamed zarr3, stock OCDBT, plain zarr v2).
"""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from illada_jax.checkpoint import _orbax_stream

RNG = np.random.default_rng(0)
ARRAYS = {'layers': {'w': RNG.standard_normal((4, 6, 8)).astype(np.float32)},
          'norm': RNG.standard_normal((8,)).astype(np.float32)}


def _lazy_tree():
  w, norm = ARRAYS['layers']['w'], ARRAYS['norm']
  return {
      'layers': {'w': _orbax_stream.LazyArray(w.shape, w.dtype, (1, 6, 8),
                                              lambda: ((i, w[i]) for i in range(4)))},
      'norm': _orbax_stream.LazyArray(norm.shape, norm.dtype, norm.shape,
                                      lambda: [((), norm)]),
  }


def _stock_save(path, use_ocdbt, use_zarr3):
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(str(path), args=ocp.args.PyTreeSave(ARRAYS))
  return str(path)


def _metadata(path):
  with open(f'{path}/_METADATA') as f:
    return json.load(f)


def test_streamed_item_is_a_numpy_item_to_orbax(tmp_path):
  _orbax_stream.save_streaming(tmp_path / 'streamed', _lazy_tree())
  stock = _stock_save(tmp_path / 'stock', use_ocdbt=False, use_zarr3=True)
  assert _metadata(tmp_path / 'streamed') == _metadata(stock)
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'streamed')
  np.testing.assert_array_equal(restored['layers']['w'], ARRAYS['layers']['w'])
  np.testing.assert_array_equal(restored['norm'], ARRAYS['norm'])
  assert set(_orbax_stream.stored_arrays(tmp_path / 'streamed')) == {'layers/w', 'norm'}


@pytest.mark.parametrize('layout', ['streamed', 'ocdbt_zarr2', 'plain_zarr2', 'ocdbt_zarr3'])
def test_slice_reads_agree_on_every_item_layout(tmp_path, layout):
  path = tmp_path / layout
  if layout == 'streamed':
    _orbax_stream.save_streaming(path, _lazy_tree())
  else:
    _stock_save(path, use_ocdbt=layout.startswith('ocdbt'), use_zarr3=layout.endswith('zarr3'))
  arrays = _orbax_stream.open_stored_arrays(path)
  assert sorted(arrays) == ['layers/w', 'norm']
  w = ARRAYS['layers']['w']
  np.testing.assert_array_equal(arrays['layers/w'][1].read().result(), w[1])
  np.testing.assert_array_equal(arrays['layers/w'][:, 2:4].read().result(), w[:, 2:4])
  np.testing.assert_array_equal(arrays['norm'].read().result(), ARRAYS['norm'])
