"""The HF name table against the names spelled out per family in `helpers` (SPEC §1)."""

import jax
import pytest

import illada_jax
from illada_jax.checkpoint import hf_names
from helpers import head_name, hf_names as spelled_out, tiny_cfg


@pytest.mark.parametrize('family', ['illada', 'llada'])
@pytest.mark.parametrize('tied', [True, False])
def test_layout_names_shapes_and_parameter_paths(family, tied):
  cfg = tiny_cfg(family).replace(tie_embeddings=tied)
  maps = hf_names.layout(cfg)
  got = {m.hf_name(i): m.hf_shape for m in maps
         for i in (range(cfg.num_layers) if m.stacked else [None])}
  assert got == spelled_out(cfg, head=not tied)
  assert hf_names.head_name(cfg) == head_name(cfg)
  # Every parameter of the model appears once, with the shape the layout implies.
  abstract = illada_jax.abstract_params(cfg)
  params = {'/'.join(k.key for k in keys): leaf.shape
            for keys, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  assert {m.key: m.shape(cfg) for m in maps} == params
