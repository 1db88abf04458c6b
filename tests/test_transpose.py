"""The bit-exact packed transpose of the converter."""

import math

import numpy as np
import pytest

from illada_jax.checkpoint import _rawio, _transpose
from helpers import BF16


@pytest.mark.parametrize('shape,dtype', [
    ((2051, 1030), BF16), ((2053, 2050), BF16), ((1030, 2050), np.float32),
    ((37, 101), np.uint8), ((9, 5), np.float64), ((0, 7), BF16)])
def test_transpose2d_is_bit_exact(shape, dtype):
  """Random bits (NaN payloads included) through the packed transpose, threaded or not."""
  itemsize = np.dtype(dtype).itemsize
  a = np.frombuffer(np.random.default_rng(1).bytes(math.prod(shape) * itemsize),
                    dtype).reshape(shape)
  for pool in (None, _rawio.BufferPool()):
    got = _transpose.transpose2d(a, pool)
    assert got.shape == shape[::-1] and got.dtype == a.dtype and got.flags.c_contiguous
    assert got.tobytes() == np.ascontiguousarray(a.T).tobytes()
