"""int8 weight-only inference through qwix (illada_jax.quant): the weights, the model,
sampling, the engine, checkpoints, the CLIs and the lm-eval adapter."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import illada_jax
from illada_jax import engine, prompts, quant, sampling, scoring
from illada_jax.cli import sample as sample_cli
from illada_jax.cli import score as score_cli

from helpers import LLADA
from helpers import WORD_CFG
from helpers import make_params, tiny_cfg, word_checkpoint, write_jsonl

OPTS = sampling.SamplingOptions(gen_length=8, block_length=4, steps=8)
FLAGS = ['--gen-length', '8', '--block-length', '4', '--steps', '8', '--no-progress']


def _paths(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _paths(v, prefix + (k,))
    else:
      yield prefix + (k,), v


@pytest.mark.parametrize('family,scan,mode', [('illada', True, 'int8'), ('illada', False, 'int8_head'),
                                              ('llada', True, 'int8_head'), ('llada', False, 'int8')])
def test_weights_are_symmetric_int8_per_output_channel(family, scan, mode):
  """Each quantized weight: int8 values, one float32 scale per output channel (and layer)
  equal to max|w| / 127.5 over the contracted axes (qwix's symmetric bound), and |w - q * scale| <= scale / 2."""
  cfg = tiny_cfg(family).replace(scan_layers=scan)
  params = illada_jax.init_params(cfg, jax.random.key(0))
  qcfg, qp = quant.quantize_params(cfg, params, mode)
  assert qcfg.quantize == mode
  want = set(quant.quantized_names(qcfg))
  assert ('lm_head' in want) == (mode == 'int8_head' and not cfg.tie_embeddings)
  assert ('embedding' in want) == (mode == 'int8_head' and cfg.tie_embeddings)
  floats = dict(_paths(params))
  seen = set()
  for path, leaf in _paths(qp):
    w = np.asarray(floats[path], np.float32)
    if path[-1] not in want:
      assert leaf is floats[path]
      continue
    seen.add(path[-1])
    assert quant.is_qarray(leaf) and leaf.qvalue.dtype == jnp.int8
    assert leaf.scale.dtype == jnp.float32
    contracted = {'o_proj': (-3, -2), 'down_proj': (-2,), 'lm_head': (-2,),
                  'embedding': (-1,)}.get(path[-1], (-3,) if 'attn' in path else (-2,))
    absmax = np.abs(w).max(axis=contracted, keepdims=True)
    np.testing.assert_allclose(np.asarray(leaf.scale), absmax / 127.5, rtol=1e-6)
    q, s = np.asarray(leaf.qvalue, np.float32), np.asarray(leaf.scale)
    assert q.min() >= -128 and q.max() <= 127 and np.abs(q).max() >= 127
    assert np.all(np.abs(w - q * s) <= s / 2 * (1 + 1e-4))
  assert seen == want


@pytest.mark.parametrize('family', ['illada', 'llada'])
@pytest.mark.parametrize('mode', ['int8', 'int8_head'])
def test_int8_forward_is_the_float_model_on_the_dequantized_weights(family, mode):
  """qwix's PTQ dot_general computes exactly the float model with int8 * scale weights
  (float32 here), and differs from the float weights' logits."""
  cfg = tiny_cfg(family).replace(param_dtype='float32', compute_dtype='float32')
  params = illada_jax.init_params(cfg, jax.random.key(0))
  qcfg, qp = quant.quantize_params(cfg, params, mode)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  mask = jnp.ones((2, 12), jnp.int32).at[0, :3].set(0)
  got = illada_jax.forward(qcfg, qp, tokens, mask)
  assert got.dtype == jnp.float32
  ref = illada_jax.forward(cfg, quant.dequantize_params(qp), tokens, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=0)
  assert float(jnp.abs(got - illada_jax.forward(cfg, params, tokens, mask)).max()) > 1e-3


@pytest.mark.slow
def test_engine_and_sample_take_the_quantized_tree():
  """`Engine(qcfg, qparams)` gives each request the tokens `sample(qcfg, qparams)` gives it
  alone (bf16 compute), and int8 tokens are not the float model's."""
  params = make_params(LLADA, end_boost=0.3)
  qcfg, qp = quant.quantize_params(LLADA, params)
  o = sampling.SamplingOptions(gen_length=8, block_length=4, threshold=0.5, cache='dual')
  rng = np.random.default_rng(0)
  reqs = [engine.Request(id=i, prompt_ids=tuple(int(t) for t in rng.integers(0, 60, 5)),
                         options=o, seed=i) for i in range(3)]
  got = {c.id: c.token_ids for c in engine.Engine(qcfg, qp, slots=2, buckets=(8,)).generate(reqs)}
  ends = (LLADA.eos_token_id, LLADA.eot_token_id)
  for r in reqs:
    out = sampling.sample(qcfg, qp, np.asarray([r.prompt_ids]), options=o, seeds=[r.seed])
    gen = np.asarray(out.tokens)[0, 5:].tolist()
    assert got[r.id] == gen[:next((i for i, t in enumerate(gen) if t in ends), len(gen))]


def test_checkpoint_stores_int8_and_quantizing_at_load_gives_the_same_bits(tmp_path):
  cfg = tiny_cfg('llada')
  params = illada_jax.init_params(cfg, jax.random.key(0))
  qcfg, qp = quant.quantize_params(cfg, params)
  illada_jax.save_checkpoint(tmp_path / 'f', cfg, params)
  illada_jax.save_checkpoint(tmp_path / 'q', qcfg, qp)
  c1, p1 = illada_jax.load_checkpoint(tmp_path / 'q')  # as stored: int8, no re-quantizing
  c2, p2 = illada_jax.load_checkpoint(tmp_path / 'f', quantize='int8')
  c3, p3 = illada_jax.load_checkpoint(tmp_path / 'q', quantize='int8')
  assert c1 == c2 == c3 == qcfg
  for a, b, c in zip(jax.tree.leaves(qp), jax.tree.leaves(p1), jax.tree.leaves(p2)):
    assert a.dtype == b.dtype == c.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  with pytest.raises(ValueError, match='holds int8 weights; cannot load them as none'):
    illada_jax.load_checkpoint(tmp_path / 'q', quantize='none')
  with pytest.raises(ValueError, match="quantize='int4'"):
    illada_jax.load_checkpoint(tmp_path / 'f', quantize='int4')
  mesh = illada_jax.make_mesh('fsdp=4,tensor=2')
  _, ps = illada_jax.load_checkpoint(tmp_path / 'f', mesh=mesh, quantize='int8')
  up = ps['layers']['mlp']['up_proj']
  assert up.qvalue.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')
  np.testing.assert_array_equal(np.asarray(up.qvalue), np.asarray(qp['layers']['mlp']['up_proj'].qvalue))


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  return word_checkpoint(str(tmp_path_factory.mktemp('ckpt')))


@pytest.mark.slow
def test_sample_and_score_clis_quantize_int8(ckpt, tmp_path, capsys):
  """`--quantize int8` on both CLIs gives what the library gives with the int8 tree."""
  path, params = ckpt
  qcfg, qp = quant.quantize_params(WORD_CFG, params)
  assert sample_cli.main(['--ckpt', path, '--prompt', 'w1 w2 w3', *FLAGS, '--quantize',
                          'int8']) == 0
  rec = json.loads(capsys.readouterr().out.splitlines()[0])
  out = sampling.sample(qcfg, qp, np.asarray([[7, 8, 9]]), options=OPTS)
  gen = prompts.completion_ids(qcfg, np.asarray(out.tokens)[0, 3:])
  assert rec['completion'] == prompts.load_tokenizer(path).decode(gen)
  data = write_jsonl(tmp_path / 'items.jsonl', [{'context': 'w1 w2', 'continuation': 'w3'}])
  assert score_cli.main(['--ckpt', path, '--input', data, '--method', 'confidence',
                         '--no-progress', '--quantize', 'int8']) == 0
  got = json.loads(capsys.readouterr().out.splitlines()[0])
  want = scoring.confidence_score(qcfg, qp, [([7, 8], [9])])[0]
  flt = scoring.confidence_score(WORD_CFG, params, [([7, 8], [9])])[0]
  np.testing.assert_allclose(got['scores'], [float(want)], rtol=1e-5)
  assert float(want) != pytest.approx(float(flt), abs=1e-6)


def test_lm_eval_adapter_model_arg_quantize(ckpt):
  pytest.importorskip('lm_eval')
  from illada_jax import lm_eval_adapter
  path, params = ckpt
  lm = lm_eval_adapter.ILLaDAJax(ckpt=path, quantize='int8', batch_size=2)
  assert lm.cfg.quantize == 'int8' and quant.is_qarray(lm.params['layers']['attn']['q_proj'])


@pytest.mark.parametrize('family,head', [('illada', False), ('llada', True)])
def test_convert_quantize_streams_the_bits_quantizing_at_load_gives(family, head, tmp_path,
                                                                   monkeypatch):
  """`illada-convert quantize` (tables cut into several row / column blocks) writes the
  int8 tree `load_checkpoint(..., quantize=...)` makes from the float checkpoint, bit for
  bit, loadable as it is; the same tokens; weights in about half the bytes of bf16."""
  from illada_jax.checkpoint import quantized
  from illada_jax.cli import convert
  monkeypatch.setattr(quantized, 'TABLE_BLOCK_BYTES', 4096)  # 32 rows of 64 bf16
  cfg = tiny_cfg(family)
  params = illada_jax.init_params(cfg, jax.random.key(0))
  illada_jax.save_checkpoint(tmp_path / 'f', cfg, params)
  flags = ['--int8', '--quiet'] + (['--head'] if head else [])
  assert convert.main(['quantize', str(tmp_path / 'f'), str(tmp_path / 'q'), *flags]) == 0
  stored_cfg, stored = illada_jax.load_checkpoint(tmp_path / 'q')
  at_load_cfg, at_load = illada_jax.load_checkpoint(tmp_path / 'f',
                                                    quantize='int8_head' if head else 'int8')
  assert stored_cfg == at_load_cfg and stored_cfg.quantize == ('int8_head' if head else 'int8')
  assert jax.tree.structure(stored) == jax.tree.structure(at_load)
  for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(at_load)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  prompt = np.random.default_rng(0).integers(0, 100, (2, 6))
  o = sampling.SamplingOptions(gen_length=8, block_length=4, steps=8)
  t1 = sampling.sample(stored_cfg, stored, prompt, options=o).tokens
  t2 = sampling.sample(at_load_cfg, at_load, prompt, options=o).tokens
  np.testing.assert_array_equal(np.asarray(t1), np.asarray(t2))
  weights = lambda tree: quant.nbytes(tree['layers']['attn']) + quant.nbytes(tree['layers']['mlp'])
  assert 0.5 < weights(stored) / weights(params) < 0.55


def test_convert_quantize_refuses_bad_input_with_one_line(tmp_path, capsys):
  from illada_jax.cli import convert
  cfg = tiny_cfg('illada')
  illada_jax.save_checkpoint(tmp_path / 'f', cfg, illada_jax.init_params(cfg, jax.random.key(0)))
  assert convert.main(['quantize', str(tmp_path / 'f'), str(tmp_path / 'q'), '--int8']) == 0
  cases = [([str(tmp_path / 'nope'), str(tmp_path / 'x')], 'nope: not a checkpoint directory'),
           ([str(tmp_path / 'q'), str(tmp_path / 'x')], 'already holds int8 weights'),
           ([str(tmp_path / 'f'), str(tmp_path / 'q')], 'exists (pass --overwrite'),
           ([str(tmp_path / 'f'), str(tmp_path / 'f' / 'in')], 'the destination is inside'),
           ([str(tmp_path / 'f'), str(tmp_path / 'f')], 'the destination is the source')]
  capsys.readouterr()
  for args, msg in cases:
    assert convert.main(['quantize', *args, '--int8']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
  assert not (tmp_path / 'x').exists() and not (tmp_path / 'x.partial').exists()


def _tool(name):
  import importlib.util
  import os
  from helpers import REPO
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'tools', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
@pytest.mark.parametrize('family', ['illada', 'llada'])
def test_int8_logit_error_is_within_three_times_bfloat16s(family):
  """tools/int8_accuracy.py's figures: against float32 logits, int8 weights (bf16 compute)
  err by at most 3x what bf16 weights alone do (a wrong scale axis would be far off)."""
  rows = {r['model']: r for r in _tool('int8_accuracy').logit_errors(family)}
  bf = rows['bfloat16']
  for name in ('int8, bf16 compute', 'int8_head, bf16 compute', 'int8, f32 compute'):
    assert rows[name]['mean'] < 3 * bf['mean'] and rows[name]['max'] < 3 * bf['max'], rows
    assert rows[name]['mean'] > bf['mean'] / 3, rows  # the int8 rounding shows


@pytest.mark.slow
def test_int8_keeps_the_short_demo_accuracy_within_one_point(short_demo):
  """The held-out problems at T = 0: int8 (and int8 with the tied head) within one
  point of the checkpoint as trained."""
  cfg, result = short_demo
  rows = _tool('int8_accuracy').demo_figures(cfg.out)
  assert rows[0]['accuracy'] == result['accuracy']  # the float row is the demo's own figure
  for r in rows[1:]:
    assert abs(r['accuracy'] - result['accuracy']) <= 0.01, rows
    assert r['agreement'] >= 0.95, rows
