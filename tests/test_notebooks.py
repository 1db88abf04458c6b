"""The notebooks run top to bottom in a fresh kernel (nbclient)."""

import os
import pathlib

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / 'notebooks'


def execute(name: str, cwd) -> list[dict]:
  """Runs notebooks/<name> in `cwd`; returns the outputs of its code cells."""
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(cwd)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  assert not [o for o in outputs if o.get('output_type') == 'error']
  return outputs


@pytest.mark.slow
def test_quickstart_samples_and_plots_commit_order():
  outputs = execute('quickstart.ipynb', NOTEBOOKS)
  assert any('image/png' in o.get('data', {}) for o in outputs), 'the commit-order plot is missing'


@pytest.mark.slow
def test_train_tiny_trains_and_plots_its_loss(tmp_path, monkeypatch):
  monkeypatch.setenv('ILLADA_NOTEBOOK_STEPS', '10')
  monkeypatch.setenv('ILLADA_NOTEBOOK_OUT', str(tmp_path))
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
  outputs = execute('train_tiny.ipynb', tmp_path)
  assert os.path.exists(tmp_path / 'loss_curve.png')
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'accuracy on 200 held-out problems' in text
