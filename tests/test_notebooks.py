"""The quickstart notebook runs top to bottom (nbclient, fresh kernel)."""

import os

import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), '..', 'notebooks', 'quickstart.ipynb')


@pytest.mark.slow
def test_quickstart_notebook_runs():
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  env_dir = os.path.dirname(os.path.abspath(NOTEBOOK))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': env_dir}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  assert not [o for o in outputs if o.get('output_type') == 'error']
  assert any('image/png' in o.get('data', {}) for o in outputs), 'the commit-order plot is missing'
