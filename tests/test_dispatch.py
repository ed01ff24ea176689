"""The dispatch rule: size, weight, linger, heartbeat, slots, smart batching."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest

from asyncbatch import Batcher, BatchReport

from .support import RecordingSink, settle

pytestmark = pytest.mark.looptime


async def test_max_wait_zero_batches_one_loop_iteration() -> None:
    sink = RecordingSink()
    b = Batcher(sink, max_size=100)
    first = [b.submit_nowait(i) for i in range(3)]
    # Tasks created in this iteration take their first step in the next one:
    # what they submit there still joins (the batch goes after that step).
    await asyncio.sleep(0)
    second = [b.submit_nowait(i) for i in range(3, 5)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # dispatched by now
    third = [b.submit_nowait(5)]
    assert await asyncio.gather(*first, *second, *third) == [0, 10, 20, 30, 40, 50]
    assert sink.batches == [[0, 1, 2, 3, 4], [5]]
    assert b.stats.reasons == {"wait": 2}
    await b.aclose()


async def test_max_wait_zero_takes_loads_of_tasks_started_in_the_same_iteration() -> None:
    # The DataLoader contract (aiodataloader's "loads occurring within
    # futures", graphql/dataloader's "resilient to job queue ordering").
    sink = RecordingSink()
    b: Batcher[int, int] = Batcher(sink, max_size=100)

    async def via_task(x: int) -> int:
        return await b.submit(x)

    assert list(await asyncio.gather(b.submit(1), via_task(2), via_task(3))) == [10, 20, 30]
    assert sink.batches == [[1, 2, 3]]
    await b.aclose()


async def test_max_size_splits_and_names_reason() -> None:
    sink = RecordingSink()
    async with Batcher(sink, max_size=3) as b:
        results = await asyncio.gather(*(b.submit(i) for i in range(8)))
    assert results == [i * 10 for i in range(8)]
    assert sink.batches == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert b.stats.reasons == {"size": 2, "wait": 1}


async def test_linger_deadline_is_exact_on_virtual_time() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink()
    async with Batcher(sink, max_size=10, max_wait=0.5) as b:
        t0 = loop.time()
        f1 = b.submit_nowait(1)
        await asyncio.sleep(0.3)
        f2 = b.submit_nowait(2)
        assert sink.batches == []
        await asyncio.gather(f1, f2)
        assert sink.times == [pytest.approx(t0 + 0.5)]
        # the deadline belongs to the batch's first item, not the last
        await asyncio.sleep(1)
        await b.submit(3)
    assert sink.batches == [[1, 2], [3]]
    assert sink.times[1] == pytest.approx(t0 + 0.5 + 1.0 + 0.5)


async def test_full_batch_goes_before_its_deadline() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink()
    async with Batcher(sink, max_size=2, max_wait=10) as b:
        t0 = loop.time()
        await asyncio.gather(b.submit(1), b.submit(2))
        assert loop.time() == pytest.approx(t0)
    assert b.stats.reasons == {"size": 1}


async def test_weight_seals_before_passing_max_weight() -> None:
    sink = RecordingSink(lambda items: [len(s) for s in items])
    reports: list[BatchReport] = []
    async with Batcher(sink, max_size=100, max_weight=10, weigh=len, on_batch=reports.append) as b:
        words = ["aaaa", "bbbb", "cc", "ddd", "eeeeeeeeeeeeeee", "f", ""]
        results = await asyncio.gather(*(b.submit(w) for w in words))
    assert results == [len(w) for w in words]
    # 4+4+2 = 10 reaches max_weight exactly: full. 3 + 15 would pass it, so
    # "ddd" goes alone when the heavy item arrives; the heavy one is alone too.
    assert sink.batches == [["aaaa", "bbbb", "cc"], ["ddd"], ["eeeeeeeeeeeeeee"], ["f", ""]]
    assert [r.weight for r in reports] == [10, 3, 15, 1]
    assert [r.reason for r in reports] == ["weight", "weight", "weight", "wait"]


async def test_negative_weight_is_rejected_at_submit() -> None:
    async with Batcher(RecordingSink(), max_weight=5, weigh=lambda x: x) as b:
        with pytest.raises(ValueError, match="weigh"):
            await b.submit(-1)
        assert await b.submit(0) == 0


async def test_interval_flushes_on_absolute_grid() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink()
    b = Batcher(sink, max_size=100, interval=1.0)
    t0 = loop.time()
    f = b.submit_nowait("a")  # binds: the grid is t0 + k
    await asyncio.sleep(0.25)
    g = b.submit_nowait("b")
    await asyncio.gather(f, g)
    assert sink.times == [pytest.approx(t0 + 1.0)]
    await asyncio.sleep(0.7)  # now t0 + 1.7
    await b.submit("c")
    assert sink.times[1] == pytest.approx(t0 + 2.0)
    assert b.stats.reasons == {"interval": 2}
    await b.aclose()


async def test_interval_skips_ticks_missed_by_a_lagging_loop() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink(delay=2.5)  # the sink lags across ticks 1 and 2... and 3
    b = Batcher(sink, max_size=100, interval=1.0, max_concurrency=1)
    t0 = loop.time()
    first = b.submit_nowait(1)
    await asyncio.sleep(1.1)  # tick 1 fired, sink busy until t0 + 3.5
    second = b.submit_nowait(2)  # armed for tick 2 (t0 + 2)
    await asyncio.gather(first, second)
    # tick 2 made the batch due while the slot was busy; it went when the
    # slot freed, and no extra ticks were bunched after the lag.
    assert sink.times == [pytest.approx(t0 + 1.0), pytest.approx(t0 + 3.5)]
    await asyncio.sleep(0.2)  # t0 + 6.2
    await b.submit(3)
    assert sink.times[2] == pytest.approx(t0 + 7.0)  # next grid point in the future
    assert b.stats.batches == 3
    await b.aclose()


async def test_interval_with_max_wait_takes_the_earlier() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink()
    b = Batcher(sink, max_size=100, interval=1.0, max_wait=0.1)
    t0 = loop.time()
    await b.submit(1)
    assert loop.time() == pytest.approx(t0 + 0.1)
    await asyncio.sleep(0.85)  # t0 + 0.95: the tick at t0 + 1 is nearer than 0.1
    await b.submit(2)
    assert loop.time() == pytest.approx(t0 + 1.0)
    assert b.stats.reasons == {"wait": 1, "interval": 1}
    await b.aclose()


async def test_interval_without_max_wait_has_no_linger() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink()
    b = Batcher(sink, max_size=100, interval=5.0)
    t0 = loop.time()
    await b.submit(1)
    assert loop.time() == pytest.approx(t0 + 5.0)
    await b.aclose()


async def test_flush_dispatches_before_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink()
    b = Batcher(sink, max_size=3, max_wait=100)
    t0 = loop.time()
    f = b.submit_nowait(1)
    await asyncio.sleep(10)
    assert not f.done()
    await b.flush()
    assert f.result() == 10
    assert loop.time() == pytest.approx(t0 + 10)
    assert b.stats.reasons == {"flush": 1}
    await b.aclose()


async def test_smart_batching_due_batch_keeps_filling_while_slot_busy() -> None:
    sink = RecordingSink(delay=1.0)
    reports: list[BatchReport] = []
    b = Batcher(sink, max_size=10, max_concurrency=1, on_batch=reports.append)
    futs = [b.submit_nowait(0)]
    await settle()  # batch [0] is in flight for 1 s
    for i in range(1, 6):
        futs.append(b.submit_nowait(i))
        await asyncio.sleep(0.1)  # each lands while the due batch waits
    await asyncio.gather(*futs)
    assert sink.batches == [[0], [1, 2, 3, 4, 5]]
    # the second batch was made due by its linger, then kept filling
    assert [r.reason for r in reports] == ["wait", "wait"]
    await b.aclose()


async def test_full_batches_wait_in_fifo_order_and_reason_is_first_trigger() -> None:
    sink = RecordingSink(delay=1.0)
    reports: list[BatchReport] = []
    b = Batcher(sink, max_size=2, max_concurrency=1, max_wait=0.5, on_batch=reports.append)
    futs = [b.submit_nowait(0)]
    await asyncio.sleep(0.6)  # [0] in flight until 1.5
    futs.append(b.submit_nowait(1))  # due at 1.1 by wait, then fills:
    await asyncio.sleep(0.6)
    futs += [b.submit_nowait(i) for i in (2, 3, 4, 5)]  # [1,2] full, [3,4], [5]
    await asyncio.gather(*futs)
    assert sink.batches == [[0], [1, 2], [3, 4], [5]]
    assert [r.reason for r in reports] == ["wait", "wait", "size", "wait"]
    await b.aclose()


async def test_max_concurrency_bounds_sink_calls() -> None:
    sink = RecordingSink(delay=1.0)
    async with Batcher(sink, max_size=1, max_concurrency=3) as b:
        await asyncio.gather(*(b.submit(i) for i in range(10)))
    assert sink.max_active == 3
    assert len(sink.batches) == 10


async def test_partitions_never_share_a_batch() -> None:
    sink = RecordingSink(lambda items: [f"{x[0]}:{x[1]}" for x in items])
    reports: list[BatchReport] = []
    async with Batcher(sink, max_size=10, partition=lambda x: x[0], on_batch=reports.append) as b:
        items = [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5)]
        results = await asyncio.gather(*(b.submit(x) for x in items))
    assert results == ["a:1", "b:2", "a:3", "c:4", "b:5"]
    assert sorted(sink.batches) == [[("a", 1), ("a", 3)], [("b", 2), ("b", 5)], [("c", 4)]]
    assert sorted(str(r.partition) for r in reports) == ["a", "b", "c"]


async def test_partition_has_its_own_timer() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink()
    async with Batcher(sink, max_wait=1.0, partition=lambda x: x % 2) as b:
        t0 = loop.time()
        f0 = b.submit_nowait(0)
        await asyncio.sleep(0.5)
        f1 = b.submit_nowait(1)
        await asyncio.gather(f0, f1)
    assert sink.times == [pytest.approx(t0 + 1.0), pytest.approx(t0 + 1.5)]


async def test_batches_of_one_partition_dispatch_in_due_order() -> None:
    sink = RecordingSink(delay=0.1)
    async with Batcher(sink, max_size=2, max_concurrency=1, partition=lambda x: x % 3) as b:
        await asyncio.gather(*(b.submit(i) for i in range(30)))
    for part in range(3):
        seen = [x for x in sink.items if x % 3 == part]
        assert seen == sorted(seen)


async def test_on_batch_report_fields() -> None:
    loop = asyncio.get_running_loop()
    reports: list[BatchReport] = []
    sink = RecordingSink(delay=0.25)
    async with Batcher(sink, max_size=4, on_batch=reports.append) as b:
        t0 = loop.time()
        await asyncio.gather(*(b.submit(i) for i in range(4)))
    (report,) = reports
    assert report == BatchReport(
        size=4,
        weight=0,
        partition=None,
        reason="size",
        attempts=1,
        start=pytest.approx(t0),  # type: ignore[arg-type]
        duration=pytest.approx(0.25),  # type: ignore[arg-type]
        error=None,
    )


async def test_on_batch_errors_go_to_loop_exception_handler() -> None:
    loop = asyncio.get_running_loop()
    seen: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))

    def broken(report: BatchReport) -> None:
        raise RuntimeError("boom")

    async with Batcher(RecordingSink(), on_batch=broken) as b:
        assert await b.submit(1) == 10
        assert await b.submit(2) == 20
    assert len(seen) == 2
    assert isinstance(seen[0]["exception"], RuntimeError)


REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")


async def test_the_sink_sees_no_callers_context() -> None:
    seen: list[str] = []
    spawned: list[str] = []

    async def sink(items: list[int]) -> list[int]:
        seen.append(REQUEST.get())
        REQUEST.set(f"sink{items[0]}")

        async def child() -> None:
            spawned.append(REQUEST.get())

        await asyncio.create_task(child())
        await asyncio.sleep(0)
        return items

    # One slot: later batches start from the task of the batch before them.
    batcher = Batcher(sink, max_size=3, max_wait=0.01, max_concurrency=1)

    async def caller(i: int) -> int:
        REQUEST.set(f"request{i}")
        return await batcher.submit(i)

    assert await asyncio.gather(*(caller(i) for i in range(9))) == list(range(9))
    assert seen == ["none"] * 3
    assert spawned == ["sink0", "sink3", "sink6"]  # tasks the sink starts inherit its context
    assert REQUEST.get() == "none"
    await batcher.aclose()


async def test_a_task_factory_without_context_still_runs_the_sink() -> None:
    loop = asyncio.get_running_loop()
    old = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Task[Any]:
        return asyncio.Task(coro, loop=loop)  # the pre-3.11 signature: no context=

    loop.set_task_factory(factory)
    try:
        batcher = Batcher(RecordingSink(), max_wait=0.01)
        async with asyncio.timeout(5):
            assert await batcher.submit(1) == 10
        await batcher.aclose()
    finally:
        loop.set_task_factory(old)


async def test_a_task_factory_that_raises_fails_the_batch_instead_of_hanging() -> None:
    loop = asyncio.get_running_loop()
    old = loop.get_task_factory()
    sink = RecordingSink()
    reports: list[BatchReport] = []
    batcher = Batcher(sink, max_size=2, max_wait=0.01, on_batch=reports.append)
    assert await batcher.submit(0) == 0  # bound, and its sink task made before

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        raise RuntimeError("no tasks today")

    loop.set_task_factory(factory)
    try:
        futs = [batcher.submit_nowait(1), batcher.submit_nowait(2)]  # full: dispatched now
    finally:
        loop.set_task_factory(old)
    async with asyncio.timeout(5):
        results = await asyncio.gather(*futs, return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]
    assert "no tasks today" in str(results[0])
    stats = batcher.stats
    assert (stats.submitted, stats.succeeded, stats.failed) == (3, 1, 2)
    assert (stats.pending, stats.in_flight) == (0, 0)
    assert [r.size for r in reports] == [1, 2]
    assert await batcher.submit(3) == 30  # and it goes on once tasks can be made
    await batcher.aclose()
