"""Runs the app under uvicorn: SIGINT / SIGTERM stop admitting (503), let what is in flight
finish within a grace period, stop the scheduler, and return (the process exits 0)."""

from __future__ import annotations

import contextlib
import signal
import threading

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
        signal.signal(s, handler)


def serve(app, host: str, port: int, grace: float = 30., log_level: str = 'info') -> None:
  """Serves `app` (from `app.make_app`) until SIGINT / SIGTERM, then drains for `grace` s."""
  config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=grace, lifespan='on')
  end = lambda: app.state.manager.engine.stop(timeout=10)
  _Server(config, app.state.serve, end, grace).run()
