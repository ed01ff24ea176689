"""Cancellation and expiry: withdrawn before dispatch, dropped after."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from asyncbatch import Batcher

from .support import RecordingSink, settle

pytestmark = pytest.mark.looptime


async def test_cancel_before_dispatch_withdraws_the_item() -> None:
    sink = RecordingSink()
    b = Batcher(sink, max_size=10, max_wait=1.0)
    t1 = asyncio.create_task(b.submit(1))
    t2 = asyncio.create_task(b.submit(2))
    t3 = asyncio.create_task(b.submit(3))
    await settle()
    t2.cancel()
    assert await t1 == 10
    assert await t3 == 30
    with pytest.raises(asyncio.CancelledError):
        await t2
    assert sink.batches == [[1, 3]]
    s = b.stats
    assert (s.submitted, s.succeeded, s.cancelled, s.pending) == (3, 2, 1, 0)
    await b.aclose()


async def test_cancel_releases_room_at_once() -> None:
    b = Batcher(RecordingSink(), max_size=10, max_wait=1.0, max_pending=3)
    t1 = asyncio.create_task(b.submit(1))
    t2 = asyncio.create_task(b.submit(2))
    await settle()
    assert b.stats.pending == 2
    t1.cancel()
    await settle()
    assert b.stats.pending == 1
    assert b.stats.cancelled == 1
    f3 = b.submit_nowait(3)
    f4 = b.submit_nowait(4)  # fits only because 1's room was released
    assert list(await asyncio.gather(t2, f3, f4)) == [20, 30, 40]
    await b.aclose()


@pytest.mark.parametrize("dedupe", [False, True])
async def test_cancel_of_a_slots_only_caller_releases_room_with_dedupe(dedupe: bool) -> None:
    # ../shared/cases/faults/dedupe_cancel_room_not_released.py
    b = Batcher(
        RecordingSink(),
        max_size=100,
        max_wait=1.0,
        max_pending=4,
        overflow="reject",
        dedupe=dedupe,
    )
    ta = asyncio.create_task(b.submit(1))
    tb = asyncio.create_task(b.submit(2))
    tc = asyncio.create_task(b.submit(2))  # with dedupe: coalesced into 2's slot
    await settle()
    assert b.stats.pending == (2 if dedupe else 3)
    ta.cancel()
    tb.cancel()  # with dedupe, 2's slot keeps its room: tc still waits on it
    await asyncio.gather(ta, tb, return_exceptions=True)
    assert b.stats.pending == 1
    f = b.submit_nowait(5)
    assert list(await asyncio.gather(tc, f)) == [20, 50]
    assert b.stats.cancelled == 2
    await b.aclose()


async def test_cancelled_nowait_future_is_withdrawn_at_dispatch() -> None:
    sink = RecordingSink()
    b = Batcher(sink, max_size=10, max_wait=1.0)
    f1 = b.submit_nowait(1)
    f2 = b.submit_nowait(2)
    f1.cancel()
    assert await f2 == 20
    assert sink.batches == [[2]]
    assert b.stats.cancelled == 1
    await b.aclose()


async def test_all_cancelled_batch_never_calls_the_sink() -> None:
    sink = RecordingSink()
    b = Batcher(sink, max_wait=1.0)
    f = b.submit_nowait(1)
    f.cancel()
    await asyncio.sleep(2)
    await b.flush()
    assert sink.batches == []
    assert b.stats.batches == 0
    assert b.stats.cancelled == 1
    await b.aclose()


async def test_cancel_after_dispatch_drops_the_result_only() -> None:
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_size=10)
    t1 = asyncio.create_task(b.submit(1))
    t2 = asyncio.create_task(b.submit(2))
    await asyncio.sleep(0.5)  # in flight
    t1.cancel()
    assert await t2 == 20
    with pytest.raises(asyncio.CancelledError):
        await t1
    assert sink.batches == [[1, 2]]
    s = b.stats
    assert (s.succeeded, s.cancelled, s.failed, s.in_flight) == (1, 1, 0, 0)
    await b.aclose()


async def test_per_item_timeout_before_dispatch_expires_and_withdraws() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink()
    b = Batcher(sink, max_wait=5.0)
    t0 = loop.time()
    other = b.submit_nowait(2)
    with pytest.raises(TimeoutError, match="within 1"):
        await b.submit(1, timeout=1.0)
    assert loop.time() == pytest.approx(t0 + 1.0)
    assert await other == 20
    assert sink.batches == [[2]]
    s = b.stats
    assert (s.expired, s.cancelled, s.succeeded, s.pending) == (1, 0, 1, 0)
    await b.aclose()


async def test_per_item_timeout_after_dispatch_drops_result() -> None:
    sink = RecordingSink(delay=3.0)
    b = Batcher(sink)
    with pytest.raises(TimeoutError):
        await b.submit(1, timeout=1.0)
    await b.flush()
    assert sink.batches == [[1]]
    assert (b.stats.expired, b.stats.succeeded) == (1, 0)
    await b.aclose()


async def test_per_item_timeout_not_reached() -> None:
    async with Batcher(RecordingSink(delay=0.5)) as b:
        assert await b.submit(1, timeout=1.0) == 10
    assert b.stats.expired == 0


async def test_asyncio_timeout_counts_as_cancelled() -> None:
    sink = RecordingSink()
    b = Batcher(sink, max_wait=5.0)
    keep = b.submit_nowait(2)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await b.submit(1)
    assert await keep == 20
    assert sink.batches == [[2]]
    assert (b.stats.cancelled, b.stats.expired) == (1, 0)
    await b.aclose()


async def test_wait_for_withdraws() -> None:
    sink = RecordingSink()
    b = Batcher(sink, max_wait=5.0)
    keep = b.submit_nowait(2)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(b.submit(1), 1.0)
    assert await keep == 20
    assert sink.batches == [[2]]
    await b.aclose()


async def test_anyio_cancel_scope_withdraws() -> None:
    sink = RecordingSink()
    b = Batcher(sink, max_wait=5.0)
    keep = b.submit_nowait(2)
    with anyio.move_on_after(1.0) as scope:
        await b.submit(1)
    assert scope.cancelled_caught
    assert await keep == 20
    assert sink.batches == [[2]]
    assert b.stats.cancelled == 1
    await b.aclose()


async def test_submit_many_cancelled_withdraws_everything_pending() -> None:
    sink = RecordingSink()
    b = Batcher(sink, max_wait=5.0)
    task = asyncio.create_task(b.submit_many([1, 2, 3]))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await b.flush()
    assert sink.batches == []
    assert b.stats.cancelled == 3
    await b.aclose()


async def test_cancellation_of_one_does_not_disturb_dedupe_partners() -> None:
    sink = RecordingSink()
    b = Batcher(sink, max_wait=1.0, dedupe=True)
    t1 = asyncio.create_task(b.submit(7))
    t2 = asyncio.create_task(b.submit(7))
    await settle()
    t1.cancel()
    assert await t2 == 70
    assert sink.batches == [[7]]
    s = b.stats
    assert (s.submitted, s.succeeded, s.cancelled) == (2, 1, 1)
    await b.aclose()
