"""asyncbatch.contrib.prometheus: a real prometheus_client exposition, scraped over HTTP.

Every figure is checked against a known workload on virtual time (looptime),
so counts, histogram buckets and sums are exact. The exposition is served by
prometheus_client's own HTTP server on 127.0.0.1 and parsed with its own text
parser. Last, the web-service example's ``/metrics`` route, served by uvicorn
(real time: exact counts, no durations).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import urllib.request
import weakref
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from asyncbatch import Batcher, DataLoader, QueueFull, Retry, batch
from asyncbatch.contrib.prometheus import (
    DURATION_BUCKETS,
    SIZE_BUCKETS,
    WAIT_BUCKETS,
    BatcherMetrics,
    instrument,
)

from .conftest import FLAVOURS
from .support import settle

LabelSet = tuple[tuple[str, str], ...]
EXAMPLES = str(Path(__file__).resolve().parent.parent / "examples")


@dataclass
class Scrape:
    """One parsed exposition: sample name and labels -> value; family name -> type."""

    samples: dict[tuple[str, LabelSet], float]
    types: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: dict[tuple[str, LabelSet], float] = {}
        types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            types[family.name] = family.type
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                assert key not in samples, f"duplicate series {key}"
                samples[key] = sample.value
        return cls(samples, types)

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def series(self, name: str, **labels: str) -> dict[LabelSet, float]:
        """Every sample called ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return {
            key_labels: value
            for (sample, key_labels), value in self.samples.items()
            if sample == name and want <= set(key_labels)
        }

    def histogram(self, name: str, batcher: str) -> tuple[dict[str, float], float, float]:
        """``({le: cumulative count}, count, sum)`` of one histogram series."""
        series = self.series(f"{name}_bucket", batcher=batcher)
        buckets = {dict(labels)["le"]: value for labels, value in series.items()}
        count = self.value(f"{name}_count", batcher=batcher)
        return buckets, count, self.value(f"{name}_sum", batcher=batcher)


def cumulative(bounds: tuple[float, ...], counts: dict[float, int]) -> dict[str, float]:
    """The ``le`` buckets expected when ``counts[bound]`` observations fall in each bucket."""
    out: dict[str, float] = {}
    running = 0
    for bound in (*bounds, float("inf")):
        running += counts.get(bound, 0)
        out["+Inf" if bound == float("inf") else repr(float(bound))] = running
    return out


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def exposition(registry: CollectorRegistry) -> Iterator[str]:
    """prometheus_client's HTTP server for ``registry`` on 127.0.0.1 (a free port): its URL."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body: bytes = response.read()
        return body.decode()


async def scrape(url: str) -> Scrape:
    """GET ``url`` from a worker thread (the loop goes on) and parse the exposition."""
    return Scrape.parse(await asyncio.to_thread(_get, url))


class Orders:
    """0.2 s per call; item 3 fails alone (an Exception entry)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int | Exception]:
        self.calls.append(list(items))
        await asyncio.sleep(0.2)
        return [ValueError(f"bad order {x}") if x == 3 else x * 10 for x in items]


class Flaky:
    """0.03 s per call; the first call raises ConnectionError."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, items: list[str]) -> list[str]:
        self.calls += 1
        await asyncio.sleep(0.03)
        if self.calls == 1:
            raise ConnectionError("backend restarting")
        return [s.upper() for s in items]


@pytest.mark.looptime
async def test_known_workload_scraped_over_http(
    registry: CollectorRegistry, exposition: str
) -> None:
    """Two batchers in one registry, told apart by ``batcher``; every value exact."""
    orders_sink, emails_sink = Orders(), Flaky()
    orders = Batcher(orders_sink, max_size=4, name="orders")
    emails = Batcher(
        emails_sink, max_size=8, retry=Retry(attempts=3, backoff=0.05, jitter=False), name="emails"
    )
    instrument(orders, registry=registry)
    instrument(emails, registry=registry)
    async with orders, emails:
        order_results = await orders.submit_many(list(range(10)), return_exceptions=True)
        assert await emails.submit_many(["a", "b", "c"]) == ["A", "B", "C"]
    assert [r if isinstance(r, int) else "error" for r in order_results] == [
        0, 10, 20, "error", 40, 50, 60, 70, 80, 90,
    ]  # fmt: skip
    # Three sink calls of 4, 4 and 2 items, one at a time, 0.2 s each: the second
    # batch waits 0.2 s for the slot, the third 0.4 s.
    assert orders_sink.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert emails_sink.calls == 2

    got = await scrape(exposition)

    assert got.types["asyncbatch_items"] == "counter"
    assert got.series("asyncbatch_items_total", batcher="orders") == {
        (("batcher", "orders"), ("outcome", "succeeded")): 9,
        (("batcher", "orders"), ("outcome", "failed")): 1,
        (("batcher", "orders"), ("outcome", "cancelled")): 0,
        (("batcher", "orders"), ("outcome", "expired")): 0,
        (("batcher", "orders"), ("outcome", "rejected")): 0,
        (("batcher", "orders"), ("outcome", "dropped")): 0,
    }
    assert got.value("asyncbatch_items_total", batcher="emails", outcome="succeeded") == 3
    assert got.value("asyncbatch_items_total", batcher="emails", outcome="failed") == 0
    assert got.types["asyncbatch_batches"] == "counter"
    assert {
        dict(labels)["reason"]: v
        for labels, v in got.series("asyncbatch_batches_total", batcher="orders").items()
    } == {"size": 2, "weight": 0, "wait": 1, "interval": 0, "flush": 0, "close": 0}
    assert got.value("asyncbatch_batches_total", batcher="emails", reason="wait") == 1
    assert got.value("asyncbatch_retries_total", batcher="orders") == 0
    assert got.value("asyncbatch_retries_total", batcher="emails") == 1
    for name in ("orders", "emails"):
        assert got.value("asyncbatch_pending_items", batcher=name) == 0
        assert got.value("asyncbatch_in_flight_items", batcher=name) == 0
        assert got.value("asyncbatch_concurrency_limit", batcher=name) == 1
    assert got.types["asyncbatch_pending_items"] == "gauge"

    # Histograms: one observation per sink call (size, duration), per batch (wait).
    assert got.types["asyncbatch_batch_size"] == "histogram"
    assert got.histogram("asyncbatch_batch_size", "orders") == (
        cumulative(SIZE_BUCKETS, {2: 1, 4: 2}),
        3,
        10,
    )
    assert got.histogram("asyncbatch_batch_size", "emails") == (
        cumulative(SIZE_BUCKETS, {4: 2}),
        2,  # the failed call and its retry
        6,
    )
    buckets, count, total = got.histogram("asyncbatch_sink_duration_seconds", "orders")
    assert (buckets, count) == (cumulative(DURATION_BUCKETS, {0.25: 3}), 3)
    assert total == pytest.approx(0.6, abs=1e-6)
    buckets, count, total = got.histogram("asyncbatch_sink_duration_seconds", "emails")
    assert (buckets, count) == (cumulative(DURATION_BUCKETS, {0.05: 2}), 2)
    assert total == pytest.approx(0.06, abs=1e-6)
    buckets, count, total = got.histogram("asyncbatch_batch_wait_seconds", "orders")
    assert (buckets, count) == (cumulative(WAIT_BUCKETS, {0.0001: 1, 0.25: 1, 0.5: 1}), 3)
    assert total == pytest.approx(0.6, abs=1e-6)
    buckets, count, total = got.histogram("asyncbatch_batch_wait_seconds", "emails")
    assert (buckets, count) == (cumulative(WAIT_BUCKETS, {0.0001: 1}), 1)
    assert total == pytest.approx(0.0, abs=1e-6)
    # A plain Batcher has no cache series.
    assert got.series("asyncbatch_cache_hits_total") == {}


@pytest.mark.looptime
async def test_gauges_are_read_at_scrape_time(registry: CollectorRegistry, exposition: str) -> None:
    gate = asyncio.Event()

    async def held(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    async with Batcher(held, max_size=4, max_concurrency=2, name="held") as b:
        instrument(b, registry=registry)
        futures = [b.submit_nowait(i) for i in range(10)]
        await settle()
        # Two calls of 4 hold both slots; the last 2 items wait.
        got = await scrape(exposition)
        assert got.value("asyncbatch_in_flight_items", batcher="held") == 8
        assert got.value("asyncbatch_pending_items", batcher="held") == 2
        assert got.value("asyncbatch_concurrency_limit", batcher="held") == 2
        assert got.value("asyncbatch_items_total", batcher="held", outcome="succeeded") == 0
        gate.set()
        assert await asyncio.gather(*futures) == list(range(10))
    got = await scrape(exposition)
    assert got.value("asyncbatch_in_flight_items", batcher="held") == 0
    assert got.value("asyncbatch_pending_items", batcher="held") == 0
    assert got.value("asyncbatch_items_total", batcher="held", outcome="succeeded") == 10


@pytest.mark.looptime
async def test_losses_are_counted_by_outcome(registry: CollectorRegistry, exposition: str) -> None:
    """ "Are we dropping?": rejected, dropped, expired and cancelled items, exactly."""
    gate = asyncio.Event()

    async def held(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    rejecting = Batcher(held, max_size=2, max_pending=2, overflow="reject", name="rejecting")
    dropping = Batcher(held, max_size=2, max_pending=2, overflow="drop_oldest", name="dropping")
    waiting = Batcher(held, max_size=1, name="waiting")
    for b in (rejecting, dropping, waiting):
        instrument(b, registry=registry)
    async with rejecting, dropping, waiting:
        # Each: a batch of 2 in flight (held), then 2 pending fill max_pending.
        kept = [rejecting.submit_nowait(0), rejecting.submit_nowait(1)]
        first = [dropping.submit_nowait(0), dropping.submit_nowait(1)]
        await settle()
        kept += [rejecting.submit_nowait(2), rejecting.submit_nowait(3)]
        first += [dropping.submit_nowait(2), dropping.submit_nowait(3)]
        for x in (4, 5):
            with pytest.raises(QueueFull):
                rejecting.submit_nowait(x)
        late = [dropping.submit_nowait(x) for x in (10, 11, 12)]  # drop 2, 3, then 10
        # ``waiting``: one item in flight; two more wait for the slot and leave.
        in_flight = waiting.submit_nowait(0)
        await settle()
        leaving = asyncio.ensure_future(waiting.submit(1))
        expiring = asyncio.ensure_future(waiting.submit(2, timeout=0.5))
        await settle()
        leaving.cancel()
        with pytest.raises(TimeoutError):
            await expiring
        gate.set()
        assert await asyncio.gather(*kept) == [0, 1, 2, 3]
        assert await asyncio.gather(*first[:2], *late[1:]) == [0, 1, 11, 12]
        for dropped in (*first[2:], late[0]):
            with pytest.raises(QueueFull):
                await dropped
        assert await in_flight == 0
    got = await scrape(exposition)

    def outcomes(name: str) -> dict[str, float]:
        return {
            dict(labels)["outcome"]: v
            for labels, v in got.series("asyncbatch_items_total", batcher=name).items()
        }

    assert outcomes("rejecting") == {
        "succeeded": 4, "failed": 0, "cancelled": 0, "expired": 0, "rejected": 2, "dropped": 0,
    }  # fmt: skip
    assert outcomes("dropping") == {
        "succeeded": 4, "failed": 0, "cancelled": 0, "expired": 0, "rejected": 0, "dropped": 3,
    }  # fmt: skip
    assert outcomes("waiting") == {
        "succeeded": 1, "failed": 0, "cancelled": 1, "expired": 1, "rejected": 0, "dropped": 0,
    }  # fmt: skip


@pytest.mark.looptime
async def test_batch_function_is_instrumented_before_its_first_call(
    registry: CollectorRegistry,
) -> None:
    """An @batch function: its batchers are made on first use; they are all watched."""

    @batch(max_size=3, name="double")
    async def double(items: list[int]) -> list[int]:
        return [x * 2 for x in items]

    instrument(double, registry=registry)
    assert await asyncio.gather(*(double(i) for i in range(7))) == [0, 2, 4, 6, 8, 10, 12]
    got = Scrape.parse(_exposition(registry))
    assert got.value("asyncbatch_items_total", batcher="double", outcome="succeeded") == 7
    assert got.value("asyncbatch_batches_total", batcher="double", reason="size") == 2
    assert got.value("asyncbatch_batches_total", batcher="double", reason="wait") == 1
    assert got.histogram("asyncbatch_batch_size", "double")[1:] == (3, 7)
    await double.aclose()


def _exposition(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


@pytest.mark.looptime
async def test_dataloader_cache_hits_and_misses(registry: CollectorRegistry) -> None:
    async def load(keys: list[int]) -> list[str]:
        return [f"user {k}" for k in keys]

    loader = DataLoader(load, name="users")
    instrument(loader, registry=registry)
    assert await loader.load_many([1, 2, 1]) == ["user 1", "user 2", "user 1"]
    assert await loader.load(2) == "user 2"  # from the cache
    got = Scrape.parse(_exposition(registry))
    assert got.value("asyncbatch_cache_misses_total", batcher="users") == 2
    assert got.value("asyncbatch_cache_hits_total", batcher="users") == 2
    assert got.value("asyncbatch_items_total", batcher="users", outcome="succeeded") == 2
    assert got.histogram("asyncbatch_batch_size", "users")[1:] == (1, 2)
    await loader.aclose()


@pytest.mark.looptime
async def test_same_name_twice_in_one_registry_is_an_error(registry: CollectorRegistry) -> None:
    async def sink(items: list[int]) -> list[int]:
        return items

    orders = Batcher(sink, name="orders")  # held: a batcher gone frees its name
    first = instrument(orders, registry=registry)
    with pytest.raises(ValueError, match="'orders' is already instrumented"):
        instrument(Batcher(sink, name="orders"), registry=registry)
    # Another registry is another namespace; removing frees the name.
    instrument(Batcher(sink, name="orders"), registry=CollectorRegistry())
    first.remove()
    first.remove()  # idempotent
    assert repr(first) == "<BatcherMetrics batcher='orders' [removed]>"
    orders = Batcher(sink, name="orders")
    again = instrument(orders, registry=registry)
    assert isinstance(again, BatcherMetrics)
    assert (
        Scrape.parse(_exposition(registry)).value(
            "asyncbatch_items_total", batcher="orders", outcome="succeeded"
        )
        == 0
    )


@pytest.mark.looptime
async def test_removed_batcher_is_no_longer_observed(registry: CollectorRegistry) -> None:
    async def sink(items: list[int]) -> list[int]:
        return items

    async with Batcher(sink, name="gone") as b:
        metrics = instrument(b, registry=registry)
        await b.submit(1)
        metrics.remove()
        await b.submit(2)  # no observer: nothing recorded, nothing raised
    assert Scrape.parse(_exposition(registry)).series("asyncbatch_items_total") == {}


def _outcomes(registry: CollectorRegistry, name: str) -> dict[str, float]:
    got = Scrape.parse(_exposition(registry))
    return {
        dict(labels)["outcome"]: value
        for labels, value in got.series("asyncbatch_items_total", batcher=name).items()
        if value
    }


def test_a_job_instruments_a_fresh_batcher_on_every_run(registry: CollectorRegistry) -> None:
    """``async with Batcher(..., name="job") as b: instrument(b)`` once per run: the
    closed batcher of the last run (alive: held here, as a reference cycle holds it
    until the garbage collector runs) gives its name up; the counts start afresh."""

    async def sink(items: list[int]) -> list[int | Exception]:
        return [ValueError("bad") if i == 2 else i for i in items]

    runs: list[tuple[Batcher[int, int], BatcherMetrics]] = []

    async def job(n: int) -> None:
        async with Batcher(sink, max_size=10, name="job") as b:
            metrics = instrument(b, registry=registry)
            await asyncio.gather(*(b.submit(i) for i in range(n)), return_exceptions=True)
        runs.append((b, metrics))

    asyncio.run(job(5))
    assert _outcomes(registry, "job") == {"succeeded": 4, "failed": 1}
    assert repr(runs[0][1]) == "<BatcherMetrics batcher='job' [exporting]>"
    asyncio.run(job(3))
    assert _outcomes(registry, "job") == {"succeeded": 2, "failed": 1}
    got = Scrape.parse(_exposition(registry))
    assert got.histogram("asyncbatch_batch_size", "job")[1:] == (1, 3)  # the new one's call only
    assert repr(runs[0][1]) == "<BatcherMetrics batcher='job' [removed]>"
    assert runs[0][0]._observers == ()  # detached from the old batcher
    assert runs[1][0]._observers == (runs[1][1],)
    runs[0][1].remove()  # the old handle: a no-op, the new one stays
    asyncio.run(job(1))
    assert _outcomes(registry, "job") == {"succeeded": 1}

    async def loaders() -> None:  # a DataLoader closed for good frees its name too
        async def load(keys: list[int]) -> list[int]:
            return keys

        for n in (2, 1):
            async with DataLoader(load, name="loader") as loader:
                instrument(loader, registry=registry)
                assert await loader.load_many([*range(n), 0]) == [*range(n), 0]
            assert (
                Scrape.parse(_exposition(registry)).value(
                    "asyncbatch_cache_misses_total", batcher="loader"
                )
                == n
            )

    asyncio.run(loaders())


@pytest.mark.looptime
async def test_a_batcher_keeps_its_name_until_its_close_is_over(
    registry: CollectorRegistry,
) -> None:
    """Open, or closing with items in flight: the name is taken; once done, free."""
    gate = asyncio.Event()

    async def held(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    old = Batcher(held, name="slow")
    instrument(old, registry=registry)
    with pytest.raises(ValueError, match="'slow' is already instrumented in this registry and"):
        instrument(Batcher(held, name="slow"), registry=registry)
    calls = [asyncio.ensure_future(old.submit(i)) for i in range(3)]
    await settle()
    closing = asyncio.ensure_future(old.aclose())
    await settle()
    assert old.closed
    assert old.stats.in_flight == 3
    with pytest.raises(ValueError, match="'slow' is already instrumented"):
        instrument(Batcher(held, name="slow"), registry=registry)
    gate.set()
    assert await asyncio.gather(*calls) == [0, 1, 2]
    await closing
    new = Batcher(held, name="slow")
    instrument(new, registry=registry)
    assert _outcomes(registry, "slow") == {}
    assert old.stats.succeeded == 3  # the old one's counts are not carried over


class _Unhookable(Batcher[int, int]):
    """A batcher whose detaching fails (as it could from a thread racing its loop)."""

    def _detach(self, observer: Any) -> None:
        super()._detach(observer)
        raise RuntimeError("detach failed")


@pytest.mark.looptime
async def test_remove_frees_the_name_even_if_detaching_raises(
    registry: CollectorRegistry,
) -> None:
    async def sink(items: list[int]) -> list[int]:
        return items

    fragile = _Unhookable(sink, name="fragile")
    metrics = instrument(fragile, registry=registry)
    assert await fragile.submit(1) == 1
    assert _outcomes(registry, "fragile") == {"succeeded": 1}
    with pytest.raises(RuntimeError, match="detach failed"):
        metrics.remove()
    assert repr(metrics) == "<BatcherMetrics batcher='fragile' [removed]>"
    assert Scrape.parse(_exposition(registry)).series("asyncbatch_items_total") == {}
    metrics.remove()  # idempotent: nothing raised again
    again = Batcher(sink, name="fragile")  # the name is free
    instrument(again, registry=registry)
    assert _outcomes(registry, "fragile") == {}
    await fragile.aclose()


def test_metric_names_clashing_with_another_collector(registry: CollectorRegistry) -> None:
    Counter("asyncbatch_items", "someone else's", registry=registry)

    async def sink(items: list[int]) -> list[int]:
        return items

    b = Batcher(sink, name="orders")
    with pytest.raises(ValueError, match="asyncbatch_items"):
        instrument(b, registry=registry)
    # Nothing half-done: the name is free in a registry that can take it.
    instrument(b, registry=CollectorRegistry())


@pytest.mark.parametrize(
    ("buckets", "error"),
    [
        ((), ValueError),
        ((1, 1), ValueError),
        ((2, 1), ValueError),
        ((1, float("inf")), ValueError),
        ((1, float("nan")), ValueError),
        (("1",), TypeError),
        ((True,), TypeError),
    ],
)
def test_bad_buckets_are_refused(
    registry: CollectorRegistry, buckets: tuple[Any, ...], error: type[Exception]
) -> None:
    async def sink(items: list[int]) -> list[int]:
        return items

    with pytest.raises(error, match="size_buckets"):
        instrument(Batcher(sink), registry=registry, size_buckets=buckets)
    assert _exposition(registry) == ""


def test_wrong_target_is_a_type_error(registry: CollectorRegistry) -> None:
    with pytest.raises(TypeError, match="expected an asyncbatch Batcher"):
        instrument(object(), registry=registry)


@pytest.mark.realtime
async def test_web_service_example_serves_metrics() -> None:
    """``examples/web_service.py``: GET /metrics after known traffic, over real HTTP."""
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import web_service

    backend = web_service.PriceBackend(latency=0.05)
    app = web_service.create_app(backend)
    async with (
        web_service.running_server(app) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        paths = [f"/prices/sku-{i}" for i in range(1, 31)] + ["/prices/nope"]
        paths.append("/cart?sku=sku-1&sku=sku-2&sku=sku-3")
        responses = await asyncio.gather(*(client.get(path) for path in paths))
        assert [r.status_code for r in responses] == [200] * 30 + [404, 200]
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        got = Scrape.parse(response.text)
    calls = len(backend.calls)
    assert sum(len(call) for call in backend.calls) == 34
    assert calls < 34  # batched
    assert {
        dict(labels)["outcome"]: v
        for labels, v in got.series("asyncbatch_items_total", batcher="prices").items()
    } == {"succeeded": 33, "failed": 1, "cancelled": 0, "expired": 0, "rejected": 0, "dropped": 0}
    assert sum(got.series("asyncbatch_batches_total", batcher="prices").values()) == calls
    buckets, count, total = got.histogram("asyncbatch_batch_size", "prices")
    assert (count, total) == (calls, 34)
    assert buckets["+Inf"] == calls
    _, count, total = got.histogram("asyncbatch_sink_duration_seconds", "prices")
    assert count == calls
    assert total >= 0.05 * calls  # each call sleeps 0.05 s
    assert got.histogram("asyncbatch_batch_wait_seconds", "prices")[1] == calls
    assert got.value("asyncbatch_concurrency_limit", batcher="prices") == 4
    assert got.value("asyncbatch_in_flight_items", batcher="prices") == 0


def _succeeded(registry: CollectorRegistry, name: str) -> float:
    return Scrape.parse(_exposition(registry)).value(
        "asyncbatch_items_total", batcher=name, outcome="succeeded"
    )


def test_batch_function_sums_its_batchers_of_every_loop_and_never_goes_back(
    registry: CollectorRegistry,
) -> None:
    @batch(max_size=2, name="multi")
    async def double(items: list[int]) -> list[int]:
        return [x * 2 for x in items]

    instrument(double, registry=registry)
    started = threading.Barrier(3, timeout=10)
    release = threading.Event()

    async def work(n: int) -> None:
        await asyncio.gather(*(double(i) for i in range(n)))
        started.wait()  # both loops live, each with its own batcher
        release.wait(10)

    threads = [threading.Thread(target=asyncio.run, args=(work(n),)) for n in (3, 4)]
    for thread in threads:
        thread.start()
    started.wait()
    scrape = Scrape.parse(_exposition(registry))
    assert scrape.value("asyncbatch_items_total", batcher="multi", outcome="succeeded") == 7
    assert scrape.value("asyncbatch_batches_total", batcher="multi", reason="size") == 3
    assert scrape.value("asyncbatch_concurrency_limit", batcher="multi") == 2
    assert scrape.value("asyncbatch_batch_size_count", batcher="multi") == 4
    release.set()
    for thread in threads:
        thread.join()

    async def replace(before: int) -> None:  # a new loop: the closed loops' batchers are forgotten
        await asyncio.gather(*(double(i) for i in range(2)))
        await double.aclose()
        assert _succeeded(registry, "multi") == before + 2
        await double(5)  # a fresh batcher replaces the closed one
        await double.aclose()

    asyncio.run(replace(7))
    assert _succeeded(registry, "multi") == 10
    asyncio.run(replace(10))
    assert _succeeded(registry, "multi") == 13


def test_an_instrumented_batcher_is_not_kept_alive(registry: CollectorRegistry) -> None:
    async def sink(items: list[int]) -> list[int]:
        return items

    orders = Batcher(sink, name="orders")
    metrics = instrument(orders, registry=registry)
    assert _succeeded(registry, "orders") == 0
    gone = weakref.ref(orders)
    del orders
    gc.collect()
    assert gone() is None
    assert metrics.target is None
    assert "orders" not in _exposition(registry)
    again = Batcher(sink, name="orders")  # the name is free again
    instrument(again, registry=registry)
    assert asyncio.run(_submit(again, 3)) == [0, 1, 2]
    assert _succeeded(registry, "orders") == 3
    metrics.remove()  # a no-op: its target is gone


async def _submit(batcher: Batcher[int, int], n: int) -> list[int]:
    try:
        return list(await asyncio.gather(*(batcher.submit(i) for i in range(n))))
    finally:
        await batcher.aclose()


def test_a_registry_is_freed_after_instrument() -> None:
    async def sink(items: list[int]) -> list[int]:
        return items

    orders = Batcher(sink, name="orders")
    registry = CollectorRegistry()
    metrics = instrument(orders, registry=registry)
    assert _succeeded(registry, "orders") == 0
    gone = weakref.ref(registry)
    del registry
    gc.collect()
    assert gone() is None
    assert metrics.registry is None
    metrics.remove()


# ------------------------------------------- batchers let go between two scrapes


def _runner(flavour: str) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """``asyncio.run`` on a new loop of ``flavour`` (see conftest: asyncio, eager, uvloop)."""

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=FLAVOURS[flavour]) as runner:
            return runner.run(coro)

    return run


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_batchers_made_and_let_go_between_two_scrapes_are_counted(
    registry: CollectorRegistry, flavour: str
) -> None:
    """Loops that end (``asyncio.run`` twice) and ``aclose()`` replacements, unscraped."""

    @batch(max_size=2, name="runs")
    async def double(items: list[int]) -> list[int]:
        return [x * 2 for x in items]

    instrument(double, registry=registry)
    run = _runner(flavour)

    async def work(n: int) -> None:
        assert await asyncio.gather(*(double(i) for i in range(n))) == [2 * i for i in range(n)]

    assert _succeeded(registry, "runs") == 0
    run(work(3))  # [0, 1] size, [2] wait
    run(work(4))  # [0, 1] [2, 3] size; this loop's start forgets the first loop's

    async def replaced() -> None:  # three batchers of one loop, two of them let go
        await work(2)  # size
        await double.aclose()
        await work(1)  # wait
        await double.aclose()
        await work(2)  # size

    run(replaced())
    got = Scrape.parse(_exposition(registry))
    assert {
        dict(labels)["outcome"]: v
        for labels, v in got.series("asyncbatch_items_total", batcher="runs").items()
    } == {"succeeded": 12, "failed": 0, "cancelled": 0, "expired": 0, "rejected": 0, "dropped": 0}
    assert {
        dict(labels)["reason"]: v
        for labels, v in got.series("asyncbatch_batches_total", batcher="runs").items()
    } == {"size": 5, "weight": 0, "wait": 2, "interval": 0, "flush": 0, "close": 0}
    assert got.histogram("asyncbatch_batch_size", "runs") == (
        cumulative(SIZE_BUCKETS, {1: 2, 2: 5}),
        7,
        12,
    )
    assert got.value("asyncbatch_pending_items", batcher="runs") == 0
    assert got.value("asyncbatch_in_flight_items", batcher="runs") == 0
    # No loop runs any more: no batcher is kept, the counts stay.
    assert double._state.figures().kept == []
    run(work(1))
    assert _succeeded(registry, "runs") == 13


@pytest.mark.looptime
async def test_a_batcher_let_go_while_it_drains_is_counted_to_the_end(
    registry: CollectorRegistry, exposition: str
) -> None:
    """A call during ``aclose()``'s drain starts a fresh batcher; the closing one's
    items still in flight are gauged, then counted when they finish."""
    gate = asyncio.Event()

    @batch(max_size=10, name="draining")
    async def held(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    instrument(held, registry=registry)
    first = [asyncio.ensure_future(held(i)) for i in range(3)]
    await settle()
    closing = asyncio.ensure_future(held.aclose())
    await settle()
    late = asyncio.ensure_future(held(3))  # a fresh batcher: the closing one is let go
    await settle()
    got = await scrape(exposition)
    assert got.value("asyncbatch_in_flight_items", batcher="draining") == 4
    assert got.value("asyncbatch_pending_items", batcher="draining") == 0
    assert got.value("asyncbatch_items_total", batcher="draining", outcome="succeeded") == 0
    assert got.value("asyncbatch_batches_total", batcher="draining", reason="wait") == 2
    gate.set()
    assert await asyncio.gather(*first, late) == [0, 1, 2, 3]
    await closing
    got = await scrape(exposition)
    assert got.value("asyncbatch_in_flight_items", batcher="draining") == 0
    assert got.value("asyncbatch_items_total", batcher="draining", outcome="succeeded") == 4
    assert got.value("asyncbatch_batches_total", batcher="draining", reason="wait") == 2
    assert held._state.figures().draining == []  # done: folded into the total
    assert _succeeded(registry, "draining") == 4
    await held.aclose()


# ------------------------------------------------------------------- methods


def _repo_class() -> type[Any]:
    """A fresh class per test: a method's counts run from its decoration."""

    class Repo:
        def __init__(self, scale: int) -> None:
            self.scale = scale

        @batch(max_size=2, name="repo")
        async def get(self, ids: list[int]) -> list[int]:
            return [i * self.scale for i in ids]

    return Repo


async def _both(a: Any, n: int, b: Any, m: int) -> None:
    await asyncio.gather(_read(a, n), _read(b, m))


async def _read(repo: Any, n: int) -> None:
    assert await asyncio.gather(*(repo.get(i) for i in range(n))) == [
        i * repo.scale for i in range(n)
    ]


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_a_method_on_the_class_sums_every_instance(
    registry: CollectorRegistry, flavour: str
) -> None:
    """``instrument(Repo.get)``: one series over every instance's batchers, those made
    later and those collected meanwhile included, monotonic."""
    Repo = _repo_class()
    run = _runner(flavour)
    metrics = instrument(Repo.get, registry=registry)  # before any instance exists
    assert metrics.name == "repo"
    assert _succeeded(registry, "repo") == 0
    a, b = Repo(1), Repo(10)

    run(_both(a, 3, b, 2))  # a: [0, 1] size, [2] wait; b: [0, 1] size
    got = Scrape.parse(_exposition(registry))
    assert set(got.series("asyncbatch_items_total")) == {
        (("batcher", "repo"), ("outcome", outcome))
        for outcome in ("succeeded", "failed", "cancelled", "expired", "rejected", "dropped")
    }  # one series for all instances
    assert got.value("asyncbatch_items_total", batcher="repo", outcome="succeeded") == 5
    assert got.value("asyncbatch_batches_total", batcher="repo", reason="size") == 2
    assert got.value("asyncbatch_batches_total", batcher="repo", reason="wait") == 1
    assert got.histogram("asyncbatch_batch_size", "repo") == (
        cumulative(SIZE_BUCKETS, {1: 1, 2: 2}),
        3,
        5,
    )

    # Between two scrapes: an instance made, used and collected; `a` on two more loops.
    c = Repo(100)
    run(_read(c, 4))  # size, size
    gone = weakref.ref(c)
    del c
    gc.collect()
    assert gone() is None  # not kept alive by the instrumented method
    run(_read(a, 1))  # wait
    run(_read(a, 1))  # wait
    got = Scrape.parse(_exposition(registry))
    assert got.value("asyncbatch_items_total", batcher="repo", outcome="succeeded") == 11
    assert got.value("asyncbatch_batches_total", batcher="repo", reason="size") == 4
    assert got.value("asyncbatch_batches_total", batcher="repo", reason="wait") == 3
    assert got.histogram("asyncbatch_batch_size", "repo")[1:] == (7, 11)

    del a, b
    gc.collect()  # every instance gone: the method (and its counts) stay
    got = Scrape.parse(_exposition(registry))
    assert got.value("asyncbatch_items_total", batcher="repo", outcome="succeeded") == 11
    assert got.value("asyncbatch_pending_items", batcher="repo") == 0
    assert Repo.get._instances == {}
    metrics.remove()
    assert "repo" not in _exposition(registry)


@pytest.mark.looptime
async def test_a_method_on_the_class_gauges_every_instance(
    registry: CollectorRegistry, exposition: str
) -> None:
    gate = asyncio.Event()

    class Store:
        @batch(max_size=2, max_concurrency=2, name="store")
        async def put(self, rows: list[int]) -> None:
            await gate.wait()

    instrument(Store.put, registry=registry)
    a, b = Store(), Store()
    # a: two calls of 2 hold its two slots, 1 row waits; b: one call of 2.
    calls = [asyncio.ensure_future(a.put(i)) for i in range(5)]
    calls += [asyncio.ensure_future(b.put(i)) for i in range(2)]
    await settle()
    got = await scrape(exposition)
    assert got.value("asyncbatch_in_flight_items", batcher="store") == 6
    assert got.value("asyncbatch_pending_items", batcher="store") == 1
    assert got.value("asyncbatch_concurrency_limit", batcher="store") == 4  # 2 per instance
    gate.set()
    await asyncio.gather(*calls)
    got = await scrape(exposition)
    assert got.value("asyncbatch_in_flight_items", batcher="store") == 0
    assert got.value("asyncbatch_items_total", batcher="store", outcome="succeeded") == 7
    await a.put.aclose()
    await b.put.aclose()


def test_bound_methods_of_two_instances_need_their_own_name(
    registry: CollectorRegistry,
) -> None:
    """``instrument(repo.get)``: that instance only, labelled with the method's name;
    a second instance's is refused, saying to pass ``name=`` (or use the class's)."""
    Repo = _repo_class()
    a, b = Repo(1), Repo(10)
    first = instrument(a.get, registry=registry)
    assert first.name == "repo"
    with pytest.raises(ValueError, match="'repo' is already instrumented") as refused:
        instrument(b.get, registry=registry)
    assert "instrument the method on the class" in str(refused.value)
    assert "instrument(obj.method, name=...)" in str(refused.value)
    with pytest.raises(ValueError, match="'repo' is already instrumented"):
        instrument(Repo.get, registry=registry)  # the class's default name is the same
    instrument(b.get, registry=registry, name="repo-b")

    asyncio.run(_both(a, 3, b, 2))
    assert _succeeded(registry, "repo") == 3
    assert _succeeded(registry, "repo-b") == 2
    asyncio.run(_read(a, 1))  # two loops of `a` between two scrapes
    asyncio.run(_read(a, 2))
    got = Scrape.parse(_exposition(registry))
    assert got.value("asyncbatch_items_total", batcher="repo", outcome="succeeded") == 6
    assert got.value("asyncbatch_batches_total", batcher="repo", reason="size") == 2
    assert got.value("asyncbatch_batches_total", batcher="repo", reason="wait") == 2
    assert got.value("asyncbatch_items_total", batcher="repo-b", outcome="succeeded") == 2

    # The instance is held weakly: once collected, its series go and the name is free.
    gone = weakref.ref(a)
    del a
    gc.collect()
    assert gone() is None
    assert first.target is None
    assert 'batcher="repo"' not in _exposition(registry)
    # The class attribute takes the free name: every instance since the decoration.
    instrument(Repo.get, registry=registry)
    assert _succeeded(registry, "repo") == 8
    assert _succeeded(registry, "repo-b") == 2
    first.remove()  # a no-op: its instance is gone


def test_an_instrumented_batch_function_is_not_kept_alive(registry: CollectorRegistry) -> None:
    @batch(name="short-lived")
    async def double(items: list[int]) -> list[int]:
        return [x * 2 for x in items]

    metrics = instrument(double, registry=registry)
    assert asyncio.run(double(2)) == 4
    assert _succeeded(registry, "short-lived") == 1
    gone = weakref.ref(double)
    del double
    gc.collect()
    assert gone() is None
    assert metrics.target is None
    assert "short-lived" not in _exposition(registry)


@pytest.mark.parametrize(("name", "error"), [("", ValueError), (b"orders", TypeError)])
def test_a_bad_name_is_refused(registry: CollectorRegistry, name: Any, error: type) -> None:
    async def sink(items: list[int]) -> list[int]:
        return items

    with pytest.raises(error, match="name must"):
        instrument(Batcher(sink), registry=registry, name=name)
    assert _exposition(registry) == ""


def test_the_concurrency_limit_of_batch_wrappers_without_a_batcher(
    registry: CollectorRegistry,
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
        instrument(target, registry=registry)

    def limits() -> tuple[float, ...]:
        got = Scrape.parse(_exposition(registry))
        return tuple(
            got.value("asyncbatch_concurrency_limit", batcher=name)
            for name in ("eight", "free", "repo")
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


@pytest.mark.looptime
async def test_per_request_loaders_over_one_instrumented_batch_function(
    registry: CollectorRegistry,
) -> None:
    """The README's pattern: a DataLoader per request (its own cache and dedupe)
    whose batch function calls a shared ``@batch`` function, instrumented once."""
    calls: list[list[int]] = []

    @batch(max_size=200, max_wait=0.002, name="authors")
    async def fetch_authors(ids: list[int]) -> list[str]:
        calls.append(sorted(ids))
        return [f"author {i}" for i in ids]

    instrument(fetch_authors, registry=registry)

    async def load_authors(ids: list[int]) -> list[str]:
        return await fetch_authors.submit_many(ids)

    async def request(first: int) -> list[str]:
        loader = DataLoader(load_authors)  # per request, not instrumented
        return await asyncio.gather(*(loader.load(first + k % 3) for k in range(6)))

    got = await asyncio.gather(*(request(first) for first in range(3)))
    assert got[2] == [f"author {i}" for i in (2, 3, 4, 2, 3, 4)]
    assert calls == [[0, 1, 1, 2, 2, 2, 3, 3, 4]]  # one call across the three requests
    assert _outcomes(registry, "authors") == {"succeeded": 9}
    size = Scrape.parse(_exposition(registry)).histogram("asyncbatch_batch_size", "authors")
    assert size[1:] == (1, 9)
    await fetch_authors.aclose()
