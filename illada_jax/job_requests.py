"""Turning JSONL records into engine requests: the `prepare` / `execute` pairs for `jobs.run`.

`generation_requests` is what `illada-sample` runs, `scoring_requests` what
`illada-score` runs. `prepare` checks a record's fields and builds its engine
request(s), raising ValueError for a bad record (which `jobs.run` writes as an
`{"id", "error"}` record or stops on); `execute` runs a batch of prepared
items on the engine and yields each record's result as it finishes.
"""

from __future__ import annotations

import zlib
from typing import Any

from illada_jax import engine as engine_lib
from illada_jax.jobs import Record
from illada_jax.prompts import PromptFormat
from illada_jax.sampling import SamplingOptions
from illada_jax.scoring import ScoringOptions


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a 1


def request_seed(job_seed: int, rid: Any, record: dict | None = None) -> int:
  """The record's own `seed`, else a stable hash of (job seed, id): uint32.

  Raises ValueError if the record's `seed` is not an integer.
  """
  seed = None if record is None else record.get('seed')
  if seed is not None:
    if not _is_int(seed):
      raise ValueError(f'"seed" must be an integer, got {seed!r}')
    return seed % 2 ** 32
  return zlib.crc32(f'{job_seed}:{rid!r}'.encode())


def _strings(value, name: str) -> tuple[str, ...]:
  if isinstance(value, str):
    return (value,)
  if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
    return tuple(value)
  raise ValueError(f'"{name}" must be a string or a list of strings')


def generation_requests(engine: engine_lib.Engine, tokenizer, fmt: PromptFormat,
                        options: SamplingOptions, *, chat: bool = False, stop=(),
                        max_new_tokens: int | None = None, seed: int = 0):
  """`prepare` for `jobs.run`: a record -> (engine Request, the prompt to echo).

  A record has `prompt` (a string) or `messages` (a chat), and optionally
  `stop` (a string or strings), `max_new_tokens` (a positive integer),
  `seed` (an integer) and `temperature` (a number), which override the
  job's; `"stop": null` and `"max_new_tokens": null` mean none (no stop
  strings, no limit), a null `seed` or `temperature` the job's. Raises
  ValueError for a record the engine cannot run or a field of the wrong type.
  """
  def prepare(r: Record):
    d = r.data
    key = 'messages' if 'messages' in d else 'prompt'
    prompt = d.get(key)
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt)):
      raise ValueError('expected a "prompt" string or a "messages" list')
    if isinstance(prompt, list) and not all(
        isinstance(m, dict) and isinstance(m.get('content'), str) and 'role' in m for m in prompt):
      raise ValueError('"messages" must be a list of {"role", "content"} objects')
    o = options
    temperature = d.get('temperature')
    if temperature is not None:
      if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise ValueError(f'"temperature" must be a number, got {temperature!r}')
      o = o.replace(temperature=float(temperature))
    limit = d.get('max_new_tokens', max_new_tokens)
    if limit is not None and (not _is_int(limit) or limit <= 0):
      raise ValueError(f'"max_new_tokens" must be a positive integer, got {limit!r}')
    stops = d.get('stop', stop)
    req = engine_lib.Request(
        id=r.id, prompt_ids=tuple(fmt.encode(tokenizer, engine.cfg, prompt, chat=chat)),
        options=engine.options_for(o), stop=() if stops is None else _strings(stops, 'stop'),
        max_new_tokens=limit, seed=request_seed(seed, r.id, d))
    engine.check(req)
    return req, {key: prompt}

  def execute(items):
    echo = {req.id: e for req, e in items}
    for c in engine.generate(req for req, _ in items):
      result = {**echo[c.id], 'completion': c.text, 'finish_reason': c.finish_reason,
                'completion_tokens': len(c.token_ids)}
      yield c.id, result, len(c.token_ids), c.generated

  return prepare, execute


def scoring_requests(engine: engine_lib.Engine, tokenizer, fmt: PromptFormat,
                     options: ScoringOptions, *, seed: int = 0):
  """`prepare` / `execute` for `jobs.run`: score a `continuation`, or each of `choices`.

  A record has `context` and `continuation` (a string) or `choices` (strings;
  an integer `answer` grades the prediction). Context and continuation are
  encoded separately, as written (the lm-eval adapter instead splits the joined
  text as lm-eval's models do: `prompts.encode_pair`); `add_bos=None` takes the
  checkpoint's `add_bos_token`. Results: `scores` (one per
  continuation), with `check_greedy` also `greedy` (lm-eval's is_greedy per
  continuation), and with choices `prediction` (argmax) and `correct`.
  """
  if options.add_bos is None:
    options = options.replace(add_bos=fmt.add_bos)

  def prepare(r: Record):
    d = r.data
    if not isinstance(d.get('context'), str):
      raise ValueError('expected a "context" string')
    if 'choices' in d:
      conts = _strings(d['choices'], 'choices')
      if not conts:
        raise ValueError('"choices" is empty')
    elif isinstance(d.get('continuation'), str):
      conts = (d['continuation'],)
    else:
      raise ValueError('expected a "continuation" string or a "choices" list')
    answer = d.get('answer')
    if answer is not None and 'choices' in d and (
        not _is_int(answer) or not 0 <= answer < len(conts)):
      raise ValueError(f'"answer" must be the index of a choice (0..{len(conts) - 1}), '
                       f'got {answer!r}')
    ctx = tuple(tokenizer.encode(d['context']))
    base = request_seed(seed, r.id, d)
    reqs = []
    for j, text in enumerate(conts):
      req = engine_lib.ScoreRequest((r.id, j), ctx, tuple(tokenizer.encode(text)), options,
                                    (base + j) % 2 ** 32)
      engine.check_score(req)
      reqs.append(req)
    return r.id, reqs, 'choices' in d, d.get('answer')

  def execute(items):
    pending = {rid: (reqs, choices, answer, {}) for rid, reqs, choices, answer in items}
    flat = [req for _, reqs, _, _ in items for req in reqs]
    for scored in engine.score(flat):
      rid, j = scored.id
      reqs, choices, answer, got = pending[rid]
      got[j] = scored
      if len(got) < len(reqs):
        continue
      del pending[rid]
      scores = [got[j].score for j in range(len(reqs))]
      result = {'scores': scores}
      if options.check_greedy:
        result['greedy'] = [got[j].is_greedy for j in range(len(reqs))]
      if choices:
        result['prediction'] = max(range(len(scores)), key=scores.__getitem__)
      if choices and _is_int(answer):
        result['correct'] = result['prediction'] == answer
      tokens = sum(len(q.continuation_ids) for q in reqs)
      yield rid, result, tokens, tokens

  return prepare, execute
