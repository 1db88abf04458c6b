"""TrainConfig from config files and `--set` overrides."""

import pytest

from illada_jax import train_config
from illada_jax.optimizer import OptimizerConfig
from helpers import tiny_config, write_train_config


def test_override():
  cfg = train_config.TrainConfig()
  cfg = train_config.override(cfg, 'optimizer.lr', '1e-3')
  cfg = train_config.override(cfg, 'model.num_layers', '2')
  cfg = train_config.override(cfg, 'data.paths', "('a.txt', 'b.txt')")
  cfg = train_config.override(cfg, 'async_checkpoints', 'false')
  assert cfg.optimizer.lr == 1e-3 and cfg.model.num_layers == 2
  assert cfg.data.paths == ('a.txt', 'b.txt') and cfg.async_checkpoints is False
  with pytest.raises(ValueError, match='no field'):
    train_config.override(cfg, 'optimizer.lrr', '1')


def test_config_file_round_trip(tmp_path):
  cfg = tiny_config(str(tmp_path), steps=3, optimizer=OptimizerConfig(lr=0.5))
  path = write_train_config(tmp_path / 'cfg.py', cfg)
  assert train_config.load_config(path) == cfg
  (tmp_path / 'bad.py').write_text('CONFIG = 3\n')
  with pytest.raises(ValueError, match='defines no CONFIG'):
    train_config.load_config(str(tmp_path / 'bad.py'))
