"""What a submitted generation request hands back: its events, its completion, its cancel.

`illada_jax.scheduler` fills a `Handle` from its thread (or the caller's,
offline); whoever submitted reads it by iterating, by `result()`, or through
an `on_event` callback. `held_back` is the rule that keeps a streamed text
from ever showing the start of a stop string.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any, Callable


@dataclasses.dataclass
class Completion:
  """A finished request: `text` is cut at EOS/EOT, `max_new_tokens` and the first stop string
  (then, with `options.after_think`, reduced to what follows the end-of-thinking marker).

  finish_reason: 'eos' (EOS/EOT), 'stop' (a stop string), 'length' (max new
  tokens or the generation limit), 'cancelled'. token_ids: the ids behind
  `text` (before `after_think`: the whole completion).
  generated: positions the sampler denoised for this request (whole blocks).
  steps: model calls in which the request had masked positions.
  """
  id: Any
  text: str
  token_ids: list[int]
  finish_reason: str
  generated: int
  steps: int


@dataclasses.dataclass(frozen=True)
class Event:
  """What a handle yields: `text` newly committed (possibly ''), and on the last event the
  `completion` (or the `error` that ended the request) with the request's seconds from
  submission to its first committed block (None if none was) and to its end."""
  text: str
  completion: Completion | None = None
  error: BaseException | None = None
  first_block_seconds: float | None = None
  seconds: float | None = None


class Handle:
  """A submitted generation request.

  Iterate it for its events (blocking), call `result()` for its completion,
  `cancel()` to free its slot at the next block boundary. With `stream`,
  each block that commits text yields an `Event` with the new text; the
  texts of all events add up to `completion.text` exactly. Text that could
  be the start of a stop string, or an unfinished UTF-8 character, is held
  back until the next block shows what it is; with `after_think` everything
  is held back to the end (the answer is known only then).

  `on_event`, if given, is called with each event on the scheduler's thread
  (it must not block) instead of queueing it. Times are `time.perf_counter()`.
  """

  def __init__(self, request, *, stream: bool = False,
               on_event: Callable[[Event], None] | None = None):
    self.request, self.stream = request, stream
    self.submitted = time.perf_counter()
    self.first_block: float | None = None  # when its first block was committed
    self.finished: float | None = None
    self.completion: Completion | None = None
    self.error: BaseException | None = None
    self._on_event = on_event
    self._events: queue.SimpleQueue = queue.SimpleQueue()
    self._done = threading.Event()
    self._cancelled = False
    self._sent = ''  # streamed text so far
    self.seq = 0  # arrival order, set by the scheduler
    self.submit_block = 0  # blocks the engine had run when it was submitted

  @property
  def id(self):
    return self.request.id

  @property
  def done(self) -> bool:
    return self._done.is_set()

  @property
  def cancelled(self) -> bool:
    return self._cancelled

  def cancel(self) -> None:
    """Asks the scheduler to drop the request (waiting or live) at its next block boundary."""
    self._cancelled = True

  def result(self, timeout: float | None = None) -> Completion:
    """The completion (blocking). Raises TimeoutError, or the error that ended the request."""
    if not self._done.wait(timeout):
      raise TimeoutError(f'request {self.id!r} not done after {timeout} s')
    if self.error is not None:
      raise self.error
    return self.completion

  def __iter__(self):
    if self._on_event is not None:
      raise TypeError('a handle with on_event delivers its events to the callback')
    while True:
      event = self._events.get()
      yield event
      if event.completion is not None or event.error is not None:
        return

  def _emit(self, event: Event) -> None:
    if self.finished is not None:
      return  # a request ends once: nothing follows its completion or error
    if event.completion is not None or event.error is not None:
      self.finished = time.perf_counter()
      self.completion, self.error = event.completion, event.error
      event = dataclasses.replace(
          event, seconds=self.finished - self.submitted,
          first_block_seconds=None if self.first_block is None
          else self.first_block - self.submitted)
    try:
      (self._on_event or self._events.put)(event)
    except Exception:  # noqa: BLE001
      pass  # a consumer that is gone (its event loop closed) must not stop the scheduler
    if self.finished is not None:
      self._done.set()


def held_back(text: str, stops) -> int:
  """Characters at the end of `text` not yet safe to send: a trailing unfinished character
  (U+FFFD from a partial UTF-8 sequence) and the longest tail that starts a stop string."""
  keep = len(text.rstrip('\ufffd'))
  hold = 0
  for s in stops:
    for k in range(min(len(s) - 1, keep), 0, -1):
      if text[keep - k:keep] == s[:k]:
        hold = max(hold, k)
        break
  return len(text) - keep + hold
