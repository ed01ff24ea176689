"""key + dedupe: equal items of one open batch share one sink slot."""

from __future__ import annotations

import asyncio

import pytest

from asyncbatch import Batcher

from .support import RecordingSink


async def test_equal_items_share_one_slot_and_every_waiter_gets_it() -> None:
    sink = RecordingSink()
    async with Batcher(sink, dedupe=True) as b:
        results = await b.submit_many([1, 2, 1, 3, 2, 1])
    assert results == [10, 20, 10, 30, 20, 10]
    assert sink.batches == [[1, 2, 3]]
    s = b.stats
    assert (s.submitted, s.succeeded, s.mean_batch_size) == (6, 6, 3.0)


async def test_dedupe_by_key_function() -> None:
    sink = RecordingSink(lambda items: [s.upper() for s in items])
    async with Batcher(sink, dedupe=True, key=str.lower) as b:
        results = await b.submit_many(["a", "A", "b"])
    assert results == ["A", "A", "B"]
    assert sink.batches == [["a", "b"]]


async def test_dedupe_only_within_one_open_batch() -> None:
    sink = RecordingSink()
    async with Batcher(sink, dedupe=True) as b:
        assert await b.submit(1) == 10
        assert await b.submit(1) == 10
    assert sink.batches == [[1], [1]]


async def test_dedupe_error_entry_reaches_every_waiter() -> None:
    err = KeyError("gone")
    async with Batcher(RecordingSink(lambda xs: [err for _ in xs]), dedupe=True) as b:
        results = await b.submit_many([9, 9], return_exceptions=True)
    assert results == [err, err]
    assert b.stats.failed == 2


async def test_dedupe_with_partitions_routes_results_to_the_right_callers() -> None:
    sink = RecordingSink(lambda items: [f"{p}{x}" for p, x in items])
    async with Batcher(sink, dedupe=True, partition=lambda it: it[0]) as b:
        results = await b.submit_many([("a", 1), ("b", 1), ("a", 1), ("b", 2)])
    assert results == ["a1", "b1", "a1", "b2"]
    assert sorted(map(len, sink.batches)) == [1, 2]


async def test_dedupe_needs_hashable_items_or_key() -> None:
    async with Batcher(RecordingSink(lambda xs: [0 for _ in xs]), dedupe=True) as b:
        with pytest.raises(TypeError, match="hashable"):
            await b.submit([1])
        f = b.submit_nowait(1)
        with pytest.raises(TypeError, match="hashable"):
            b.submit_nowait([1])
        assert await f == 0


async def test_dedupe_none_is_a_valid_key() -> None:
    sink = RecordingSink(lambda xs: ["x" for _ in xs])
    async with Batcher(sink, dedupe=True, key=lambda x: None) as b:
        assert await b.submit_many([1, 2]) == ["x", "x"]
    assert sink.batches == [[1]]


@pytest.mark.looptime
async def test_dedupe_all_waiters_cancel_withdraws_the_slot() -> None:
    sink = RecordingSink()
    b = Batcher(sink, dedupe=True, max_wait=1)
    f1, f2, f3 = b.submit_nowait(1), b.submit_nowait(1), b.submit_nowait(2)
    f1.cancel()
    f2.cancel()
    assert await f3 == 20
    assert sink.batches == [[2]]
    assert b.stats.cancelled == 2
    await b.aclose()
    await asyncio.sleep(0)
