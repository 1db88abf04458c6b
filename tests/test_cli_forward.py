"""`illada-forward`: the installation smoke test prints what it computed."""

import numpy as np

from illada_jax.cli import forward


def test_run_reports_table_and_finite_logits():
  out = forward.run('illada_tiny', batch=2, seq_len=16, num_layers=2)
  assert out['logits_shape'] == (2, 16, 1024)
  assert out['logits_stats']['finite'] and out['logits_stats']['std'] > 0
  assert sum(r[3] for r in out['table']) == out['param_count']
  names = [r[0] for r in out['table']]
  assert 'layers/attn/q_proj' in names and 'lm_head' not in names  # tied preset


def test_main_prints_on_a_mesh(capsys):
  forward.main(['--preset', 'llada_tiny', '--seq-len', '8', '--mesh', 'data=2,fsdp=2,tensor=2'])
  text = capsys.readouterr().out
  assert 'lm_head' in text and "P('fsdp', 'tensor')" in text
  total = [l for l in text.splitlines() if l.startswith('total')][0]
  assert int(total.split()[-1].replace(',', '')) > 1_000_000
  assert 'finite=True' in text
