"""max_pending and the overflow policies; submit_nowait never waits."""

from __future__ import annotations

import asyncio

import pytest

from asyncbatch import Batcher, BatcherClosed, QueueFull

from .support import RecordingSink, settle

pytestmark = pytest.mark.looptime


async def test_room_running_out_makes_the_open_batch_due() -> None:
    # A batch that cannot grow because room ran out is as full as it gets:
    # it goes at once (reason "size") instead of lingering for max_wait.
    sink = RecordingSink()
    b = Batcher(sink, max_size=100, max_wait=1.0, max_pending=2, overflow="reject")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    futs = [b.submit_nowait(i) for i in range(3)]  # the third finds no room: [0, 1] goes
    assert list(await asyncio.gather(*futs[:2])) == [0, 10]
    assert loop.time() == t0
    assert await futs[2] == 20
    assert sink.batches == [[0, 1], [2]]
    assert b.stats.reasons == {"size": 1, "wait": 1}
    assert b.stats.rejected == 0
    await b.aclose()


async def test_reject_raises_at_once_and_counts() -> None:
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_wait=1.0, max_pending=2, overflow="reject")
    # 1 and 2 go when 3 finds no room; 3 and 4 then wait for the busy slot.
    futs = [b.submit_nowait(i) for i in range(1, 5)]
    with pytest.raises(QueueFull, match="max_pending=2"):
        await b.submit(5)
    assert b.stats.rejected == 1
    assert list(await asyncio.gather(*futs)) == [10, 20, 30, 40]
    assert sink.batches == [[1, 2], [3, 4]]
    assert await b.submit(5) == 50  # room again
    await b.aclose()


async def test_submit_nowait_raises_queue_full_even_under_block() -> None:
    b = Batcher(RecordingSink(delay=1.0), max_wait=1.0, max_pending=1, overflow="block")
    f1 = b.submit_nowait(1)
    f2 = b.submit_nowait(2)  # [1] goes to make room
    with pytest.raises(QueueFull):
        b.submit_nowait(3)  # [2] is due, but the only slot is busy
    assert b.stats.rejected == 1
    assert list(await asyncio.gather(f1, f2)) == [10, 20]
    await b.aclose()


async def test_block_waits_for_room_in_fifo_order() -> None:
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_size=2, max_pending=2, max_concurrency=1)
    order: list[int] = []

    async def caller(i: int) -> None:
        await b.submit(i)
        order.append(i)

    tasks = []
    for i in range(8):
        tasks.append(asyncio.create_task(caller(i)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert sink.items == list(range(8))  # accepted first come, first served
    assert b.stats.peak_pending <= 2
    await b.aclose()


async def test_block_timeout_while_waiting_for_room() -> None:
    b = Batcher(RecordingSink(delay=10), max_size=1, max_pending=1)
    first = b.submit_nowait(1)  # in flight
    await settle()
    second = b.submit_nowait(2)  # pending, slot busy
    with pytest.raises(TimeoutError, match="no room"):
        await b.submit(3, timeout=1.0)
    assert b.stats.rejected == 1
    await asyncio.gather(first, second)
    await b.aclose()


async def test_cancelled_blocked_submitter_passes_its_turn() -> None:
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_size=1, max_pending=1)
    b.submit_nowait(0)
    await settle()
    b.submit_nowait(1)  # fills the room
    blocked = asyncio.create_task(b.submit(2))
    after = asyncio.create_task(b.submit(3))
    await settle()
    blocked.cancel()
    assert await after == 30
    assert 2 not in sink.items
    await b.aclose()


async def test_drop_oldest_fails_the_oldest_pending_item() -> None:
    sink = RecordingSink()
    b = Batcher(sink, max_size=10, max_wait=1.0, max_pending=3, overflow="drop_oldest")
    futs = [b.submit_nowait(i) for i in range(5)]
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert isinstance(results[0], QueueFull)
    assert isinstance(results[1], QueueFull)
    assert "drop_oldest" in str(results[0])
    assert results[2:] == [20, 30, 40]
    assert sink.batches == [[2, 3, 4]]
    s = b.stats
    assert (s.dropped, s.succeeded, s.submitted, s.peak_pending) == (2, 3, 5, 3)
    await b.aclose()


async def test_drop_oldest_across_partitions() -> None:
    # The oldest item overall goes first, whichever batch it is in.
    sink = RecordingSink()
    b = Batcher(sink, max_wait=1.0, max_pending=3, overflow="drop_oldest", partition=lambda x: x[0])
    futs = {}
    for name in ["A1", "B1", "A2"]:
        futs[name] = b.submit_nowait(name)
        await asyncio.sleep(0.01)
    futs["C1"] = b.submit_nowait("C1")
    futs["C2"] = b.submit_nowait("C2")
    dropped = [n for n, f in futs.items() if f.done() and isinstance(f.exception(), QueueFull)]
    assert dropped == ["A1", "B1"]
    await b.aclose()
    assert [futs[n].result() for n in ("A2", "C1", "C2")] == ["A2" * 10, "C1" * 10, "C2" * 10]
    assert sorted(map(sorted, sink.batches)) == [["A2"], ["C1", "C2"]]


async def test_drop_oldest_reclaims_withdrawn_room_before_dropping() -> None:
    b = Batcher(RecordingSink(), max_wait=1.0, max_pending=2, overflow="drop_oldest")
    f0 = b.submit_nowait(0)
    f1 = b.submit_nowait(1)
    f0.cancel()  # not yet swept: still occupies room
    f2 = b.submit_nowait(2)
    assert list(await asyncio.gather(f1, f2)) == [10, 20]
    assert b.stats.dropped == 0
    await b.aclose()


async def test_dedupe_partner_takes_no_room() -> None:
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_wait=1.0, max_pending=1, overflow="reject", dedupe=True)
    busy = b.submit_nowait(0)
    flushing = asyncio.create_task(b.flush())
    await settle()  # [0] holds the only slot
    f1 = b.submit_nowait(5)
    f2 = b.submit_nowait(5)  # coalesced: no room needed
    with pytest.raises(QueueFull):
        b.submit_nowait(6)
    assert list(await asyncio.gather(busy, f1, f2)) == [0, 50, 50]
    await flushing
    assert b.stats.submitted == 3
    await b.aclose()


async def test_aclose_unblocks_blocked_submitters_with_batcher_closed() -> None:
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_size=1, max_pending=1)
    first = b.submit_nowait(1)
    await settle()
    second = b.submit_nowait(2)
    blocked = asyncio.create_task(b.submit(3))
    await settle()
    await b.aclose()
    with pytest.raises(BatcherClosed):
        await blocked
    assert list(await asyncio.gather(first, second)) == [10, 20]
    assert 3 not in sink.items


async def test_sink_that_hangs_does_not_block_cancel_close() -> None:
    async def hang(items: list[int]) -> list[int]:
        await asyncio.Event().wait()
        return items

    b = Batcher(hang, max_pending=5)
    futs = [b.submit_nowait(i) for i in range(3)]
    await settle()
    await b.aclose(cancel=True)
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert all(isinstance(r, BatcherClosed) for r in results)


async def test_drop_oldest_under_sustained_overflow_stays_bounded() -> None:
    gate = asyncio.Event()

    async def stalled(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    b = Batcher(stalled, max_size=10, max_pending=100, overflow="drop_oldest")
    futs = [b.submit_nowait(i) for i in range(20_000)]
    await settle()
    # retired batches are forgotten: only the live ones stay referenced
    assert len(b._waiting) <= 100 // 10 + 2
    assert b.stats.pending == 100
    gate.set()
    results = await asyncio.gather(*futs, return_exceptions=True)
    survivors = [r for r in results if not isinstance(r, QueueFull)]
    # the first batch was already in flight; the newest 100 survived
    assert survivors == list(range(10)) + list(range(19_900, 20_000))
    s = b.stats
    assert s.dropped == 20_000 - 110
    assert s.submitted == s.succeeded + s.dropped
    await b.aclose()
