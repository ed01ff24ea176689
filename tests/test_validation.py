"""Every option is checked where it is given: type, range, finiteness, progress."""

from __future__ import annotations

import asyncio
import functools
import math
from typing import Any

import pytest

from asyncbatch import Batcher, Retry

from .support import RecordingSink


async def sink(items: list[int]) -> list[int]:
    return items


@pytest.mark.parametrize(
    ("option", "value", "error", "message"),
    [
        ("max_size", 1.0, TypeError, "max_size must be an int, got 1.0"),
        ("max_size", 0, ValueError, "max_size must be >= 1, got 0"),
        ("max_size", True, TypeError, "max_size must be an int"),
        ("max_concurrency", 2.0, TypeError, "max_concurrency must be an int, got 2.0"),
        ("max_concurrency", 0, ValueError, "max_concurrency must be >= 1"),
        ("max_concurrency", math.inf, TypeError, "max_concurrency must be an int"),
        ("max_pending", 10.0, TypeError, "max_pending must be an int"),
        ("max_pending", 0, ValueError, "max_pending must be >= 1"),
        ("max_wait", -1, ValueError, "max_wait must be >= 0"),
        ("max_wait", math.nan, ValueError, "max_wait must be >= 0, got nan"),
        ("max_wait", "1", TypeError, "max_wait must be a number"),
        ("interval", math.inf, ValueError, "interval must be finite"),
        ("interval", 0, ValueError, "interval must be > 0"),
        ("timeout", 0, ValueError, "timeout must be > 0"),
        ("timeout", math.nan, ValueError, "timeout must be > 0"),
        ("overflow", "drop_newest", ValueError, "overflow must be one of"),
        ("retry", 3, TypeError, "retry must be a Retry"),
    ],
)
def test_bad_batcher_options(option: str, value: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        Batcher(sink, **{option: value})


def test_bad_weight_options() -> None:
    with pytest.raises(ValueError, match="max_weight must be > 0"):
        Batcher(sink, max_weight=0, weigh=float)
    with pytest.raises(ValueError, match="max_weight needs weigh="):
        Batcher(sink, max_weight=10)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"attempts": 1.0}, TypeError, "Retry.attempts must be an int"),
        ({"attempts": 0}, ValueError, "Retry.attempts must be >= 1"),
        ({"attempts": math.nan}, TypeError, "Retry.attempts must be an int"),
        ({"backoff": math.inf}, ValueError, "Retry.backoff must be finite and >= 0"),
        ({"backoff": -1}, ValueError, "Retry.backoff must be finite and >= 0"),
        ({"max_backoff": math.nan}, ValueError, "Retry.max_backoff must be finite"),
        ({"backoff": "1"}, TypeError, "Retry.backoff must be a number"),
        ({"jitter": 1}, TypeError, "Retry.jitter must be a bool"),
        ({"isolate": "yes"}, TypeError, "Retry.isolate must be a bool"),
        ({"retry_on": ValueError("x")}, TypeError, "Retry.retry_on must be exception types"),
    ],
)
def test_bad_retry_options(options: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        Retry(**options)


@pytest.mark.looptime
async def test_documented_no_limits() -> None:
    rec = RecordingSink()
    b = Batcher(rec, max_wait=math.inf, timeout=math.inf, max_concurrency=None)
    f = b.submit_nowait(1)
    t = asyncio.create_task(b.submit(2, timeout=math.inf))
    await asyncio.sleep(3600)
    assert not f.done()  # no linger deadline: it waits for size, flush or close
    assert b.stats.concurrency_limit == 0
    await b.aclose()
    assert (f.result(), await t) == (10, 20)
    assert rec.batches == [[1, 2]]
    assert Retry(attempts=math.inf).attempts == math.inf


async def test_submit_timeout_is_checked_before_anything_changes() -> None:
    b = Batcher(sink, max_wait=1.0)
    for bad, error in ((0, ValueError), (-1, ValueError), (math.nan, ValueError), ("1", TypeError)):
        with pytest.raises(error):
            await b.submit(1, timeout=bad)  # type: ignore[arg-type]
    assert b.stats.pending == 0
    await b.aclose()


def write_rows(rows: list[int]) -> list[int]:
    return rows


class Writer:
    def write(self, rows: list[int]) -> list[int]:
        return rows

    async def awrite(self, rows: list[int]) -> list[int]:
        return rows


@pytest.mark.parametrize(
    "bad",
    [
        write_rows,
        lambda rows: rows,
        Writer().write,
        functools.partial(write_rows),
    ],
    ids=["def", "lambda", "method", "partial"],
)
def test_a_plain_function_sink_is_refused_at_construction(bad: Any) -> None:
    # ../shared/cases/friction/sync_sink.py
    with pytest.raises(TypeError, match=r"is a plain function; a Batcher sink must be an async"):
        Batcher(bad, retry=Retry(attempts=3, backoff=0))


async def test_an_async_generator_sink_streams_and_refuses_submit() -> None:
    async def gen(items: list[int]) -> Any:
        yield items

    b = Batcher(gen)
    with pytest.raises(TypeError, match=r"use `async for value in batcher\.submit_stream"):
        await b.submit(1)
    await b.aclose()


@pytest.mark.parametrize(
    "good",
    [sink, Writer().awrite, functools.partial(sink), RecordingSink()],
    ids=["async def", "async method", "partial", "async __call__"],
)
def test_async_sinks_are_accepted(good: Any) -> None:
    Batcher(good)


async def test_a_callable_answering_a_non_awaitable_fails_its_batch_once() -> None:
    calls = 0

    class Sync:
        def __call__(self, items: list[int]) -> list[int]:
            nonlocal calls
            calls += 1
            return items

    b: Batcher[int, int] = Batcher(Sync(), retry=Retry(attempts=3, backoff=0, isolate=True))  # type: ignore[arg-type]
    results = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
    assert all(isinstance(r, TypeError) and "not an awaitable" in str(r) for r in results)
    assert calls == 1  # not retried, not bisected
    await b.aclose()
