"""Outbound HTTP batching, through real sockets.

The client under test is the one in ``examples/http_batching.py`` (so the
README's example is what is proven here); the server is
:mod:`asyncbatch.contrib.bulkapi`, served by uvicorn on 127.0.0.1 on a free
port, in the test's own event loop, started and stopped by each test. The
server counts the calls it receives: the assertions on "how many bulk calls"
are the server's word, not the client's.
"""

from __future__ import annotations

import asyncio
import math
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from asyncbatch import BatcherClosed
from asyncbatch.contrib.bulkapi import BulkAPI, create_app, serve
from asyncbatch.contrib.httpx import (
    SAFE_TO_RETRY,
    Throttled,
    raise_for_throttling,
    retry_after,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import http_batching  # noqa: E402
from http_batching import InventoryClient, ItemRejected  # noqa: E402

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(30)]


@dataclass
class Service:
    api: BulkAPI
    url: str
    http: httpx.AsyncClient
    inventory: InventoryClient


@asynccontextmanager
async def running(
    api: BulkAPI | None = None, *, hooks: dict[str, list[Any]] | None = None, **client: Any
) -> AsyncIterator[Service]:
    """The bulk API on 127.0.0.1:<free port> and an InventoryClient talking to it.

    Closed in order on exit: the client service (drains), the httpx client
    (its connections), the server.
    """
    api = api if api is not None else BulkAPI()
    async with (
        serve(create_app(api)) as url,
        httpx.AsyncClient(base_url=url, event_hooks=hooks) as http,
        InventoryClient(http, **client) as inventory,
    ):
        yield Service(api, url, http, inventory)


def stored_versions(api: BulkAPI) -> list[int]:
    return [item["version"] for item in api.items.values()]


# -- the client service: batching ---------------------------------------------------


@pytest.mark.parametrize(
    ("tenants", "n", "max_size"),
    [(["acme"], 250, 50), (["acme", "globex", "initech"], 300, 40)],
)
async def test_n_callers_make_at_most_ceil_n_over_max_size_bulk_calls(
    tenants: list[str], n: int, max_size: int
) -> None:
    async with running(max_size=max_size) as svc:
        writes = [(tenants[i % len(tenants)], f"sku-{i}", i) for i in range(n)]
        results = await asyncio.gather(*(svc.inventory.put(*w) for w in writes))

    per_tenant = [sum(1 for w in writes if w[0] == t) for t in tenants]
    bound = sum(math.ceil(count / max_size) for count in per_tenant)
    assert svc.api.counters.batch_calls <= bound
    assert sum(svc.api.counters.batch_sizes) == n
    assert max(svc.api.counters.batch_sizes) <= max_size
    # Every caller got its own item back, written once, under its own tenant.
    assert [(r["tenant"], r["id"], r["qty"]) for r in results] == writes
    assert {r["version"] for r in results} == {1}
    assert len(svc.api.items) == n


async def test_per_item_errors_reach_only_their_caller() -> None:
    async with running(max_size=100) as svc:
        qtys = [i if i % 5 else -i - 1 for i in range(60)]  # every 5th is invalid
        ids = [f"sku-{i}" if i != 7 else "x" * 65 for i in range(60)]  # and one bad id
        outcomes = await asyncio.gather(
            *(svc.inventory.put("acme", i, q) for i, q in zip(ids, qtys, strict=True)),
            return_exceptions=True,
        )

    assert svc.api.counters.batch_calls == 1
    for item_id, qty, outcome in zip(ids, qtys, outcomes, strict=True):
        if qty < 0:
            assert isinstance(outcome, ItemRejected)
            assert outcome.status == 422
            assert f"got {qty}" in str(outcome)  # its own error, not a neighbour's
        elif len(item_id) > 64:
            assert isinstance(outcome, ItemRejected)
            assert "id must be a string" in str(outcome)
        else:
            assert isinstance(outcome, dict)
            assert (outcome["id"], outcome["qty"]) == (item_id, qty)
    assert svc.api.counters.items_rejected == 13
    assert svc.api.counters.items_written == 47


async def test_a_failed_bulk_call_fails_its_batch_only() -> None:
    async with running(max_size=10) as svc:
        svc.api.fail_next(1, status=500, retry_after=None)  # not retried: not SAFE_TO_RETRY
        first = [svc.inventory.put("acme", f"a-{i}", i) for i in range(10)]
        outcomes = await asyncio.gather(*first, return_exceptions=True)
        later = await asyncio.gather(*(svc.inventory.put("acme", f"b-{i}", i) for i in range(10)))

    assert all(isinstance(o, httpx.HTTPStatusError) for o in outcomes)
    assert not any(isinstance(o, Throttled) for o in outcomes)
    assert [r["id"] for r in later] == [f"b-{i}" for i in range(10)]
    assert svc.api.counters.batch_calls == 2


async def test_identical_concurrent_gets_collapse_into_one_request() -> None:
    async with running(max_size=100) as svc:
        for i in range(5):
            await svc.inventory.put("acme", f"sku-{i}", i)
        await svc.inventory.put("globex", "sku-0", 100)
        svc.api.counters.get_calls = 0

        wanted = [("acme", f"sku-{i % 6}") for i in range(240)] + [("globex", "sku-0")] * 60
        outcomes = await asyncio.gather(
            *(svc.inventory.get(*w) for w in wanted), return_exceptions=True
        )

    # 7 distinct (tenant, URL): acme sku-0..5 (sku-5 missing), globex sku-0.
    assert svc.api.counters.get_calls == 7
    for (tenant, item_id), outcome in zip(wanted, outcomes, strict=True):
        if item_id == "sku-5":
            assert isinstance(outcome, ItemRejected)
            assert outcome.status == 404
        else:
            assert isinstance(outcome, dict)
            assert (outcome["tenant"], outcome["id"]) == (tenant, item_id)
            assert outcome["qty"] == (100 if tenant == "globex" else int(item_id[-1]))
    stats = svc.inventory.reads.stats
    assert stats.submitted == stats.succeeded + stats.failed == 300


async def test_a_throttled_get_retries_its_batch() -> None:
    async with running(max_size=100) as svc:
        for i in range(3):
            await svc.inventory.put("acme", f"sku-{i}", i)
        svc.api.fail_next(1, status=429, retry_after=0.01)
        got = await asyncio.gather(*(svc.inventory.get("acme", f"sku-{i % 3}") for i in range(30)))

    assert [g["id"] for g in got] == [f"sku-{i % 3}" for i in range(30)]
    assert svc.api.counters.get_calls == 6  # 3 GETs, one refused, then the 3 again


# -- throttling -------------------------------------------------------------------------


async def test_throttling_is_survived_and_no_item_is_lost() -> None:
    api = BulkAPI(rate=200, burst=2)
    n, max_size = 300, 25
    async with running(api, max_size=max_size, max_concurrency=4, attempts=60) as svc:
        results = await asyncio.gather(*(svc.inventory.put("acme", f"s-{i}", i) for i in range(n)))

    counters = api.counters
    assert [r["id"] for r in results] == [f"s-{i}" for i in range(n)]
    assert counters.throttled > 0
    assert counters.items_written == n == len(api.items)
    assert set(stored_versions(api)) == {1}  # a refused call wrote nothing; no item twice
    processed = len(counters.batch_sizes)
    assert processed <= math.ceil(n / max_size)
    assert counters.batch_calls == processed + counters.throttled  # the rest are retries


async def test_retry_after_is_what_the_next_try_waits() -> None:
    # backoff=0: without the server's delay the retry would go at once; and the
    # whole-second Retry-After (1 s) is not what is used: Retry-After-Ms is.
    async with running(backoff=0.0) as svc:
        svc.api.fail_next(1, status=429, retry_after=0.15)
        svc.api.fail_next(1, status=503, retry_after=0.1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        item = await svc.inventory.put("acme", "sku-1", 1)
        elapsed = loop.time() - started

    assert item["version"] == 1
    assert svc.api.counters.batch_calls == 3
    assert 0.25 <= elapsed < 0.9


async def test_503_without_retry_after_uses_the_backoff() -> None:
    async with running(backoff=0.01, attempts=3) as svc:
        svc.api.fail_next(2, status=503, retry_after=None)
        item = await svc.inventory.put("acme", "sku-1", 1)
        svc.api.fail_next(3, status=503, retry_after=None)
        with pytest.raises(Throttled) as caught:
            await svc.inventory.put("acme", "sku-2", 2)

    assert item["id"] == "sku-1"
    assert caught.value.retry_after is None
    assert caught.value.response.status_code == 503
    assert svc.api.counters.batch_calls == 6
    assert ("acme", "sku-2") not in svc.api.items


# -- shutdown -------------------------------------------------------------------------


async def test_closing_the_service_mid_load_drains() -> None:
    first_request = asyncio.Event()

    async def on_request(request: httpx.Request) -> None:
        first_request.set()

    api = BulkAPI(latency=0.05)
    n = 400
    async with running(api, hooks={"request": [on_request]}, max_size=50, max_concurrency=2) as svc:
        writers = [asyncio.create_task(svc.inventory.put("acme", f"s-{i}", i)) for i in range(n)]
        await first_request.wait()  # bulk calls are on the wire, most items still pending
        at_close = svc.inventory.writes.stats
        closing = asyncio.create_task(svc.inventory.aclose())
        await asyncio.sleep(0)
        with pytest.raises(BatcherClosed):
            await svc.inventory.put("acme", "too-late", 0)
        await closing
        assert all(w.done() for w in writers)  # aclose returned after every answer
        results = [w.result() for w in writers]

    assert at_close.in_flight > 0
    assert at_close.pending > 0
    assert [r["id"] for r in results] == [f"s-{i}" for i in range(n)]
    assert api.counters.items_written == n
    assert api.counters.batch_calls == math.ceil(n / 50)
    assert api.counters.peak_in_flight <= 2
    assert ("acme", "too-late") not in api.items


# -- the bulk API itself ------------------------------------------------------------------


async def test_bulk_api_endpoints() -> None:
    api = BulkAPI(max_batch_items=3)
    async with serve(create_app(api)) as url, httpx.AsyncClient(base_url=url) as http:
        assert url.startswith("http://127.0.0.1:")
        r = await http.post("/v1/items:batch", content=b"{not json")
        assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_request")
        r = await http.post("/v1/items:batch", json={"id": "a"})
        assert r.status_code == 400
        r = await http.post("/v1/items:batch", json=[{"id": str(i), "qty": 1} for i in range(4)])
        assert r.status_code == 413
        assert "at most 3 items per call, got 4" in r.json()["error"]["message"]

        r = await http.post(
            "/v1/items:batch",
            json=[{"id": "a", "qty": 1}, 7, {"id": "b", "qty": True}],
            headers={"X-Tenant": "t"},
        )
        assert r.status_code == 207
        assert [e["status"] for e in r.json()["results"]] == [201, 422, 422]
        assert "got int" in r.json()["results"][1]["error"]["message"]

        r = await http.put("/v1/items/a", json={"qty": 5}, headers={"X-Tenant": "t"})
        assert (r.status_code, r.json()["item"]["version"]) == (200, 2)
        r = await http.put("/v1/items/c", json={"qty": 1})
        assert (r.status_code, r.json()["item"]["tenant"]) == (201, "default")
        r = await http.put("/v1/items/c", json={"qty": -1})
        assert r.status_code == 422
        r = await http.put("/v1/items/c", content=b"[")
        assert r.status_code == 400
        r = await http.get("/v1/items/a", headers={"X-Tenant": "t"})
        assert r.json() == {"item": {"id": "a", "qty": 5, "tenant": "t", "version": 2}}
        assert (await http.get("/v1/items/a")).status_code == 404  # other tenant

        api.fail_next(1, status=502, retry_after=None)
        r = await http.get("/v1/items/a")
        assert r.status_code == 502
        assert "retry-after" not in r.headers
        api.fail_next(1, status=429, retry_after=0.0123)
        r = await http.put("/v1/items/z", json={"qty": 1})
        assert (r.status_code, r.headers["retry-after"], r.headers["retry-after-ms"]) == (
            429,
            "1",
            "13",
        )

        counters = (await http.get("/_admin/counters")).json()
        assert counters == api.counters.as_dict()
        assert counters["batch_calls"] == 4
        assert counters["put_calls"] == 5
        assert counters["get_calls"] == 3
        assert counters["failed"] == 2
        assert counters["batch_sizes"] == [3]
        assert (await http.post("/_admin/reset")).json() == {"reset": True}
        assert api.counters.batch_calls == 0
        assert not api.items
    assert "items=0" in repr(api)


async def test_rate_limit_answers_429_with_the_time_to_the_next_token() -> None:
    api = BulkAPI(rate=10, burst=1)
    async with serve(create_app(api)) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/v1/items/a")).status_code == 404  # the one token
        r = await http.get("/v1/items/a")
        assert r.status_code == 429
        delay = retry_after(r.headers)
        assert delay is not None
        assert 0.05 < delay <= 0.1  # 1 token / (10 per second), minus what has refilled
        assert api.counters.throttled == 1


def test_bulk_api_validates_its_knobs() -> None:
    with pytest.raises(ValueError, match="latencies must be >= 0"):
        BulkAPI(latency=-1)
    with pytest.raises(ValueError, match="rate must be > 0"):
        BulkAPI(rate=0)
    with pytest.raises(ValueError, match="max_batch_items must be >= 1"):
        BulkAPI(max_batch_items=0)
    assert BulkAPI(rate=50).burst == 50
    assert create_app().state.api.counters.batch_calls == 0


async def test_serve_reports_a_busy_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=r"could not serve on 127\.0\.0\.1"):
            async with serve(create_app(), port=port):
                pass  # pragma: no cover


async def test_serve_cancelled_while_stopping_still_stops() -> None:
    stopping = asyncio.Event()
    urls: list[str] = []

    async def run() -> None:
        async with serve(create_app()) as url:
            urls.append(url)
            stopping.set()

    task = asyncio.create_task(run())
    await stopping.wait()  # run() is now waiting for the server to shut down
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(urls[0])


def test_bulk_api_runs_as_a_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncbatch.contrib.bulkapi", "--latency", "0", "--rate", "1000"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url) as http:
            r = http.post("/v1/items:batch", json=[{"id": "a", "qty": 1}])
            assert r.status_code == 207
            assert http.get("/_admin/counters").json()["batch_calls"] == 1
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        if proc.stdout is not None:
            proc.stdout.close()


# -- contrib.httpx: Retry-After and Throttled ----------------------------------------------


def _response(status: int, headers: dict[str, str] | None = None) -> httpx.Response:
    request = httpx.Request("POST", "http://127.0.0.1/v1/items:batch")
    return httpx.Response(status, headers=headers, request=request)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": "0.25"}, 0.25),  # fractions tolerated
        ({"Retry-After": "1", "Retry-After-Ms": "40"}, 0.04),  # ms wins
        ({"Retry-After-Ms": "junk", "Retry-After": "2"}, 2.0),
        ({"Retry-After": "-1"}, None),
        ({"Retry-After": "inf"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # in the past
    ],
)
def test_retry_after_parsing(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after(headers) == expected


def test_retry_after_http_date() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert retry_after({"Retry-After": later}, now=now) == 30.0
    naive = "Thu, 01 Jan 2026 12:00:10 -0000"  # no zone information: read as UTC
    assert retry_after(httpx.Headers({"Retry-After": naive}), now=now) == 10.0


def test_raise_for_throttling() -> None:
    raise_for_throttling(_response(207))
    raise_for_throttling(_response(500))
    with pytest.raises(Throttled) as caught:
        raise_for_throttling(_response(429, {"Retry-After-Ms": "250"}))
    exc = caught.value
    assert isinstance(exc, httpx.HTTPStatusError)
    assert isinstance(exc, SAFE_TO_RETRY)
    assert exc.retry_after == 0.25
    assert str(exc) == (
        "POST http://127.0.0.1/v1/items:batch was throttled: "
        "HTTP 429 Too Many Requests (retry after 0.25 s)"
    )
    with pytest.raises(Throttled, match=r"503 Service Unavailable \(no Retry-After\)"):
        raise_for_throttling(_response(503))
    # Too long a delay is not honoured: Retry's own backoff applies.
    with pytest.raises(Throttled) as caught:
        raise_for_throttling(_response(429, {"Retry-After": "3600"}))
    assert caught.value.retry_after is None
    with pytest.raises(Throttled) as caught:
        raise_for_throttling(_response(429, {"Retry-After": "3600"}), max_retry_after=math.inf)
    assert caught.value.retry_after == 3600.0
    with pytest.raises(Throttled):
        raise_for_throttling(_response(502), statuses={502})


def test_the_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(http_batching.main(writes=200, reads=200, latency=0.0))  # once, not per loop
    out = capsys.readouterr().out
    assert "1. 200 concurrent put() calls for 3 tenants" in out
    assert "2. 200 concurrent get() calls of" in out
    assert "none lost" in out
    assert "4. aclose() with" in out
