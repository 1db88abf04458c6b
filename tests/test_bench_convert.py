"""tools/bench_convert.py runs end to end on a tiny preset and prints every figure."""

import importlib.util
import os

from helpers import REPO

_spec = importlib.util.spec_from_file_location(
    'bench_convert', os.path.join(REPO, 'tools', 'bench_convert.py'))
bench_convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_convert)


def test_bench_convert_reports_both_directions_against_the_copy(tmp_path, capsys):
  assert bench_convert.main(['--preset', 'illada_tiny', '--workdir', str(tmp_path)]) == 0
  out = capsys.readouterr().out.split('summary:')[1]
  for direction in ('hf-to-orbax', 'orbax-to-hf'):
    lines = [l for l in out.splitlines() if l.startswith(direction)]
    assert len(lines) == 5, lines
    assert 'copy (read + write + fsync)' in lines[0] and lines[0].endswith('ratio 1.00')
    assert 'x copy (target <= 1.5x' in lines[2]
  assert os.listdir(tmp_path) == []  # nothing left behind
