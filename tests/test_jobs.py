"""JSONL jobs: resume after a kill, torn lines, bad records, input order, several processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import pytest

from illada_jax import job_requests, jobs
from illada_jax.sampling import SamplingOptions

from helpers import read_jsonl, word_checkpoint, write_jsonl


def _records(tmp_path, rows):
  return jobs.read_records(write_jsonl(tmp_path / 'in.jsonl', rows))


def _fake(fail_after=None):
  """prepare/execute that 'complete' records in reverse order, optionally dying midway."""
  def prepare(r):
    if 'prompt' not in r.data:
      raise ValueError('expected a "prompt"')
    return r

  def execute(items):
    for k, r in enumerate(reversed(items)):
      if fail_after is not None and k == fail_after:
        raise KeyboardInterrupt
      yield r.id, {'echo': r.data['prompt'].upper()}, 1, 2
  return prepare, execute


def test_interrupted_job_resumes_to_the_uninterrupted_file(tmp_path):
  rows = [{'prompt': f'p{i}'} for i in range(6)] + [{'id': 'z', 'prompt': 'last'}]
  records = _records(tmp_path, rows)
  whole = tmp_path / 'whole.jsonl'
  s = jobs.run(records, str(whole), *_fake(), progress=False, log=lambda m: None)
  assert (s.done, s.output_tokens, s.generated_tokens) == (7, 7, 14)
  assert [r['id'] for r in read_jsonl(whole)] == [1, 2, 3, 4, 5, 6, 'z']  # input order
  out = tmp_path / 'out.jsonl'
  with pytest.raises(KeyboardInterrupt):
    jobs.run(records, str(out), *_fake(fail_after=3), progress=False, log=lambda m: None)
  assert len(read_jsonl(out)) == 3  # flushed as they finished
  with open(out, 'a') as f:
    f.write('{"id": 2, "echo": "P')  # a write cut by the kill
  s = jobs.run(records, str(out), *_fake(), progress=False, log=lambda m: None)
  assert (s.skipped, s.done) == (3, 4)
  assert out.read_bytes() == whole.read_bytes()
  s = jobs.run(records, str(out), *_fake(), progress=False, log=lambda m: None)
  assert (s.skipped, s.done) == (7, 0) and out.read_bytes() == whole.read_bytes()


def test_bad_records_are_named_and_skipped_or_stop_the_job(tmp_path):
  rows = [{'prompt': 'a'}, '{"prompt": ', '[1, 2]', {'no': 'prompt'}, {'id': 'k', 'prompt': 'b'},
          {'id': 'k', 'prompt': 'again'}, {'id': True, 'prompt': 'c'}]
  records = _records(tmp_path, rows)
  logged = []
  out = tmp_path / 'out.jsonl'
  s = jobs.run(records, str(out), *_fake(), progress=False, log=logged.append)
  got = {r['id']: r for r in read_jsonl(out)}
  src = str(tmp_path / 'in.jsonl')
  assert got[2]['error'].startswith(f'{src}:2: invalid JSON')
  assert got[3]['error'] == f'{src}:3: expected a JSON object'
  assert got[4]['error'] == f'{src}:4: expected a "prompt"'
  assert got[7]['error'] == f'{src}:7: "id" must be a string or an integer'
  assert got[1]['echo'] == 'A' and got['k']['echo'] == 'B'
  assert any(f'{src}:6: duplicate id' in m for m in logged)  # no record: the id is taken
  assert s.errors == 5 and s.done == 2
  with pytest.raises(jobs.JobError, match=f'{src}:2: invalid JSON'):
    jobs.run(records, str(tmp_path / 'stop.jsonl'), *_fake(), on_error='stop', progress=False)


def test_parts_of_several_processes_merge_in_input_order(tmp_path):
  records = _records(tmp_path, [{'prompt': f'p{i}'} for i in range(5)])
  out = str(tmp_path / 'out.jsonl')
  for i in (1, 0):  # process 0 merges once both parts exist (the barrier's job)
    s = jobs.run(records, out, *_fake(), process_index=i, process_count=2, progress=False,
                 log=lambda m: None)
    assert s.total == (3 if i == 0 else 2)
  assert [r['id'] for r in read_jsonl(out)] == [1, 2, 3, 4, 5]
  assert not [p for p in os.listdir(tmp_path) if '.part-' in p]



def test_bad_lines_line_number_ids_never_collide_with_explicit_ids(tmp_path):
  """A bad line's id is its line number: an explicit id equal to it (either order) is a dup."""
  records = _records(tmp_path, ['{oops', {'id': 1, 'prompt': 'a'}, {'id': 4, 'prompt': 'b'},
                                '[4]', {'prompt': 'c'}])
  src = str(tmp_path / 'in.jsonl')
  logged = []
  out = tmp_path / 'out.jsonl'
  s = jobs.run(records, str(out), *_fake(), progress=False, log=logged.append)
  got = read_jsonl(out)
  ids = [r['id'] for r in got]
  assert ids == [1, 4, 5] and len(set(ids)) == len(ids)  # every id exactly once
  assert got[0]['error'].startswith(f'{src}:1: invalid JSON') and got[1]['echo'] == 'B'
  assert any(m.startswith(f'error: {src}:2: duplicate id 1 (first on line 1)') for m in logged)
  assert any(f'{src}:4: expected a JSON object' in m and 'duplicate id' in m
             and 'first on line 3' in m for m in logged)
  assert (s.errors, s.done) == (3, 2)


def test_bytes_that_are_not_utf8_are_a_bad_line_and_a_bom_is_dropped(tmp_path):
  path = tmp_path / 'in.jsonl'
  path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "caf\xe9"}\n'
                   b'{"prompt": "\\ud800"}\n{"prompt": "d"}\n')
  records = jobs.read_records(str(path))
  assert [(r.id, r.data) for r in records if r.error is None] == [
      (1, {'prompt': 'a'}), (4, {'prompt': 'd'})]
  errors = {r.id: r.error for r in records if r.error}
  assert errors[2] == f'{path}:2: not UTF-8 (byte 0xe9 at byte 16 of the line)'
  assert errors[3].startswith(f'{path}:3: a string holds a lone UTF-16 surrogate')
  out = tmp_path / 'out.jsonl'
  jobs.run(records, str(out), *_fake(), progress=False, log=lambda m: None)
  assert [r['id'] for r in read_jsonl(out)] == [1, 2, 3, 4]


def _generation(tmp_path, rows, **kw):
  """Runs `generation_requests`' prepare on `rows` over a stand-in engine: (requests, out)."""
  engine = types.SimpleNamespace(cfg=None, options_for=lambda o: o, check=lambda req: None)
  fmt = types.SimpleNamespace(encode=lambda tok, cfg, prompt, chat: [len(str(prompt))])
  prepare, _ = job_requests.generation_requests(engine, None, fmt, SamplingOptions(), **kw)

  def execute(items):
    for req, echo in items:
      yield req.id, {**echo, 'stop': list(req.stop), 'seed': req.seed,
                     'temperature': req.options.temperature,
                     'max_new_tokens': req.max_new_tokens}, 1, 1
  out = tmp_path / 'out.jsonl'
  s = jobs.run(_records(tmp_path, rows), str(out), prepare, execute, progress=False,
               log=lambda m: None)
  return s, {r['id']: r for r in read_jsonl(out)}


def test_badly_typed_fields_are_errors_of_their_record_not_of_the_job(tmp_path):
  rows = [{'id': 't', 'prompt': '70+39=', 'temperature': [1]},
          {'prompt': 'x', 'seed': [3]}, {'prompt': 'x', 'seed': '3'},
          {'prompt': 'x', 'max_new_tokens': True}, {'prompt': 'x', 'stop': [1]},
          {'prompt': 'x', 'temperature': True},
          {'id': 'ok', 'prompt': 'y', 'stop': None, 'seed': 2 ** 32 + 5, 'temperature': 1,
           'max_new_tokens': 3},
          {'id': 'default', 'prompt': 'z'}]
  s, got = _generation(tmp_path, rows, stop=('\n',), max_new_tokens=9)
  src = tmp_path / 'in.jsonl'
  assert got['t']['error'] == f'{src}:1: "temperature" must be a number, got [1]'
  assert got[2]['error'] == f'{src}:2: "seed" must be an integer, got [3]'
  assert got[3]['error'] == f"{src}:3: \"seed\" must be an integer, got '3'"
  assert got[4]['error'] == f'{src}:4: "max_new_tokens" must be a positive integer, got True'
  assert got[5]['error'] == f'{src}:5: "stop" must be a string or a list of strings'
  assert got[6]['error'] == f'{src}:6: "temperature" must be a number, got True'
  assert got['ok'] == {'id': 'ok', 'prompt': 'y', 'stop': [], 'seed': 5, 'temperature': 1.0,
                       'max_new_tokens': 3,  # "stop": null is no stop strings
                       jobs.HASH_KEY: jobs.input_hash(jobs.Record('', 'ok', rows[6]))}
  assert got['default']['stop'] == ['\n'] and got['default']['max_new_tokens'] == 9
  assert (s.errors, s.done) == (6, 2)


def test_a_corrupt_line_before_the_last_of_the_output_stops_the_resume(tmp_path):
  records = _records(tmp_path, [{'prompt': f'p{i}'} for i in range(4)])
  out = tmp_path / 'out.jsonl'
  jobs.run(records, str(out), *_fake(), progress=False, log=lambda m: None)
  lines = out.read_text().splitlines(keepends=True)
  before = ''.join(lines[:1] + ['{"id": 2, "ec\n'] + lines[2:])
  out.write_text(before)
  with pytest.raises(jobs.JobError, match=f'{out}:2: corrupt result line'):
    jobs.run(records, str(out), *_fake(), progress=False, log=lambda m: None)
  assert out.read_text() == before  # nothing cut, nothing appended
  out.write_bytes(lines[0].encode() + b'{"id": 2, "echo": "\xff"}\n' + ''.join(lines[2:]).encode())
  with pytest.raises(jobs.JobError, match=f'{out}:2: corrupt result line'):
    jobs.run(records, str(out), *_fake(), progress=False, log=lambda m: None)
  out.write_text(''.join(lines[:1] + ['[2]\n'] + lines[2:]))
  with pytest.raises(jobs.JobError, match=f'{out}:2: corrupt result line'):
    jobs.run(records, str(out), *_fake(), progress=False, log=lambda m: None)
  out.write_text(''.join(lines[:3]) + '{"id": 4, "ec\n')  # a torn last line, with its newline
  s = jobs.run(records, str(out), *_fake(), progress=False, log=lambda m: None)
  assert (s.skipped, s.done) == (3, 1) and out.read_text() == ''.join(lines)


def test_error_records_are_retried_on_resume(tmp_path):
  """A job-wide mistake (every record refused) is fixed by rerunning with a good option."""
  rows = [{'prompt': 'x' * n} for n in (1, 5, 2, 6)] + ['{bad']
  records = _records(tmp_path, rows)
  out = tmp_path / 'out.jsonl'

  def limited(limit):
    def prepare(r):
      if len(r.data['prompt']) > limit:
        raise ValueError(f'prompt longer than {limit}')
      return r
    return prepare, _fake()[1]

  s = jobs.run(records, str(out), *limited(1), progress=False, log=lambda m: None)
  assert (s.errors, s.done) == (4, 1)
  assert [('error' in r) for r in read_jsonl(out)] == [False, True, True, True, True]
  s = jobs.run(records, str(out), *limited(5), progress=False, log=lambda m: None)
  assert (s.skipped, s.errors, s.done) == (1, 2, 2)  # 6 x and the bad line still errors
  got = read_jsonl(out)
  assert [r['id'] for r in got] == [1, 2, 3, 4, 5]
  assert [r.get('echo') for r in got[:3]] == ['X', 'XXXXX', 'XX']
  assert got[3]['error'].endswith('prompt longer than 5') and 'error' in got[4]
  s = jobs.run(records, str(out), *limited(9), progress=False, log=lambda m: None)
  assert (s.skipped, s.errors, s.done) == (3, 1, 1)
  assert [r['id'] for r in read_jsonl(out)] == [1, 2, 3, 4, 5]
  assert read_jsonl(out)[3]['echo'] == 'X' * 6


def test_error_records_of_one_process_are_retried_by_several(tmp_path):
  records = _records(tmp_path, [{'prompt': f'p{i}'} for i in range(5)])
  out = str(tmp_path / 'out.jsonl')

  def refuse(r):
    raise ValueError('gen_length too long')
  s = jobs.run(records, out, refuse, _fake()[1], progress=False, log=lambda m: None)
  assert s.errors == 5 and all('error' in r for r in read_jsonl(out))
  for i in (1, 0):
    s = jobs.run(records, out, *_fake(), process_index=i, process_count=2, progress=False,
                 log=lambda m: None)
    assert (s.skipped, s.errors, s.done) == (0, 0, 3 if i == 0 else 2)
  assert [{k: v for k, v in r.items() if k != jobs.HASH_KEY} for r in read_jsonl(out)] == [
      {'id': i, 'echo': f'P{i - 1}'} for i in range(1, 6)]


def test_a_record_whose_input_changed_is_recomputed(tmp_path):
  out = tmp_path / 'out.jsonl'
  rows = [{'prompt': f'p{i}'} for i in range(4)]
  jobs.run(_records(tmp_path, rows), str(out), *_fake(), progress=False, log=lambda m: None)
  rows[1] = {'prompt': 'changed'}
  s = jobs.run(_records(tmp_path, rows), str(out), *_fake(), progress=False, log=lambda m: None)
  assert (s.skipped, s.changed, s.done) == (3, 1, 1)
  got = read_jsonl(out)
  assert [r['echo'] for r in got] == ['P0', 'CHANGED', 'P2', 'P3']
  assert got[1][jobs.HASH_KEY] == jobs.input_hash(_records(tmp_path, rows)[1]) != \
      got[0][jobs.HASH_KEY]


def test_another_checkpoint_or_setting_is_refused_unless_restart(tmp_path):
  out = str(tmp_path / 'out.jsonl')
  records = _records(tmp_path, [{'prompt': f'p{i}'} for i in range(3)])
  run = lambda by, **kw: jobs.run(records, out, *_fake(), progress=False, log=lambda m: None,
                                  produced_by=by, **kw)
  by = {'checkpoint': 'ck#1', 'settings': {'gen_length': 8, 'chat': False}}
  assert run(by).done == 3 and run(by).skipped == 3
  with pytest.raises(jobs.JobError, match=r'settings\.gen_length was 8, now 16.*--restart'):
    run({**by, 'settings': {'gen_length': 16, 'chat': False}})
  with pytest.raises(jobs.JobError, match="checkpoint was 'ck#1', now 'ck#2'"):
    run({**by, 'checkpoint': 'ck#2'})
  s = run({**by, 'checkpoint': 'ck#2'}, restart=True)
  assert (s.skipped, s.done) == (0, 3) and len(read_jsonl(out)) == 3
  assert run({**by, 'checkpoint': 'ck#2'}).skipped == 3


def test_checkpoint_identity_follows_the_weights_files(tmp_path):
  (tmp_path / 'params').mkdir()
  (tmp_path / 'model_config.json').write_text('{}')
  (tmp_path / 'params' / 'a').write_bytes(b'1')
  first = jobs.checkpoint_identity(str(tmp_path))
  assert jobs.checkpoint_identity(str(tmp_path)) == first
  (tmp_path / 'params' / 'a').write_bytes(b'12')
  assert jobs.checkpoint_identity(str(tmp_path)) != first

# -- the real CLI -----------------------------------------------------------------

FLAGS = ['--gen-length', '8', '--block-length', '4', '--steps', '4', '--variable-length',
         '--slots', '2', '--no-progress']


def _cli(*args, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             **(env_extra or {}))
  return subprocess.Popen([sys.executable, '-m', 'illada_jax.cli.sample', *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_cli_killed_midway_resumes_and_matches_an_uninterrupted_run(tmp_path):
  path, _ = word_checkpoint(str(tmp_path))
  prompts = write_jsonl(tmp_path / 'in.jsonl', [
      {'prompt': ' '.join(f'w{(7 * i + j) % 50}' for j in range(1 + i % 5))} for i in range(240)])
  whole = tmp_path / 'whole.jsonl'
  proc = _cli('--ckpt', path, '--prompts', prompts, '--out', str(whole), *FLAGS)
  log = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, log[-2000:]
  assert 'output' in log and 'computed' in log and 'tok/s' in log  # the summary line
  out = tmp_path / 'out.jsonl'
  proc = _cli('--ckpt', path, '--prompts', prompts, '--out', str(out), *FLAGS)
  deadline = time.time() + 600
  while not (out.exists() and len(out.read_text().splitlines()) >= 4):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-2000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  written = out.read_text().splitlines()
  assert 4 <= len(written) < 240
  with open(out, 'a') as f:
    f.write('{"id": 99, "completion": "w1 w')  # torn by the kill
  proc = _cli('--ckpt', path, '--prompts', prompts, '--out', str(out), *FLAGS)
  log = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, log[-2000:]
  assert f'{len(written)} already written' in log
  assert out.read_bytes() == whole.read_bytes()
  assert [r['id'] for r in read_jsonl(out)] == list(range(1, 241))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_the_records_of_one(tmp_path):
  path, _ = word_checkpoint(str(tmp_path))
  prompts = write_jsonl(tmp_path / 'in.jsonl', [
      {'prompt': ' '.join(f'w{(3 * i + j) % 50}' for j in range(1 + i % 4)), 'seed': i}
      for i in range(9)])
  flags = [*FLAGS, '--temperature', '0.7', '--mesh', 'data=2']
  one = tmp_path / 'one.jsonl'
  proc = _cli('--ckpt', path, '--prompts', prompts, '--out', str(one), *flags)
  log = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, log[-2000:]
  two = tmp_path / 'two.jsonl'
  port = _free_port()
  procs = [_cli('--ckpt', path, '--prompts', prompts, '--out', str(two), *flags,
                '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2', '--process-id',
                str(i)) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  assert '5 requests' in logs[0] and '4 requests' in logs[1]  # records i mod 2
  assert two.read_bytes() == one.read_bytes()
  assert not [p for p in os.listdir(tmp_path) if '.part-' in p]


@pytest.mark.slow
def test_a_failing_process_stops_the_whole_job_within_seconds_and_stays_resumable(tmp_path):
  """Process 1 owns a bad record under --on-error stop: both processes exit non-zero within
  seconds of each other, naming process 1 and the record (before: 308 s, then exit 134)."""
  path, _ = word_checkpoint(str(tmp_path))
  prompts = write_jsonl(tmp_path / 'in.jsonl', [{'prompt': 'w1 w2'}, {'no': 'prompt'},
                                                {'prompt': 'w3'}, {'prompt': 'w4 w5'}])
  out = tmp_path / 'out.jsonl'

  def pair(*extra):
    port = _free_port()
    procs = [_cli('--ckpt', path, '--prompts', prompts, '--out', str(out), *FLAGS, *extra,
                  '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2',
                  '--process-id', str(i)) for i in range(2)]
    ended = [None, None]
    deadline = time.monotonic() + 400
    while None in ended:
      for i, p in enumerate(procs):
        if ended[i] is None and p.poll() is not None:
          ended[i] = time.monotonic()
      if time.monotonic() > deadline:
        for p in procs:
          p.kill()
        raise AssertionError('a process of the job hung')
      time.sleep(0.05)
    return procs, [p.communicate()[0] for p in procs], ended

  procs, logs, ended = pair('--on-error', 'stop')
  assert procs[0].returncode != 0 and procs[1].returncode != 0, logs
  assert abs(ended[0] - ended[1]) < 15, (ended, logs)
  assert 'process 1' in logs[0] and 'in.jsonl:2' in logs[0], logs[0][-2000:]
  assert 'in.jsonl:2' in logs[1], logs[1][-2000:]
  assert 'Traceback' not in logs[0] + logs[1]
  procs, logs, _ = pair()  # rerun: what was written is kept, the bad record is an error record
  assert [p.returncode for p in procs] == [0, 1], logs  # process 1 holds the error record
  got = read_jsonl(out)
  assert [r['id'] for r in got] == [1, 2, 3, 4] and 'error' in got[1]


@pytest.mark.slow
def test_ctrl_c_or_sigterm_stops_a_job_after_flushing_and_a_rerun_finishes_it(tmp_path):
  path, _ = word_checkpoint(str(tmp_path))
  prompts = write_jsonl(tmp_path / 'in.jsonl', [
      {'prompt': ' '.join(f'w{(5 * i + j) % 50}' for j in range(1 + i % 3))} for i in range(120)])
  out = tmp_path / 'out.jsonl'
  for sig in (signal.SIGINT, signal.SIGTERM):
    proc = _cli('--ckpt', path, '--prompts', prompts, '--out', str(out), *FLAGS)
    before = len(out.read_text().splitlines()) if out.exists() else 0
    deadline = time.time() + 600
    while not (out.exists() and len(out.read_text().splitlines()) >= before + 2):
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-2000:]
      time.sleep(0.05)
    proc.send_signal(sig)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + sig, log[-2000:]
    assert 'Traceback' not in log and f'stopped by {sig.name}' in log, log[-2000:]
    lines = out.read_text().splitlines()
    assert all(json.loads(line)['completion'] is not None for line in lines)  # whole lines only
  proc = _cli('--ckpt', path, '--prompts', prompts, '--out', str(out), *FLAGS)
  log = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, log[-2000:]
  assert [r['id'] for r in read_jsonl(out)] == list(range(1, 121))


def test_a_score_answer_outside_the_choices_is_an_error_of_its_record(tmp_path):
  from illada_jax.prompts import PromptFormat
  from illada_jax.scoring import ScoringOptions
  prepare, _ = job_requests.scoring_requests(None, None, PromptFormat(),
                                             ScoringOptions(add_bos=False))
  for answer in (3, -1, '0', 1.0, True):
    rec = jobs.Record('in.jsonl:1', 1, {'context': 'c', 'choices': ['a', 'b', 'c'],
                                        'answer': answer})
    with pytest.raises(ValueError, match=r'"answer" must be the index of a choice \(0\.\.2\)'):
      prepare(rec)
