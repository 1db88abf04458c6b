"""tools/device_bench.py: the --smoke run, its deadline, its FLOP count, its imports."""

import collections
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, 'tools', 'device_bench.py')
_spec = importlib.util.spec_from_file_location('device_bench', TOOL)
device_bench = importlib.util.module_from_spec(_spec)
sys.modules['device_bench'] = device_bench  # dataclasses look their module up there
_spec.loader.exec_module(device_bench)

# (figure, metric) -> lines of the smoke run: one per attention length, two batches.
SMOKE_LINES = {
    ('attention', 'max abs error vs f32, output'): 1,
    ('attention', 'max abs error vs f32, dq dk dv'): 1,
    ('attention', 'pallas fwd'): 1,
    ('attention', 'pallas fwd+bwd'): 1,
    ('train_1b', 'train step'): 1,
    ('forward_8b', 'forward'): 2,
    ('engine_8b', 'output tokens/s'): 1,
    ('sampler_8b', 'fixed-step step'): 2,
    ('sampler_8b', 'threshold 0.9 + dual cache'): 2,
    ('int8_8b', 'forward tokens/s'): 2,
    ('int8_8b', 'sampler tokens/s'): 1,
}


def _run(*args):
  return subprocess.run([sys.executable, TOOL, *args], env=dict(os.environ, JAX_PLATFORMS='cpu'),
                        capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_smoke_run_writes_every_figure_beside_its_baseline(tmp_path):
  out = tmp_path / 'bench.json'
  proc = _run('--smoke', '--out', str(out))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  doc = json.loads(out.read_text())
  assert doc['events'] == [], doc['events']  # no FAILED or SKIPPED line
  assert doc['baselines']['matmul_bf16_flops'] > 0
  lines = collections.Counter((r['figure'], r['metric']) for r in doc['records'])
  assert lines == SMOKE_LINES
  for r in doc['records']:
    assert math.isfinite(r['value']) and r['value'] > 0, r
    assert math.isfinite(r['baseline']) and r['baseline'] > 0, r
    assert r['ratio'] == pytest.approx(r['value'] / r['baseline']), r
    assert f"{r['figure']} {r['case']}: {r['metric']} " in proc.stdout
    if r['unit'] == 'TFLOP/s':  # MFU lines: against the matmul measured in this run
      assert r['baseline'] == pytest.approx(doc['baselines']['matmul_bf16_flops'] / 1e12)
      assert r['tokens_per_s'] > 0
    if r['unit'] == 'abs':  # the kernel's error against float32 is about XLA bf16's own
      assert r['ratio'] < 2, r
  assert len(doc['compile_s']) >= 10 and all(c['s'] > 0 for c in doc['compile_s'])


def test_a_spent_deadline_skips_every_figure_and_still_writes_the_json(tmp_path):
  out = tmp_path / 'bench.json'
  proc = _run('--smoke', '--deadline', '0', '--out', str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads(out.read_text())
  skipped = [line for line in proc.stdout.splitlines() if line.startswith('SKIPPED (deadline)')]
  assert len(skipped) == len(device_bench.GROUPS) and doc['events'] == skipped
  assert doc['records'] == []


@pytest.mark.parametrize('which', ['model', 'train_model'])
def test_flops_agree_with_the_train_loop(which):
  from illada_jax import flops
  cfg = getattr(device_bench.sizes(False, 'xla'), which)
  batch, length = 4, 2048
  want = flops.train_flops_per_token(cfg, length) * batch * length
  assert 3 * device_bench.model_flops(cfg, batch, length, length) == pytest.approx(want, rel=1e-9)
  head = 2 * batch * (length - 32) * cfg.d_model * cfg.vocab_size
  got = device_bench.model_flops(cfg, batch, length, length) - device_bench.model_flops(
      cfg, batch, length, 32)
  assert got == pytest.approx(head)


def test_train_step_builders_import_without_grain():
  code = ('import sys; sys.modules["grain"] = None\n'
          'from illada_jax import train\n'
          'assert callable(train.jit_train_step) and train.TrainConfig().data.paths == ()\n'
          'try:\n  import illada_jax.data\nexcept ImportError:\n  print("grain blocked")\n')
  proc = subprocess.run([sys.executable, '-c', code], env=dict(os.environ, JAX_PLATFORMS='cpu'),
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == 'grain blocked'
