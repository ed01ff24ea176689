"""asyncbatch.contrib.otel with the real OpenTelemetry SDK: in-memory reader and exporter.

Metric values, units and histogram buckets are checked exactly against known
workloads on virtual time (looptime); spans for their names, attributes,
links to the submitters' spans, parentage and ERROR status.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, StatusCode

import asyncbatch
from asyncbatch import Batcher, DataLoader, Retry, batch
from asyncbatch._observe import SinkCall
from asyncbatch.contrib.otel import (
    DURATION_BUCKETS,
    SIZE_BUCKETS,
    WAIT_BUCKETS,
    BatcherTelemetry,
    instrument,
)

from .conftest import FLAVOURS

pytestmark = pytest.mark.looptime


@dataclass
class Metrics:
    """One collection: instrument name -> (kind, unit, points)."""

    kinds: dict[str, str]
    units: dict[str, str]
    points: dict[str, list[Any]]

    @classmethod
    def collect(cls, reader: InMemoryMetricReader) -> Metrics:
        data = reader.get_metrics_data()
        assert data is not None
        kinds: dict[str, str] = {}
        units: dict[str, str] = {}
        points: dict[str, list[Any]] = {}
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                assert scope_metrics.scope.name == "asyncbatch"
                assert scope_metrics.scope.version == asyncbatch.__version__
                for metric in scope_metrics.metrics:
                    kind = type(metric.data).__name__
                    if isinstance(metric.data, Sum):
                        assert metric.data.is_monotonic
                    kinds[metric.name] = kind
                    units[metric.name] = metric.unit or ""
                    points[metric.name] = list(metric.data.data_points)
        return cls(kinds, units, points)

    def values(self, name: str, batcher: str, key: str | None = None) -> Any:
        """The value of ``name`` for ``batcher``, or ``{attribute key value: value}``."""
        out: dict[Any, Any] = {}
        for point in self.points.get(name, []):
            attributes = dict(point.attributes)
            if attributes.pop("asyncbatch.batcher") != batcher:
                continue
            assert isinstance(point, NumberDataPoint)
            if key is None:
                assert attributes == {}
                return point.value
            assert set(attributes) == {key}
            out[attributes[key]] = point.value
        return out

    def histogram(self, name: str, batcher: str) -> HistogramDataPoint:
        (point,) = [
            p for p in self.points[name] if dict(p.attributes) == {"asyncbatch.batcher": batcher}
        ]
        assert isinstance(point, HistogramDataPoint)
        return point


def buckets(bounds: tuple[float, ...], counts: dict[float, int]) -> list[int]:
    """Per-bucket (not cumulative) counts, OpenTelemetry's way: the last is (max bound, +inf)."""
    return [counts.get(bound, 0) for bound in (*bounds, float("inf"))]


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def meter_provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[reader])
    yield provider
    provider.shutdown()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def sink_spans(exporter: InMemorySpanExporter, batcher: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == f"asyncbatch.sink {batcher}"]


class Orders:
    """0.2 s per call; item 3 fails alone (an Exception entry); a call with 99 raises."""

    def __init__(self, tracer: trace.Tracer | None = None) -> None:
        self.calls: list[list[int]] = []
        self.tracer = tracer or trace.get_tracer("backend")

    async def __call__(self, items: list[int]) -> list[int | Exception]:
        self.calls.append(list(items))
        with self.tracer.start_as_current_span("backend call"):
            await asyncio.sleep(0.2)
        if 99 in items:
            raise ConnectionError("backend down")
        return [ValueError(f"bad order {x}") if x == 3 else x * 10 for x in items]


async def test_metrics_for_a_known_workload(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    orders_sink = Orders()
    calls = 0

    async def flaky(items: list[str]) -> list[str]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.03)
        if calls == 1:
            raise ConnectionError("backend restarting")
        return [s.upper() for s in items]

    orders = Batcher(orders_sink, max_size=4, name="orders")
    emails = Batcher(
        flaky, max_size=8, retry=Retry(attempts=3, backoff=0.05, jitter=False), name="emails"
    )
    instrument(orders, meter_provider=meter_provider)
    instrument(emails, meter_provider=meter_provider)
    async with orders, emails:
        results = await orders.submit_many(list(range(10)), return_exceptions=True)
        assert await emails.submit_many(["a", "b", "c"]) == ["A", "B", "C"]
    assert [r if isinstance(r, int) else "error" for r in results] == [
        0, 10, 20, "error", 40, 50, 60, 70, 80, 90,
    ]  # fmt: skip
    assert orders_sink.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]

    got = Metrics.collect(reader)
    assert got.kinds == {
        "asyncbatch.items": "Sum",
        "asyncbatch.batches": "Sum",
        "asyncbatch.pending": "Gauge",
        "asyncbatch.in_flight": "Gauge",
        "asyncbatch.batch.size": "Histogram",
        "asyncbatch.sink.duration": "Histogram",
        "asyncbatch.batch.wait": "Histogram",
        "asyncbatch.retries": "Sum",
        "asyncbatch.concurrency.limit": "Gauge",
        # No DataLoader here: the cache instruments have no points.
    }
    assert got.units == {
        "asyncbatch.items": "{item}",
        "asyncbatch.batches": "{batch}",
        "asyncbatch.pending": "{item}",
        "asyncbatch.in_flight": "{item}",
        "asyncbatch.batch.size": "{item}",
        "asyncbatch.sink.duration": "s",
        "asyncbatch.batch.wait": "s",
        "asyncbatch.retries": "{call}",
        "asyncbatch.concurrency.limit": "{call}",
    }
    assert got.values("asyncbatch.items", "orders", "asyncbatch.outcome") == {
        "succeeded": 9, "failed": 1, "cancelled": 0, "expired": 0, "rejected": 0, "dropped": 0,
    }  # fmt: skip
    assert got.values("asyncbatch.items", "emails", "asyncbatch.outcome")["succeeded"] == 3
    assert got.values("asyncbatch.batches", "orders", "asyncbatch.reason") == {
        "size": 2, "weight": 0, "wait": 1, "interval": 0, "flush": 0, "close": 0,
    }  # fmt: skip
    assert got.values("asyncbatch.retries", "orders") == 0
    assert got.values("asyncbatch.retries", "emails") == 1
    for name in ("orders", "emails"):
        assert got.values("asyncbatch.pending", name) == 0
        assert got.values("asyncbatch.in_flight", name) == 0
        assert got.values("asyncbatch.concurrency.limit", name) == 1

    size = got.histogram("asyncbatch.batch.size", "orders")
    assert list(size.explicit_bounds) == list(SIZE_BUCKETS)
    assert (size.count, size.sum, size.min, size.max) == (3, 10, 2, 4)
    assert list(size.bucket_counts) == buckets(SIZE_BUCKETS, {2: 1, 4: 2})
    size = got.histogram("asyncbatch.batch.size", "emails")
    assert (size.count, size.sum) == (2, 6)  # the failed call and its retry
    duration = got.histogram("asyncbatch.sink.duration", "orders")
    assert list(duration.explicit_bounds) == list(DURATION_BUCKETS)
    assert duration.count == 3
    assert duration.sum == pytest.approx(0.6, abs=1e-6)
    assert list(duration.bucket_counts) == buckets(DURATION_BUCKETS, {0.25: 3})
    duration = got.histogram("asyncbatch.sink.duration", "emails")
    assert duration.count == 2
    assert duration.sum == pytest.approx(0.06, abs=1e-6)
    wait = got.histogram("asyncbatch.batch.wait", "orders")
    assert list(wait.explicit_bounds) == list(WAIT_BUCKETS)
    assert wait.count == 3
    assert wait.sum == pytest.approx(0.6, abs=1e-6)  # 0, 0.2 and 0.4 s for the slot
    assert list(wait.bucket_counts) == buckets(WAIT_BUCKETS, {0.0001: 1, 0.25: 1, 0.5: 1})
    assert got.histogram("asyncbatch.batch.wait", "emails").count == 1


async def test_gauges_are_observed_at_collection(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    gate = asyncio.Event()

    async def held(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    async with Batcher(held, max_size=4, max_concurrency=2, name="held") as b:
        instrument(b, meter_provider=meter_provider)
        futures = [b.submit_nowait(i) for i in range(10)]
        for _ in range(5):
            await asyncio.sleep(0)
        got = Metrics.collect(reader)
        assert got.values("asyncbatch.in_flight", "held") == 8
        assert got.values("asyncbatch.pending", "held") == 2
        assert got.values("asyncbatch.concurrency.limit", "held") == 2
        gate.set()
        assert await asyncio.gather(*futures) == list(range(10))
    got = Metrics.collect(reader)
    assert got.values("asyncbatch.in_flight", "held") == 0
    assert got.values("asyncbatch.items", "held", "asyncbatch.outcome")["succeeded"] == 10


async def test_spans_attributes_links_and_error_status(
    meter_provider: MeterProvider,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    orders_sink = Orders(tracer_provider.get_tracer("backend"))
    orders = Batcher(orders_sink, max_size=4, name="orders")
    telemetry = instrument(orders, meter_provider=meter_provider, tracer_provider=tracer_provider)
    assert telemetry.tracing
    assert telemetry.capture is not None
    tracer = tracer_provider.get_tracer("test")
    submitters: dict[int, SpanContext] = {}

    async def request(x: int) -> object:
        # Each request has its own span, current while it awaits its item.
        with tracer.start_as_current_span(f"request {x}") as span:
            submitters[x] = span.get_span_context()
            try:
                return await orders.submit(x)
            except Exception as exc:
                return exc

    async with orders:
        # Items 0-3, then 4, 5, 99, 7 (a batch whose call raises), then 8 and 9
        # submitted from no span at all.
        results = await asyncio.gather(
            *(request(x) for x in (0, 1, 2, 3, 4, 5, 99, 7)), orders.submit(8), orders.submit(9)
        )
    assert orders_sink.calls == [[0, 1, 2, 3], [4, 5, 99, 7], [8, 9]]
    assert results[:4] == [0, 10, 20, results[3]]
    assert isinstance(results[3], ValueError)  # a per-item error: the call succeeded
    assert all(isinstance(r, ConnectionError) for r in results[4:8])

    spans = sink_spans(exporter, "orders")
    assert [dict(s.attributes or {}) for s in spans] == [
        {
            "asyncbatch.batcher": "orders",
            "messaging.batch.message_count": n,
            "asyncbatch.attempt": 1,
        }
        for n in (4, 4, 2)
    ]
    first, failed, anonymous = spans
    assert [link.context for link in first.links] == [submitters[x] for x in (0, 1, 2, 3)]
    assert [link.context for link in failed.links] == [submitters[x] for x in (4, 5, 99, 7)]
    assert list(anonymous.links) == []  # no span was current: no link
    # A root span of its own trace, linked to the requests (not their child).
    assert all(s.parent is None for s in spans)

    assert first.status.status_code is StatusCode.UNSET
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ConnectionError: backend down"
    (event,) = failed.events
    assert event.name == "exception"
    assert dict(event.attributes or {})["exception.type"] == "ConnectionError"
    assert dict(event.attributes or {})["exception.message"] == "backend down"
    # The sink's own spans are children of its call's span.
    backend = [s for s in exporter.get_finished_spans() if s.name == "backend call"]
    assert [s.parent.span_id if s.parent else None for s in backend] == [
        s.context.span_id for s in spans if s.context
    ]
    assert len({s.context.trace_id for s in backend if s.context}) == 3


async def test_retries_are_separate_spans_with_their_attempt(
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    calls = 0

    async def flaky(items: list[str]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise TimeoutError("slow backend")
        return [s.upper() for s in items]

    async with Batcher(
        flaky, name="emails", retry=Retry(attempts=3, backoff=0.05, jitter=False)
    ) as emails:
        instrument(emails, meter_provider=meter_provider, tracer_provider=tracer_provider)
        with tracer_provider.get_tracer("test").start_as_current_span("send") as send:
            assert await emails.submit_many(["a", "b"]) == ["A", "B"]
    spans = sink_spans(exporter, "emails")
    assert [(s.attributes or {})["asyncbatch.attempt"] for s in spans] == [1, 2, 3]
    assert [s.status.status_code for s in spans] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    # Both items came from one span: one link, not two.
    assert [[link.context for link in s.links] for s in spans] == [[send.get_span_context()]] * 3
    metrics = Metrics.collect(reader)
    assert metrics.values("asyncbatch.retries", "emails") == 2
    assert metrics.histogram("asyncbatch.sink.duration", "emails").count == 3


async def test_links_are_capped_at_128(
    meter_provider: MeterProvider,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    async def sink(items: list[int]) -> list[int]:
        return items

    b = Batcher(sink, max_size=200, name="wide")
    instrument(b, meter_provider=meter_provider, tracer_provider=tracer_provider)
    tracer = tracer_provider.get_tracer("test")
    contexts: list[SpanContext] = []

    async def request(x: int) -> int:
        with tracer.start_as_current_span(f"request {x}") as span:
            contexts.append(span.get_span_context())
            return await b.submit(x)

    async with b:
        assert await asyncio.gather(*(request(x) for x in range(200))) == list(range(200))
    (span,) = sink_spans(exporter, "wide")
    assert (span.attributes or {})["messaging.batch.message_count"] == 200
    assert [link.context for link in span.links] == contexts[:128]


async def test_no_tracer_provider_means_no_capture_and_no_span(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """The global tracer provider is not set in the tests: nothing is captured per item."""
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)

    async def sink(items: list[int]) -> list[int]:
        return items

    async with Batcher(sink, name="quiet") as b:
        telemetry = instrument(b, meter_provider=meter_provider)
        assert telemetry.capture is None
        assert not telemetry.tracing
        assert repr(telemetry) == "<BatcherTelemetry batcher='quiet' [metrics]>"
        assert await b.submit_many([1, 2, 3]) == [1, 2, 3]
    assert Metrics.collect(reader).histogram("asyncbatch.batch.size", "quiet").count == 1
    # A no-op provider given explicitly is no tracer either.
    async with Batcher(sink, name="noop") as b:
        telemetry = instrument(
            b, meter_provider=meter_provider, tracer_provider=trace.NoOpTracerProvider()
        )
        assert telemetry.capture is None


async def test_two_tracers_leave_no_ended_span_current(
    meter_provider: MeterProvider,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    """Two tracing observers on one batcher: the sink runs under the span attached
    last; after the call no sink span is current (on_batch's spans are roots); no
    submitter's baggage reaches the sink."""
    tracer = tracer_provider.get_tracer("test")
    seen: dict[str, Any] = {}

    def on_batch(report: asyncbatch.BatchReport) -> None:
        seen["on_batch"] = trace.get_current_span()
        with tracer.start_as_current_span("after"):
            pass

    async def sink(items: list[int]) -> list[int]:
        seen["baggage"] = dict(baggage.get_all())
        with tracer.start_as_current_span("inside"):
            pass
        return items

    b = Batcher(sink, name="two", on_batch=on_batch)
    for name in ("two", "two-b"):
        instrument(b, name=name, meter_provider=meter_provider, tracer_provider=tracer_provider)

    async def request(x: int) -> int:
        token = otel_context.attach(baggage.set_baggage("tenant", f"tenant-{x}"))
        try:
            return await b.submit(x)
        finally:
            otel_context.detach(token)

    async with b:
        assert await asyncio.gather(*(request(x) for x in range(3))) == [0, 1, 2]
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"asyncbatch.sink two", "asyncbatch.sink two-b", "inside", "after"}
    inside, after, second = spans["inside"], spans["after"], spans["asyncbatch.sink two-b"]
    assert inside.parent is not None
    assert second.context is not None
    assert inside.parent.span_id == second.context.span_id
    assert after.parent is None
    assert seen["on_batch"] is trace.INVALID_SPAN
    assert seen["baggage"] == {}


def test_contexts_detached_out_of_order_leave_no_ended_span_current(
    meter_provider: MeterProvider, tracer_provider: TracerProvider
) -> None:
    """Observers ended first-started-first (not the nesting order): the context
    current before the call comes back, not the first observer's ended span."""

    async def sink(items: list[int]) -> list[int]:
        return items

    b = Batcher(sink, name="fifo")
    first, second = (
        instrument(b, name=name, meter_provider=meter_provider, tracer_provider=tracer_provider)
        for name in ("fifo-1", "fifo-2")
    )
    outer = tracer_provider.get_tracer("test").start_span("outer")
    token = otel_context.attach(trace.set_span_in_context(outer))
    try:
        call = SinkCall("fifo", 2, 1, (), 0.0)
        first_token = first.call_started(call)
        second_token = second.call_started(call)
        assert first_token is not None
        assert second_token is not None
        assert trace.get_current_span() is second_token[0]
        first.call_finished(call, first_token, 0.5, None)
        second.call_finished(call, second_token, 0.5, None)
        assert trace.get_current_span() is outer
        # And in order: each end brings back what its start found.
        first_token = first.call_started(call)
        second_token = second.call_started(call)
        assert first_token is not None
        assert second_token is not None
        second.call_finished(call, second_token, 0.5, None)
        assert trace.get_current_span() is first_token[0]
        first.call_finished(call, first_token, 0.5, None)
        assert trace.get_current_span() is outer
    finally:
        otel_context.detach(token)
        outer.end()
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_a_meter_provider_let_go_is_not_kept() -> None:
    """Instrumenting with many meter providers in turn keeps none of them (nor their
    readers and points) once they are dropped."""
    import gc
    import weakref

    from asyncbatch.contrib.otel import _Instruments

    async def sink(items: list[int]) -> list[int]:
        return items

    gc.collect()
    before = len(_Instruments._live())
    readers: list[weakref.ref[InMemoryMetricReader]] = []

    async def run() -> None:
        for _ in range(20):
            reader = InMemoryMetricReader()
            provider = MeterProvider(metric_readers=[reader])
            b = Batcher(sink, name="x")
            telemetry = instrument(b, meter_provider=provider)
            assert await b.submit(1) == 1
            got = Metrics.collect(reader)
            assert got.values("asyncbatch.items", "x", "asyncbatch.outcome")["succeeded"] == 1
            telemetry.remove()
            await b.aclose()
            provider.shutdown()
            readers.append(weakref.ref(reader))
            del reader, provider, b, telemetry, got
            gc.collect()

    asyncio.run(run())
    gc.collect()
    assert [ref() for ref in readers] == [None] * 20
    assert len(_Instruments._live()) == before
    assert len(_Instruments._all) == before


async def test_batch_function_and_dataloader(
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    @batch(max_size=3, name="double")
    async def double(items: list[int]) -> list[int]:
        return [x * 2 for x in items]

    async def load(keys: list[int]) -> list[str]:
        return [f"user {k}" for k in keys]

    instrument(double, meter_provider=meter_provider, tracer_provider=tracer_provider)
    loader = DataLoader(load, name="users")
    instrument(loader, meter_provider=meter_provider)
    assert await asyncio.gather(*(double(i) for i in range(7))) == [0, 2, 4, 6, 8, 10, 12]
    assert await loader.load_many([1, 2, 1]) == ["user 1", "user 2", "user 1"]
    assert await loader.load(2) == "user 2"
    got = Metrics.collect(reader)
    assert got.values("asyncbatch.items", "double", "asyncbatch.outcome")["succeeded"] == 7
    assert [len(s.links) for s in sink_spans(exporter, "double")] == [0, 0, 0]
    assert got.values("asyncbatch.cache.misses", "users") == 2
    assert got.values("asyncbatch.cache.hits", "users") == 2
    assert got.values("asyncbatch.cache.hits", "double") == {}  # not a DataLoader
    await double.aclose()
    await loader.aclose()


async def test_same_name_twice_with_one_meter_provider_is_an_error(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    async def sink(items: list[int]) -> list[int]:
        return items

    orders = Batcher(sink, name="orders")  # held: a batcher gone frees its name
    first = instrument(orders, meter_provider=meter_provider)
    with pytest.raises(ValueError, match="'orders' is already instrumented"):
        instrument(Batcher(sink, name="orders"), meter_provider=meter_provider)
    other = MeterProvider(metric_readers=[InMemoryMetricReader()])
    instrument(Batcher(sink, name="orders"), meter_provider=other)
    other.shutdown()
    first.remove()
    first.remove()
    assert repr(first) == "<BatcherTelemetry batcher='orders' [removed]>"
    orders = Batcher(sink, name="orders")
    again = instrument(orders, meter_provider=meter_provider)
    assert isinstance(again, BatcherTelemetry)
    assert (
        Metrics.collect(reader).values("asyncbatch.items", "orders", "asyncbatch.outcome")[
            "succeeded"
        ]
        == 0
    )


def _item_points(reader: InMemoryMetricReader, name: str) -> dict[str, NumberDataPoint]:
    """``asyncbatch.items`` points of ``name`` by outcome, zeros left out."""
    got = Metrics.collect(reader)
    out = {}
    for point in got.points.get("asyncbatch.items", []):  # no batcher: no point at all
        attributes = dict(point.attributes)
        if attributes["asyncbatch.batcher"] == name and point.value:
            out[str(attributes["asyncbatch.outcome"])] = point
    return out


def test_a_job_instruments_a_fresh_batcher_on_every_run(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """``async with Batcher(..., name="job") as b: instrument(b)`` once per run: the
    closed batcher of the last run (alive: held here) gives its name up. Its
    counters start afresh under the start time of the first run's points: the
    SDK keeps it per attribute set, and the API cannot move it."""

    async def sink(items: list[int]) -> list[int | Exception]:
        return [ValueError("bad") if i == 2 else i for i in items]

    runs: list[tuple[Batcher[int, int], BatcherTelemetry]] = []

    async def job(n: int) -> None:
        async with Batcher(sink, max_size=10, name="job") as b:
            telemetry = instrument(b, meter_provider=meter_provider)
            await asyncio.gather(*(b.submit(i) for i in range(n)), return_exceptions=True)
        runs.append((b, telemetry))

    asyncio.run(job(5))
    first = _item_points(reader, "job")
    assert {k: p.value for k, p in first.items()} == {"succeeded": 4, "failed": 1}
    asyncio.run(job(3))
    second = _item_points(reader, "job")
    assert {k: p.value for k, p in second.items()} == {"succeeded": 2, "failed": 1}
    assert second["succeeded"].start_time_unix_nano == first["succeeded"].start_time_unix_nano
    assert repr(runs[0][1]) == "<BatcherTelemetry batcher='job' [removed]>"
    assert runs[0][0]._observers == ()
    runs[0][1].remove()  # the old handle: a no-op, the new one stays
    asyncio.run(job(1))
    assert {k: p.value for k, p in _item_points(reader, "job").items()} == {"succeeded": 1}


async def test_a_batcher_keeps_its_name_until_its_close_is_over(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    gate = asyncio.Event()

    async def held(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    old = Batcher(held, name="slow")
    instrument(old, meter_provider=meter_provider)
    calls = [asyncio.ensure_future(old.submit(i)) for i in range(3)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(old.aclose())
    await asyncio.sleep(0)
    assert old.closed
    with pytest.raises(ValueError, match="'slow' is already instrumented with this meter"):
        instrument(Batcher(held, name="slow"), meter_provider=meter_provider)
    gate.set()
    assert await asyncio.gather(*calls) == [0, 1, 2]
    await closing
    new = Batcher(held, name="slow")
    instrument(new, meter_provider=meter_provider)
    assert _item_points(reader, "slow") == {}


class _Unhookable(Batcher[int, int]):
    """A batcher whose detaching fails (as it could from a thread racing its loop)."""

    def _detach(self, observer: Any) -> None:
        super()._detach(observer)
        raise RuntimeError("detach failed")


async def test_remove_frees_the_name_even_if_detaching_raises(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    async def sink(items: list[int]) -> list[int]:
        return items

    fragile = _Unhookable(sink, name="fragile")
    telemetry = instrument(fragile, meter_provider=meter_provider)
    assert await fragile.submit(1) == 1
    assert {k: p.value for k, p in _item_points(reader, "fragile").items()} == {"succeeded": 1}
    with pytest.raises(RuntimeError, match="detach failed"):
        telemetry.remove()
    assert repr(telemetry) == "<BatcherTelemetry batcher='fragile' [removed]>"
    assert _item_points(reader, "fragile") == {}
    telemetry.remove()  # idempotent: nothing raised again
    again = Batcher(sink, name="fragile")  # the name is free
    instrument(again, meter_provider=meter_provider)
    assert Metrics.collect(reader).values("asyncbatch.pending", "fragile") == 0
    await fragile.aclose()


def test_wrong_target_is_a_type_error(meter_provider: MeterProvider) -> None:
    with pytest.raises(TypeError, match="expected an asyncbatch Batcher"):
        instrument(42, meter_provider=meter_provider)


@pytest.fixture
def fresh_global_meter_provider() -> Iterator[None]:
    """No global meter provider set (the API's proxy one), restored afterwards."""
    from opentelemetry.metrics import _internal as api
    from opentelemetry.util._once import Once

    saved = (api._METER_PROVIDER, api._METER_PROVIDER_SET_ONCE, api._PROXY_METER_PROVIDER)
    api._METER_PROVIDER = None
    api._METER_PROVIDER_SET_ONCE = Once()
    api._PROXY_METER_PROVIDER = api._ProxyMeterProvider()
    yield
    api._METER_PROVIDER, api._METER_PROVIDER_SET_ONCE, api._PROXY_METER_PROVIDER = saved


@pytest.mark.usefixtures("fresh_global_meter_provider")
async def test_instrumented_before_and_after_the_global_provider_is_set() -> None:
    from opentelemetry import metrics

    async def sink(items: list[int]) -> list[int]:
        return items

    early = Batcher(sink, max_size=2, name="early")
    instrument(early)  # the proxy provider: no SDK yet
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics.set_meter_provider(provider)
    late = Batcher(sink, max_size=2, name="late")
    instrument(late)  # the SDK provider: ends on the same SDK meter
    with pytest.raises(ValueError, match="'early' is already instrumented"):
        instrument(Batcher(sink, name="early"))
    await asyncio.gather(*(early.submit(i) for i in range(4)), *(late.submit(i) for i in range(6)))
    got = Metrics.collect(reader)
    assert got.values("asyncbatch.items", "early", "asyncbatch.outcome")["succeeded"] == 4
    assert got.values("asyncbatch.items", "late", "asyncbatch.outcome")["succeeded"] == 6
    assert got.values("asyncbatch.batches", "late", "asyncbatch.reason")["size"] == 3
    assert got.values("asyncbatch.pending", "late") == 0
    assert got.values("asyncbatch.concurrency.limit", "late") == 1
    size_points = {
        dict(p.attributes)["asyncbatch.batcher"]: p for p in got.points["asyncbatch.batch.size"]
    }
    assert (size_points["early"].count, size_points["late"].count) == (2, 3)
    await early.aclose()
    await late.aclose()
    provider.shutdown()


def test_batch_function_sums_its_batchers_and_never_goes_back(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    @batch(max_size=2, name="multi")
    async def double(items: list[int]) -> list[int]:
        return [x * 2 for x in items]

    instrument(double, meter_provider=meter_provider)

    async def work(n: int) -> None:
        await asyncio.gather(*(double(i) for i in range(n)))

    asyncio.run(work(3))
    got = Metrics.collect(reader)
    assert got.values("asyncbatch.items", "multi", "asyncbatch.outcome")["succeeded"] == 3

    async def replace() -> None:  # a new loop; then a fresh batcher after aclose()
        await work(4)
        await double.aclose()
        got = Metrics.collect(reader)
        assert got.values("asyncbatch.items", "multi", "asyncbatch.outcome")["succeeded"] == 7
        await work(1)

    asyncio.run(replace())
    got = Metrics.collect(reader)
    assert got.values("asyncbatch.items", "multi", "asyncbatch.outcome")["succeeded"] == 8
    assert got.values("asyncbatch.batches", "multi", "asyncbatch.reason")["size"] == 3


def test_an_instrumented_batcher_is_not_kept_alive(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    import gc
    import weakref

    async def sink(items: list[int]) -> list[int]:
        return items

    orders = Batcher(sink, name="orders")
    telemetry = instrument(orders, meter_provider=meter_provider)
    assert Metrics.collect(reader).values("asyncbatch.pending", "orders") == 0
    gone = weakref.ref(orders)
    del orders
    gc.collect()
    assert gone() is None
    assert telemetry.target is None
    data = reader.get_metrics_data()  # no batcher left: no point at all
    assert data is None or not [
        p
        for r in data.resource_metrics
        for s in r.scope_metrics
        for m in s.metrics
        for p in m.data.data_points
        if dict(p.attributes or {}).get("asyncbatch.batcher") == "orders"
    ]
    again = Batcher(sink, name="orders")  # the name is free again
    instrument(again, meter_provider=meter_provider)
    assert Metrics.collect(reader).values("asyncbatch.pending", "orders") == 0
    telemetry.remove()


def _runner(flavour: str) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """``asyncio.run`` on a new loop of ``flavour`` (see conftest: asyncio, eager, uvloop)."""

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=FLAVOURS[flavour]) as runner:
            return runner.run(coro)

    return run


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_batchers_made_and_let_go_between_two_collections_are_counted(
    meter_provider: MeterProvider, reader: InMemoryMetricReader, flavour: str
) -> None:
    """Loops that end (``asyncio.run`` twice) and ``aclose()`` replacements, uncollected."""

    @batch(max_size=2, name="runs")
    async def double(items: list[int]) -> list[int]:
        return [x * 2 for x in items]

    instrument(double, meter_provider=meter_provider)
    run = _runner(flavour)

    async def work(n: int) -> None:
        assert await asyncio.gather(*(double(i) for i in range(n))) == [2 * i for i in range(n)]

    assert Metrics.collect(reader).values("asyncbatch.items", "runs", "asyncbatch.outcome") == {
        "succeeded": 0, "failed": 0, "cancelled": 0, "expired": 0, "rejected": 0, "dropped": 0,
    }  # fmt: skip
    run(work(3))  # [0, 1] size, [2] wait
    run(work(4))  # [0, 1] [2, 3] size

    async def replaced() -> None:  # three batchers of one loop, two of them let go
        await work(2)  # size
        await double.aclose()
        await work(1)  # wait
        await double.aclose()
        await work(2)  # size

    run(replaced())
    got = Metrics.collect(reader)
    assert got.values("asyncbatch.items", "runs", "asyncbatch.outcome") == {
        "succeeded": 12, "failed": 0, "cancelled": 0, "expired": 0, "rejected": 0, "dropped": 0,
    }  # fmt: skip
    assert got.values("asyncbatch.batches", "runs", "asyncbatch.reason") == {
        "size": 5, "weight": 0, "wait": 2, "interval": 0, "flush": 0, "close": 0,
    }  # fmt: skip
    size = got.histogram("asyncbatch.batch.size", "runs")
    assert (size.count, size.sum, size.min, size.max) == (7, 12, 1, 2)
    assert list(size.bucket_counts) == buckets(SIZE_BUCKETS, {1: 2, 2: 5})
    assert got.values("asyncbatch.pending", "runs") == 0
    assert got.values("asyncbatch.in_flight", "runs") == 0


def _repo_class() -> type[Any]:
    """A fresh class per test: a method's counts run from its decoration."""

    class Repo:
        def __init__(self, scale: int) -> None:
            self.scale = scale

        @batch(max_size=2, name="repo")
        async def get(self, ids: list[int]) -> list[int]:
            return [i * self.scale for i in ids]

    return Repo


async def _read(repo: Any, n: int) -> None:
    assert await asyncio.gather(*(repo.get(i) for i in range(n))) == [
        i * repo.scale for i in range(n)
    ]


async def _both(a: Any, n: int, b: Any, m: int) -> None:
    await asyncio.gather(_read(a, n), _read(b, m))


def test_a_method_on_the_class_sums_every_instance(
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    """``instrument(Repo.get)``: one ``asyncbatch.batcher`` for every instance's batchers,
    those made later and those collected meanwhile included, monotonic; their spans too."""
    import gc
    import weakref

    Repo = _repo_class()
    telemetry = instrument(Repo.get, meter_provider=meter_provider, tracer_provider=tracer_provider)
    assert telemetry.name == "repo"
    assert telemetry.tracing
    a, b = Repo(1), Repo(10)
    asyncio.run(_both(a, 3, b, 2))  # a: [0, 1] size, [2] wait; b: [0, 1] size
    got = Metrics.collect(reader)
    assert {dict(p.attributes)["asyncbatch.batcher"] for p in got.points["asyncbatch.items"]} == {
        "repo"
    }
    assert got.values("asyncbatch.items", "repo", "asyncbatch.outcome")["succeeded"] == 5
    assert got.values("asyncbatch.batches", "repo", "asyncbatch.reason")["size"] == 2
    assert got.values("asyncbatch.batches", "repo", "asyncbatch.reason")["wait"] == 1
    assert got.histogram("asyncbatch.batch.size", "repo").count == 3
    sizes: list[Any] = [
        (s.attributes or {})["messaging.batch.message_count"] for s in sink_spans(exporter, "repo")
    ]
    assert sorted(sizes) == [1, 2, 2]

    # Between two collections: an instance made, used and collected; `a` on two more loops.
    c = Repo(100)
    asyncio.run(_read(c, 4))  # size, size
    gone = weakref.ref(c)
    del c
    gc.collect()
    assert gone() is None  # not kept alive by the instrumented method
    asyncio.run(_read(a, 1))  # wait
    asyncio.run(_read(a, 1))  # wait
    got = Metrics.collect(reader)
    assert got.values("asyncbatch.items", "repo", "asyncbatch.outcome") == {
        "succeeded": 11, "failed": 0, "cancelled": 0, "expired": 0, "rejected": 0, "dropped": 0,
    }  # fmt: skip
    assert got.values("asyncbatch.batches", "repo", "asyncbatch.reason") == {
        "size": 4, "weight": 0, "wait": 3, "interval": 0, "flush": 0, "close": 0,
    }  # fmt: skip
    size = got.histogram("asyncbatch.batch.size", "repo")
    assert (size.count, size.sum) == (7, 11)
    assert list(size.bucket_counts) == buckets(SIZE_BUCKETS, {1: 3, 2: 4})
    assert len(sink_spans(exporter, "repo")) == 7

    del a, b
    gc.collect()  # every instance gone: the method (and its counts) stay
    got = Metrics.collect(reader)
    assert got.values("asyncbatch.items", "repo", "asyncbatch.outcome")["succeeded"] == 11
    assert got.values("asyncbatch.pending", "repo") == 0
    telemetry.remove()


def test_bound_methods_of_two_instances_need_their_own_name(
    meter_provider: MeterProvider,
    reader: InMemoryMetricReader,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    """``instrument(repo.get)``: that instance only, named after the method; a second
    instance's is refused, saying to pass ``name=`` (or use the class's); the name
    given names its points and its spans."""
    import gc
    import weakref

    Repo = _repo_class()
    a, b = Repo(1), Repo(10)
    first = instrument(a.get, meter_provider=meter_provider)
    assert first.name == "repo"
    with pytest.raises(ValueError, match="'repo' is already instrumented") as refused:
        instrument(b.get, meter_provider=meter_provider)
    assert "instrument the method on the class" in str(refused.value)
    assert "instrument(obj.method, name=...)" in str(refused.value)
    with pytest.raises(ValueError, match="'repo' is already instrumented"):
        instrument(Repo.get, meter_provider=meter_provider)
    named = instrument(
        b.get, name="repo-b", meter_provider=meter_provider, tracer_provider=tracer_provider
    )
    assert repr(named) == "<BatcherTelemetry batcher='repo-b' [tracing]>"
    asyncio.run(_both(a, 3, b, 2))
    asyncio.run(_read(a, 1))  # two more loops of `a` between two collections
    asyncio.run(_read(a, 2))
    got = Metrics.collect(reader)
    assert got.values("asyncbatch.items", "repo", "asyncbatch.outcome")["succeeded"] == 6
    assert got.values("asyncbatch.batches", "repo", "asyncbatch.reason")["size"] == 2
    assert got.values("asyncbatch.batches", "repo", "asyncbatch.reason")["wait"] == 2
    assert got.values("asyncbatch.items", "repo-b", "asyncbatch.outcome")["succeeded"] == 2
    assert got.histogram("asyncbatch.batch.size", "repo-b").count == 1
    (span,) = sink_spans(exporter, "repo-b")
    assert dict(span.attributes or {}) == {
        "asyncbatch.batcher": "repo-b",
        "messaging.batch.message_count": 2,
        "asyncbatch.attempt": 1,
    }

    # The instance is held weakly: once collected, its points go and the name is free.
    gone = weakref.ref(a)
    del a
    gc.collect()
    assert gone() is None
    assert first.target is None
    assert Metrics.collect(reader).values("asyncbatch.items", "repo", "asyncbatch.outcome") == {}
    instrument(Repo.get, meter_provider=meter_provider)  # every instance since the decoration
    got = Metrics.collect(reader)
    assert got.values("asyncbatch.items", "repo", "asyncbatch.outcome")["succeeded"] == 8
    assert got.values("asyncbatch.items", "repo-b", "asyncbatch.outcome")["succeeded"] == 2
    first.remove()


@pytest.mark.parametrize(("name", "error"), [("", ValueError), (42, TypeError)])
def test_a_bad_name_is_refused(meter_provider: MeterProvider, name: Any, error: type) -> None:
    async def sink(items: list[int]) -> list[int]:
        return items

    with pytest.raises(error, match="name must"):
        instrument(Batcher(sink), meter_provider=meter_provider, name=name)


def test_the_concurrency_limit_of_batch_wrappers_without_a_batcher(
    meter_provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """Before the first call and once the loop is closed: the limit a new batcher
    gets (decorated or configured; 0 for none). Over an instance with a limit and
    one without: 0, no limit."""

    @batch(max_concurrency=8, name="eight")
    async def eight(items: list[int]) -> list[int]:
        return items

    @batch(max_concurrency=None, name="free")
    async def free(items: list[int]) -> list[int]:
        return items

    class Repo:
        @batch(max_concurrency=4, name="repo")
        async def get(self, ids: list[int]) -> list[int]:
            return ids

    for target in (eight, free, Repo.get):
        instrument(target, meter_provider=meter_provider)

    def limits() -> tuple[int, ...]:
        got = Metrics.collect(reader)
        return tuple(
            got.values("asyncbatch.concurrency.limit", name) for name in ("eight", "free", "repo")
        )

    assert limits() == (8, 0, 4)

    async def work() -> None:
        a, b = Repo(), Repo()
        await asyncio.gather(eight(1), free(1), a.get(1), b.get(1))
        assert limits() == (8, 0, 8)
        b.get.configure(max_concurrency=None)
        assert limits() == (8, 0, 0)

    asyncio.run(work())
    assert limits() == (8, 0, 4)
    eight.configure(max_concurrency=3)
    free.configure(max_concurrency=2)
    assert limits() == (3, 2, 4)
