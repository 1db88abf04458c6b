"""Limits follow the model: variable-length generation is capped at the model's window."""

import pytest

from illada_jax import engine
from illada_jax.sampling import SamplingOptions

from helpers import LLADA, make_params


def test_variable_length_gen_length_is_capped_in_blocks_at_the_window():
  eng = engine.Engine(LLADA, make_params(LLADA), slots=2)  # max_len 64
  o = SamplingOptions(gen_length=100000, block_length=4, steps=2, variable_length=True)
  assert eng.options_for(o).gen_length == 60  # 15 blocks and at least one prompt token
  req = lambda opts: engine.Request(id=0, prompt_ids=(7, 8, 9), options=opts, seed=1)
  (capped,) = eng.generate([req(o)])
  (exact,) = eng.generate([req(o.replace(gen_length=60))])
  assert capped.token_ids == exact.token_ids and capped.finish_reason == exact.finish_reason
  assert eng.options_for(o.replace(gen_length=32)).gen_length == 32  # within the window: kept
  with pytest.raises(ValueError, match='block_length: 64 leaves no room'):
    eng.options_for(SamplingOptions(gen_length=128, block_length=64, variable_length=True))
