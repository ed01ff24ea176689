"""The token streaming example over real HTTP: server-sent events from a batched decoder.

The server (uvicorn, in this test's event loop) listens on 127.0.0.1 on a port
the OS picks, and is stopped before each test ends. No timing is asserted:
only tokens, how streams end, and how many decoder calls served them.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from asyncbatch import Batcher

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import token_streaming as ts

pytestmark = pytest.mark.realtime

PROMPTS = [
    "one",
    "two words",
    "a prompt of five words",
    "the quick brown fox jumps over",
    "x y z",
    "hello brave new world",
]


def client_for(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=30.0)


def catch_loop_errors() -> list[dict[str, Any]]:
    """What reaches the running loop's exception handler ("never retrieved" & co)."""
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    return errors


async def wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    """Poll ``condition`` until it holds (fails the test after ``seconds``)."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not true within {seconds} s")


def batcher_of(app: Any) -> Batcher[str, str]:
    batcher = app.state.batcher
    assert isinstance(batcher, Batcher)
    return batcher


async def test_each_client_gets_its_own_tokens_from_shared_decoder_steps() -> None:
    errors = catch_loop_errors()
    decoder = ts.Decoder(fixed=0.01, per_prompt=0.001)
    # One call at a time, the first prompt waits 0.2 s for companions: clients
    # arriving together share calls, however loaded the machine is.
    app = ts.create_app(decoder, max_wait=0.2, max_concurrency=1)
    async with ts.running_server(app) as url, client_for(url) as client:
        assert url.startswith("http://127.0.0.1:")
        results = await asyncio.gather(*(ts.stream_tokens(client, p) for p in PROMPTS))
        batcher = batcher_of(app)
    assert [(r.ended, r.tokens) for r in results] == [("end", ts.completion(p)) for p in PROMPTS]
    assert ts.completion("hello brave new world") == ["HELLO", "BRAVE", "NEW", "WORLD"]
    assert all(r.first_token is not None for r in results)
    # Batched: fewer decoder calls than clients, each prompt in exactly one call.
    assert 1 <= len(decoder.calls) < len(PROMPTS)
    assert sorted(p for call in decoder.calls for p in call) == sorted(PROMPTS)
    # Each call ran as many steps as its longest completion, no more.
    assert decoder.steps == sum(max(len(ts.completion(p)) for p in c) for c in decoder.calls)
    assert (decoder.completed, decoder.abandoned) == (len(decoder.calls), 0)
    s = batcher.stats
    assert (s.submitted, s.succeeded, s.failed, s.cancelled) == (len(PROMPTS), len(PROMPTS), 0, 0)
    assert s.batches == len(decoder.calls)
    assert batcher.closed  # shutdown closed the app's batcher
    assert errors == []


async def test_a_client_that_disconnects_early_does_not_disturb_the_others() -> None:
    errors = catch_loop_errors()
    decoder = ts.Decoder(fixed=0.005, per_prompt=0.0005)
    app = ts.create_app(decoder, max_wait=0.2, max_concurrency=1)
    endless = " ".join(f"w{k}" for k in range(20_000))  # 100 s if nobody stopped it
    async with ts.running_server(app) as url, client_for(url) as client:
        batcher = batcher_of(app)
        quitter, *others = await asyncio.gather(
            ts.stream_tokens(client, endless, stop_after=2),
            *(ts.stream_tokens(client, p) for p in PROMPTS),
        )
        assert (quitter.ended, quitter.tokens) == ("left", ["W0", "W1"])
        assert [(r.ended, r.tokens) for r in others] == [("end", ts.completion(p)) for p in PROMPTS]
        # The server saw the disconnect: the quitter's stream was dropped and
        # its decoder call closed (after the step in progress), not run to its end.
        await wait_for(lambda: batcher.stats.in_flight == 0 and decoder.abandoned == 1)
        assert decoder.completed == len(decoder.calls) - 1
        assert decoder.steps < 1000
        assert batcher.stats.cancelled == 1
        # The service carries on.
        after = await ts.stream_tokens(client, "still here")
        assert (after.ended, after.tokens) == ("end", ["STILL", "HERE"])
    s = batcher.stats
    assert (s.submitted, s.succeeded, s.cancelled, s.failed) == (8, 7, 1, 0)
    assert batcher.closed
    assert errors == []


async def test_shutdown_lets_a_stream_in_flight_finish_then_closes_the_batcher() -> None:
    errors = catch_loop_errors()
    decoder = ts.Decoder(fixed=0.01, per_prompt=0.001)
    app = ts.create_app(decoder)
    prompt = " ".join(f"t{k}" for k in range(30))
    async with httpx.AsyncClient(timeout=30.0) as client:
        async with ts.running_server(app) as url:
            client.base_url = httpx.URL(url)
            streaming = asyncio.create_task(ts.stream_tokens(client, prompt))
            await wait_for(lambda: decoder.steps >= 1)
            batcher = batcher_of(app)
            assert not batcher_of(app).closed
        # The server stopped: it finished the response in progress, then the
        # lifespan closed (drained) the batcher.
        got = await streaming
        assert (got.ended, got.tokens) == ("end", ts.completion(prompt))
        assert batcher.closed
        assert (decoder.completed, decoder.abandoned) == (1, 0)
        s = batcher.stats
        assert (s.submitted, s.succeeded, s.in_flight) == (1, 1, 0)
        # The same app serves again, with a fresh batcher made at its startup.
        async with ts.running_server(app) as url:
            client.base_url = httpx.URL(url)
            again = await ts.stream_tokens(client, "once more")
            assert batcher_of(app) is not batcher
        assert (again.ended, again.tokens) == ("end", ["ONCE", "MORE"])
        assert batcher_of(app).closed
    assert errors == []


async def test_the_unbatched_route_calls_the_decoder_once_per_client() -> None:
    decoder = ts.Decoder(fixed=0.002, per_prompt=0.0005)
    async with ts.running_server(ts.create_app(decoder)) as url, client_for(url) as client:
        results = await asyncio.gather(
            *(ts.stream_tokens(client, p, mode="unbatched") for p in PROMPTS[:3])
        )
    assert [(r.ended, r.tokens) for r in results] == [
        ("end", ts.completion(p)) for p in PROMPTS[:3]
    ]
    assert sorted(decoder.calls) == sorted([p] for p in PROMPTS[:3])


def test_main_reports_both_routes(capsys: pytest.CaptureFixture[str]) -> None:
    report = ts.main(["--clients", "3", "--tokens", "2", "--a", "0.002", "--b", "0.0005"])
    assert [row.mode for row in report.rows] == ["batched", "unbatched"]
    for row in report.rows:
        assert (row.clients, row.tokens) == (3, 6)
        assert row.seconds > 0
        assert 0 < row.ttft_p50 <= row.ttft_p99
        assert row.tokens_per_s > 0
    batched, unbatched = report.of("batched"), report.of("unbatched")
    assert 1 <= batched.decoder_calls <= 3
    assert (unbatched.decoder_calls, unbatched.decoder_steps) == (3, 6)
    assert (report.fixed, report.per_prompt) == (0.002, 0.0005)
    out = capsys.readouterr().out
    assert "TTFT p50" in out
    assert "tokens/s" in out
    assert out.count("\n") >= 4


async def test_aclosing_a_batch_decorated_stream_leaves_at_once() -> None:
    from asyncbatch import batch

    @batch(max_size=8)
    async def generate(prompts: list[str]) -> AsyncGenerator[list[str], None]:
        for k in range(100):
            await asyncio.sleep(0.01)
            yield [f"{p}{k}" for p in prompts]

    # f(item) is an async generator, typed as an AsyncIterator.
    stream = cast(AsyncGenerator[str, None], generate("a"))
    async with contextlib.aclosing(stream) as tokens:
        async for _ in tokens:
            break
    try:
        assert generate.stats.cancelled == 1  # as it is for Batcher.submit_stream
    finally:
        await generate.aclose()
