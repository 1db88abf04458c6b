"""tools/bench_serve.py: one run against a real illada-serve subprocess, tiny settings."""

import importlib.util
import os
import re
import sys

import pytest

from helpers import word_checkpoint, write_jsonl

_spec = importlib.util.spec_from_file_location(
    'bench_serve', os.path.join(os.path.dirname(os.path.dirname(__file__)), 'tools',
                                'bench_serve.py'))
bench_serve = importlib.util.module_from_spec(_spec)
sys.modules['bench_serve'] = bench_serve  # dataclasses look their module up
_spec.loader.exec_module(bench_serve)

FIGURES = ('request throughput', 'output tokens/s', 'time to first block p50',
           'time to first block p99', 'end-to-end latency p50', 'end-to-end latency p99')


@pytest.mark.slow
def test_every_figure_is_printed_and_outputs_equal_the_offline_engine(tmp_path, capsys):
  ckpt, _ = word_checkpoint(str(tmp_path))
  prompts = [{'prompt': ' '.join(f'w{(7 * i + j) % 58}' for j in range(1 + i % 5))}
             for i in range(6)]
  path = write_jsonl(str(tmp_path / 'prompts.jsonl'), prompts)
  rc = bench_serve.main(['--ckpt', ckpt, '--prompts', path, '--workdir', str(tmp_path),
                         '--requests', '6', '--sequential', '2', '--slots', '4',
                         '--rates', '40', '--gen-length', '8', '--block-length', '4',
                         '--buckets', '8'])
  out = capsys.readouterr().out
  assert rc == 0, out
  for run in ('saturation', 'Poisson 40.00 req/s'):
    for figure in FIGURES:
      # Throughputs have both baselines; latencies (b), and end-to-end (a) too.
      want = r'\(([\d.]+x \(a\), )?[\d.]+x \(b\)\)'
      assert re.search(rf'^{re.escape(run)}: {figure} [\d.]+( s| req/s)? {want}$', out, re.M), (figure, out)
    assert re.search(rf'^{re.escape(run)}: output tokens/s \d+ \([\d.]+x \(a\), ', out, re.M)
  assert re.search(r'^\(a\) offline engine: 6 requests in ', out, re.M)
  assert re.search(r'^saturation: output tokens/s ceiling set by that CPU: [\d.]+x \(a\)$', out,
                   re.M)
  assert re.search(r'^\(b\) one request at a time: 2 requests in ', out, re.M)
  assert 'server exit status 0' in out
  assert 'errors: 0 of 20 requests' in out  # warm-up 6 + (b) 2 + saturation 6 + one rate 6
  assert "outputs at temperature 0 equal to the offline engine's: 20/20" in out


def test_latency_ratios_read_baseline_over_run():
  a = bench_serve.Figures(4, 2., 40, [], [1., 1., 1., 1.])
  b = bench_serve.Figures(2, 4., 10, [0.5, 0.5], [2., 2.])
  f = bench_serve.Figures(4, 1., 40, [0.25] * 4, [0.5] * 4)
  lines = bench_serve.lines_for('x', f, a, b)
  assert lines[0] == 'x: request throughput 4.00 req/s (2.00x (a), 8.00x (b))'
  assert lines[1] == 'x: output tokens/s 40 (2.00x (a), 16.00x (b))'
  assert lines[2] == 'x: time to first block p50 0.250 s (2.00x (b))'
  assert lines[4] == 'x: end-to-end latency p50 0.500 s (2.00x (a), 4.00x (b))'


def test_the_cpu_ceiling_is_the_pass_cpu_spread_over_every_core():
  # 6 CPU-s on 2 cores cannot take less than 3 s; (a) took 2 s, so at best 2/3 of its speed.
  lines = bench_serve.cpu_lines('x', 4., 5., 1., 2., 3.5, 2)
  assert lines == ['x: CPU 5.00 s server + 1.00 s client = 6.00 s ((a): 3.50 s); on 2 cores no '
                   'pass using it takes less than 3.000 s, this one took 4.000 s (75% of that '
                   'speed)', 'x: output tokens/s ceiling set by that CPU: 0.67x (a)']
  assert bench_serve.cpu_lines('x', 4., None, 1., 2., 3.5, 2) == []
  assert bench_serve.process_cpu(os.getpid()) > 0
