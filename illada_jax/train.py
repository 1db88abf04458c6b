"""The training loop: one jitted, donated step over a sharded state, Orbax checkpoints.

  state = {'step': int32 [], 'params': Params, 'opt_state': optax state}
  LoRA (`cfg.lora.rank > 0`): 'params' holds the adapters only, and
  state['base'] the frozen base weights (no gradient, no optimizer state,
  not checkpointed: `base_params` makes them again on resume).

`make_train_step` builds a pure `(state, batch) -> (state, metrics)`:
the global batch `[B, L]` is split into `grad_accum` micro-batches that a
`lax.scan` runs one after another, summing float32 gradients; the update is
applied once. The noise key of step s is `fold_in(key(seed), s)`, so a
resumed run draws exactly the masks an uninterrupted one would. Parameters,
optimizer state, activations and the batch are sharded by the logical axis
rules `cfg.sharding_rules` (default `sharding.RULES`). The run's settings are
a `TrainConfig` (`illada_jax.train_config`).

`train(cfg)` runs the loop: Grain data, metrics on a tqdm bar and in
TensorBoard event files (plus `metrics.jsonl`), periodic eval, async
Orbax checkpoints every `checkpoint_every` steps (keep-N). A step directory
holds the items `params` (converter-compatible: `load_checkpoint` of
`illada_jax.checkpoint` reads `<dir>/<step>` once its `model_config.json` is
written), `opt_state`, `meta` (step) and `data` (per-process Grain iterator
state), and the run's tokenizer files (`finetune.stamp_step_dir`). With
`cfg.init_from` the weights of a checkpoint directory start the run
(`finetune`); with `cfg.eval_samples` each eval also logs sampled
completions of held-out prompts (`train_samples`). SIGTERM and SIGINT
(Ctrl-C) save at the next step boundary and return (a second one aborts at
once); a non-finite loss raises before any checkpoint of the bad state is
written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from illada_jax import finetune
from illada_jax import flops as flops_lib
from illada_jax import lora as lora_lib
from illada_jax import loss as loss_lib
from illada_jax import model as model_lib
from illada_jax import optimizer as opt_lib
from illada_jax import resume
from illada_jax import sharding
from illada_jax import train_log
from illada_jax.checkpoint import store as ckpt_store
from illada_jax.config import ModelConfig
from illada_jax.train_config import TrainConfig, load_config, override  # noqa: F401 (API)


def _data_lib():
  # Imported on use: `data` needs Grain, the step builders do not, and they
  # must import on accelerator hosts without Grain (tools/device_bench.py).
  from illada_jax import data
  return data


# -- state and step ----------------------------------------------------------------

def batch_sharding(mesh, rules=sharding.RULES) -> NamedSharding:
  """Sharding of a `[B, L]` batch: its logical axes `act_batch`, `act_length` under `rules`."""
  return NamedSharding(mesh, sharding.logical_to_spec(('act_batch', 'act_length'), rules))


def state_shardings(cfg: TrainConfig, mesh, tx: optax.GradientTransformation):
  """(abstract state with shardings, sharding pytree) on `mesh` under `cfg.sharding_rules`."""
  m_abs = model_lib.abstract_params(cfg.model, mesh, cfg.sharding_rules)
  p_abs = (lora_lib.abstract_adapters(cfg.model, cfg.lora, mesh, cfg.sharding_rules)
           if cfg.lora.rank else m_abs)
  p_shard = jax.tree.map(lambda x: x.sharding, p_abs)
  o_abs = jax.eval_shape(tx.init, p_abs)
  replicated = NamedSharding(mesh, P())
  o_shard = optax.tree_map_params(
      tx, lambda _, s: s, o_abs, p_shard, transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  shard = {'step': replicated, 'params': p_shard, 'opt_state': o_shard}
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': p_abs, 'opt_state': o_abs}, shard)
  if cfg.lora.rank:
    abstract['base'] = m_abs
    shard['base'] = jax.tree.map(lambda x: x.sharding, m_abs)
  return abstract, shard


def base_params(cfg: TrainConfig, mesh):
  """The model weights a run starts from, sharded on `mesh`: those of `cfg.init_from`
  (`finetune.restore_params`: restored into their shards, cast to the run's
  param dtype), else `init_params(key(seed))`."""
  if cfg.init_from:
    return finetune.restore_params(cfg, mesh)
  return model_lib.init_params(cfg.model, jax.random.key(cfg.seed), mesh, cfg.sharding_rules)


def init_state(cfg: TrainConfig, mesh, tx):
  """A fresh, sharded train state: `base_params`, step 0, `tx.init`.

  LoRA: the base is frozen in state['base'] and 'params' are fresh adapters.
  """
  _, shard = state_shardings(cfg, mesh, tx)
  state = {'step': jax.device_put(jnp.zeros((), jnp.int32), shard['step']),
           'params': base_params(cfg, mesh)}
  if cfg.lora.rank:
    state['base'] = state['params']
    state['params'] = lora_lib.init_adapters(
        cfg.model, cfg.lora, jax.random.fold_in(jax.random.key(cfg.seed), 1), mesh,
        cfg.sharding_rules)
  state['opt_state'] = jax.jit(tx.init, out_shardings=shard['opt_state'])(state['params'])
  return state


def loss_fn(cfg: TrainConfig, params, batch, key, base=None):
  """Scalar loss and metrics of one micro-batch (`batch['tokens']` `[b, L]`).

  With `base` (LoRA), `params` are the adapters and the model is `lora.lora_model`.
  """
  model = None
  if base is not None:
    params = lora_lib.combine(cfg.model, base, params)
    model = lora_lib.lora_model(cfg.model, cfg.lora)
  if cfg.objective == 'pretrain':
    return loss_lib.pretrain_loss(cfg.model, params, batch['tokens'], key, eps=cfg.eps,
                                  random_length_prob=cfg.random_length_prob,
                                  chunk=cfg.loss_chunk, model=model)
  if cfg.objective == 'sft':
    return loss_lib.sft_loss(cfg.model, params, batch['tokens'], batch['response_mask'], key,
                             eps=cfg.eps, chunk=cfg.loss_chunk, model=model)
  raise ValueError(f'objective={cfg.objective!r}; use pretrain or sft')


def make_train_step(cfg: TrainConfig, tx: optax.GradientTransformation, mesh):
  """`(state, batch) -> (state, metrics)`, pure; jit it with `jit_train_step`."""
  schedule = opt_lib.learning_rate_schedule(cfg.optimizer)
  accum = cfg.grad_accum
  batch_spec = batch_sharding(mesh, cfg.sharding_rules).spec

  def step_fn(state, batch):
    with sharding.activation_sharding(mesh, cfg.sharding_rules):
      params = state['params']
      key = jax.random.fold_in(jax.random.key(cfg.seed), state['step'])
      # Row r goes to micro-batch r % accum, so every micro-batch keeps the
      # batch sharding of the global batch.
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1),
          batch)
      micro = jax.tree.map(
          lambda x: jax.lax.with_sharding_constraint(
              x, NamedSharding(mesh, P(None, *batch_spec))), micro)
      base = state.get('base')  # LoRA: frozen, closed over by the loss, so not differentiated
      grad_fn = jax.value_and_grad(lambda p, b, k: loss_fn(cfg, p, b, k, base), has_aux=True)

      def body(carry, xs):
        grads_acc, metrics_acc = carry
        i, mb = xs
        (_, metrics), grads = grad_fn(params, mb, jax.random.fold_in(key, i))
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
        return (grads_acc, metrics_acc), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      m0 = {k: jnp.zeros((), jnp.float32)
            for k in ('loss', 'masked_tokens', 'masked_accuracy', 'masked_ce')}
      (grads, metrics), _ = jax.lax.scan(body, (zeros, m0), (jnp.arange(accum), micro))
      grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grads, params)
      metrics = {k: v / accum for k, v in metrics.items()}
      metrics['masked_tokens'] = metrics['masked_tokens'] * accum
      metrics['grad_norm'] = optax.global_norm(grads)
      metrics['lr'] = schedule(state['step'])
      updates, opt_state = tx.update(grads, state['opt_state'], params)
      params = optax.apply_updates(params, updates)
      # A finite loss with overflowing new parameters must not be checkpointed either.
      metrics['params_finite'] = jnp.all(jnp.stack(
          [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])).astype(jnp.float32)
      new = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
      if base is not None:
        new['base'] = base
      return new, metrics

  return step_fn


def jit_train_step(cfg: TrainConfig, tx, mesh):
  """The jitted, donated train step with explicit shardings (also used for AOT)."""
  _, shard = state_shardings(cfg, mesh, tx)
  bs = batch_sharding(mesh, cfg.sharding_rules)
  batch_shard = {'tokens': bs, 'response_mask': bs} if cfg.objective == 'sft' else {'tokens': bs}
  return jax.jit(make_train_step(cfg, tx, mesh), in_shardings=(shard, batch_shard),
                 out_shardings=(shard, NamedSharding(mesh, P())), donate_argnums=0)


def make_eval_step(cfg: TrainConfig, mesh):
  """`(params, batch, index, base=None) -> metrics` with a fixed key per eval batch index."""
  def eval_fn(params, batch, index, base=None):
    with sharding.activation_sharding(mesh, cfg.sharding_rules):
      key = jax.random.fold_in(jax.random.key(cfg.seed + 1), index)
      ecfg = dataclasses.replace(cfg, random_length_prob=0.0)
      loss, metrics = loss_fn(ecfg, params, batch, key, base)
      return metrics
  return jax.jit(eval_fn)


# -- checkpoints ------------------------------------------------------------------

def checkpoint_manager(cfg: TrainConfig) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=cfg.async_checkpoints,
      create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(cfg.workdir, 'checkpoints')),
                               options=options)


def _stamp_model_config(mngr: ocp.CheckpointManager, cfg: TrainConfig):
  """Makes every finished step directory a whole checkpoint (`finetune.stamp_step_dir`).

  It is then a checkpoint directory in the format of `illada_jax.checkpoint`
  (params item + model_config.json) with the run's tokenizer files and
  `tokenizer_config.json` (BOS convention, chat template), so samplers
  encode prompts as training did.
  """
  if jax.process_index() != 0:
    return
  for step in mngr.all_steps():
    step_dir = os.path.join(str(mngr.directory), str(step))
    if os.path.isdir(step_dir) and not os.path.exists(
        os.path.join(step_dir, ckpt_store.CONFIG_FILE)):
      if cfg.lora.rank:  # params are adapters: say so, and which base they need
        lora_lib.write_info(step_dir, cfg.lora, base=cfg.init_from, seed=cfg.seed)
      finetune.stamp_step_dir(step_dir, cfg)  # last: its model_config.json marks the stamp


def save(mngr, state, data_iter, cfg: TrainConfig, *, force: bool = False):
  _stamp_model_config(mngr, cfg)
  step = int(jax.device_get(state['step']))
  items = {
      'params': ocp.args.StandardSave(state['params']),
      'opt_state': ocp.args.StandardSave(state['opt_state']),
      'meta': ocp.args.JsonSave({'step': step}),
  }
  if data_iter is not None:
    items['data'] = _data_lib().checkpoint_save_args(data_iter)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(mngr, step: int, abstract_state, data_iter):
  items = {
      'params': ocp.args.StandardRestore(abstract_state['params']),
      'opt_state': ocp.args.StandardRestore(abstract_state['opt_state']),
      'meta': ocp.args.JsonRestore(),
  }
  if data_iter is not None:
    items['data'] = _data_lib().checkpoint_restore_args(data_iter)
  out = mngr.restore(step, args=ocp.args.Composite(**items))
  state = {'step': jax.device_put(jnp.asarray(out['meta']['step'], jnp.int32),
                                  abstract_state['step'].sharding),
           'params': out['params'], 'opt_state': out['opt_state']}
  return state


# -- the loop ---------------------------------------------------------------------

class _Stop:
  """Set by SIGTERM or SIGINT (Ctrl-C); the loop saves at the next step boundary and returns.

  A second signal raises KeyboardInterrupt at once (no save), for a user who
  does not want to wait for the step and the checkpoint.
  """

  def __init__(self):
    self.requested = None  # the name of the first signal

  def __call__(self, signum, frame):
    del frame
    if self.requested is not None:
      raise KeyboardInterrupt(f'second {signal.Signals(signum).name}: aborted without saving')
    self.requested = signal.Signals(signum).name


def _global_batch(batch: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
  """Process-local rows -> one global array per key, sharded as `batch_sharding`."""
  bs = batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(bs, np.asarray(v)) for k, v in batch.items()}


def train(cfg: TrainConfig, *, stop_after: int | None = None,
          data_iter: Iterator | None = None, eval_data: list | None = None,
          on_log: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
  """Runs (or resumes) training in `cfg.workdir`; returns a summary.

  Args:
    cfg: the run.
    stop_after: stop (with a checkpoint) once this step is reached, as if
      preempted; the schedule still spans `cfg.steps`.
    data_iter: a checkpointable iterator of process-local batches; default
      `data.make_train_iterator(cfg.data, ...)`.
    eval_data: list of process-local eval batches; default from `cfg.data`.
    on_log: called with (step, metrics) at each log step.

  Returns:
    {'losses': {step: loss}, 'final_step', 'stopped': 'done' | 'sigterm' | 'sigint' |
    'stop_after', 'state', 'eval': {step: loss}, 'steps_per_sec'}.
  """
  if cfg.batch_size % (cfg.grad_accum * jax.process_count()):
    raise ValueError(f'batch_size={cfg.batch_size} must divide by grad_accum x processes')
  cfg = finetune.resolve_config(cfg)  # init_from: the checkpoint's model and tokenizer
  restart_data = resume.check(cfg, jax.process_count())  # refuses what a resume cannot honour
  data_lib = _data_lib()
  mesh = sharding.make_mesh(cfg.mesh)
  tx = opt_lib.make_optimizer(cfg.optimizer)
  abstract_state, shardings = state_shardings(cfg, mesh, tx)
  local_batch = cfg.batch_size // jax.process_count()
  if data_iter is None or (eval_data is None and cfg.eval_every):
    data_lib.ensure_tokenizer(cfg.data)
  if data_iter is None:
    data_iter = data_lib.make_train_iterator(
        cfg.data, batch_size=local_batch, seq_len=cfg.seq_len, objective=cfg.objective,
        seed=cfg.seed, model=cfg.model)
  if eval_data is None and cfg.eval_every:
    eval_data = data_lib.make_eval_batches(
        cfg.data, batch_size=local_batch, seq_len=cfg.seq_len, objective=cfg.objective,
        num_batches=cfg.eval_batches, model=cfg.model)

  mngr = checkpoint_manager(cfg)
  latest = mngr.latest_step()
  if latest is not None:  # the run's own checkpoint wins over init_from
    state = restore(mngr, latest, abstract_state, None if restart_data else data_iter)
    if cfg.lora.rank:
      state['base'] = base_params(cfg, mesh)
  else:
    state = init_state(cfg, mesh, tx)
  start = int(jax.device_get(state['step']))
  if jax.process_index() == 0 and (latest is None or restart_data):
    resume.record(cfg, jax.process_count())

  step_fn = jit_train_step(cfg, tx, mesh)
  eval_fn = make_eval_step(cfg, mesh) if eval_data else None
  sampler = None
  if cfg.eval_every and cfg.eval_samples:
    from illada_jax.train_samples import EvalSampler
    sampler = EvalSampler(cfg, mesh)
  writer = train_log.Writer(cfg.workdir, start)
  stop = _Stop()
  old_handlers = ({s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
                  if _main_thread() else {})
  end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
  tokens_per_step = cfg.batch_size * cfg.seq_len
  flops_step = flops_lib.train_flops_per_token(cfg.model, cfg.seq_len) * tokens_per_step
  # MFU only against a known peak: a guessed one would make the figure meaningless.
  peak = (cfg.peak_flops_per_device
          or flops_lib.peak_flops(jax.devices()[0], cfg.model.compute_dtype))
  peak = peak and peak * jax.device_count()

  bar = None
  if cfg.progress_bar and jax.process_index() == 0:
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=start, desc='train', dynamic_ncols=True)

  losses: dict[int, float] = {}
  evals: dict[int, float] = {}
  pending: list[tuple[int, dict]] = []
  reason = 'done'
  last_time, last_step = time.perf_counter(), start
  t_begin = time.perf_counter()

  def flush(step: int):
    """Pulls pending metrics to the host, checks them, logs the latest."""
    nonlocal last_time, last_step
    if not pending:
      return
    host = jax.device_get(pending)  # waits for the steps to finish
    pending.clear()
    if bar is not None:  # the bar counts finished steps, not dispatched ones
      bar.update(len(host))
    for s, m in host:
      loss = float(m['loss'])
      if not math.isfinite(loss) or not m['params_finite']:
        what = f'loss {loss}' if not math.isfinite(loss) else 'parameters after the update'
        raise FloatingPointError(
            f'non-finite {what} at step {s}: stopping without saving this state; '
            f'the last good checkpoint is step {mngr.latest_step()} in {mngr.directory}')
      losses[s] = loss
    s, m = host[-1]
    now = time.perf_counter()
    dt = max(now - last_time, 1e-9)
    n = max(step - last_step, 1)
    last_time, last_step = now, step
    logged = {k: float(v) for k, v in m.items()}
    logged['tokens_per_sec'] = n * tokens_per_step / dt
    if peak:
      logged['mfu'] = n * flops_step / dt / peak
    writer.write(s, logged)
    if bar is not None:
      mfu = {'mfu': f"{logged['mfu']:.1%}"} if peak else {}
      bar.set_postfix(loss=f"{logged['loss']:.3f}", acc=f"{logged['masked_accuracy']:.3f}",
                      lr=f"{logged['lr']:.2e}", gnorm=f"{logged['grad_norm']:.2f}",
                      tok_s=f"{logged['tokens_per_sec']:.0f}", **mfu, refresh=False)
    if on_log is not None:
      on_log(s, logged)

  try:
    step = start
    while step < end:
      batch = _global_batch(next(data_iter), mesh, cfg.sharding_rules)
      state, metrics = step_fn(state, batch)
      step += 1
      pending.append((step, metrics))
      if step % cfg.log_every == 0:
        flush(step)
      if eval_fn is not None and step % cfg.eval_every == 0:
        vals = [eval_fn(state['params'], _global_batch(b, mesh, cfg.sharding_rules), i,
                        state.get('base'))['loss'] for i, b in enumerate(eval_data)]
        evals[step] = float(np.mean(jax.device_get(vals)))
        writer.write(step, {'eval_loss': evals[step]})
      if sampler is not None and step % cfg.eval_every == 0:
        weights = (lora_lib.merge(cfg.lora, state['base'], state['params']) if cfg.lora.rank
                   else state['params'])  # LoRA: the sampler runs the merged model
        writer.write_samples(step, sampler(weights))
      preempted = _agree(stop.requested is not None)
      if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or preempted:
        flush(step)
        save(mngr, state, data_iter, cfg, force=True)
      if preempted:
        reason = (stop.requested or 'SIGTERM').lower()  # a peer's signal: as a preemption
        break
    else:
      if stop_after is not None and end < cfg.steps:
        reason = 'stop_after'
    flush(step)
    if mngr.latest_step() != step:
      save(mngr, state, data_iter, cfg, force=True)
  finally:
    mngr.wait_until_finished()
    _stamp_model_config(mngr, cfg)
    mngr.close()
    writer.close()
    if bar is not None:
      bar.close()
    for s, handler in old_handlers.items():
      signal.signal(s, handler)
  elapsed = time.perf_counter() - t_begin
  return {'losses': losses, 'eval': evals, 'final_step': step, 'stopped': reason,
          'state': state, 'steps_per_sec': (step - start) / max(elapsed, 1e-9),
          'checkpoint_dir': os.path.join(str(mngr.directory), str(step))}


def _main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def _agree(flag: bool) -> bool:
  """True on every process if any process got SIGTERM."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
