"""The request manager: OpenAI requests -> engine requests, and their results back (async).

It owns no device work: it encodes prompts (the checkpoint's BOS and chat
template, the same path as `illada-sample`), checks them against the
engine's limits, submits one engine request per choice, and turns the
scheduler's events (delivered on its thread) into an asyncio stream. A client
that goes away cancels its requests; their slots free at the next block.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from typing import AsyncIterator, Callable

from illada_jax import engine as engine_lib
from illada_jax.sampling import SamplingOptions
from illada_jax.scheduler import Completion, Event, Handle
from illada_jax.scoring import ScoringOptions
from illada_jax.serve import protocol
from illada_jax.serve.metrics import Metrics

FINISH_REASONS = {'eos': 'stop', 'stop': 'stop', 'length': 'length', 'cancelled': 'cancelled'}


class ServeError(Exception):
  """A request the server refuses: HTTP `status`, an OpenAI error body naming `param`."""

  def __init__(self, status: int, message: str, param: str | None = None,
               kind: str = 'invalid_request_error', headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind = status, message, param, kind
    self.headers = headers or {}


class ClientGone(Exception):
  """The client disconnected while its request ran."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a server fixes at start: its settings group, scoring settings, name, queue bound."""
  options: SamplingOptions
  scoring: ScoringOptions
  model_name: str
  max_queue: int = 1024


@dataclasses.dataclass
class Job:
  """The engine requests of one HTTP request (one per choice) and their prompt sizes."""
  requests: list[engine_lib.Request]
  prompt_tokens: int


class RequestManager:
  """Turns protocol requests into engine work; see the module docstring."""

  def __init__(self, eng: engine_lib.Engine, tokenizer, fmt, settings: Settings,
               metrics: Metrics):
    self.engine, self.tok, self.fmt = eng, tokenizer, fmt
    self.settings, self.metrics = settings, metrics
    self.options = eng.options_for(settings.options)

  # -- building engine requests --------------------------------------------------------
  def check_model(self, name: str | None) -> None:
    if name is not None and name != self.settings.model_name:
      raise ServeError(404, f'model {name!r} does not exist; this server serves '
                       f'{self.settings.model_name!r}', 'model', 'not_found_error')

  def _check_common(self, body: protocol._Common) -> None:
    self.check_model(body.model)
    field = body.unsupported()
    if field is not None:
      raise ServeError(400, f'{field}: not supported by this masked-diffusion model '
                       '(leave it unset or at its neutral value)', field)

  def completion_job(self, body: protocol.CompletionRequest) -> Job:
    """Engine requests for `/v1/completions`; raises ServeError naming the bad field."""
    self._check_common(body)
    rows = []
    if not body.prompts():
      raise ServeError(400, 'empty prompt list', 'prompt')
    for p in body.prompts():
      if isinstance(p, str):
        if not p:  # would be the BOS alone
          raise ServeError(400, 'empty prompt', 'prompt')
        ids = self.fmt.encode(self.tok, self.engine.cfg, p)
      else:
        bad = [t for t in p if not 0 <= t < self.engine.cfg.vocab_size]
        if bad:
          raise ServeError(400, f'token id {bad[0]} is outside the vocabulary '
                           f'[0, {self.engine.cfg.vocab_size})', 'prompt')
        ids = list(p)
      rows.append(ids)
    return self._job(body, rows, body.max_tokens, 'prompt')

  def chat_job(self, body: protocol.ChatCompletionRequest) -> Job:
    """Engine requests for `/v1/chat/completions` (the checkpoint's chat template)."""
    self._check_common(body)
    try:
      messages = [{'role': m.role, 'content': m.text()} for m in body.messages]
      ids = self.fmt.encode(self.tok, self.engine.cfg, messages, chat=True,
                            add_generation_prompt=(body.add_generation_prompt
                                                   and not body.continue_final_message))
    except ValueError as e:  # a content part that is not text, or the template refused
      raise ServeError(400, str(e), 'messages') from None
    return self._job(body, [ids], body.limit(), 'messages')

  def _job(self, body, rows: list[list[int]], limit: int | None, field: str) -> Job:
    o = self.options
    if body.temperature is not None:
      o = o.replace(temperature=float(body.temperature))
    base = body.seed if body.seed is not None else secrets.randbits(32)
    requests = []
    for k, ids in enumerate(rows):
      if not ids:
        raise ServeError(400, 'empty prompt', field)
      for j in range(body.n):
        req = engine_lib.Request(id=(k, j), prompt_ids=tuple(ids), options=o, stop=body.stops(),
                                 max_new_tokens=limit, seed=(base + j) % 2 ** 32)
        try:
          req = self.engine.prepare(req)
        except ValueError as e:
          raise ServeError(400, str(e), field) from None
        most = self.engine.limit_blocks(req.options, len(ids)) * req.options.block_length
        if limit is not None and limit > most:
          name = 'max_tokens' if field == 'prompt' or body.max_completion_tokens is None \
              else 'max_completion_tokens'
          raise ServeError(400, f'{name}={limit} is more than this server can generate after '
                           f'a prompt of {len(ids)} tokens ({most})', name)
        requests.append(req)
    return Job(requests, sum(len(ids) for ids in rows))

  # -- running them ----------------------------------------------------------------------
  def check_queue(self, count: int, field: str) -> None:
    """ServeError 400 if `count` requests could never queue, 429 if they cannot now."""
    limit = self.settings.max_queue
    if count > limit:
      raise ServeError(400, f'{count} requests (prompts x n) are more than this server '
                       f'queues (--max-queue {limit})', field)
    waiting = self.engine.scheduler.waiting()
    if waiting + count > limit:
      raise ServeError(429, f'the queue is full ({waiting} requests waiting); retry later',
                       kind='rate_limit_error', headers={'Retry-After': '1'})

  def _submit(self, job: Job, stream: bool) -> tuple[list[Handle], asyncio.Queue]:
    self.check_queue(len(job.requests), 'n')
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    handles = []
    for i, req in enumerate(job.requests):
      handles.append(self.engine.submit(req, stream=stream,
                                        on_event=self._deliver(loop, events, i)))
    self.metrics.prompt_tokens.inc(job.prompt_tokens)
    return handles, events

  def _deliver(self, loop, events: asyncio.Queue, i: int):
    """The handle's callback (scheduler thread): metrics as the request ends, whether or not
    its client is still there; the event to the client's asyncio queue."""
    def deliver(ev: Event):
      if ev.completion is not None:
        c = ev.completion
        self.metrics.finished(FINISH_REASONS[c.finish_reason], len(c.token_ids), c.generated,
                              ev.first_block_seconds, ev.seconds)
      loop.call_soon_threadsafe(events.put_nowait, (i, ev))
    return deliver

  @staticmethod
  def _raise_if_failed(ev: Event) -> None:
    if ev.error is not None:
      raise ServeError(503, f'the request could not finish: {ev.error}',
                       kind='service_unavailable')

  async def complete(self, job: Job, disconnected: Callable) -> list[Completion]:
    """Every choice's completion, in order; cancels them all (ClientGone) if the client leaves."""
    handles, events = self._submit(job, stream=False)
    done: dict[int, Completion] = {}
    try:
      while len(done) < len(handles):
        try:
          i, ev = await asyncio.wait_for(events.get(), 0.25)
        except asyncio.TimeoutError:
          if await disconnected():
            raise ClientGone() from None
          continue
        self._raise_if_failed(ev)
        done[i] = ev.completion
    finally:
      for h in handles:
        h.cancel()  # a no-op for finished requests
    return [done[i] for i in range(len(handles))]

  def stream(self, job: Job) -> AsyncIterator[tuple[int, str, Completion | None]]:
    """Submits the job now (ServeError 429 when the queue is full) and returns an async
    iterator of `(choice, new text, completion or None)` as blocks commit; the texts of a
    choice add up to its completion's text. Closing it early cancels what is unfinished."""
    handles, events = self._submit(job, stream=True)

    async def iterate():
      left = len(handles)
      try:
        while left:
          i, ev = await events.get()
          if ev.completion is not None or ev.error is not None:
            self._raise_if_failed(ev)
            left -= 1
          yield i, ev.text, ev.completion
      finally:
        for h in handles:
          h.cancel()
    return iterate()

  # -- scoring ---------------------------------------------------------------------------
  def _too_long(self, ctx: tuple, o: ScoringOptions) -> str | None:
    """'context' if the context could not be scored with any continuation, else None."""
    try:
      shortest = (self.engine.cfg.eos_token_id,)
      self.engine.check_score(engine_lib.ScoreRequest(0, ctx, shortest, o, 0))
    except ValueError:
      return 'context'
    return None

  async def score(self, body: protocol.ScoreRequest) -> tuple[list, int]:
    """(`Scored` per continuation, prompt tokens): encoded as `illada-score` encodes records
    (context and continuation separately; MC seeds `seed + j`)."""
    self.check_model(body.model)
    o = self.settings.scoring if body.method is None else \
        self.settings.scoring.replace(method=body.method)
    if o.add_bos is None:
      o = o.replace(add_bos=self.fmt.add_bos)
    self.check_queue(len(body.continuations), 'continuations')
    ctx = tuple(self.tok.encode(body.context))
    reqs = []
    for j, text in enumerate(body.continuations):
      cont = tuple(self.tok.encode(text))
      req = engine_lib.ScoreRequest(j, ctx, cont, o, (body.seed + j) % 2 ** 32)
      try:
        self.engine.check_score(req)
      except ValueError as e:
        raise ServeError(400, f'context ({len(ctx)} tokens) and continuation {j} ({len(cont)} '
                         f'tokens): {e}', self._too_long(ctx, o) or 'continuations') from None
      reqs.append(req)
    scored = await asyncio.to_thread(lambda: list(self.engine.score(reqs)))
    by_id = {s.id: s for s in scored}
    return [by_id[j] for j in range(len(reqs))], len(ctx) + sum(len(r.continuation_ids)
                                                                  for r in reqs)


def response_id(prefix: str) -> str:
  return f'{prefix}-{secrets.token_hex(12)}'
