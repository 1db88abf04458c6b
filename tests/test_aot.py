"""Ahead-of-time compilation of the train step and the engine's block program for a TPU topology."""

import importlib.util
import os
import types

import jax
import pytest

pytest.importorskip('libtpu')

_TOOL = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'tools', 'aot_compile.py')


def _tool():
  spec = importlib.util.spec_from_file_location('aot_compile', _TOOL)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.tpu
@pytest.mark.slow
def test_small_preset_compiles_for_v5p_8(capsys):
  aot = _tool()
  devices, hbm = aot.topology_devices('v5p-8')
  assert len(devices) == 4 and devices[0].platform == 'tpu'
  args = types.SimpleNamespace(
      preset='illada_tiny', topology='v5p-8', seq_len=512, mesh='data=1,fsdp=-1,tensor=1',
      objective='pretrain', attention='splash', remat='full', param_dtype='float32',
      state_dtype='float32', loss_chunk=64)
  # conftest asks for 'highest' matmul precision (f32 emulation), which the
  # bfloat16 TPU attention kernels reject; compile as production would.
  with jax.default_matmul_precision('default'):
    row = aot.try_batch(args, devices, hbm, per_device_batch=2)
    cfg = aot.train_config(args, len(devices), 1)
    compiled = aot.compile_engine_block(cfg.model, devices, 'data=4', slots=8, bucket=32,
                                        gen=32, block=8)
  assert row['error'] is None and row['fits']
  mem = row['memory_gib']
  assert 0 < mem['peak'] < 1 and mem['argument'] > 0
  assert 'fits' in capsys.readouterr().out
  assert compiled.memory_analysis().peak_memory_in_bytes > 0


@pytest.mark.tpu
def test_tiny_lora_sft_config_compiles_for_v5p_8(tmp_path, capsys):
  """`--config` compiles a config file's own step: here LoRA SFT (frozen base, adapters)."""
  from illada_jax import train
  from illada_jax.lora import LoraConfig
  from helpers import write_train_config
  aot = _tool()
  model = train.TrainConfig().model.replace(
      num_layers=2, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32, mlp_hidden=256,
      vocab_size=512, param_dtype='bfloat16', compute_dtype='bfloat16', attention_impl='xla')
  cfg = train.TrainConfig(model=model, objective='sft', seq_len=128, loss_chunk=64,
                          lora=LoraConfig(rank=4, alpha=8.0))
  args = types.SimpleNamespace(config=write_train_config(tmp_path / 'lora.py', cfg),
                               topology='v5p-8')
  devices, hbm = aot.topology_devices('v5p-8')
  with jax.default_matmul_precision('default'):
    row = aot.try_batch(args, devices, hbm, per_device_batch=2)
  assert row['error'] is None and row['fits'], row
  assert 0 < row['memory_gib']['argument'] < row['memory_gib']['peak'] < 1
  assert 'lora L=128 v5p-8 (4 chips) per-device batch 2' in capsys.readouterr().out
