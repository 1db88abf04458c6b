"""Every CLI turns a user mistake into one line on stderr and exit 2, before any model loads."""

import os
import subprocess
import sys
import time

import pytest

import illada_jax
import illada_jax.demo
from illada_jax import lora, train as train_lib
from illada_jax.checkpoint import store
from illada_jax.cli import convert as convert_cli
from illada_jax.cli import demo as demo_cli
from illada_jax.cli import sample as sample_cli
from illada_jax.cli import score as score_cli
from illada_jax.cli import train as train_cli

from helpers import REPO, WORD_CFG, word_checkpoint, write_jsonl


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
  """A tiny checkpoint, a damaged and an empty one, inputs, a train config, a LoRA step dir."""
  root = tmp_path_factory.mktemp('cli_errors')
  ckpt, _ = word_checkpoint(str(root))
  damaged = root / 'damaged'
  damaged.mkdir()
  (damaged / 'model_config.json').write_text('{"num_layers": ')
  (damaged / 'params').mkdir()
  no_params = root / 'no_params'
  no_params.mkdir()
  store.write_config(str(no_params), WORD_CFG)
  prompts = write_jsonl(root / 'in.jsonl', [{'prompt': 'w1 w2'}])
  items = write_jsonl(root / 'items.jsonl', [{'context': 'w1', 'continuation': 'w2'}])
  docs = write_jsonl(root / 'docs.jsonl', [{'text': 'w1 w2'}])
  (root / 'a_file').write_text('x')
  config = root / 'cfg.py'
  config.write_text('from illada_jax.config import DataConfig\n'
                    'from illada_jax.train_config import TrainConfig\n'
                    f'CONFIG = TrainConfig(data=DataConfig(paths=({docs!r},), tokenizer='
                    f'{os.path.join(ckpt, "tokenizer.json")!r}), workdir={str(root / "run")!r},'
                    " mesh='data=1,fsdp=-1,tensor=1')\n")
  step = root / 'step'  # a LoRA step directory whose base is the checkpoint
  step.mkdir()
  store.write_config(str(step), WORD_CFG)
  lora.write_info(str(step), lora.LoraConfig(rank=2), base=ckpt, seed=0)
  return {'ROOT': str(root), 'CKPT': ckpt, 'DAMAGED': str(damaged), 'NOPARAMS': str(no_params),
          'PROMPTS': prompts, 'ITEMS': items, 'CONFIG': str(config), 'STEP': str(step),
          'FILE': str(root / 'a_file')}


S = ['--ckpt', 'CKPT', '--prompt', 'w1', '--gen-length', '8', '--no-progress']
C = ['--ckpt', 'CKPT', '--input', 'ITEMS', '--no-progress']
T = ['--config', 'CONFIG']
# (cli, argv, a word the message must name)
CASES = [
    ('sample', ['--ckpt', 'ROOT/nope', '--prompt', 'w1'], '--ckpt'),
    ('sample', ['--ckpt', 'DAMAGED', '--prompt', 'w1'], 'model_config.json'),
    ('sample', ['--ckpt', 'NOPARAMS', '--prompt', 'w1'], 'params'),
    ('sample', ['--ckpt', 'STEP', '--prompt', 'w1'], 'merge-lora'),
    ('sample', ['--ckpt', 'CKPT', '--prompts', 'ROOT/missing.jsonl'], '--prompts'),
    ('sample', S + ['--gen-length', '0'], '--gen-length'),
    ('sample', S + ['--block-length', '5'], 'block'),
    ('sample', S + ['--cache', 'bogus'], '--cache'),
    ('sample', S + ['--slots', '0'], '--slots'),
    ('sample', S + ['--slots', 'x'], '--slots'),
    ('sample', S + ['--buckets', 'abc'], '--buckets'),
    ('sample', S + ['--buckets', '999'], '--buckets'),
    ('sample', S + ['--mesh', 'data=3'], '--mesh'),
    ('sample', S + ['--mesh', 'nodes=2'], '--mesh'),
    ('sample', S + ['--out', 'FILE/out.jsonl'], '--out'),
    ('sample', S + ['--out', 'ROOT'], '--out'),
    ('sample', ['--ckpt', 'CKPT', '--prompts', 'PROMPTS', '--out', 'PROMPTS'], 'is the --prompts'),
    ('sample', S + ['--out', 'CKPT/out.jsonl'], 'inside the --ckpt'),
    ('score', C + ['--out', 'ITEMS'], 'is the --input'),
    ('sample', S + ['--gen-length', '64'], '--gen-length'),
    ('sample', S + ['--variable-length', '--gen-length', '64', '--block-length', '64'],
     '--block-length'),
    ('sample', S + ['--temperature', 'hot'], 'temperature'),
    ('sample', S + ['--tokenizer', 'ROOT/none.json'], '--tokenizer'),
    ('sample', ['--ckpt', 'CKPT'], '--prompt'),
    ('score', C + ['--slots', '0'], '--slots'),
    ('score', ['--ckpt', 'CKPT', '--input', 'ROOT/missing.jsonl'], '--input'),
    ('score', C + ['--method', 'bogus'], 'method'),
    ('score', C + ['--mesh', 'data=16'], '--mesh'),
    ('train', ['--config', 'ROOT/missing.py'], 'missing.py'),
    ('train', ['--config', 'no_such_config'], 'no_such_config'),
    ('train', T + ['--set', 'foo=1'], 'foo'),
    ('train', T + ['--set', 'steps=abc'], 'steps'),
    ('train', T + ['--set', 'steps=0'], 'steps'),
    ('train', T + ['--set', 'data.paths=/x.jsonl'], 'data.paths'),
    ('train', T + ['--set', 'data=1'], 'data'),
    ('train', T + ['--set', 'steps'], '--set'),
    ('train', T + ['--set', 'mesh=data=3'], 'mesh'),
    ('train', T + ['--set', 'workdir=FILE/run'], 'workdir'),
    ('train', T + ['--set', 'init_from=ROOT/nope'], 'init_from'),
    ('train', T + ['--set', 'init_from=DAMAGED'], 'init_from'),
    ('train', T + ['--set', 'init_from=CKPT', '--set', 'workdir=CKPT/run'], 'init_from checkpoint'),
    ('train', T + ['--set', 'objective=rl'], 'objective'),
    ('train', T + ['--set', 'lora.rank=-1'], 'lora.rank'),
    ('train', T + ['--set', 'data.tokenizer=ROOT/none.model'], 'data.tokenizer'),
    ('convert', ['merge-lora', 'STEP', 'CKPT', '--overwrite'], 'base checkpoint'),
    ('convert', ['merge-lora', 'STEP', 'STEP/merged', '--overwrite'], 'step directory'),
    ('convert', ['merge-lora', 'STEP', 'ROOT/m', '--base', 'ROOT/nope'], 'nope'),
    ('convert', ['hf-to-orbax', 'ROOT/nope', 'ROOT/out'], 'nope'),
    ('convert', ['orbax-to-hf', 'CKPT', 'CKPT/hf'], 'inside'),
    ('convert', ['orbax-to-hf', 'CKPT', 'ROOT/hf', '--dtype', 'int8'], '--dtype'),
    ('demo', ['--steps', '0'], '--steps'),
    ('demo', ['--out', 'FILE/demo'], '--out'),
]
MAINS = {'sample': sample_cli.main, 'score': score_cli.main, 'train': train_cli.main,
         'convert': convert_cli.main, 'demo': demo_cli.main}


def _fill(argv, ws):
  """Names of `ws` (alone, before a '/', or after '=') replaced by their paths."""
  out = []
  for a in argv:
    head, eq, value = a.rpartition('=') if '=' in a and not a.startswith('-') else ('', '', a)
    for key in sorted(ws, key=len, reverse=True):
      if value == key or value.startswith(key + '/'):
        value = ws[key] + value[len(key):]
        break
    out.append(head + eq + value)
  return out


@pytest.fixture
def no_model(monkeypatch):
  """Loading a model, training or merging fails the test."""
  def loaded(*a, **k):
    raise AssertionError('a model was loaded for a bad invocation')
  monkeypatch.setattr(illada_jax, 'load_checkpoint', loaded)
  monkeypatch.setattr(store, 'load_checkpoint', loaded)
  monkeypatch.setattr(train_lib, 'train', loaded)
  monkeypatch.setattr(illada_jax.demo, 'run', loaded)


@pytest.mark.parametrize('cli,argv,names', CASES, ids=[f'{c}:{" ".join(a)}' for c, a, _ in CASES])
def test_a_bad_invocation_is_one_line_and_exit_2(ws, no_model, capsys, cli, argv, names):
  start = time.perf_counter()
  try:
    rc = MAINS[cli](_fill(argv, ws))
  except SystemExit as e:  # argparse
    rc = e.code
  seconds = time.perf_counter() - start
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert rc == 2, err
  assert len(lines) == 1, err
  assert names in lines[0] and 'Traceback' not in err, err
  assert seconds < 10, seconds
  assert os.path.isfile(os.path.join(ws['CKPT'], 'model_config.json'))  # inputs untouched


@pytest.mark.parametrize('argv,names', [
    (['illada_jax.cli.sample', '--ckpt', 'nope', '--prompt', 'w1'], '--ckpt'),
    (['illada_jax.cli.train', '--config', 'missing.py'], 'missing.py')])
def test_a_bad_invocation_in_a_real_process(tmp_path, argv, names):
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  r = subprocess.run([sys.executable, '-m', *argv], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and names in lines[0], r.stderr


def test_set_parses_by_the_declared_type():
  from illada_jax import train_config
  cfg = train_config.TrainConfig()
  assert train_config.override(cfg, 'data.paths', '/x.jsonl').data.paths == ('/x.jsonl',)
  assert train_config.override(cfg, 'data.paths', 'a.jsonl,b.jsonl').data.paths == (
      'a.jsonl', 'b.jsonl')
  assert train_config.override(cfg, 'init_from', '/c/k').init_from == '/c/k'
  assert train_config.override(cfg, 'mesh', 'data=2,fsdp=4').mesh == 'data=2,fsdp=4'
  assert train_config.override(cfg, 'steps', '1e3').steps == 1000
  assert train_config.override(cfg, 'model.bos_token_id', 'None').model.bos_token_id is None
  with pytest.raises(ValueError, match=r'--set steps=1\.5'):
    train_config.override(cfg, 'steps', '1.5')


def test_empty_prompts_file_warns_and_exits_0_with_a_summary(ws, no_model, tmp_path, capsys):
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n')
  out = tmp_path / 'out.jsonl'
  assert sample_cli.main(['--ckpt', ws['CKPT'], '--prompts', str(empty), '--out', str(out),
                          '--gen-length', '8']) == 0
  err = capsys.readouterr().err
  assert 'warning' in err and 'no records' in err and '0 requests' in err
  assert out.read_text() == ''


def test_help_shows_each_default_once(capsys):
  with pytest.raises(SystemExit):
    sample_cli.main(['--help'])
  text = ' '.join(capsys.readouterr().out.split())
  assert 'default: gen_length' in text
  for chunk in text.split('--')[1:]:
    assert chunk.count('default:') <= 1, chunk


def test_no_accelerator_device_means_cpu_only_unless_chosen(tmp_path):
  from illada_jax.cli import _common
  env = {}
  _common.quiet_platforms(env, patterns=(str(tmp_path / 'accel*'),))
  assert env == {'JAX_PLATFORMS': 'cpu'}  # libtpu is never loaded on a CPU machine
  (tmp_path / 'accel0').write_text('')
  env = {}
  _common.quiet_platforms(env, patterns=(str(tmp_path / 'accel*'),))
  assert env == {}  # a TPU host: JAX picks its platform
  env = {'JAX_PLATFORMS': 'tpu'}
  _common.quiet_platforms(env, patterns=(str(tmp_path / 'none*'),))
  assert env == {'JAX_PLATFORMS': 'tpu'}  # the user's choice stands
