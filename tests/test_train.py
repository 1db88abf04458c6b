"""Train loop: exact resume, SIGTERM, NaN stop, SIGKILL during a save, CLI overrides."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from illada_jax import flops, resume, sharding, train
from illada_jax.lora import LoraConfig
from illada_jax.optimizer import OptimizerConfig
from helpers import TRAIN_MODEL as MODEL, tiny_config, write_train_config


def test_exact_resume(tmp_path):
  cfg = tiny_config(str(tmp_path), random_length_prob=0.3)
  full = train.train(dataclasses.replace(cfg, workdir=str(tmp_path / 'full')))
  assert full['stopped'] == 'done' and sorted(full['losses']) == list(range(1, 9))
  part = train.train(dataclasses.replace(cfg, workdir=str(tmp_path / 'part')), stop_after=4)
  assert part['stopped'] == 'stop_after' and part['final_step'] == 4
  rest = train.train(dataclasses.replace(cfg, workdir=str(tmp_path / 'part')))
  assert sorted(rest['losses']) == [5, 6, 7, 8]
  got = {**part['losses'], **rest['losses']}
  assert got == full['losses']  # bitwise: same masks, data order and updates
  params_a = jax.device_get(full['state']['params'])
  params_b = jax.device_get(rest['state']['params'])
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  # The step directory is a converter-format checkpoint (params item + model_config.json).
  step_dir = rest['checkpoint_dir']
  assert os.path.exists(os.path.join(step_dir, 'model_config.json'))
  from illada_jax import checkpoint
  mcfg, params = checkpoint.load_checkpoint(step_dir)
  assert mcfg == MODEL
  jax.tree.map(np.testing.assert_array_equal, params, params_b)
  metrics = [json.loads(l) for l in open(tmp_path / 'full' / 'metrics.jsonl')]
  assert {'loss', 'masked_accuracy', 'lr', 'grad_norm', 'tokens_per_sec'} <= set(metrics[-1])
  assert 'mfu' not in metrics[-1]  # a CPU has no known peak, and none was given


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
  cfg = tiny_config(str(tmp_path), checkpoint_every=1, async_checkpoints=False,
                    optimizer=OptimizerConfig(lr=1e36, warmup_steps=0, schedule='constant',
                                              clip_norm=0.0, weight_decay=0.0))
  with pytest.raises(FloatingPointError, match='non-finite'):
    train.train(cfg)
  mngr = train.checkpoint_manager(cfg)
  last = mngr.latest_step()
  assert last is not None and last >= 1
  tx = train.opt_lib.make_optimizer(cfg.optimizer)
  mesh = train.sharding.make_mesh(cfg.mesh)
  abstract, _ = train.state_shardings(cfg, mesh, tx)
  state = train.restore(mngr, last, abstract, None)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state['params']))


def _write_config(root, **kw):
  """A config file for a 2-device subprocess run; returns (path, its TrainConfig)."""
  cfg = tiny_config(root, mesh='data=1,fsdp=2,tensor=1', **kw)
  cfg = dataclasses.replace(cfg, optimizer=OptimizerConfig(total_steps=cfg.steps))
  return write_train_config(os.path.join(root, 'cfg.py'), cfg), cfg


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return env


def _spawn(cfg_path):
  return subprocess.Popen([sys.executable, '-m', 'illada_jax.cli.train', '--config', cfg_path],
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(pred, proc, timeout=180):
  t0 = time.time()
  while not pred():
    if proc.poll() is not None:
      raise AssertionError(f'process exited early:\n{proc.stdout.read()}')
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError('timeout')
    time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_and_exits_cleanly(tmp_path, sig):
  root = str(tmp_path)
  path, cfg = _write_config(root, steps=100000, checkpoint_every=0)
  proc = _spawn(path)
  metrics = os.path.join(cfg.workdir, 'metrics.jsonl')
  _wait_for(lambda: os.path.exists(metrics) and os.path.getsize(metrics) > 0, proc)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert f'{sig.name.lower()} at step' in out and 'Traceback' not in out
  steps = train.checkpoint_manager(cfg).all_steps()
  assert len(steps) == 1 and 0 < steps[0] < 100000


def test_a_second_signal_aborts_at_once():
  stop = train._Stop()
  stop(signal.SIGINT, None)
  assert stop.requested == 'SIGINT'
  with pytest.raises(KeyboardInterrupt, match='second SIGTERM'):
    stop(signal.SIGTERM, None)


@pytest.mark.slow
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
  root = str(tmp_path)
  path, cfg = _write_config(root, steps=100000, checkpoint_every=1)
  proc = _spawn(path)
  ckpt = os.path.join(cfg.workdir, 'checkpoints')

  def saving_after_a_commit():
    if not os.path.isdir(ckpt):
      return False
    names = os.listdir(ckpt)
    return any(n.isdigit() for n in names) and any('tmp' in n for n in names)

  _wait_for(saving_after_a_commit, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  mngr = train.checkpoint_manager(dataclasses.replace(cfg, mesh='data=1,fsdp=-1,tensor=1'))
  last = mngr.latest_step()
  assert last is not None
  tx = train.opt_lib.make_optimizer(cfg.optimizer)
  mesh = train.sharding.make_mesh('data=1,fsdp=-1,tensor=1')
  abstract, _ = train.state_shardings(cfg, mesh, tx)
  state = train.restore(mngr, last, abstract, None)
  assert int(state['step']) == last
  # And training resumes from it.
  proc = subprocess.run([sys.executable, '-m', 'illada_jax.cli.train', '--config', path,
                         '--stop-after', str(last + 2)], env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert f'at step {last + 2}' in proc.stdout


def test_grad_accumulation_averages_micro_batches():
  """accum=2: the update is the mean of the micro-batch gradients (rows r % 2)."""
  import jax.numpy as jnp
  import optax
  cfg = train.TrainConfig(model=MODEL, batch_size=4, grad_accum=2, seq_len=8, seed=3,
                          mesh='data=1,fsdp=-1,tensor=1', random_length_prob=0.0)
  mesh = train.sharding.make_mesh('data=1,fsdp=1,tensor=1', devices=jax.devices()[:1])
  tx = optax.sgd(1.0)
  params = train.model_lib.init_params(MODEL, jax.random.key(0))
  state = {'step': jnp.array(5, jnp.int32), 'params': params, 'opt_state': tx.init(params)}
  tokens = jax.random.randint(jax.random.key(1), (4, 8), 6, MODEL.vocab_size)
  new, metrics = jax.jit(train.make_train_step(cfg, tx, mesh))(state, {'tokens': tokens})
  key = jax.random.fold_in(jax.random.key(3), 5)
  grad = jax.jit(jax.grad(lambda p, t, k: train.loss_fn(cfg, p, {'tokens': t}, k)[0]))
  grads = [grad(params, tokens[i::2], jax.random.fold_in(key, i)) for i in range(2)]
  want = jax.tree.map(lambda p, a, b: p - (a + b) / 2, params, *grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new['params'], want)
  assert int(new['step']) == 6 and np.isfinite(float(metrics['loss']))


def test_periodic_eval_and_tensorboard_events(tmp_path):
  cfg = tiny_config(str(tmp_path), steps=4, eval_every=2, eval_batches=2, checkpoint_every=0,
                    async_checkpoints=False, peak_flops_per_device=1e12)
  out = train.train(cfg)
  assert sorted(out['eval']) == [2, 4]
  assert all(np.isfinite(v) and v > 0 for v in out['eval'].values())
  assert out['eval'][2] != out['eval'][4]  # same eval batches, weights trained in between
  tb_dir = tmp_path / 'run' / 'tb'
  events = [p for p in tb_dir.iterdir() if 'tfevents' in p.name]
  assert events and events[0].stat().st_size > 0
  payload = events[0].read_bytes()
  for tag in (b'loss', b'eval_loss', b'grad_norm', b'lr'):
    assert tag in payload
  logged = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert [m['step'] for m in logged if 'eval_loss' in m] == [2, 4]
  # With a peak given, MFU is the model FLOP rate over it (all devices together).
  m = [m for m in logged if 'mfu' in m][-1]
  rate = flops.train_flops_per_token(cfg.model, cfg.seq_len) * m['tokens_per_sec']
  assert m['mfu'] == pytest.approx(rate / (1e12 * jax.device_count()), rel=1e-9)


def test_peak_flops_known_only_for_listed_kinds_in_bf16():
  class Device:
    def __init__(self, kind):
      self.device_kind = kind
  assert flops.peak_flops(Device('TPU v5p')) == 459e12
  assert flops.peak_flops(Device('TPU v5 lite')) == 197e12
  assert flops.peak_flops(Device('NVIDIA H200')) == 989e12
  assert flops.peak_flops(Device('TPU v5p'), 'float32') is None
  assert flops.peak_flops(Device('cpu')) is None
  assert flops.peak_flops(jax.devices()[0], 'bfloat16') is None


def test_train_step_shardings_follow_the_rules():
  """Editing the rules table moves the batch, the parameters and the optimizer state."""
  mesh = sharding.make_mesh('data=2,fsdp=2,tensor=2')
  custom = tuple({**dict(sharding.RULES), 'act_batch': 'data', 'embed': None,
                  'mlp': 'fsdp'}.items())
  specs = {}
  for name, rules in (('default', sharding.RULES), ('custom', custom)):
    cfg = train.TrainConfig(model=MODEL, batch_size=8, seq_len=8, sharding_rules=rules)
    tx = train.opt_lib.make_optimizer(cfg.optimizer)
    abstract, _ = train.state_shardings(cfg, mesh, tx)
    batch = {'tokens': jax.ShapeDtypeStruct((8, 8), np.int32,
                                            sharding=train.batch_sharding(mesh, rules))}
    state_in, batch_in = train.jit_train_step(cfg, tx, mesh).lower(abstract, batch).compile(
        ).input_shardings[0]
    specs[name] = (batch_in['tokens'].spec, state_in['params']['layers']['mlp']['gate_proj'].spec,
                   state_in['opt_state'][1][0].mu['layers']['mlp']['gate_proj'].spec)
  P = jax.sharding.PartitionSpec
  assert specs['default'] == (P(('data', 'fsdp'), None), P(None, 'fsdp', 'tensor'),
                              P(None, 'fsdp', 'tensor'))
  assert specs['custom'] == (P('data', None), P(None, None, 'fsdp'), P(None, None, 'fsdp'))


@pytest.mark.slow
def test_resume_refuses_changed_data_settings_and_weights_and_metrics_never_repeat(tmp_path):
  cfg = tiny_config(str(tmp_path), steps=4, checkpoint_every=2, async_checkpoints=False)
  train.train(cfg, stop_after=2)
  with open(os.path.join(cfg.workdir, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps({'step': 3, 'loss': 9.0}) + '\n')  # logged, then killed before step 4's save
  for key, value, named in [('batch_size', 16, 'batch_size was 8, now 16'),
                            ('seq_len', 32, 'seq_len was 16, now 32'),
                            ('data.paths', ('x.jsonl',), 'data.paths was'),
                            ('data.chat_turns', 'last', 'data.chat_turns')]:
    changed = dataclasses.replace(cfg, **{key: value}) if '.' not in key else dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, **{key[5:]: value}))
    with pytest.raises(ValueError, match=f'{re.escape(named)}.*restart_data'):
      train.train(changed)
  with pytest.raises(ValueError, match='lora.rank was 0, now 4.*new workdir'):
    train.train(dataclasses.replace(cfg, lora=LoraConfig(rank=4)))
  with pytest.raises(ValueError, match='model.d_model was 32, now 64'):
    train.train(dataclasses.replace(cfg, model=cfg.model.replace(d_model=64)))
  out = train.train(dataclasses.replace(cfg, steps=5, log_every=2))  # harmless changes
  assert out['final_step'] == 5
  steps = [json.loads(line)['step'] for line in open(os.path.join(cfg.workdir, 'metrics.jsonl'))]
  assert steps == sorted(set(steps)) and 9.0 not in [
      json.loads(line).get('loss') for line in open(os.path.join(cfg.workdir, 'metrics.jsonl'))]
  more = dataclasses.replace(cfg, steps=6, batch_size=16, restart_data=True)
  assert train.train(more)['final_step'] == 6  # weights kept, data restarted
  recorded = json.load(open(os.path.join(cfg.workdir, resume.SETTINGS_FILE)))
  assert recorded == resume.settings(more, 1)  # the new settings are the run's now
