"""Prometheus metrics of a server (`GET /metrics`), through `prometheus_client`.

Gauges read the scheduler when scraped (queue depth, busy slots); counters
and histograms are updated as each request finishes. One registry per
server, so several servers in one process do not share counts.
"""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 (the app's media type)

_LATENCY_BUCKETS = (.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
  """The server's metrics, all named `illada_*`."""

  def __init__(self, scheduler, slots: int):
    r = self.registry = CollectorRegistry()
    Gauge('illada_queue_depth', 'requests waiting for a slot', registry=r).set_function(
        scheduler.waiting)
    Gauge('illada_busy_slots', 'slots holding a live request', registry=r).set_function(
        scheduler.busy)
    Gauge('illada_slots', 'slots in the pool', registry=r).set(slots)
    self.requests = Counter('illada_requests', 'finished generation requests (one per choice)',
                            ['finish_reason'], registry=r)
    self.prompt_tokens = Counter('illada_prompt_tokens', 'prompt tokens of submitted requests',
                                 registry=r)
    self.output_tokens = Counter('illada_output_tokens', 'tokens of returned completions',
                                 registry=r)
    self.computed_tokens = Counter(
        'illada_computed_tokens', 'positions denoised for finished requests (whole blocks)',
        registry=r)
    self.time_to_first_block = Histogram(
        'illada_time_to_first_block_seconds', 'submission to the first committed block',
        buckets=_LATENCY_BUCKETS, registry=r)
    self.latency = Histogram('illada_e2e_latency_seconds', 'submission to completion',
                             buckets=_LATENCY_BUCKETS, registry=r)
    self.errors = Counter('illada_http_errors', 'requests refused, by HTTP status', ['status'],
                          registry=r)

  def finished(self, reason: str, output: int, computed: int, first_block: float | None,
               latency: float) -> None:
    self.requests.labels(reason).inc()
    self.output_tokens.inc(output)
    self.computed_tokens.inc(computed)
    if first_block is not None:
      self.time_to_first_block.observe(first_block)
    self.latency.observe(latency)

  def text(self) -> bytes:
    return generate_latest(self.registry)
