"""Batching outbound HTTP calls: each caller awaits one item, the network sees bulk calls.

A client service for a bulk HTTP API (:mod:`asyncbatch.contrib.bulkapi`, served
here on 127.0.0.1 by this script). Its callers write and read one item at a
time, concurrently; underneath:

- writes go through a :class:`~asyncbatch.Batcher` whose sink posts one
  ``POST /v1/items:batch`` per batch and maps the 207 multi-status answer back
  item by item: an item the API refuses fails only its own caller
  (:class:`ItemRejected`), the others get their stored item;
- the tenant is a request header, so ``partition=tenant``: items of different
  tenants never share a request;
- ``429``/``503`` answers raise :class:`~asyncbatch.contrib.httpx.Throttled`
  carrying the server's ``Retry-After``; ``Retry`` waits exactly that long and
  tries the batch again. Writes retry only failures after which the server
  certainly did no work (``SAFE_TO_RETRY``);
- reads (``GET /v1/items/{id}``, no bulk read endpoint) are coalesced:
  ``dedupe=True`` with ``key=url`` folds identical concurrent GETs into one
  request whose answer every caller receives.

Run it (needs ``pip install 'asyncbatch[http]'``)::

    python examples/http_batching.py
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx

from asyncbatch import Batcher, Retry
from asyncbatch.contrib.bulkapi import BulkAPI, create_app, serve
from asyncbatch.contrib.httpx import SAFE_TO_RETRY, Throttled, raise_for_throttling

JSON = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Write:
    """One item to upsert for one tenant."""

    tenant: str
    id: str
    qty: int


@dataclass(frozen=True, slots=True)
class Read:
    """One item to fetch for one tenant."""

    tenant: str
    id: str

    @property
    def url(self) -> str:
        return f"/v1/items/{self.id}"


class ItemRejected(Exception):
    """The API refused one item (a per-item 4xx, or 404 on a read); only its caller sees it."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code


class InventoryClient:
    """A client service: ``put``/``get`` one item; bulk requests on the wire.

    Args:
        http: the ``httpx.AsyncClient`` to send with (its ``base_url`` is the
            API); the caller owns it and closes it after this client.
        max_size: items per bulk call; keep it within the API's own limit.
        max_wait: seconds the first item of a batch waits for companions.
        max_concurrency: bulk calls in flight at once, per operation.
        attempts: tries per batch before a throttled batch fails its callers.
        backoff: first retry delay when the server gives no ``Retry-After``.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        max_size: int = 100,
        max_wait: float = 0.002,
        max_concurrency: int = 4,
        attempts: int = 5,
        backoff: float = 0.05,
    ) -> None:
        self._http = http
        self.writes: Batcher[Write, JSON] = Batcher(
            self._post_batch,
            max_size=max_size,
            max_wait=max_wait,
            max_concurrency=max_concurrency,
            partition=lambda w: w.tenant,  # one X-Tenant header per request
            retry=Retry(attempts=attempts, backoff=backoff, retry_on=SAFE_TO_RETRY),
            name="inventory.writes",
        )
        self.reads: Batcher[Read, JSON] = Batcher(
            self._get_each,
            max_size=max_size,
            max_wait=max_wait,
            max_concurrency=max_concurrency,
            partition=lambda r: r.tenant,
            key=lambda r: r.url,  # within a tenant's batch, the URL is the request
            dedupe=True,
            # GETs are idempotent: any transport error may be retried.
            retry=Retry(
                attempts=attempts, backoff=backoff, retry_on=(Throttled, httpx.TransportError)
            ),
            name="inventory.reads",
        )

    async def put(self, tenant: str, item_id: str, qty: int) -> JSON:
        """Upsert one item; its stored form. Raises ``ItemRejected`` if the API refuses it."""
        return await self.writes.submit(Write(tenant, item_id, qty))

    async def get(self, tenant: str, item_id: str) -> JSON:
        """Fetch one item. Raises ``ItemRejected`` (status 404) if there is none."""
        return await self.reads.submit(Read(tenant, item_id))

    async def aclose(self) -> None:
        """Stop taking calls; send everything already accepted and wait for the answers."""
        # Writes refuse new items from this very call on (aclose() closes before its
        # first await; gather() would start it one loop iteration late); reads follow
        # in their own task, and both drain at the same time.
        reads = asyncio.ensure_future(self.reads.aclose())
        try:
            await self.writes.aclose()
        finally:
            await reads

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- sinks: one call per batch -----------------------------------------------

    async def _post_batch(self, writes: list[Write]) -> list[JSON | Exception]:
        response = await self._http.post(
            "/v1/items:batch",
            json=[{"id": w.id, "qty": w.qty} for w in writes],
            headers={"X-Tenant": writes[0].tenant},  # partition: one tenant per batch
        )
        raise_for_throttling(response)  # 429/503: Retry waits for Retry-After
        response.raise_for_status()  # any other failure fails the whole batch
        # 207: one entry per item, in order (the Batcher checks the length).
        return [_outcome(entry) for entry in response.json()["results"]]

    async def _get_each(self, reads: list[Read]) -> list[JSON | Exception]:
        # No bulk read endpoint: one GET per distinct URL (dedupe has already
        # folded identical concurrent reads into one slot), all at once.
        outcomes = await asyncio.gather(*(self._get_one(r) for r in reads))
        # A throttled GET retries the whole batch after the longest delay asked;
        # re-reading the others is harmless. Other errors stay with their caller.
        retry = [o for o in outcomes if isinstance(o, Throttled | httpx.TransportError)]
        if retry:
            raise max(retry, key=lambda exc: getattr(exc, "retry_after", None) or 0.0)
        return outcomes

    async def _get_one(self, read: Read) -> JSON | Exception:
        # Never raises, so that gather() leaves no sibling request behind.
        try:
            response = await self._http.get(read.url, headers={"X-Tenant": read.tenant})
            raise_for_throttling(response)
            if response.status_code == 404:
                return _outcome({"status": 404, **response.json()})
            response.raise_for_status()
            item: JSON = response.json()["item"]
            return item
        except Exception as exc:
            return exc


def _outcome(entry: JSON) -> JSON | Exception:
    """One multi-status entry: the item, or the error that fails only its caller."""
    if entry["status"] < 300:
        item: JSON = entry["item"]
        return item
    error = entry["error"]
    return ItemRejected(entry["status"], error["code"], error["message"])


# -- the demo ----------------------------------------------------------------------


async def _put_all(inventory: InventoryClient, writes: list[Write]) -> list[JSON | BaseException]:
    return await asyncio.gather(
        *(inventory.put(w.tenant, w.id, w.qty) for w in writes), return_exceptions=True
    )


async def main(writes: int = 1_000, reads: int = 2_000, latency: float = 0.002) -> None:
    """Run the four scenes against a bulk API served on 127.0.0.1, print what happened."""
    rng = random.Random(5)
    tenants = ["acme", "globex", "initech"]
    api = BulkAPI(latency=latency, max_batch_items=100)
    async with (
        serve(create_app(api)) as base_url,
        httpx.AsyncClient(base_url=base_url) as http,
        InventoryClient(http, max_size=100) as inventory,
    ):
        print(f"bulk API on {base_url}, {latency * 1000:g} ms per call\n")

        # 1. Many concurrent writers, three tenants, a few invalid items.
        batch = [
            Write(rng.choice(tenants), f"sku-{i}", -1 if i % 97 == 13 else rng.randrange(100))
            for i in range(writes)
        ]
        started = time.perf_counter()
        outcomes = await _put_all(inventory, batch)
        elapsed = time.perf_counter() - started
        rejected = [
            (w, o) for w, o in zip(batch, outcomes, strict=True) if isinstance(o, Exception)
        ]
        assert all(isinstance(o, ItemRejected) and w.qty < 0 for w, o in rejected)
        bound = sum(math.ceil(sum(w.tenant == t for w in batch) / 100) for t in tenants)
        print(
            f"1. {writes} concurrent put() calls for {len(tenants)} tenants in "
            f"{elapsed * 1000:.0f} ms: {api.counters.batch_calls} bulk calls "
            f"(at most {bound}: ceil(n/100) per tenant), "
            f"{api.counters.items_written} written, {len(rejected)} rejected, each "
            f"error raised in its own caller only, e.g.\n   {rejected[0][1]!r}"
        )

        # 2. Identical concurrent GETs collapse into one request.
        stored = [w for w in batch[:25] if w.qty >= 0]
        hot = [rng.choice(stored) for _ in range(reads)]
        before = api.counters.get_calls
        got = await asyncio.gather(*(inventory.get(w.tenant, w.id) for w in hot))
        assert all(
            g["id"] == w.id and g["tenant"] == w.tenant for g, w in zip(got, hot, strict=True)
        )
        distinct = len({(w.tenant, w.id) for w in hot})
        print(
            f"2. {reads} concurrent get() calls of {distinct} distinct items: "
            f"{api.counters.get_calls - before} GET requests"
        )

        # 3. Throttling: the server says 429 then 503, with Retry-After.
        api.fail_next(1, status=429, retry_after=0.05)
        api.fail_next(1, status=503, retry_after=0.02)
        more = [Write("acme", f"late-{i}", i) for i in range(300)]
        calls, written = api.counters.batch_calls, api.counters.items_written
        started = time.perf_counter()
        results = await asyncio.gather(*(inventory.put(w.tenant, w.id, w.qty) for w in more))
        elapsed = time.perf_counter() - started
        assert [r["id"] for r in results] == [w.id for w in more]
        print(
            f"3. 300 put() calls while the API answered 429 (Retry-After 50 ms), then 503 "
            f"(20 ms): {api.counters.batch_calls - calls} bulk calls, 2 of them refused and "
            f"retried after the server's delay; {api.counters.items_written - written} "
            f"written, none lost, in {elapsed * 1000:.0f} ms"
        )

        # 4. Shutting down under load: everything accepted is still sent.
        api.latency = 0.02
        tail = [Write("globex", f"tail-{i}", i) for i in range(500)]
        written = api.counters.items_written
        pending = asyncio.gather(*(inventory.put(w.tenant, w.id, w.qty) for w in tail))
        await asyncio.sleep(0.005)  # the writers submit, the first bulk calls go out
        at_close = inventory.writes.stats
        await inventory.aclose()
        done = await pending
        print(
            f"4. aclose() with {at_close.in_flight} items in flight and {at_close.pending} "
            f"waiting: it returned once all {len(done)} were answered "
            f"({api.counters.items_written - written} written)"
        )


if __name__ == "__main__":
    asyncio.run(main())
