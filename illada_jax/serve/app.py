"""The HTTP app: OpenAI routes over the request manager (FastAPI; uvicorn runs it).

  POST /v1/completions, /v1/chat/completions   generation, `stream: true` for SSE
  POST /v1/score                               log-likelihoods of continuations
  GET  /v1/models, /health, /metrics

Errors are OpenAI error bodies (`{"error": {"message", "type", "param",
"code"}}`): 400 for a bad field (named in `param`), 401 without the API key,
404 for another model name, 413 for a body over the limit, 429 with
`Retry-After` when the queue is full, 503 while loading or shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from illada_jax.serve import protocol
from illada_jax.serve.manager import FINISH_REASONS, ClientGone, RequestManager, ServeError, \
    response_id
from illada_jax.serve.metrics import CONTENT_TYPE_LATEST

MAX_BODY_BYTES = 4 * 2 ** 20
_UNION_TAGS = {'str', 'int', 'float', 'bool', 'dict', 'list', 'none'}


def _error_body(message: str, kind: str, param=None) -> dict:
  """OpenAI's error object, for a response body and for a stream's error chunk alike."""
  return {'error': {'message': message, 'type': kind, 'param': param, 'code': None}}


def _error(status: int, message: str, param=None, kind='invalid_request_error', headers=None):
  return JSONResponse(_error_body(message, kind, param), status_code=status, headers=headers)


class _BodyLimit:
  """Refuses (413) a request body over `limit` bytes: by its Content-Length before reading it,
  or, sent without one, as soon as what arrived passes the limit."""

  def __init__(self, app, limit: int, on_refused=None):
    self.app, self.limit, self.on_refused = app, limit, on_refused

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)

    async def too_large(scope, receive, send):
      if self.on_refused is not None:
        self.on_refused(413)
      response = _error(413, f'request body over the limit of {self.limit} bytes',
                        kind='request_too_large')
      return await response(scope, receive, send)
    length = dict(scope['headers']).get(b'content-length')
    if length is not None:
      if length.isdigit() and int(length) > self.limit:
        return await too_large(scope, receive, send)
      return await self.app(scope, receive, send)
    chunks, seen, more = [], 0, True
    while more:  # no length declared: read it here, up to the limit
      message = await receive()
      if message['type'] != 'http.request':
        return
      chunks.append(message.get('body', b''))
      seen += len(chunks[-1])
      if seen > self.limit:
        return await too_large(scope, receive, send)
      more = message.get('more_body', False)
    replayed = False

    async def replay():
      nonlocal replayed
      if replayed:
        return await receive()
      replayed = True
      return {'type': 'http.request', 'body': b''.join(chunks), 'more_body': False}
    await self.app(scope, replay, send)


def make_app(manager: RequestManager, *, api_key: str | None = None,
             warmup=None, max_body: int = MAX_BODY_BYTES) -> FastAPI:
  """The app. `warmup()` (compiling the block programs) runs on a thread at startup, then the
  engine's scheduler starts and `/health` says ready; `/v1` routes answer 503 until then."""
  state = {'ready': False, 'draining': False, 'failed': None}
  eng, settings = manager.engine, manager.settings

  @contextlib.asynccontextmanager
  async def lifespan(app):
    def prepare():
      try:
        if warmup is not None:
          warmup()
        eng.start()
        # What loading and compiling left (jax, the tokenizer, transformers: some 240k
        # objects) lives as long as the server. Frozen, it is left out of every full
        # collection, each of which walked it all with the GIL held (about 160 ms on the
        # 2-core CI machine, stalling the event loop and the scheduler alike).
        gc.collect()
        gc.freeze()
        state['ready'] = True
      except Exception as e:  # noqa: BLE001 (reported by /health)
        state['failed'] = f'{type(e).__name__}: {e}'
    warming = threading.Thread(target=prepare, name='illada-warmup', daemon=True)
    warming.start()
    yield
    state['draining'] = True
    warming.join()  # a compile cannot be interrupted; exiting under it aborts the process
    eng.stop(timeout=30)

  # No /docs or /openapi.json: they would be the only routes outside --api-key.
  app = FastAPI(title='illada-serve', lifespan=lifespan, docs_url=None, redoc_url=None,
                openapi_url=None)
  app.state.serve, app.state.manager = state, manager

  def refused(e: ServeError):
    manager.metrics.errors.labels(str(e.status)).inc()
    return _error(e.status, e.message, e.param, e.kind, e.headers)

  @app.exception_handler(ServeError)
  async def _serve_error(request, e: ServeError):
    return refused(e)

  @app.exception_handler(StarletteHTTPException)
  async def _http(request, e: StarletteHTTPException):  # unknown routes, unparsable bodies
    return refused(ServeError(e.status_code, str(e.detail), kind='invalid_request_error'
                              if e.status_code < 500 else 'server_error'))

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, e: RequestValidationError):
    first, param = _first_error(e.errors())
    if first.get('type') == 'json_invalid':
      message, param = f'the body is not valid JSON ({first.get("ctx", {}).get("error", "")})', None
    elif param is None and first.get('type') in ('model_attributes_type', 'dict_type'):
      # FastAPI parses a body as JSON only when its Content-Type says so (curl -d sends
      # application/x-www-form-urlencoded unless told otherwise).
      kind = request.headers.get('content-type')
      message = ('the body must be a JSON object' if kind and 'json' in kind.lower() else
                 f'the body must be a JSON object sent with Content-Type: application/json '
                 f'(this one: {kind or "none"})')
    else:
      message = f'{param or "body"}: {first.get("msg", "invalid")}'
    return refused(ServeError(400, message, param))

  async def authorized(request: Request):
    if state['draining']:
      raise ServeError(503, 'the server is shutting down', kind='service_unavailable')
    if not state['ready']:
      raise ServeError(503, 'the server is still compiling', kind='service_unavailable')
    if api_key is not None:
      scheme, _, given = request.headers.get('authorization', '').partition(' ')
      if scheme.lower() != 'bearer' or given.strip() != api_key:
        raise ServeError(401, 'missing or wrong API key (Authorization: Bearer KEY)',
                         kind='authentication_error')

  @app.get('/health')
  async def health():
    if state['failed']:
      return JSONResponse({'status': 'failed', 'error': state['failed']}, status_code=500)
    if state['draining']:
      return JSONResponse({'status': 'draining'}, status_code=503)
    if not state['ready']:
      return JSONResponse({'status': 'loading'}, status_code=503)
    return {'status': 'ok'}

  @app.get('/metrics')
  async def metrics():
    return Response(manager.metrics.text(), media_type=CONTENT_TYPE_LATEST)

  @app.get('/v1/models', dependencies=[Depends(authorized)])
  async def models():
    return {'object': 'list', 'data': [{
        'id': settings.model_name, 'object': 'model', 'created': int(time.time()),
        'owned_by': 'illada-jax', 'max_model_len': eng.cfg.max_len}]}

  @app.get('/v1/models/{name}', dependencies=[Depends(authorized)])
  async def model(name: str):
    manager.check_model(name)
    return (await models())['data'][0]

  @app.post('/v1/completions', dependencies=[Depends(authorized)])
  async def completions(body: protocol.CompletionRequest, request: Request):
    job = manager.completion_job(body)
    return await _respond(manager, body, job, request, chat=False)

  @app.post('/v1/chat/completions', dependencies=[Depends(authorized)])
  async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
    job = manager.chat_job(body)
    return await _respond(manager, body, job, request, chat=True)

  @app.post('/v1/score', dependencies=[Depends(authorized)])
  async def score(body: protocol.ScoreRequest):
    scored, tokens = await manager.score(body)
    best = max(range(len(scored)), key=lambda j: scored[j].score)
    return {'id': response_id('score'), 'object': 'score', 'model': settings.model_name,
            'method': body.method or settings.scoring.method, 'prediction': best,
            'data': [{'index': j, 'continuation': body.continuations[j], 'score': s.score,
                      'is_greedy': s.is_greedy} for j, s in enumerate(scored)],
            'usage': {'prompt_tokens': tokens, 'total_tokens': tokens}}

  if max_body:
    app.add_middleware(_BodyLimit, limit=max_body,
                       on_refused=lambda status: manager.metrics.errors.labels(str(status)).inc())
  return app


def _usage(job, completions_tokens: int) -> dict:
  return {'prompt_tokens': job.prompt_tokens, 'completion_tokens': completions_tokens,
          'total_tokens': job.prompt_tokens + completions_tokens}


def _first_error(errors: list[dict]) -> tuple[dict, str | None]:
  """(the error to report, the field it names). pydantic names the member of a union it
  tried (`stop.str`, `prompt.list[int].1`): the field is what comes before it, and the
  error reported is the one of the member the value's type matches (a list of 65 stop
  strings is too long, not 'a valid string')."""
  def split(err):
    loc = [str(x) for x in err.get('loc', ()) if x != 'body']
    cut = next((i for i, x in enumerate(loc) if x in _UNION_TAGS or '[' in x), len(loc))
    return '.'.join(loc[:cut]) or None, (loc[cut] if cut < len(loc) else None)
  if not errors:
    return {}, None
  param, _ = split(errors[0])
  value = errors[0].get('input')
  for err in errors:
    p, member = split(err)
    if p == param and member is not None and len(err.get('loc', ())) == len(errors[0]['loc']):
      if member.startswith('list') == isinstance(value, list):
        return err, param
  return errors[0], param


async def _respond(manager: RequestManager, body, job, request: Request, chat: bool):
  rid = response_id('chatcmpl' if chat else 'cmpl')
  created, model = int(time.time()), manager.settings.model_name
  if body.stream:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    stream = manager.stream(job)  # submits now: a full queue is still a 429
    return StreamingResponse(_sse(stream, job, rid, created, model, chat, include_usage),
                             media_type='text/event-stream')
  try:
    done = await manager.complete(job, request.is_disconnected)
  except ClientGone:
    return Response(status_code=499)
  choices = []
  for i, c in enumerate(done):
    reason = FINISH_REASONS[c.finish_reason]
    if chat:
      choices.append({'index': i, 'message': {'role': 'assistant', 'content': c.text},
                      'logprobs': None, 'finish_reason': reason})
    else:
      choices.append({'index': i, 'text': c.text, 'logprobs': None, 'finish_reason': reason})
  return {'id': rid, 'object': 'chat.completion' if chat else 'text_completion',
          'created': created, 'model': model, 'choices': choices,
          'usage': _usage(job, sum(len(c.token_ids) for c in done))}


async def _sse(stream, job, rid, created, model, chat, include_usage):
  """Server-sent events: a chunk per committed block with new text, a chunk with each
  choice's finish_reason, the usage chunk if asked for, then `[DONE]`."""
  kind = 'chat.completion.chunk' if chat else 'text_completion'

  def chunk(choices, **extra):
    data = {'id': rid, 'object': kind, 'created': created, 'model': model, 'choices': choices,
            **extra}
    return f'data: {json.dumps(data, ensure_ascii=False)}\n\n'

  def choice(i, text, reason=None, first=False):
    if chat:
      delta = {'role': 'assistant', 'content': text} if first else \
          ({'content': text} if text else {})
      return {'index': i, 'delta': delta, 'logprobs': None, 'finish_reason': reason}
    return {'index': i, 'text': text, 'logprobs': None, 'finish_reason': reason}

  output = 0
  try:
    if chat:  # the role first, as OpenAI's stream does
      for i in range(len(job.requests)):
        yield chunk([choice(i, '', first=True)])
    async for i, text, completion in stream:
      if text:
        yield chunk([choice(i, text)])
      if completion is not None:
        output += len(completion.token_ids)
        yield chunk([choice(i, '', FINISH_REASONS[completion.finish_reason])])
    if include_usage:
      yield chunk([], usage=_usage(job, output))
    yield 'data: [DONE]\n\n'
  except Exception as e:  # noqa: BLE001 (headers are sent: the error goes in the stream)
    if isinstance(e, asyncio.CancelledError):
      raise
    kind = e.kind if isinstance(e, ServeError) else 'server_error'
    param = e.param if isinstance(e, ServeError) else None
    yield f'data: {json.dumps(_error_body(str(e), kind, param))}\n\n'
    yield 'data: [DONE]\n\n'
  finally:
    await stream.aclose()
