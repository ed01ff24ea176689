"""A realistic bulk HTTP API to batch against: for tests, examples and benchmarks.

Needs the ``http`` extra (``pip install 'asyncbatch[http]'``: starlette, uvicorn,
httpx); starlette and uvicorn are imported only when an app is built or served,
so importing this module never fails.

The API (one in-memory store of items per tenant; the tenant is the
``X-Tenant`` request header, ``"default"`` when absent)::

    POST /v1/items:batch      JSON array of items to upsert, at most
                              ``max_batch_items`` of them.
                              207 {"results": [one entry per item, in order]}
                              where an entry is
                                {"status": 201 | 200, "item": {...}}     created | updated
                                {"status": 422, "error": {"code": "invalid_item",
                                                          "message": "..."}}
                              400 the body is not a JSON array; 413 too many items.
    GET  /v1/items/{id}       200 {"item": {...}}; 404 {"error": {...}}.
    PUT  /v1/items/{id}       the one-item write, body {"qty": int}: 201 | 200
                              {"item": {...}}, 422 {"error": {...}}.
    GET  /_admin/counters     the counters below, as JSON (not counted, never throttled)
    POST /_admin/reset        zero the counters and empty the store

An item is ``{"id": str (1..64 chars), "qty": int >= 0}``; the stored item adds
``"tenant"`` and ``"version"`` (1 on creation, +1 per write: a test can tell an
item written twice).

Every ``/v1`` call waits ``latency`` seconds (plus ``item_latency`` per item of
a batch) before answering, like a backend doing the work. With ``rate`` set, a
token bucket (``rate`` calls per second, ``burst`` at once) guards all ``/v1``
calls; a call without a token is answered at once with ``429`` and the time
until the next token, in both ``Retry-After`` (whole seconds, rounded up, as
RFC 9110 requires) and ``Retry-After-Ms`` (milliseconds, the precision
clients such as Azure's and OpenAI's read first). :meth:`BulkAPI.fail_next`
scripts the next answers (``503 Service Unavailable`` with a ``Retry-After``,
or any status) for tests. A throttled or failed call does no work: none of its
items is written.

Usage, in the same event loop as the client (what the tests do)::

    api = BulkAPI(latency=0.002, rate=100, burst=10)
    async with serve(create_app(api)) as base_url:  # "http://127.0.0.1:<free port>"
        ...
    api.counters.batch_calls

or as a process (what ``benchmarks/http_bulk.py`` does; prints the base URL on its
first line, stops on SIGINT/SIGTERM)::

    python -m asyncbatch.contrib.bulkapi --latency 0.002
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import signal
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.types import ASGIApp

__all__ = ["BulkAPI", "Counters", "create_app", "main", "serve"]

_EXTRA_HINT = (
    "asyncbatch.contrib.bulkapi needs starlette and uvicorn: "
    "install the http extra, pip install 'asyncbatch[http]'"
)

JSONObject = dict[str, Any]


@dataclasses.dataclass
class Counters:
    """What the server saw since it started (or since :meth:`BulkAPI.reset`).

    Calls are counted when received, so a throttled or failed call counts in
    ``batch_calls`` / ``get_calls`` as well as in ``throttled`` / ``failed``.
    """

    batch_calls: int = 0
    """``POST /v1/items:batch`` requests received."""
    get_calls: int = 0
    """``GET /v1/items/{id}`` requests received."""
    put_calls: int = 0
    """``PUT /v1/items/{id}`` requests received."""
    throttled: int = 0
    """Calls answered ``429`` by the rate limit."""
    failed: int = 0
    """Calls answered with a status scripted by :meth:`BulkAPI.fail_next`."""
    items_written: int = 0
    """Items stored (by batch calls and by ``PUT``)."""
    items_rejected: int = 0
    """Items refused with ``422`` (per item in a batch call, or a whole ``PUT``)."""
    batch_sizes: list[int] = dataclasses.field(default_factory=list)
    """Item count of every batch call that was processed (not throttled/failed)."""
    in_flight: int = 0
    """``/v1`` calls being processed right now."""
    peak_in_flight: int = 0
    """Most ``/v1`` calls processed at once."""

    def as_dict(self) -> JSONObject:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Scripted:
    status: int
    retry_after: float | None


class BulkAPI:
    """The behaviour and state of the bulk API; one instance per server.

    Every knob is a plain attribute that a test may change between calls.

    Args:
        latency: seconds every ``/v1`` call takes before it answers.
        item_latency: extra seconds per item of a batch call.
        rate: token-bucket refill, in calls per second; ``None``: no rate limit.
        burst: bucket size (calls allowed at once); defaults to ``max(1, rate)``.
        max_batch_items: a batch call with more items is answered ``413``.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        item_latency: float = 0.0,
        rate: float | None = None,
        burst: float | None = None,
        max_batch_items: int = 1000,
    ) -> None:
        if latency < 0 or item_latency < 0:
            raise ValueError(f"latencies must be >= 0, got {latency=} {item_latency=}")
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be > 0 calls per second, got {rate}")
        if max_batch_items < 1:
            raise ValueError(f"max_batch_items must be >= 1, got {max_batch_items}")
        self.latency = latency
        self.item_latency = item_latency
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate or 1.0)
        self.max_batch_items = max_batch_items
        self.counters = Counters()
        self.items: dict[tuple[str, str], JSONObject] = {}
        self._tokens = self.burst
        self._refilled = time.monotonic()
        self._scripted: list[_Scripted] = []

    def __repr__(self) -> str:
        return (
            f"<BulkAPI latency={self.latency} rate={self.rate} burst={self.burst} "
            f"items={len(self.items)} {self.counters}>"
        )

    def fail_next(
        self, count: int = 1, *, status: int = 503, retry_after: float | None = 0.0
    ) -> None:
        """Answer the next ``count`` ``/v1`` calls with ``status`` (doing no work).

        ``retry_after`` (seconds) is sent as ``Retry-After``/``Retry-After-Ms``;
        ``None`` sends neither.
        """
        self._scripted.extend(_Scripted(status, retry_after) for _ in range(count))

    def reset(self) -> None:
        """Zero the counters, empty the store, refill the bucket, drop scripted failures."""
        self.counters = Counters()
        self.items.clear()
        self._scripted.clear()
        self._tokens = self.burst
        self._refilled = time.monotonic()

    # -- the API, free of any web framework: (status, body, headers) --------------------

    def _admit(self) -> tuple[int, JSONObject, dict[str, str]] | None:
        """Rate limit and scripted failures: an answer that replaces the call, or None."""
        if self._scripted:
            scripted = self._scripted.pop(0)
            self.counters.failed += 1
            return (
                scripted.status,
                {"error": {"code": "scripted", "message": f"scripted HTTP {scripted.status}"}},
                _retry_after_headers(scripted.retry_after),
            )
        if self.rate is None:
            return None
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        self.counters.throttled += 1
        wait = (1.0 - self._tokens) / self.rate
        return (
            429,
            {"error": {"code": "rate_limited", "message": f"over {self.rate} calls/s"}},
            _retry_after_headers(wait),
        )

    def write_batch(self, tenant: str, payload: object) -> tuple[int, JSONObject]:
        """Validate and store one batch; the multi-status answer."""
        if not isinstance(payload, list):
            return 400, _error("bad_request", "the body must be a JSON array of items")
        if len(payload) > self.max_batch_items:
            return 413, _error(
                "too_many_items",
                f"at most {self.max_batch_items} items per call, got {len(payload)}",
            )
        results = [self._write(tenant, raw) for raw in payload]
        self.counters.batch_sizes.append(len(payload))
        return 207, {"results": results}

    def write_item(self, tenant: str, item_id: str, payload: object) -> tuple[int, JSONObject]:
        """Validate and store one item (``PUT``); its answer."""
        raw = {**payload, "id": item_id} if isinstance(payload, dict) else payload
        result = self._write(tenant, raw)
        status = result.pop("status")
        return status, result

    def _write(self, tenant: str, raw: object) -> JSONObject:
        """One item's multi-status entry: {"status", "item"} or {"status", "error"}."""
        problem = _invalid(raw)
        if problem is not None:
            self.counters.items_rejected += 1
            return {"status": 422, **_error("invalid_item", problem)}
        assert isinstance(raw, dict)
        key = (tenant, raw["id"])
        previous = self.items.get(key)
        version = 1 if previous is None else previous["version"] + 1
        stored = {"id": raw["id"], "qty": raw["qty"], "tenant": tenant, "version": version}
        self.items[key] = stored
        self.counters.items_written += 1
        return {"status": 201 if previous is None else 200, "item": stored}

    def read_item(self, tenant: str, item_id: str) -> tuple[int, JSONObject]:
        stored = self.items.get((tenant, item_id))
        if stored is None:
            return 404, _error("not_found", f"no item {item_id!r} for tenant {tenant!r}")
        return 200, {"item": stored}

    @contextlib.contextmanager
    def _tracking(self) -> Iterator[None]:
        counters = self.counters
        counters.in_flight += 1
        counters.peak_in_flight = max(counters.peak_in_flight, counters.in_flight)
        try:
            yield
        finally:
            counters.in_flight -= 1


def _error(code: str, message: str) -> JSONObject:
    return {"error": {"code": code, "message": message}}


def _invalid(raw: object) -> str | None:
    """Why an item is invalid, or None."""
    if not isinstance(raw, dict):
        return f"an item must be a JSON object, got {type(raw).__name__}"
    item_id = raw.get("id")
    if not isinstance(item_id, str) or not 1 <= len(item_id) <= 64:
        return f"id must be a string of 1 to 64 characters, got {item_id!r}"
    qty = raw.get("qty")
    if not isinstance(qty, int) or isinstance(qty, bool) or qty < 0:
        return f"qty must be an integer >= 0, got {qty!r}"
    return None


def _retry_after_headers(seconds: float | None) -> dict[str, str]:
    if seconds is None:
        return {}
    return {
        "Retry-After": str(math.ceil(seconds)),
        "Retry-After-Ms": str(math.ceil(seconds * 1000)),
    }


def create_app(api: BulkAPI | None = None) -> Starlette:
    """The starlette app serving ``api`` (a fresh :class:`BulkAPI` if None).

    The instance is also reachable as ``app.state.api``.

    Raises:
        ImportError: starlette is not installed (install ``asyncbatch[http]``).
    """
    try:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route
    except ImportError as exc:  # pragma: no cover - the test extra installs starlette
        raise ImportError(_EXTRA_HINT) from exc

    state = api if api is not None else BulkAPI()

    def answer(status: int, body: JSONObject, headers: Mapping[str, str] | None = None) -> Response:
        return JSONResponse(body, status_code=status, headers=headers)

    async def batch(request: Request) -> Response:
        state.counters.batch_calls += 1
        refused = state._admit()
        if refused is not None:
            return answer(*refused)
        with state._tracking():
            body = await request.body()
            try:
                payload = json.loads(body)
            except ValueError:
                return answer(*_http_error(400, "the body is not JSON"))
            count = len(payload) if isinstance(payload, list) else 0
            await asyncio.sleep(state.latency + count * state.item_latency)
            return answer(*state.write_batch(_tenant(request), payload))

    async def get_item(request: Request) -> Response:
        state.counters.get_calls += 1
        refused = state._admit()
        if refused is not None:
            return answer(*refused)
        with state._tracking():
            await asyncio.sleep(state.latency)
            return answer(*state.read_item(_tenant(request), request.path_params["item_id"]))

    async def put_item(request: Request) -> Response:
        state.counters.put_calls += 1
        refused = state._admit()
        if refused is not None:
            return answer(*refused)
        with state._tracking():
            try:
                payload = json.loads(await request.body())
            except ValueError:
                return answer(*_http_error(400, "the body is not JSON"))
            await asyncio.sleep(state.latency)
            item_id = request.path_params["item_id"]
            return answer(*state.write_item(_tenant(request), item_id, payload))

    async def counters(request: Request) -> Response:
        return answer(200, state.counters.as_dict())

    async def reset(request: Request) -> Response:
        state.reset()
        return answer(200, {"reset": True})

    app = Starlette(
        routes=[
            Route("/v1/items:batch", batch, methods=["POST"]),
            Route("/v1/items/{item_id}", get_item, methods=["GET"]),
            Route("/v1/items/{item_id}", put_item, methods=["PUT"]),
            Route("/_admin/counters", counters, methods=["GET"]),
            Route("/_admin/reset", reset, methods=["POST"]),
        ]
    )
    app.state.api = state
    return app


def _tenant(request: Request) -> str:
    return request.headers.get("x-tenant", "default")


def _http_error(status: int, message: str) -> tuple[int, JSONObject]:
    return status, _error("bad_request", message)


@contextlib.asynccontextmanager
async def serve(
    app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0, graceful: float = 5.0
) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn in the running event loop; yield its base URL.

    ``port=0`` (the default) binds a free port. On exit the server stops
    accepting, closes idle keep-alive connections, lets requests in progress
    finish (at most ``graceful`` seconds, then cancels them) and is gone. The
    server installs no signal handler: Ctrl+C reaches the program as usual.

    Raises:
        ImportError: uvicorn is not installed (install ``asyncbatch[http]``).
        OSError: the address could not be bound.
    """
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover - the test extra installs uvicorn
        raise ImportError(_EXTRA_HINT) from exc

    class _Server(uvicorn.Server):
        # uvicorn's own loop polls should_exit every 0.1 s and exits the process on
        # a bind error; embedded in someone else's loop we want neither.

        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self.ready = asyncio.Event()
            self.exit = asyncio.Event()

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        async def startup(self, sockets: Any = None) -> None:
            try:
                await super().startup(sockets=sockets)
            except SystemExit:
                raise OSError(f"uvicorn could not serve on {host}:{port}") from None
            self.ready.set()

        async def main_loop(self) -> None:
            # on_tick refreshes the Date header and reports should_exit; wake up
            # once a second for the header, at once for the exit.
            while not await self.on_tick(0):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self.exit.wait()
                self.should_exit = self.should_exit or self.exit.is_set()

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=max(1, math.ceil(graceful)),
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(), name=f"uvicorn {host}:{port}")
    ready = asyncio.create_task(server.ready.wait())
    try:
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
    if task.done():
        task.result()  # raises the startup error
        raise RuntimeError("uvicorn stopped before it was ready")  # pragma: no cover
    try:
        bound = server.servers[0].sockets[0].getsockname()
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.exit.set()
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            server.force_exit = True
            await task
            raise


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - run in a subprocess
    """Run the bulk API on 127.0.0.1 until SIGINT/SIGTERM; print the base URL first.

    Tested as a process (``test_bulk_api_runs_as_a_process``), where coverage
    does not follow.
    """
    parser = argparse.ArgumentParser(
        prog="python -m asyncbatch.contrib.bulkapi", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--port", type=int, default=0, help="0 (default): a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per call")
    parser.add_argument("--item-latency", type=float, default=0.0, help="seconds per item")
    parser.add_argument("--rate", type=float, default=None, help="calls per second")
    parser.add_argument("--burst", type=float, default=None, help="calls at once")
    parser.add_argument("--max-batch-items", type=int, default=1000)
    parser.add_argument("--uvloop", action="store_true", help="serve on uvloop")
    args = parser.parse_args(argv)
    api = BulkAPI(
        latency=args.latency,
        item_latency=args.item_latency,
        rate=args.rate,
        burst=args.burst,
        max_batch_items=args.max_batch_items,
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with serve(create_app(api), port=args.port) as url:
            print(url, flush=True)
            await stop.wait()

    if args.uvloop:
        import uvloop

        uvloop.run(run())
    else:
        asyncio.run(run())


if __name__ == "__main__":  # pragma: no cover
    main()
