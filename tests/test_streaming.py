"""Streaming per-item results: async generator sinks, submit_stream, @batch, END."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asyncbatch import (
    END,
    Batcher,
    BatcherClosed,
    ResultMismatch,
    Retry,
    StreamingBatchedFunction,
    batch,
)

from .support import settle

pytestmark = pytest.mark.looptime


class Decoder:
    """A batched generator: step k yields f"{p}{k}" for each prompt, ``steps`` steps."""

    def __init__(self, steps: int = 3, step_cost: float = 0.1) -> None:
        self.steps = steps
        self.step_cost = step_cost
        self.batches: list[list[str]] = []
        self.closed = 0
        self.done = 0

    async def __call__(self, prompts: list[str]) -> AsyncIterator[list[object]]:
        self.batches.append(list(prompts))
        try:
            for k in range(self.steps):
                await asyncio.sleep(self.step_cost)
                yield [self.entry(p, k) for p in prompts]
            self.done += 1
        except GeneratorExit:
            self.closed += 1
            raise

    def entry(self, prompt: str, k: int) -> object:
        if prompt.startswith("end") and k == 1:
            return END
        if prompt.startswith("bad") and k == 1:
            return ValueError(f"bad {prompt}")
        return f"{prompt}{k}"


def streaming(sink: Any, **options: Any) -> Batcher[str, Any]:
    """A Batcher of a generator sink, typed for these tests."""
    return Batcher(sink, **options)


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [value async for value in stream]


async def test_each_caller_gets_its_own_entries_in_order() -> None:
    decoder = Decoder()
    b = streaming(decoder, max_size=8)
    results = await asyncio.gather(*(collect(b.submit_stream(p)) for p in ("a", "b", "c")))
    assert results == [["a0", "a1", "a2"], ["b0", "b1", "b2"], ["c0", "c1", "c2"]]
    assert decoder.batches == [["a", "b", "c"]]
    await b.aclose()
    s = b.stats
    assert (s.submitted, s.succeeded, s.batches) == (3, 3, 1)


async def test_end_and_exception_entries_end_only_their_stream() -> None:
    b = streaming(Decoder(), max_size=8)
    ok, ended, bad = list(
        await asyncio.gather(
            collect(b.submit_stream("a")),
            collect(b.submit_stream("end")),
            collect(b.submit_stream("bad")),
            return_exceptions=True,
        )
    )
    assert ok == ["a0", "a1", "a2"]
    assert ended == ["end0"]
    assert isinstance(bad, ValueError)
    assert str(bad) == "bad bad"
    await b.aclose()
    s = b.stats
    assert (s.succeeded, s.failed) == (2, 1)


async def test_a_caller_that_leaves_affects_nobody_and_the_last_one_closes_the_generator() -> None:
    decoder = Decoder(steps=10)
    b = streaming(decoder, max_size=8)

    async def leave_after(n: int, prompt: str) -> list[str]:
        got: list[str] = []
        async with contextlib.aclosing(b.submit_stream(prompt)) as stream:
            async for value in stream:
                got.append(value)
                if len(got) == n:
                    break
        return got

    assert list(await asyncio.gather(leave_after(1, "x"), leave_after(3, "y"))) == [
        ["x0"],
        ["y0", "y1", "y2"],
    ]
    await asyncio.sleep(0.5)  # the step in progress ends; then the generator is closed
    assert decoder.closed == 1  # every caller left: aclose()d, not run to its end
    assert decoder.done == 0
    assert b.stats.in_flight == 0
    await b.aclose()
    assert b.stats.cancelled == 2


async def test_a_timeout_around_a_stream_only_ends_that_caller() -> None:
    b = streaming(Decoder(steps=3, step_cost=1.0), max_size=8)

    async def impatient() -> list[str]:
        got: list[str] = []
        with contextlib.suppress(TimeoutError):
            async with (
                asyncio.timeout(1.5),
                contextlib.aclosing(b.submit_stream("i")) as s,
            ):
                async for value in s:
                    got.append(value)
        return got

    slow, patient = await asyncio.gather(impatient(), collect(b.submit_stream("p")))
    assert (slow, patient) == (["i0"], ["p0", "p1", "p2"])
    await b.aclose()


async def test_items_cancelled_before_dispatch_never_reach_the_generator() -> None:
    decoder = Decoder()
    b = streaming(decoder, max_size=8, max_wait=1.0)
    gone = asyncio.create_task(collect(b.submit_stream("gone")))
    kept = asyncio.create_task(collect(b.submit_stream("kept")))
    await settle()
    gone.cancel()
    assert await kept == ["kept0", "kept1", "kept2"]
    assert decoder.batches == [["kept"]]
    await b.aclose()


async def test_a_raising_generator_fails_every_open_stream() -> None:
    async def broken(items: list[str]) -> AsyncIterator[list[str]]:
        yield [f"{x}0" for x in items]
        raise ConnectionError("model crashed")

    b = streaming(broken, max_size=8)
    got: list[str] = []

    async def client(p: str) -> None:
        async for value in b.submit_stream(p):
            got.append(value)

    results = await asyncio.gather(client("a"), client("b"), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError, ConnectionError]
    assert got == ["a0", "b0"]
    await b.aclose()


async def test_a_step_of_the_wrong_length_is_a_result_mismatch() -> None:
    async def short(items: list[str]) -> AsyncIterator[list[str]]:
        yield items[:1]

    b = streaming(short, max_size=8)
    results = await asyncio.gather(
        collect(b.submit_stream("a")), collect(b.submit_stream("b")), return_exceptions=True
    )
    assert all(isinstance(r, ResultMismatch) for r in results)
    await b.aclose()


async def test_retry_applies_only_before_the_first_step() -> None:
    calls = 0

    async def flaky(items: list[str]) -> AsyncIterator[list[str]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("not ready")
        yield [f"{x}0" for x in items]
        if calls == 2:
            raise ConnectionError("mid-stream")
        yield [f"{x}1" for x in items]  # pragma: no cover - never reached

    b = streaming(flaky, max_size=8, retry=Retry(attempts=5, backoff=0))
    got: list[str] = []

    async def client() -> None:
        async for value in b.submit_stream("a"):
            got.append(value)

    with pytest.raises(ConnectionError, match="mid-stream"):
        await client()
    assert (got, calls) == (["a0"], 2)
    await b.aclose()


async def test_timeout_bounds_each_step() -> None:
    b = streaming(Decoder(steps=3, step_cost=2.0), max_size=8, timeout=1.0)
    with pytest.raises(TimeoutError, match="did not answer within"):
        await collect(b.submit_stream("a"))
    fast = streaming(Decoder(steps=3, step_cost=0.5), max_size=8, timeout=1.0)
    assert await collect(fast.submit_stream("a")) == ["a0", "a1", "a2"]  # 1.5 s in all
    await b.aclose()
    await fast.aclose()


async def test_partitions_and_concurrency() -> None:
    decoder = Decoder(steps=2)
    b = streaming(decoder, max_size=8, max_concurrency=2, partition=lambda p: p[0])
    results = await asyncio.gather(*(collect(b.submit_stream(p)) for p in ("a1", "b1", "a2")))
    assert results == [["a10", "a11"], ["b10", "b11"], ["a20", "a21"]]
    assert sorted(map(sorted, decoder.batches)) == [["a1", "a2"], ["b1"]]
    await b.aclose()


async def test_aclose_drains_streams_and_cancel_fails_them() -> None:
    b = streaming(Decoder(steps=3, step_cost=1.0), max_size=8)
    t = asyncio.create_task(collect(b.submit_stream("a")))
    await settle()
    await b.aclose()
    assert await t == ["a0", "a1", "a2"]

    c = streaming(Decoder(steps=3, step_cost=1.0), max_size=8)
    got: list[str] = []

    async def client() -> None:
        async for value in c.submit_stream("a"):
            got.append(value)

    task = asyncio.create_task(client())
    await asyncio.sleep(1.5)
    await c.aclose(cancel=True)
    with pytest.raises(BatcherClosed):
        await task
    assert got == ["a0"]


async def test_submit_on_a_streaming_batcher_and_submit_stream_on_a_plain_one() -> None:
    b = streaming(Decoder())
    for call in (lambda: b.submit("x"), lambda: b.submit_many(["x"])):
        with pytest.raises(TypeError, match=r"use `async for value in batcher.submit_stream"):
            await call()
    for sync in (b.submit_nowait, b.put_nowait):
        with pytest.raises(TypeError, match="streaming sink"):
            sync("x")
    with pytest.raises(TypeError, match="streaming sink"):
        await b.put("x")

    async def plain(items: list[int]) -> list[int]:
        return items

    p = Batcher(plain)
    with pytest.raises(TypeError, match="needs a streaming sink"):
        await collect(p.submit_stream(1))
    await b.aclose()
    await p.aclose()


async def test_batch_decorator_on_an_async_generator_function() -> None:
    batches: list[list[str]] = []

    @batch(max_size=8)
    async def generate(prompts: list[str]) -> AsyncIterator[list[str]]:
        batches.append(list(prompts))
        for k in range(2):
            yield [f"{p}{k}" for p in prompts]

    assert isinstance(generate, StreamingBatchedFunction)
    results = await asyncio.gather(collect(generate("a")), collect(generate("b")))
    assert list(results) == [["a0", "a1"], ["b0", "b1"]]
    assert batches == [["a", "b"]]
    assert generate.stats.succeeded == 2
    await generate.aclose()
    assert repr(generate).startswith("<batched generator function")


def test_batch_decorator_refuses_streaming_methods() -> None:
    with pytest.raises(TypeError, match="streaming methods are not supported"):

        class Model:
            @batch()  # type: ignore[arg-type]
            async def generate(self, prompts: list[str]) -> AsyncIterator[list[str]]:
                yield prompts


async def test_end_is_a_named_singleton() -> None:
    import pickle

    assert repr(END) == "asyncbatch.END"
    assert pickle.loads(pickle.dumps(END)) is END


# ------------------------------------------- found by the second attack round


async def test_leaving_after_an_error_entry_leaves_nothing_unretrieved() -> None:
    async def gen(items: list[str]) -> AsyncIterator[list[object]]:
        yield [f"{i}:0" for i in items]
        yield [ValueError(f"bad {i}") for i in items]

    b = streaming(gen, max_size=8)
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))

    async def first_only(i: str) -> str:
        async with contextlib.aclosing(b.submit_stream(i)) as s:
            async for x in s:
                await asyncio.sleep(0.01)  # the error arrives meanwhile
                return str(x)
        return "none"

    assert list(await asyncio.gather(first_only("a"), first_only("b"))) == ["a:0", "b:0"]
    await b.aclose()
    await settle()  # a Stream nobody retrieved would be reported as it is freed
    assert errors == []


async def test_submit_stream_from_its_own_generator_beyond_the_slots_raises() -> None:
    async def gen(items: list[str]) -> AsyncIterator[list[str]]:
        if items[0] == "outer":
            inner = [x async for x in b.submit_stream("inner")]
            yield [",".join(inner)]
        else:
            yield items

    b = streaming(gen, max_size=1)
    with pytest.raises(RuntimeError, match=r"submit_stream\(\) of its own batcher"):
        await collect(b.submit_stream("outer"))
    await b.aclose()


async def test_a_generator_raising_cancelled_error_itself_fails_its_streams() -> None:
    async def gen(items: list[str]) -> AsyncIterator[list[str]]:
        yield items
        raise asyncio.CancelledError("from inside")

    b = streaming(gen, max_size=8)
    with pytest.raises(RuntimeError, match="raised CancelledError without being cancelled"):
        await collect(b.submit_stream("a"))
    await b.aclose()


async def test_put_from_the_sink_waiting_for_room_does_not_deadlock() -> None:
    seen: list[list[int]] = []

    async def sink(items: list[int]) -> None:
        seen.append(list(items))
        if items == [0]:
            await b.put(100)
            await b.put(101)  # no room until a batch goes: a slot is lent for it

    b: Batcher[int, None] = Batcher(sink, max_size=1, max_pending=1)
    await asyncio.wait_for(b.submit(0), 5)
    await b.aclose()
    assert seen == [[0], [100], [101]]
