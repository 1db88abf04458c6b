"""Runs the app under uvicorn: SIGINT / SIGTERM stop admitting (503), let what is in flight
finish within a grace period, stop the scheduler, and return (the process exits 0)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
import time

import uvicorn


class _Server(uvicorn.Server):
  """uvicorn's server, draining on a signal and returning normally afterwards (uvicorn's own
  handling re-raises the signal once shut down, which would end the process by it)."""

  def __init__(self, config: uvicorn.Config, state: dict, end_in_flight, grace: float):
    super().__init__(config)
    self._serve_state, self._end_in_flight, self._grace = state, end_in_flight, grace

  def handle_exit(self, sig, frame):
    if not self.should_exit:
      self._serve_state['draining'] = True
      # Just before uvicorn cancels what is left, the scheduler stops: requests still in
      # flight then end with a 503 body (a stream with an error chunk), not a cut connection.
      timer = threading.Timer(max(self._grace - 1., 0.), self._end_in_flight)
      timer.daemon = True
      timer.start()
    elif sig == signal.SIGINT:
      self.force_exit = True  # a second Ctrl-C: stop waiting for requests
    self.should_exit = True

  async def shutdown(self, sockets=None):
    await super().shutdown(sockets)
    if self.force_exit:
      # After a second Ctrl-C uvicorn stops waiting and leaves the app's shutdown out; the
      # tasks left would be cancelled at exit, each logging a CancelledError traceback. Instead
      # the scheduler stops after its current block, so every request still in flight ends
      # with its 503 body or error chunk at once, and the app's own shutdown runs.
      await asyncio.to_thread(self._end_in_flight)
      deadline = time.monotonic() + 2.
      while self.server_state.tasks and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
      await self.lifespan.shutdown()

  @contextlib.contextmanager
  def capture_signals(self):
    if threading.current_thread() is not threading.main_thread():
      yield
      return
    old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      yield
    finally:
      for s, handler in old.items():
        # Stopped by a signal, the process is on its way out: another Ctrl-C would only
        # interrupt its exit (a KeyboardInterrupt traceback from an atexit hook).
        signal.signal(s, signal.SIG_IGN if self.should_exit else handler)


def serve(app, host: str, port: int, grace: float = 30., log_level: str = 'info') -> None:
  """Serves `app` (from `app.make_app`) until SIGINT / SIGTERM, then drains for `grace` s (a
  second SIGINT: at once). Returns with both signals ignored: the caller is exiting."""
  # After each block the scheduler thread needs the GIL to hand out results and start the
  # next block; with Python's default 5 ms switch interval it waits that long behind the
  # event loop while the device idles (a 512-request saturation pass: 8% faster at 0.5 ms).
  sys.setswitchinterval(5e-4)
  config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=grace, lifespan='on')
  end = lambda: app.state.manager.engine.stop(timeout=10)
  _Server(config, app.state.serve, end, grace).run()
