"""Two processes x two CPU devices on 127.0.0.1: train, checkpoint, restore, continue."""

import os
import socket
import subprocess
import sys

import pytest

from illada_jax.optimizer import OptimizerConfig
from helpers import tiny_config, write_train_config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_pair(cfg_path, extra=()):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'illada_jax.cli.train', '--config', cfg_path,
       '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2', '--process-id', str(i),
       *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


@pytest.mark.slow
def test_two_processes_train_checkpoint_restore(tmp_path):
  root = str(tmp_path)
  cfg_path = write_train_config(  # data made once, before the processes start
      os.path.join(root, 'cfg.py'),
      tiny_config(root, steps=4, checkpoint_every=2, mesh='data=1,fsdp=-1,tensor=1',
                  optimizer=OptimizerConfig(total_steps=4)))
  outs = _run_pair(cfg_path, ['--stop-after', '2'])
  assert 'stop_after at step 2' in outs[0]
  ckpt = os.path.join(root, 'run', 'checkpoints', '2')
  assert sorted(n for n in os.listdir(os.path.join(ckpt, 'data')) if n.startswith('process')) == [
      'process_0-of-2.json', 'process_1-of-2.json']
  outs = _run_pair(cfg_path)  # restores step 2 on both processes, trains to 4
  assert 'done at step 4' in outs[0]
  assert os.path.isdir(os.path.join(root, 'run', 'checkpoints', '4', 'params'))
