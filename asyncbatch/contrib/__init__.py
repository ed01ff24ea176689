"""Optional integrations. Each module here needs an extra; none is imported by ``asyncbatch``.

Layout:

- ``bulkapi``: a realistic bulk HTTP API (starlette app + in-process uvicorn
  server on 127.0.0.1) for tests, examples and benchmarks. Needs ``asyncbatch[http]``.
- ``httpx``: building bulk sinks on an ``httpx.AsyncClient``: multi-status
  answers mapped to per-item results and errors, 429/503 mapped to an error
  carrying the server's ``Retry-After``. Needs ``asyncbatch[httpx]``.
- ``prometheus``: a ``prometheus_client`` collector for any batcher, ``@batch``
  function or DataLoader. Needs ``asyncbatch[prometheus]``.
- ``otel``: OpenTelemetry metrics and one span per sink call, linked to the
  submitters' spans. Needs ``asyncbatch[otel]``.
- ``redis``: durable micro-batches on Redis Streams consumer groups
  (``StreamConsumer``, ``StreamWriter``). Needs ``asyncbatch[redis]``.
"""
