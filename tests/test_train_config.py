"""TrainConfig from config files and `--set` overrides."""

import glob
import os
import re

import pytest

from illada_jax import data, train_config
from illada_jax.optimizer import OptimizerConfig
from helpers import REPO, SHARED, tiny_config, write_train_config


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


def test_init_from_is_a_setting():
  cfg = train_config.override(train_config.TrainConfig(), 'init_from', '/ckpts/illada-8b')
  assert cfg.init_from == '/ckpts/illada-8b' and train_config.TrainConfig().init_from == ''


# Strings that only exist on one machine (a home, a mount, this project's host).
_MACHINE_PATH = re.compile(r"""['"](/work/|/home/|/Users/|/mnt/|/root/)""")


def test_no_absolute_machine_path_in_configs_tests_or_tools():
  bad = []
  for sub in ('configs', 'tests', 'tools'):
    for path in sorted(glob.glob(os.path.join(REPO, sub, '**', '*.py'), recursive=True)):
      for n, line in enumerate(open(path), 1):
        if _MACHINE_PATH.search(line) and '_MACHINE_PATH' not in line:
          bad.append(f'{os.path.relpath(path, REPO)}:{n}: {line.strip()}')
  assert not bad, bad


def test_shakespeare_config_finds_shared_data_beside_the_checkout_or_names_the_setting():
  cfg = train_config.load_config(os.path.join(REPO, 'configs', 'shakespeare_tiny.py'))
  (path,) = cfg.data.paths
  assert os.path.samefile(os.path.dirname(path), os.path.join(SHARED, 'data')) \
      if os.path.isdir(os.path.join(SHARED, 'data')) else path.endswith('tinyshakespeare.txt')
  with pytest.raises(FileNotFoundError, match=r'data\.paths'):
    data.record_source((os.path.join(REPO, 'no_such_dir', 'tinyshakespeare.txt'),))
