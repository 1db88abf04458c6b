"""The OpenAI API's request bodies as pydantic models: every field validated in one place.

A field the model cannot honour (`logprobs`, `top_p` below 1, penalties,
`tools`, ...) is declared here so that a request setting it is refused with a
400 naming it (`unsupported`), instead of being silently dropped; set to its
neutral value (`top_p: 1`, `presence_penalty: 0`, `logprobs: null`) it
changes nothing and is accepted. Other unknown fields are ignored, as the
OpenAI clients send extras (`user`, `metadata`) that change nothing here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
  model_config = ConfigDict(extra='ignore', strict=True)

  include_usage: bool = False


# field -> values that change nothing (any other value is refused)
_NEUTRAL = {
    'logprobs': (None, False), 'top_logprobs': (None, 0), 'echo': (None, False),
    'suffix': (None, ''), 'best_of': (None, 1), 'top_p': (None, 1, 1.0), 'top_k': (None, -1, 0),
    'presence_penalty': (None, 0, 0.0), 'frequency_penalty': (None, 0, 0.0),
    'repetition_penalty': (None, 1, 1.0), 'logit_bias': (None, {}), 'tools': (None, []),
    'tool_choice': (None, 'none'), 'functions': (None, []), 'function_call': (None, 'none'),
    'response_format': (None, {'type': 'text'}), 'parallel_tool_calls': (None, False, True),
    'audio': (None,), 'modalities': (None, ['text']), 'prediction': (None,),
}


class _Common(BaseModel):
  """Fields shared by completions and chat completions. Strict types: `"stream": "yes"` or
  `"max_tokens": true` are 400s, not coerced."""
  model_config = ConfigDict(extra='ignore', strict=True)

  model: str | None = None  # None: the served model (as vLLM)
  temperature: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
  seed: int | None = Field(None, ge=0, lt=2 ** 32)  # the request's random stream
  stop: str | Annotated[list[str], Field(max_length=64)] | None = None  # at most 64 strings
  n: int = Field(1, ge=1, le=128)
  stream: bool = False
  stream_options: StreamOptions | None = None
  # Declared so that a non-neutral value is refused by name (see `unsupported`).
  logprobs: Any = None
  top_p: Any = None
  top_k: Any = None
  presence_penalty: Any = None
  frequency_penalty: Any = None
  repetition_penalty: Any = None
  logit_bias: Any = None

  def stops(self) -> tuple[str, ...]:
    if self.stop is None:
      return ()
    stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
    return tuple(s for s in stops if s)

  def unsupported(self) -> str | None:
    """The first field set to a value this server cannot honour, else None."""
    for name, neutral in _NEUTRAL.items():
      if name in type(self).model_fields and getattr(self, name) not in neutral:
        return name
    return None


class CompletionRequest(_Common):
  """`POST /v1/completions`: `prompt` is a string, strings, token ids, or lists of ids."""
  prompt: Union[str, list[str], list[int], list[list[int]]]
  max_tokens: int | None = Field(None, ge=1)
  echo: Any = None
  suffix: Any = None
  best_of: Any = None

  def prompts(self) -> list[str | list[int]]:
    """One entry per prompt: a string or a list of token ids."""
    p = self.prompt
    if isinstance(p, str):
      return [p]
    if p and all(isinstance(t, int) for t in p):
      return [list(p)]
    return list(p)


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra='ignore', strict=True)

  role: str = Field(min_length=1)
  content: str | list[dict] | None = None
  name: str | None = None

  def text(self) -> str:
    """The content as text: a string, or its `text` parts joined by newlines (as vLLM joins
    them); ValueError for another kind of part. A null content is empty text."""
    if self.content is None:
      return ''
    if isinstance(self.content, str):
      return self.content
    out = []
    for part in self.content:
      if part.get('type') != 'text':
        raise ValueError(f'content part of type {part.get("type")!r}: only text parts')
      if not isinstance(part.get('text'), str):
        raise ValueError('a text content part without a "text" string')
      out.append(part['text'])
    return '\n'.join(out)


class ChatCompletionRequest(_Common):
  """`POST /v1/chat/completions`: `messages` rendered with the checkpoint's chat template."""
  messages: list[ChatMessage] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  max_tokens: int | None = Field(None, ge=1)
  # As vLLM's extras: false with a final assistant message continues that message.
  add_generation_prompt: bool = True
  continue_final_message: bool = False
  top_logprobs: Any = None
  tools: Any = None
  tool_choice: Any = None
  functions: Any = None
  function_call: Any = None
  response_format: Any = None
  parallel_tool_calls: Any = None
  audio: Any = None
  modalities: Any = None
  prediction: Any = None

  def limit(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ScoreRequest(BaseModel):
  """`POST /v1/score`: the log-likelihood of each continuation after `context` (SPEC §3).

  method: 'mc' (Monte-Carlo ELBO estimate) or 'confidence' (iLLaDA's
  multiple-choice score); default: the server's scoring settings. `seed`
  seeds the MC draws (continuation j uses seed + j).
  """
  model_config = ConfigDict(extra='ignore', strict=True)

  model: str | None = None  # None: the served model (as vLLM)
  context: str
  continuations: list[str] = Field(min_length=1, max_length=64)
  method: Literal['mc', 'confidence'] | None = None
  seed: int = Field(0, ge=0, lt=2 ** 32)


class ErrorDetail(BaseModel):
  message: str
  type: str
  param: str | None = None
  code: str | None = None


class ErrorResponse(BaseModel):
  error: ErrorDetail
