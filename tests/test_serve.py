"""`illada-serve` started for real on 127.0.0.1, driven by the official `openai` client,
raw HTTP (httpx) and lm-evaluation-harness; answers checked against `illada-sample`'s path."""

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from illada_jax import engine, job_requests, jobs, prompts, scoring
from illada_jax.sampling import SamplingOptions

from helpers import WORD_CFG, start_server, word_checkpoint

KEY = 'sk-test'
OPTIONS = SamplingOptions(gen_length=16, block_length=4, steps=16)
FLAGS = ['--gen-length', '16', '--block-length', '4', '--steps', '16']
PROMPTS = ['w1 w2 w3', 'w4', 'w5 w6 w7 w8 w9', 'w10 w11', 'w12 w13 w14 w15', 'w16 w17',
           'w18', 'w19 w20 w21']


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  return word_checkpoint(str(tmp_path_factory.mktemp('serve')))


@pytest.fixture(scope='module')
def server(ckpt):
  proc, url = start_server(ckpt[0], *FLAGS, '--slots', '4', '--buckets', '16', '--api-key', KEY,
                           '--max-queue', '64', '--grace', '20')
  yield proc, url
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def _offline(path, params, records, chat=False):
  """What `illada-sample` writes for `records`: its job's own request builder on an engine."""
  tok, fmt = prompts.load_tokenizer(path), prompts.PromptFormat.from_checkpoint(path)
  eng = engine.Engine(WORD_CFG, params, tokenizer=tok, slots=4, buckets=(16, 48))
  prepare, execute = job_requests.generation_requests(eng, tok, fmt, OPTIONS, chat=chat)
  items = [prepare(jobs.Record(f'r{i}', i, r)) for i, r in enumerate(records)]
  return {rid: out for rid, out, _, _ in execute(items)}


@pytest.fixture(scope='module')
def cases(ckpt):
  """Records (prompt, stop, max_new_tokens) and illada-sample's answers at T = 0, with stop
  strings taken from the free answers so that some requests end on one."""
  path, params = ckpt
  free = _offline(path, params, [{'prompt': p} for p in PROMPTS])
  records = [{'prompt': p} for p in PROMPTS]
  for i, p in enumerate(PROMPTS[:4]):
    words = free[i]['completion'].split()
    records.append({'prompt': p, 'stop': [words[2][1:], 'never']})
    records.append({'prompt': p, 'max_new_tokens': 3 + i})
  answers = _offline(path, params, records)
  assert {answers[i]['finish_reason'] for i in answers} >= {'stop', 'length'}
  return records, answers


def _client(url):
  return openai.OpenAI(base_url=url + '/v1', api_key=KEY, max_retries=0, timeout=300)


def _create(client, record, **kw):
  return client.completions.create(model='model', prompt=record['prompt'], temperature=0,
                                   stop=record.get('stop'), max_tokens=record.get('max_new_tokens'),
                                   **kw)


def test_completions_through_the_openai_client_equal_illada_sample(server, cases, ckpt):
  _, url = server
  records, answers = cases
  client = _client(url)
  tok = prompts.load_tokenizer(ckpt[0])
  for i, r in enumerate(records):
    got = _create(client, r)
    want = answers[i]
    assert got.choices[0].text == want['completion'], r
    assert got.choices[0].finish_reason == {'eos': 'stop'}.get(want['finish_reason'],
                                                                want['finish_reason'])
    assert got.usage.completion_tokens == want['completion_tokens']
    assert got.usage.prompt_tokens == len(tok.encode(r['prompt']))
  # Several prompts in one request, and a prompt given as token ids.
  batch = client.completions.create(model='model', prompt=PROMPTS[:3], temperature=0)
  assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == \
      [answers[i]['completion'] for i in range(3)]
  ids = client.completions.create(model='model', prompt=tok.encode(PROMPTS[2]), temperature=0)
  assert ids.choices[0].text == answers[2]['completion']
  assert [m.id for m in client.models.list().data] == ['model']


def test_chat_answers_equal_illada_sample_chat(server, ckpt):
  path, params = ckpt
  chats = [[{'role': 'user', 'content': 'w1 w2'}],
           [{'role': 'system', 'content': 'w3'}, {'role': 'user', 'content': 'w4 w5'}]]
  want = _offline(path, params, [{'messages': m} for m in chats], chat=True)
  client = _client(server[1])
  for i, messages in enumerate(chats):
    got = client.chat.completions.create(model='model', messages=messages, temperature=0)
    assert got.choices[0].message.content == want[i]['completion']
    assert got.choices[0].message.role == 'assistant'


def test_n_choices_take_seed_plus_index_under_any_load(server):
  client = _client(server[1])
  prompt = PROMPTS[0]
  together = client.completions.create(model='model', prompt=prompt, n=3, seed=5,
                                       temperature=0.9, max_tokens=12)
  texts = [c.text for c in sorted(together.choices, key=lambda c: c.index)]
  assert len(set(texts)) > 1  # independent draws
  alone = [client.completions.create(model='model', prompt=prompt, seed=5 + j,
                                     temperature=0.9, max_tokens=12).choices[0].text
           for j in range(3)]
  assert alone == texts
  # The same seeded requests among 12 concurrent others give the same texts.
  results = {}

  def ask(k):
    seed = 5 + k if k < 3 else 100 + k
    results[k] = client.completions.create(model='model', prompt=PROMPTS[k % 8], seed=seed,
                                           temperature=0.9, max_tokens=12).choices[0].text
  threads = [threading.Thread(target=ask, args=(k,)) for k in range(15)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results[0] == texts[0]
  again = [client.completions.create(model='model', prompt=PROMPTS[k], seed=5 + k,
                                     temperature=0.9, max_tokens=12).choices[0].text
           for k in (1, 2)]
  assert again == [results[1], results[2]]


def test_streamed_deltas_add_up_to_the_answer(server, cases):
  records, answers = cases
  client = _client(server[1])
  long = 0
  for i, r in enumerate(records):
    chunks = list(_create(client, r, stream=True, stream_options={'include_usage': True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert ''.join(texts) == answers[i]['completion']
    assert reasons[-1] in ('stop', 'length') and not any(reasons[:-1])
    assert chunks[-1].usage.completion_tokens == answers[i]['completion_tokens']
    long = max(long, sum(bool(t) for t in texts))
  assert long >= 3  # one chunk per committed block, not one at the end
  stream = client.chat.completions.create(model='model', stream=True, temperature=0,
                                          messages=[{'role': 'user', 'content': 'w1 w2'}])
  chunks = list(stream)
  assert chunks[0].choices[0].delta.role == 'assistant'
  whole = client.chat.completions.create(model='model', temperature=0,
                                         messages=[{'role': 'user', 'content': 'w1 w2'}])
  assert ''.join(c.choices[0].delta.content or '' for c in chunks) == \
      whole.choices[0].message.content


BAD = [  # (route, body, status, param)
    ('/v1/completions', '{"model": "model", "prompt": ', 400, None),
    ('/v1/completions', {'model': 'model', 'prompt': 'w1', 'max_tokens': 'x'}, 400, 'max_tokens'),
    ('/v1/completions', {'model': 'model', 'prompt': 'w1', 'max_tokens': 0}, 400, 'max_tokens'),
    ('/v1/completions', {'model': 'model', 'prompt': 'w1', 'max_tokens': 17}, 400, 'max_tokens'),
    ('/v1/completions', {'model': 'model', 'prompt': ''}, 400, 'prompt'),
    ('/v1/completions', {'model': 'model', 'prompt': ' '.join(['w1'] * 49)}, 400, 'prompt'),
    ('/v1/completions', {'model': 'model', 'prompt': [1, 99999]}, 400, 'prompt'),
    ('/v1/completions', {'model': 'model', 'prompt': 'w1', 'temperature': -1}, 400,
     'temperature'),
    ('/v1/completions', {'model': 'model', 'prompt': 'w1', 'n': 0}, 400, 'n'),
    ('/v1/completions', {'model': 'other', 'prompt': 'w1'}, 404, 'model'),
    ('/v1/completions', {'model': 5, 'prompt': 'w1'}, 400, 'model'),
    ('/v1/completions', {'model': 'model', 'prompt': 'w1', 'logprobs': 2}, 400, 'logprobs'),
    ('/v1/completions', {'model': 'model', 'prompt': 'w1', 'top_p': 0.5}, 400, 'top_p'),
    ('/v1/completions', {'model': 'model', 'prompt': 'w1', 'best_of': 3}, 400, 'best_of'),
    ('/v1/completions', {'model': 'model', 'prompt': 'w1', 'n': 100}, 400, 'n'),
    ('/v1/completions', {'model': 'model', 'prompt': []}, 400, 'prompt'),
    ('/v1/completions', {'model': 'model', 'prompt': ''}, 400, 'prompt'),
    ('/v1/completions', {'model': 'model', 'prompt': 'w1', 'stop': 5}, 400, 'stop'),
    ('/v1/completions', {'model': 'model', 'prompt': 'w1', 'stop': ['w'] * 65}, 400, 'stop'),
    ('/v1/completions', {'model': 'model', 'prompt': 'w1', 'stream_options': {
        'include_usage': 'yes'}}, 400, 'stream_options.include_usage'),
    ('/v1/completions', {'model': 'model', 'prompt': 'w1', 'stream': 'yes'}, 400, 'stream'),
    ('/v1/completions', {'model': 'model', 'prompt': 'w1', 'max_tokens': True}, 400,
     'max_tokens'),
    ('/v1/completions', {'model': 'model', 'prompt': 'w1', 'seed': 2 ** 32}, 400, 'seed'),
    ('/v1/nothing', {'model': 'model'}, 404, None),
    ('/v1/chat/completions', {'model': 'model', 'messages': []}, 400, 'messages'),
    ('/v1/chat/completions', {'model': 'model', 'messages': [{'role': 'user', 'content': 'w1'}],
                              'tools': [{'type': 'function'}]}, 400, 'tools'),
    ('/v1/chat/completions', {'model': 'model', 'messages': [{'role': 'user', 'content': [
        {'type': 'image_url', 'image_url': {'url': 'x'}}]}]}, 400, 'messages'),
    ('/v1/chat/completions', {'model': 'model', 'messages': [{'role': 'user', 'content': 'w1'}],
                              'max_completion_tokens': 99}, 400, 'max_completion_tokens'),
    ('/v1/score', {'model': 'model', 'context': 'w1', 'continuations': ['']}, 400,
     'continuations'),
    ('/v1/score', {'context': ' '.join(['w1'] * 70), 'continuations': ['w2']}, 400, 'context'),
    ('/v1/score', {'context': 'w1', 'continuations': ['w2', ' '.join(['w1'] * 70)]}, 400,
     'continuations'),
]
# The messages a user reads, where a shorter one would not say what to change.
MESSAGES = [  # (body, headers, words the message has)
    ('{"prompt": "w1", "temperature": NaN}', {'Content-Type': 'application/json'},
     'temperature: Input should be a finite number'),
    ('{"prompt": "w1"}', {'Content-Type': 'text/plain'},
     'the body must be a JSON object sent with Content-Type: application/json (this one: '
     'text/plain)'),
    ('["w1"]', {'Content-Type': 'application/json'}, 'the body must be a JSON object'),
]


def test_bad_requests_get_a_4xx_naming_the_field_and_change_nothing(server, cases):
  _, url = server
  records, answers = cases
  auth = {'Authorization': f'Bearer {KEY}'}
  with httpx.Client(base_url=url, timeout=120) as http:
    for route, body, status, param in BAD:
      kw = {'content': body, 'headers': {**auth, 'Content-Type': 'application/json'}} \
          if isinstance(body, str) else {'json': body, 'headers': auth}
      r = http.post(route, **kw)
      assert r.status_code == status, (body, r.text)
      err = r.json()['error']
      assert err['param'] == param and err['message'], (body, err)
    for body, headers, words in MESSAGES:
      r = http.post('/v1/completions', content=body, headers={**auth, **headers})
      assert r.status_code == 400 and r.json()['error']['message'] == words, r.text
    assert http.post('/v1/completions', json={'model': 'model', 'prompt': 'w1'}).status_code == 401
    assert http.post('/v1/completions', json={'model': 'model', 'prompt': 'w1'},
                     headers={'Authorization': 'Bearer wrong'}).status_code == 401
    assert http.get('/v1/models').status_code == 401
    assert http.get('/v1/models', headers={'Authorization': f'bearer {KEY}'}).status_code == 200
    assert http.get('/v1/models/model', headers=auth).json()['id'] == 'model'
    assert http.get('/openapi.json').status_code == 404
    big = {'model': 'model', 'prompt': 'w1 ' * 3_000_000}
    assert http.post('/v1/completions', json=big, headers=auth).status_code == 413
    assert 'illada_http_errors_total{status="413"} 1.0' in http.get('/metrics').text
    ok = http.post('/v1/completions', headers=auth, json={
        'model': 'model', 'prompt': records[0]['prompt'], 'temperature': 0})
    assert ok.json()['choices'][0]['text'] == answers[0]['completion']
    unnamed = http.post('/v1/completions', headers=auth, json={  # no model: the served one
        'prompt': records[0]['prompt'], 'temperature': 0})
    assert unnamed.json()['choices'][0]['text'] == answers[0]['completion']
    assert unnamed.json()['model'] == 'model'
    long_stop = http.post('/v1/completions', headers=auth, json={  # one stop of 70 characters
        'prompt': records[0]['prompt'], 'temperature': 0, 'stop': 'w' * 70, 'user': 'u'})
    assert long_stop.json()['choices'][0]['text'] == answers[0]['completion']
    assert http.get('/health').json() == {'status': 'ok'}


def test_scores_equal_illada_score(server, ckpt, tmp_path):
  """/v1/score with the server's default ScoringOptions (MC) and with method=confidence."""
  from illada_jax.cli import score as score_cli
  path, _ = ckpt
  inp = tmp_path / 'in.jsonl'
  inp.write_text(json.dumps({'context': 'w1 w2', 'choices': ['w3', 'w4 w5'], 'seed': 7}) + '\n')
  want = {}
  for method in ('mc', 'confidence'):
    out = tmp_path / f'{method}.jsonl'
    assert score_cli.main(['--ckpt', path, '--input', str(inp), '--out', str(out), '--slots',
                           '4', '--method', method, '--no-progress']) == 0
    want[method] = json.loads(out.read_text())
  with httpx.Client(base_url=server[1], timeout=300,
                    headers={'Authorization': f'Bearer {KEY}'}) as http:
    for method in ('mc', 'confidence'):
      got = http.post('/v1/score', json={'model': 'model', 'context': 'w1 w2', 'seed': 7,
                                         'method': method, 'continuations': ['w3', 'w4 w5'],
                                         'user': 'u'})  # an extra field: ignored
      got = got.json()
      np.testing.assert_allclose([d['score'] for d in got['data']], want[method]['scores'],
                                 rtol=1e-5)
      assert got['prediction'] == want[method]['prediction']


async def _load(url, records, answers, n=200, clients=16):
  """n requests from `clients` concurrent clients: every fourth streams and hangs up after its
  first chunk, every 25th is malformed; the rest must equal illada-sample's answers."""
  headers = {'Authorization': f'Bearer {KEY}'}
  outcome = {'ok': 0, 'bad': 0, 'gone': 0, 'wrong': []}
  work = asyncio.Queue()
  for k in range(n):
    work.put_nowait(k)

  async def client():
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers) as http:
      while not work.empty():
        k = work.get_nowait()
        i = k % len(records)
        body = {'model': 'model', 'prompt': records[i]['prompt'], 'temperature': 0,
                'stop': records[i].get('stop'), 'max_tokens': records[i].get('max_new_tokens')}
        if k % 25 == 3:
          r = await http.post('/v1/completions', json={**body, 'max_tokens': -4})
          outcome['bad'] += r.status_code == 400
        elif k % 4 == 1:
          async with http.stream('POST', '/v1/completions', json={**body, 'stream': True}) as r:
            async for _ in r.aiter_lines():
              break  # hang up after the first chunk
          outcome['gone'] += 1
        else:
          r = await http.post('/v1/completions', json=body)
          text = r.json()['choices'][0]['text']
          outcome['ok'] += 1
          if text != answers[i]['completion']:
            outcome['wrong'].append((k, text))
  await asyncio.gather(*[client() for _ in range(clients)])
  return outcome


def _metric(text: str, name: str) -> float:
  return sum(float(line.split()[-1]) for line in text.splitlines()
             if line.startswith(name + ' ') or line.startswith(name + '{'))


@pytest.mark.slow
def test_load_with_disconnects_and_malformed_requests(server, cases):
  _, url = server
  records, answers = cases
  outcome = asyncio.run(_load(url, records, answers))
  assert outcome['wrong'] == []
  assert outcome['ok'] + outcome['bad'] + outcome['gone'] == 200
  assert outcome['bad'] == 8 and outcome['gone'] == 48
  import time
  for _ in range(50):  # the slots of hung-up requests free at the next block boundary
    metrics = httpx.get(url + '/metrics').text
    if _metric(metrics, 'illada_busy_slots') == 0:
      break
    time.sleep(0.2)
  assert _metric(metrics, 'illada_busy_slots') == 0
  assert _metric(metrics, 'illada_queue_depth') == 0
  assert _metric(metrics, 'illada_requests_total') >= 144
  cancelled = [line for line in metrics.splitlines()
               if line.startswith('illada_requests_total{finish_reason="cancelled"}')]
  assert cancelled and float(cancelled[0].split()[-1]) >= 1  # hung-up streams counted
  assert _metric(metrics, 'illada_time_to_first_block_seconds_count') >= 144
  assert httpx.get(url + '/health').json() == {'status': 'ok'}


def test_sigterm_finishes_what_is_in_flight_and_exits_0(server, cases):
  """Runs last on the module's server: a stream in flight when SIGTERM arrives completes."""
  proc, url = server
  records, answers = cases
  client = _client(url)
  stream = _create(client, records[0], stream=True)
  first = next(iter(stream))
  proc.send_signal(signal.SIGTERM)
  rest = [c.choices[0].text for c in stream if c.choices]
  assert first.choices[0].text + ''.join(rest) == answers[0]['completion']
  assert proc.wait(timeout=60) == 0
  with pytest.raises(openai.APIConnectionError):
    _create(client, records[0])


def test_a_second_ctrl_c_ends_what_is_in_flight_with_an_error_chunk_and_exits_0(ckpt):
  """The first SIGINT drains; the second stops the scheduler after its block: the stream still
  running gets an error chunk and [DONE], nothing logs a traceback, the exit status is 0."""
  proc, url = start_server(ckpt[0], *FLAGS, '--slots', '1', '--buckets', '16', '--grace', '600')
  log = os.path.join(os.path.dirname(ckpt[0].rstrip('/')), f'serve-{url.rsplit(":", 1)[1]}.log')
  try:
    body = {'prompt': PROMPTS[0], 'n': 128, 'stream': True, 'temperature': 0}
    with httpx.Client(base_url=url, timeout=120) as http, \
        http.stream('POST', '/v1/completions', json=body) as r:
      lines = (line for line in r.iter_lines() if line.startswith('data: '))
      next(lines)
      proc.send_signal(signal.SIGINT)
      time.sleep(0.2)
      proc.send_signal(signal.SIGINT)
      rest = list(lines)
    assert proc.wait(timeout=60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert rest[-1] == 'data: [DONE]' and '"error"' in rest[-2], rest[-3:]
  assert set(json.loads(rest[-2][6:])['error']) == {'message', 'type', 'param', 'code'}
  assert 'Traceback' not in open(log).read()


@pytest.mark.slow
def test_lm_eval_local_completions_against_the_server_matches_the_offline_adapter(short_demo,
                                                                                  tmp_path):
  """lm-eval's own `local-completions` model on a generate_until task over the demo's held-out
  sums, against the server, gives the offline adapter's answers and exact match."""
  import lm_eval
  import lm_eval.models  # noqa: F401 (registers local-completions beside `illada_jax`)
  from lm_eval.tasks import TaskManager
  from illada_jax import demo, lm_eval_adapter  # noqa: F401 (registers `illada_jax`)
  cfg, result = short_demo
  _, test = demo.make_problems(cfg)
  g = demo.seq_lengths(cfg)[1]
  tasks = tmp_path / 'tasks'
  tasks.mkdir()
  data = tasks / 'sums.jsonl'
  data.write_text(''.join(json.dumps({'context': r['prompt'], 'target': r['response']}) + '\n'
                          for r in test[:48]))
  (tasks / 'sums.yaml').write_text(
      f'task: demo_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n'
      'test_split: test\noutput_type: generate_until\ndoc_to_text: "{{context}}"\n'
      'doc_to_target: "{{target}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
      f'  max_gen_toks: {g}\n  do_sample: false\n'
      'metric_list:\n  - metric: exact_match\n')
  manager = TaskManager(include_path=str(tasks))
  settings = f'gen_length={g},block_length={g},steps={g}'
  offline = lm_eval.simple_evaluate(model='illada_jax', tasks=['demo_sums'], batch_size=16,
                                    model_args=f'ckpt={result["checkpoint"]},{settings}',
                                    task_manager=manager, log_samples=True)
  proc, url = start_server(result['checkpoint'], '--gen-length', str(g), '--block-length',
                           str(g), '--steps', str(g), '--slots', '16', '--buckets', '16',
                           '--served-model-name', 'demo')
  try:
    online = lm_eval.simple_evaluate(
        model='local-completions', tasks=['demo_sums'], task_manager=manager, log_samples=True,
        model_args=f'model=demo,base_url={url}/v1/completions,tokenizer_backend=None,'
                   f'tokenized_requests=False,num_concurrent=8,max_retries=1,max_gen_toks={g}')
  finally:
    proc.terminate()
    assert proc.wait(timeout=60) == 0
  answers = lambda run: [s['resps'][0][0] for s in sorted(run['samples']['demo_sums'],
                                                            key=lambda s: s['doc_id'])]
  assert answers(online) == answers(offline)
  em = offline['results']['demo_sums']['exact_match,none']
  assert online['results']['demo_sums']['exact_match,none'] == em >= 0.8


@pytest.mark.parametrize('argv, flag', [
    (['--slots', '0'], '--slots'), (['--buckets', 'abc'], '--buckets'),
    (['--port', '70000'], '--port'), (['--max-queue', '0'], '--max-queue'),
    (['--gen-length', '0'], '--gen-length'), (['--block-length', '5'], '--gen-length'),
    (['--cache', 'bogus'], '--cache'), (['--score-preset', 'nope'], '--score-preset'),
    (['--ckpt', '/nonexistent/ckpt'], '--ckpt'), (['--gen-length', '64'], '--gen-length'),
])
def test_serve_flags_are_checked_in_one_line_before_the_model_loads(argv, flag, ckpt, capsys):
  from illada_jax.cli import serve as serve_cli
  args = ['--ckpt', ckpt[0], *argv] if argv[0] != '--ckpt' else argv
  assert serve_cli.main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('illada-serve: ') and flag in err[0], err


def test_serve_settings_default_as_illada_sample_does():
  """No server-only defaults: `--gen-length 24` alone is blocks of 24, as its help says."""
  from illada_jax.cli import _common, sample as sample_cli, serve as serve_cli
  from illada_jax.configs.sampling import PRESETS
  argv = ['--ckpt', 'c', '--gen-length', '24']
  served, _ = serve_cli.settings_from(serve_cli.build_parser().parse_args(argv))
  sampled = _common.options_from(sample_cli.build_parser().parse_args(argv + ['--prompt', 'x']),
                                 SamplingOptions, PRESETS)
  assert served == sampled == SamplingOptions(gen_length=24)


def test_quantize_int8_reaches_the_served_model(ckpt, monkeypatch):
  """`--quantize int8` serves the int8 tree (the engine's config says so); the int8 numerics
  themselves are tested in tests/test_quant.py."""
  from illada_jax.cli import serve as serve_cli
  from illada_jax.serve import server
  served = {}
  monkeypatch.setattr(server, 'serve', lambda app, *a, **k: served.setdefault('app', app))
  assert serve_cli.main(['--ckpt', ckpt[0], *FLAGS, '--quantize', 'int8', '--slots', '2']) == 0
  routes = {r.path for r in served['app'].routes}
  assert {'/v1/completions', '/v1/chat/completions', '/v1/score', '/metrics'} <= routes
  assert served['app'].state.manager.engine.cfg.quantize == 'int8'


def test_a_full_queue_is_a_429_with_retry_after(ckpt):
  """The scheduler is not started here, so what is submitted stays queued."""
  from illada_jax.serve import manager as manager_lib, metrics, protocol
  path, params = ckpt
  tok, fmt = prompts.load_tokenizer(path), prompts.PromptFormat.from_checkpoint(path)
  eng = engine.Engine(WORD_CFG, params, tokenizer=tok, slots=2, buckets=(16,))
  settings = manager_lib.Settings(OPTIONS, scoring.ScoringOptions(), 'model', max_queue=5)
  manager = manager_lib.RequestManager(eng, tok, fmt, settings,
                                       metrics.Metrics(eng.scheduler, eng.slots))
  body = lambda n: protocol.CompletionRequest(model='model', prompt='w1 w2', n=n)

  async def fill():
    manager.stream(manager.completion_job(body(4)))
    with pytest.raises(manager_lib.ServeError) as e:
      manager.stream(manager.completion_job(body(2)))
    return e.value
  e = asyncio.run(fill())
  assert e.status == 429 and e.headers == {'Retry-After': '1'} and eng.scheduler.waiting() == 4
  with pytest.raises(manager_lib.ServeError) as e:
    asyncio.run(manager.score(protocol.ScoreRequest(model='model', context='w1',
                                                    continuations=['w2', 'w3'])))
  assert e.value.status == 429
