"""notebooks/train_tiny.ipynb runs top to bottom (a very short training)."""

import os

import pytest

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'notebooks', 'train_tiny.ipynb')


@pytest.mark.slow
def test_train_tiny_notebook(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  monkeypatch.setenv('ILLADA_NOTEBOOK_STEPS', '10')
  monkeypatch.setenv('ILLADA_NOTEBOOK_OUT', str(tmp_path))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  assert os.path.exists(tmp_path / 'loss_curve.png')
  text = ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                 for o in c.get('outputs', []))
  assert 'accuracy on 200 held-out problems' in text
