"""A Starlette web service that batches its backend calls: where batchers live.

Each HTTP request asks for the price of one product; the prices come from a
slow *bulk* backend (one round trip per call, whatever the number of
products). The app sends the products asked for by concurrent requests to the
backend together, through one :class:`~asyncbatch.Batcher`:

- **One batcher per app, created in the lifespan and closed at shutdown.**
  The lifespan runs in the server's event loop, which the batcher binds to;
  ``async with`` closes it at shutdown, after it has answered every request
  it accepted (a draining ``aclose()``). Each startup makes a fresh one, so
  the same app object can be served again (tests, ``uvicorn --reload``).
- Not at import time: a module-level batcher closed at shutdown *stays
  closed* (``BatcherClosed`` on every later request), and one never closed
  loses what is pending when the loop ends.
- Per-request objects (a :class:`~asyncbatch.DataLoader` and its cache)
  belong to the request; the app-wide batcher holds no per-user data.

Routes: ``GET /prices/{sku}`` (404 for an unknown product),
``GET /cart?sku=a&sku=b`` (several products at once, ``submit_many``) and
``GET /metrics``: the batcher's figures for Prometheus to scrape (items by
outcome, batch sizes, backend call durations, waits; see the README's
"Metrics and traces"), from the app's own registry. To add
a route, add it to ``ROUTES`` or to the list :func:`create_app` builds; the
batcher is ``request.app.state.prices``.

Run it (needs the ``http`` and ``prometheus`` extras)::

    python examples/web_service.py --port 8000
    curl http://127.0.0.1:8000/prices/sku-1
    curl http://127.0.0.1:8000/metrics
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asyncbatch import Batcher
from asyncbatch.contrib.prometheus import instrument


class UnknownProduct(LookupError):
    """The backend has no price for this product."""


@dataclass
class PriceBackend:
    """A slow bulk endpoint: one round trip per call, any number of products.

    ``calls`` records the products of each call, so the tests (and the
    ``X-Backend-Calls`` header) can show how few calls the service makes.
    """

    latency: float = 0.005  # seconds per call
    prices: Mapping[str, float] = field(
        default_factory=lambda: {f"sku-{i}": round(1.5 * i, 2) for i in range(1, 101)}
    )
    calls: list[list[str]] = field(default_factory=list)

    async def fetch(self, skus: list[str]) -> list[float | Exception]:
        """The price of each product, in order; an unknown one fails alone."""
        self.calls.append(list(skus))
        await asyncio.sleep(self.latency)
        return [
            self.prices[sku] if sku in self.prices else UnknownProduct(f"no product {sku!r}")
            for sku in skus
        ]


def prices_of(request: Request) -> Batcher[str, float]:
    """The app's batcher, made by the lifespan."""
    batcher: Batcher[str, float] = request.app.state.prices
    return batcher


async def price(request: Request) -> JSONResponse:
    sku = request.path_params["sku"]
    try:
        value = await prices_of(request).submit(sku, timeout=5.0)  # seconds
    except UnknownProduct as exc:
        return JSONResponse({"error": str(exc)}, status_code=404)
    return JSONResponse({"sku": sku, "price": value})


async def cart(request: Request) -> JSONResponse:
    skus = request.query_params.getlist("sku")
    results = await prices_of(request).submit_many(skus, return_exceptions=True)
    unknown = [sku for sku, r in zip(skus, results, strict=True) if isinstance(r, Exception)]
    if unknown:
        return JSONResponse({"error": f"unknown products: {unknown}"}, status_code=404)
    total = round(sum(r for r in results if isinstance(r, float)), 2)
    return JSONResponse({"skus": skus, "total": total})


async def metrics(request: Request) -> Response:
    """The Prometheus text exposition of the app's registry (read now, from ``stats``)."""
    registry: CollectorRegistry = request.app.state.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    Route("/prices/{sku}", price),
    Route("/cart", cart),
    Route("/metrics", metrics),
]


def create_app(backend: PriceBackend | None = None) -> Starlette:
    """The service: ``ROUTES`` plus a lifespan that owns the batcher.

    ``backend`` defaults to a fresh :class:`PriceBackend`; it is kept as
    ``app.state.backend``. ``app.state.registry`` is the app's Prometheus
    registry (its own, so that several apps in one process do not clash).
    """
    backend = PriceBackend() if backend is None else backend
    registry = CollectorRegistry()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Created here, in the server's loop; closed (drained) at shutdown.
        async with Batcher(
            backend.fetch,
            max_size=100,  # products per backend call
            max_wait=0.002,  # seconds the first request waits for companions
            max_concurrency=4,  # backend calls at once
            name="prices",
        ) as batcher:
            app.state.prices = batcher
            exported = instrument(batcher, registry=registry)  # series batcher="prices"
            try:
                yield
            finally:
                exported.remove()  # a restart instruments its fresh batcher

    app = Starlette(routes=list(ROUTES), lifespan=lifespan)
    app.state.backend = backend
    app.state.registry = registry
    return app


app = create_app()  # `uvicorn web_service:app`: the batcher is made at startup, not here


def listening_socket(port: int = 0) -> socket.socket:
    """A socket bound to 127.0.0.1 (port 0: a free port chosen by the OS)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@contextlib.asynccontextmanager
async def running_server(asgi_app: Starlette) -> AsyncIterator[str]:
    """Serve ``asgi_app`` with uvicorn on 127.0.0.1 in this event loop; yields its URL.

    Leaving the block shuts the server down: it finishes the requests in
    progress, then runs the lifespan's shutdown (which closes the batcher).
    """
    sock = listening_socket()
    host, port = sock.getsockname()
    server = uvicorn.Server(uvicorn.Config(asgi_app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # startup failed: raise why
            await asyncio.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    sock = listening_socket(args.port)
    print(f"prices on http://127.0.0.1:{args.port}/prices/sku-1 (and /cart?sku=sku-1&sku=sku-2)")
    uvicorn.Server(uvicorn.Config(app, lifespan="on")).run(sockets=[sock])


if __name__ == "__main__":
    main()
