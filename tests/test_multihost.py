"""Two processes x two CPU devices on 127.0.0.1: train, checkpoint, restore, continue.

The per-step losses must equal a one-process run of the same four devices on
the same global batches (process 0's local rows, then process 1's), and the
two processes must read different rows: were both reading process 0's rows,
the losses would be those of another global batch.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from illada_jax import data, train
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
def test_two_processes_train_checkpoint_restore_and_match_one_process(tmp_path):
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

  with open(os.path.join(root, 'run', 'metrics.jsonl')) as f:  # process 0 writes it
    got = {m['step']: m['loss'] for m in map(json.loads, f) if 'loss' in m}
  assert sorted(got) == [1, 2, 3, 4]
  got = [got[s] for s in (1, 2, 3, 4)]
  cfg = train.load_config(cfg_path)
  rows = [_local_batches(cfg, i, 2, steps=4) for i in range(2)]  # [process][step] [B/2, L]
  for r0, r1 in zip(*rows):
    assert not _shared_rows(r0, r1)
  want = _one_process_losses(cfg, [np.concatenate([r0, r1]) for r0, r1 in zip(*rows)])
  np.testing.assert_allclose(got, want, rtol=1e-6)  # bitwise equal when measured
  # The comparison tells the two apart: process 1 reading process 0's rows gives other losses.
  same = _one_process_losses(cfg, [np.concatenate([r0, r0]) for r0 in rows[0]])
  assert np.max(np.abs(np.asarray(same) / np.asarray(want) - 1)) > 1e-3


def _local_batches(cfg, process_index: int, process_count: int, steps: int):
  """The token rows process `process_index` of `process_count` reads at steps 1..steps."""
  it = iter(data.make_dataset(cfg.data, batch_size=cfg.batch_size // process_count,
                              seq_len=cfg.seq_len, objective=cfg.objective, seed=cfg.seed,
                              process_index=process_index, process_count=process_count,
                              model=cfg.model))
  return [next(it)['tokens'] for _ in range(steps)]


def _shared_rows(a_BL, b_BL) -> bool:
  return bool((a_BL[:, None, :] == b_BL[None, :, :]).all(-1).any())


def _one_process_losses(cfg, batches):
  """Per-step losses of the train step on 4 devices of this process (as 2 x 2 devices)."""
  mesh = train.sharding.make_mesh(cfg.mesh, devices=jax.devices()[:4])
  tx = train.opt_lib.make_optimizer(cfg.optimizer)
  state = train.init_state(cfg, mesh, tx)
  step = train.jit_train_step(cfg, tx, mesh)
  losses = []
  for tokens in batches:
    state, metrics = step(state, {'tokens': jax.device_put(tokens, train.batch_sharding(mesh))})
    losses.append(float(metrics['loss']))
  return losses
