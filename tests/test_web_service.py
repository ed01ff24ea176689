"""The web service example over real HTTP: one batcher per app, made in the lifespan.

The server (uvicorn, in this test's event loop) listens on 127.0.0.1 on a port
the OS picks, and is stopped before each test ends.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import pytest

from asyncbatch import Batcher, BatcherClosed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import web_service

pytestmark = pytest.mark.realtime


async def get_all(client: httpx.AsyncClient, paths: list[str]) -> list[httpx.Response]:
    return list(await asyncio.gather(*(client.get(path) for path in paths)))


async def test_concurrent_requests_share_backend_calls() -> None:
    backend = web_service.PriceBackend(latency=0.05)
    app = web_service.create_app(backend)
    async with (
        web_service.running_server(app) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        assert url.startswith("http://127.0.0.1:")
        responses = await get_all(client, [f"/prices/sku-{i}" for i in range(1, 41)])
        assert [r.status_code for r in responses] == [200] * 40
        assert [r.json() for r in responses] == [
            {"sku": f"sku-{i}", "price": round(1.5 * i, 2)} for i in range(1, 41)
        ]
        batcher = app.state.prices
        assert isinstance(batcher, Batcher)
        assert not batcher.closed
        assert batcher.stats.succeeded == 40
    # Every product reached the backend once, in far fewer calls than requests.
    assert sorted(sku for call in backend.calls for sku in call) == sorted(
        f"sku-{i}" for i in range(1, 41)
    )
    assert len(backend.calls) < 40
    assert batcher.stats.batches == len(backend.calls)
    # Shutdown closed the app's batcher.
    assert batcher.closed


async def test_unknown_products_fail_alone() -> None:
    backend = web_service.PriceBackend(latency=0.01)
    async with (
        web_service.running_server(web_service.create_app(backend)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        ok, missing = await get_all(client, ["/prices/sku-2", "/prices/nope"])
        assert (ok.status_code, ok.json()) == (200, {"sku": "sku-2", "price": 3.0})
        assert (missing.status_code, missing.json()) == (404, {"error": "no product 'nope'"})

        cart = await client.get("/cart", params=[("sku", "sku-1"), ("sku", "sku-10")])
        assert (cart.status_code, cart.json()) == (
            200,
            {"skus": ["sku-1", "sku-10"], "total": 16.5},
        )
        bad_cart = await client.get("/cart", params=[("sku", "sku-1"), ("sku", "x")])
        assert (bad_cart.status_code, bad_cart.json()) == (
            404,
            {"error": "unknown products: ['x']"},
        )


async def test_the_same_app_serves_again_with_a_fresh_batcher() -> None:
    app = web_service.create_app(web_service.PriceBackend(latency=0.001))
    batchers = []
    for _ in range(2):
        async with (
            web_service.running_server(app) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as client,
        ):
            response = await client.get("/prices/sku-3")
            assert (response.status_code, response.json()) == (200, {"sku": "sku-3", "price": 4.5})
            batchers.append(app.state.prices)
    first, second = batchers
    assert first is not second
    assert first.closed
    assert second.closed
    # What a module-level batcher closed at shutdown would do on the next startup.
    with pytest.raises(BatcherClosed):
        await first.submit("sku-3")


async def test_a_route_can_be_added() -> None:
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def count(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(web_service.prices_of(request).stats.batches))

    app = web_service.create_app(web_service.PriceBackend(latency=0.001))
    app.router.routes.append(Route("/count", count))
    async with (
        web_service.running_server(app) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        await client.get("/prices/sku-1")
        response = await client.get("/count")
        assert (response.status_code, response.text) == (200, "1")


def test_module_level_app_makes_no_batcher_at_import() -> None:
    assert isinstance(web_service.app.state.backend, web_service.PriceBackend)
    assert not hasattr(web_service.app.state, "prices")
