"""`illada-serve`: an OpenAI-compatible HTTP server over the engine's one scheduler.

  protocol   the OpenAI request bodies (pydantic): every field checked in one place
  manager    protocol requests -> engine requests; scheduler events -> async streams
  metrics    Prometheus metrics (`prometheus_client`)
  app        the FastAPI routes, errors, API key, body limit
  server     uvicorn with a graceful drain on SIGINT / SIGTERM

The scheduler (`illada_jax.scheduler`) owns the device; nothing here does.
See docs/serving.md.
"""
