"""The processes of one job fail together, fast: a failure flag, barriers with timeouts.

With `jax.distributed`, a process that fails (a bad record under `--on-error
stop`, an exception, a signal) calls `report_failure(reason)`: it sets one key
in the coordination service's key-value store. Every other process watches
that key (`watch`, a daemon thread polling twice a second) and its barriers
(`barrier`) check it while they wait, so all of them stop within seconds,
naming the failing process and the reason, instead of blocking in a
collective or in `jax.distributed.shutdown`'s barrier until a heartbeat
timeout aborts them (minutes, exit 134). A process that stops this way leaves
with `exit_now`, which skips that shutdown barrier; what it wrote and flushed
stays (jobs resume from it).

The key-value store is reached through `jax._src.distributed.global_state.client`:
jax has no public API for it (only the collectives), and this module is the
one place that uses it.
"""

from __future__ import annotations

import atexit
import itertools
import os
import sys
import threading
import time
from typing import Callable

FAILED_KEY = 'illada/failed'
DEFAULT_BARRIER_TIMEOUT_S = 3600.


class GroupFailed(RuntimeError):
  """Another process of the job failed, or a barrier timed out; the message says which."""


def _client():
  from jax._src import distributed  # private: see the module docstring
  return distributed.global_state.client


def _process() -> tuple[int, int]:
  from jax._src import distributed
  state = distributed.global_state
  return state.process_id, state.num_processes


def active() -> bool:
  """Whether this process is one of several of a `jax.distributed` job."""
  try:
    return _client() is not None and (_process()[1] or 1) > 1
  except ImportError:
    return False


def failure() -> str | None:
  """The failure some process reported, or None."""
  try:
    value = _client().key_value_try_get(FAILED_KEY)
  except Exception as e:  # NOT_FOUND, or the coordination service itself is gone
    if 'NOT_FOUND' in str(e) or 'not found' in str(e).lower():
      return None
    return f'the coordination service (process 0) is gone ({type(e).__name__})'
  return value.decode() if isinstance(value, bytes) else value


def report_failure(reason: str) -> None:
  """Tells every process that this one failed (the first report wins)."""
  try:
    _client().key_value_set(FAILED_KEY, f'process {_process()[0]}: {reason}')
  except Exception:  # already reported by another process, or the service is gone
    pass


def barrier(name: str, timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S) -> Callable[[], None]:
  """A cross-process barrier (a no-op with one process) that raises GroupFailed when any
  process reported a failure, or after `timeout_s` naming the processes that never came."""
  if not active():
    return lambda: None
  counter = itertools.count()

  def wait():
    client, (me, n) = _client(), _process()
    key = f'illada/barrier/{name}/{next(counter)}'
    client.key_value_set(f'{key}/{me}', '1')
    deadline = time.monotonic() + timeout_s
    while True:
      reason = failure()
      if reason is not None:
        raise GroupFailed(reason)
      arrived = {k.rsplit('/', 1)[-1] for k, _ in client.key_value_dir_get(key + '/')}
      if len(arrived) >= n:
        return
      if time.monotonic() > deadline:
        missing = sorted(set(map(str, range(n))) - arrived)
        report_failure(f'barrier {name} timed out after {timeout_s:.0f} s waiting for '
                       f'process(es) {", ".join(missing)}')
        raise GroupFailed(failure())
      time.sleep(0.05)

  return wait


def watch(on_failure: Callable[[str], None], interval_s: float = 0.5) -> threading.Thread | None:
  """Calls `on_failure(reason)` (from a daemon thread) once another process reports one."""
  if not active():
    return None
  me = f'process {_process()[0]}:'
  exiting = threading.Event()
  # Registered after jax.distributed's own exit handler, so it runs first: a normal exit's
  # shutdown (the service going away) is not taken for a failure.
  atexit.register(exiting.set)

  def loop():
    while not exiting.is_set():
      reason = failure()
      if reason is not None and not reason.startswith(me) and not exiting.is_set():
        on_failure(reason)
        return
      time.sleep(interval_s)

  thread = threading.Thread(target=loop, name='illada-failure-watch', daemon=True)
  thread.start()
  return thread


def exit_now(code: int) -> None:
  """Leaves at once with `code`, skipping `jax.distributed`'s shutdown barrier (which would
  wait for the processes that failed); stdout and stderr are flushed first."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:
      pass
  os._exit(code)
