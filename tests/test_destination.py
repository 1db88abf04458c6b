"""Commands that write a directory never destroy an input or leave a half-written one."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import illada_jax
from illada_jax import checkpoint
from illada_jax.checkpoint import _destination
from illada_jax.checkpoint.errors import ConversionError
from illada_jax.cli import convert as convert_cli

from helpers import WORD_CFG


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, '-c', 'pass'])
  p.wait()
  return p.pid


def test_a_failure_keeps_the_old_result_and_removes_the_temporary(tmp_path):
  dst = tmp_path / 'dst'
  dst.mkdir()
  (dst / 'old').write_text('kept')
  with pytest.raises(RuntimeError):
    with _destination.Destination(dst, overwrite=True) as tmp:
      (open(os.path.join(tmp, 'new'), 'w')).write('half')
      raise RuntimeError('failed mid-write')
  assert sorted(os.listdir(tmp_path)) == ['dst'] and (dst / 'old').read_text() == 'kept'
  with _destination.Destination(dst, overwrite=True) as tmp:
    (open(os.path.join(tmp, 'new'), 'w')).write('whole')
  assert sorted(os.listdir(tmp_path)) == ['dst'] and os.listdir(dst) == ['new']


def test_a_rerun_removes_stale_temporaries_and_restores_a_result_moved_aside(tmp_path):
  dead = _dead_pid()
  stale = tmp_path / f'.dst.tmp-{dead}-abc'
  stale.mkdir()
  (stale / 'big').write_bytes(b'x' * 100)
  other = tmp_path / f'.other.tmp-{dead}-abc'  # another destination's: not ours to remove
  other.mkdir()
  live = tmp_path / f'.dst.tmp-{os.getppid()}-abc'  # a running process's: left alone
  live.mkdir()
  moved = tmp_path / f'.dst.tmp-{dead}-def.old'  # killed between the two renames of a swap
  moved.mkdir()
  (moved / 'result').write_text('previous')
  assert _destination.remove_stale(str(tmp_path / 'dst')) == [str(stale)]
  assert (tmp_path / 'dst' / 'result').read_text() == 'previous'
  assert sorted(os.listdir(tmp_path)) == sorted(['dst', other.name, live.name])


def test_the_destination_may_not_overlap_an_input(tmp_path):
  src = tmp_path / 'src'
  (src / 'sub').mkdir(parents=True)
  os.symlink(src, tmp_path / 'link')
  for dst, why in [(src, 'is the'), (src / 'sub', 'inside'), (tmp_path, 'contains'),
                   (tmp_path / 'link', 'is the')]:
    with pytest.raises(ConversionError, match=why):
      _destination.check_apart(src, dst)
  _destination.check_apart(src, tmp_path / 'elsewhere')


def test_a_float16_export_that_would_overflow_is_refused(tmp_path, capsys):
  params = illada_jax.init_params(WORD_CFG, jax.random.key(0))
  params['final_norm']['scale'] = params['final_norm']['scale'].at[3].set(1e5)
  illada_jax.save_checkpoint(str(tmp_path / 'ckpt'), WORD_CFG, params)
  with pytest.raises(ConversionError, match=r'norm.*\[.*100000\].*float16'):
    checkpoint.orbax_to_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'hf'), dtype='float16',
                           progress=False)
  assert convert_cli.main(['orbax-to-hf', str(tmp_path / 'ckpt'), str(tmp_path / 'hf'),
                           '--dtype', 'float16', '--quiet']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'overflow float16' in err[0]
  assert sorted(os.listdir(tmp_path)) == ['ckpt']  # nothing half-written
  checkpoint.orbax_to_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'hf'), dtype='bfloat16',
                         progress=False)
  assert np.isfinite(np.asarray(checkpoint.load_checkpoint(str(tmp_path / 'ckpt'))[1][
      'final_norm']['scale'])).all()


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_conversion_removes_its_temporary_directory(tmp_path, monkeypatch, capsys,
                                                                   sig):
  """The signal arrives while the converter writes (sent to this very process): exit 128 + n,
  one line, no destination and no temporary directory left."""
  params = illada_jax.init_params(WORD_CFG, jax.random.key(0))
  illada_jax.save_checkpoint(str(tmp_path / 'ckpt'), WORD_CFG, params)
  from illada_jax.checkpoint import convert as convert_lib
  real = convert_lib.write_safetensors

  def interrupted(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), sig)
    time.sleep(5)  # the handler raises here
    raise AssertionError('no signal arrived')
  monkeypatch.setattr(convert_lib, 'write_safetensors', interrupted)
  rc = convert_cli.main(['orbax-to-hf', str(tmp_path / 'ckpt'), str(tmp_path / 'hf'), '--quiet'])
  assert rc == 128 + sig
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and sig.name in err[0], err
  assert sorted(os.listdir(tmp_path)) == ['ckpt']
