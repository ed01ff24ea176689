"""aclose() under load: it always ends, and every accepted item is resolved.

Each test closes a batcher in the middle of something (callers still
arriving, a batch sleeping before its retry, a sink failing every call,
callers blocked on ``max_pending``, several partitions and slots busy,
several closers at once, a closer cancelled) and then checks, on virtual
time, when the close returned, what every caller got, and that the counters
add up: ``submitted == succeeded + failed + cancelled + expired + dropped``,
with nothing pending, in flight, scheduled or running afterwards.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from asyncbatch import Batcher, BatcherClosed, QueueFull, Retry, Retryable

from .support import RecordingSink, live_timers, other_tasks, settle

pytestmark = pytest.mark.looptime


def assert_all_accounted(b: Batcher[Any, Any]) -> None:
    """Every accepted caller ended exactly one way; nothing is left behind."""
    s = b.stats
    assert s.submitted == s.succeeded + s.failed + s.cancelled + s.expired + s.dropped, s
    assert (s.pending, s.in_flight) == (0, 0), s
    assert b.closed
    assert "[closed]" in repr(b)
    loop = asyncio.get_running_loop()
    owners = [getattr(getattr(h, "_callback", None), "__self__", None) for h in live_timers(loop)]
    assert b not in owners
    assert [t for t in other_tasks() if "Batcher" in repr(t.get_coro())] == []


class Failing:
    """Raises ``ConnectionError`` on every call (or the first ``failures``)."""

    def __init__(self, failures: int | None = None, delay: float = 0.0) -> None:
        self.failures = failures
        self.delay = delay
        self.calls: list[list[Any]] = []
        self.times: list[float] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        self.times.append(asyncio.get_running_loop().time())
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failures is None or len(self.calls) <= self.failures:
            raise ConnectionError(f"call {len(self.calls)} failed")
        return [x * 10 for x in items]


async def gather_outcomes(tasks: list[asyncio.Task[Any]]) -> list[Any]:
    return list(await asyncio.gather(*tasks, return_exceptions=True))


# ------------------------------------------------------ callers still arriving


async def test_close_while_submitters_arrive_resolves_every_accepted_item() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink(delay=0.05)
    b = Batcher(sink, max_size=4, max_wait=0.02, max_concurrency=2)

    async def caller(i: int) -> Any:
        await asyncio.sleep(i * 0.01)  # one arrival every 10 ms, from t=0
        return await b.submit(i)

    tasks = [asyncio.create_task(caller(i)) for i in range(100)]
    await asyncio.sleep(0.505)  # callers 0..50 came
    await b.aclose()
    closed_at = loop.time()
    results = await gather_outcomes(tasks)

    assert results[:51] == [i * 10 for i in range(51)]
    assert all(isinstance(r, BatcherClosed) for r in results[51:])
    assert "accepts no new items" in str(results[51])
    assert sink.items == list(range(51))  # each accepted item once, in order
    s = b.stats
    assert (s.submitted, s.succeeded, s.failed, s.rejected) == (51, 51, 0, 0)
    assert closed_at - 0.505 < 0.2  # the drain took a few sink calls, not more
    assert_all_accounted(b)


async def test_close_while_nowait_producers_overflow_counts_every_outcome() -> None:
    sink = RecordingSink(delay=0.1)
    b = Batcher(sink, max_size=5, max_wait=1.0, max_pending=10, overflow="drop_oldest")
    futs: list[asyncio.Future[Any]] = []
    refused = 0

    async def producer(start: int) -> None:
        nonlocal refused
        for i in range(start, start + 50):
            try:
                futs.append(b.submit_nowait(i))
            except BatcherClosed:
                refused += 1
            await asyncio.sleep(0.01)

    producers = [asyncio.create_task(producer(k * 1000)) for k in range(3)]
    await asyncio.sleep(0.255)
    await b.aclose()
    await asyncio.gather(*producers)
    results = await asyncio.gather(*futs, return_exceptions=True)

    assert len(futs) + refused == 150
    dropped = [r for r in results if isinstance(r, QueueFull)]
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert len(dropped) + len(ok) == len(futs)
    s = b.stats
    assert (s.submitted, s.succeeded, s.dropped) == (len(futs), len(ok), len(dropped))
    assert sorted(ok) == sorted(x * 10 for x in sink.items)
    assert_all_accounted(b)


# ------------------------------------------------------- batches being retried


async def test_drain_waits_for_a_batch_sleeping_before_its_retry() -> None:
    loop = asyncio.get_running_loop()
    sink = Failing(failures=2)
    b = Batcher(sink, max_size=10, retry=Retry(attempts=3, backoff=1.0, jitter=False))
    futs = [b.submit_nowait(i) for i in range(5)]
    await asyncio.sleep(0.5)  # call 1 failed at t=0; the retry sleeps until t=1
    await b.aclose()
    assert loop.time() == pytest.approx(3.0)  # call 2 at t=1 failed, call 3 at t=3
    assert [f.result() for f in futs] == [0, 10, 20, 30, 40]
    assert sink.times == pytest.approx([0.0, 1.0, 3.0])
    s = b.stats
    assert (s.submitted, s.succeeded, s.failed, s.batches) == (5, 5, 0, 1)
    assert_all_accounted(b)


async def test_cancel_close_ends_a_retry_backoff_at_once() -> None:
    loop = asyncio.get_running_loop()
    sink = Failing(failures=2)
    b = Batcher(sink, max_size=10, retry=Retry(attempts=3, backoff=1.0, jitter=False))
    futs = [b.submit_nowait(i) for i in range(5)]
    await asyncio.sleep(0.5)
    await b.aclose(cancel=True)
    assert loop.time() == pytest.approx(0.5)  # no waiting for the backoff
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert all(isinstance(r, BatcherClosed) for r in results)
    assert "in flight" in str(results[0])
    assert len(sink.calls) == 1
    s = b.stats
    assert (s.submitted, s.succeeded, s.failed) == (5, 0, 5)
    assert_all_accounted(b)


@pytest.mark.parametrize("cancel", [False, True])
async def test_close_while_retryable_items_wait_for_their_retry(cancel: bool) -> None:
    loop = asyncio.get_running_loop()
    tries: dict[int, int] = {}

    async def sink(items: list[int]) -> list[Any]:
        out: list[Any] = []
        for x in items:
            tries[x] = tries.get(x, 0) + 1
            out.append(Retryable(ConnectionError(x)) if x == 3 and tries[x] == 1 else x * 10)
        return out

    b = Batcher(sink, max_size=10, retry=Retry(attempts=3, backoff=2.0, jitter=False))
    futs = [b.submit_nowait(i) for i in range(5)]
    await asyncio.sleep(1.0)  # 0, 1, 2, 4 resolved; 3 waits until t=2 for its retry
    assert [f.done() for f in futs] == [True, True, True, False, True]
    await b.aclose(cancel=cancel)
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert results[:3] + results[4:] == [0, 10, 20, 40]
    if cancel:
        assert loop.time() == pytest.approx(1.0)
        assert isinstance(results[3], BatcherClosed)
        assert tries[3] == 1
    else:
        assert loop.time() == pytest.approx(2.0)
        assert results[3] == 30
        assert tries[3] == 2
    s = b.stats
    assert (s.submitted, s.succeeded, s.failed) == (5, 5 - cancel, int(cancel))
    assert_all_accounted(b)


# -------------------------------------------------------- a sink always failing


@pytest.mark.parametrize("isolate", [False, True])
async def test_close_while_the_sink_fails_every_call(isolate: bool) -> None:
    loop = asyncio.get_running_loop()
    sink = Failing()
    retry = Retry(attempts=3, backoff=0.1, jitter=False, isolate=isolate)
    b = Batcher(sink, max_size=4, max_wait=10, max_concurrency=2, retry=retry)
    futs = [b.submit_nowait(i) for i in range(18)]  # four full batches and [16, 17]
    await settle()
    await b.aclose()
    # Three tries per batch, 0.1 s then 0.2 s apart; two slots for five batches.
    assert loop.time() == pytest.approx(0.9)
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    # Isolation: once the tries are used up, a batch of n that fails item by
    # item costs 2n - 2 more calls (4 -> 6, 2 -> 2), all failing.
    assert len(sink.calls) == (5 * 3 + 4 * 6 + 2 if isolate else 5 * 3)
    s = b.stats
    assert (s.submitted, s.succeeded, s.failed, s.batches) == (18, 0, 18, 5)
    assert s.reasons == {"size": 4, "close": 1}
    assert_all_accounted(b)


async def test_close_while_the_sink_hangs_past_its_timeout() -> None:
    loop = asyncio.get_running_loop()

    async def hang(items: list[int]) -> list[int]:
        await asyncio.Event().wait()
        return items

    b = Batcher(hang, max_size=3, timeout=1.0, retry=Retry(attempts=2, backoff=0.5, jitter=False))
    futs = [b.submit_nowait(i) for i in range(6)]  # two batches, one slot
    await settle()
    await b.aclose()
    assert loop.time() == pytest.approx(2 * (1.0 + 0.5 + 1.0))
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert all(isinstance(r, TimeoutError) for r in results)
    assert "did not answer within 1.0 s" in str(results[0])
    assert (b.stats.failed, b.stats.batches) == (6, 2)
    assert_all_accounted(b)


# ------------------------------------------------ callers blocked on max_pending


async def test_close_while_submitters_are_blocked_on_max_pending() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_size=2, max_wait=10, max_pending=4, overflow="block")
    # [0, 1] in flight, [2, 3] and [4, 5] due and waiting for the slot,
    # 6..9 blocked: no room.
    tasks = [asyncio.create_task(b.submit(i)) for i in range(10)]
    await settle()
    assert b.stats.pending == 4
    await asyncio.sleep(0.5)
    await b.aclose()
    assert loop.time() == pytest.approx(3.0)  # the three batches, one after the other
    results = await gather_outcomes(tasks)
    assert results[:6] == [0, 10, 20, 30, 40, 50]
    assert all(isinstance(r, BatcherClosed) for r in results[6:])
    assert sink.batches == [[0, 1], [2, 3], [4, 5]]
    s = b.stats
    assert (s.submitted, s.succeeded, s.rejected, s.peak_pending) == (6, 6, 0, 4)
    assert_all_accounted(b)


async def test_close_while_a_submit_many_is_half_accepted() -> None:
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_size=2, max_wait=10, max_pending=3, overflow="block")
    first = [b.submit_nowait(i) for i in range(4)]  # [0, 1] in flight, 2 and 3 pending
    await settle()
    many = asyncio.create_task(b.submit_many([4, 5, 6]))  # 4 accepted, 5 blocks
    await settle()
    assert b.stats.pending == 3
    await b.aclose()
    with pytest.raises(BatcherClosed):
        await many
    assert [f.result() for f in first] == [0, 10, 20, 30]
    # The accepted 4 was withdrawn with its submit_many: the sink never saw it.
    assert sink.items == [0, 1, 2, 3]
    s = b.stats
    assert (s.submitted, s.succeeded, s.cancelled) == (5, 4, 1)
    assert_all_accounted(b)


# ---------------------------------------------- several slots and partitions


async def test_drain_with_partitions_and_several_slots() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_size=4, max_wait=60, max_concurrency=2, partition=lambda x: x % 3)
    futs = [b.submit_nowait(i) for i in range(30)]  # 10 per partition: 4 + 4 + 2
    await b.aclose()
    assert loop.time() == pytest.approx(5.0)  # nine batches, two at a time
    assert [f.result() for f in futs] == [i * 10 for i in range(30)]
    assert sink.max_active == 2
    assert len(sink.batches) == 9
    for part in range(3):
        batches = [batch for batch in sink.batches if batch[0] % 3 == part]
        assert all(x % 3 == part for batch in batches for x in batch)
        assert [x for batch in batches for x in batch] == list(range(part, 30, 3))
    s = b.stats
    assert (s.submitted, s.succeeded, s.batches) == (30, 30, 9)
    assert s.reasons == {"size": 6, "close": 3}
    assert_all_accounted(b)


async def test_drain_with_partitions_one_of_them_failing() -> None:
    loop = asyncio.get_running_loop()

    async def sink(items: list[int]) -> list[int]:
        await asyncio.sleep(0.5)
        if items[0] % 2:
            raise ConnectionError("odd partition down")
        return [x * 10 for x in items]

    retry = Retry(attempts=2, backoff=1.0, jitter=False)
    b = Batcher(
        sink, max_size=3, max_wait=60, max_concurrency=3, partition=lambda x: x % 2, retry=retry
    )
    futs = [b.submit_nowait(i) for i in range(12)]  # per partition: 3 + 3
    await b.aclose()
    # Even batches take 0.5 s, odd ones 0.5 + 1 + 0.5. Three slots: [0, 2, 4],
    # [1, 3, 5] and [6, 8, 10] start at once, [7, 9, 11] when the first ends.
    assert loop.time() == pytest.approx(2.5)
    results = await asyncio.gather(*futs, return_exceptions=True)
    for i, r in enumerate(results):
        assert isinstance(r, ConnectionError) if i % 2 else r == i * 10
    s = b.stats
    assert (s.submitted, s.succeeded, s.failed, s.batches) == (12, 6, 6, 4)
    assert_all_accounted(b)


# ------------------------------------------------------------- everything at once


@pytest.mark.parametrize("cancel", [False, True])
async def test_close_under_mixed_load_counts_what_the_callers_saw(cancel: bool) -> None:
    """Arrivals, cancellations, drop_oldest, a failing and stalling sink,
    retries, per-item errors and Retryable items, partitions and three slots,
    then a close: the counters match, one by one, what the callers got."""
    loop = asyncio.get_running_loop()
    rng = random.Random(4)

    async def sink(items: list[int]) -> list[Any]:
        await asyncio.sleep(rng.choice([0.0, 0.05, 0.5, 5.0]))  # 5 s: past the timeout
        if rng.random() < 0.2:
            raise ConnectionError("down")
        answers: list[Any] = []
        for x in items:
            roll = rng.random()
            if roll < 0.1:
                answers.append(ValueError(x))
            elif roll < 0.2:
                answers.append(Retryable(ConnectionError(x)))
            else:
                answers.append(x * 10)
        return answers

    b = Batcher(
        sink,
        max_size=5,
        max_wait=0.02,
        max_concurrency=3,
        partition=lambda x: x % 3,
        max_pending=20,
        overflow="drop_oldest",
        timeout=1.0,
        retry=Retry(attempts=3, backoff=0.1, jitter=False),
    )
    futs: list[asyncio.Future[Any]] = []
    refused = 0

    async def producer(k: int) -> None:
        nonlocal refused
        for j in range(60):
            try:
                fut = b.submit_nowait(k * 1000 + j)
            except BatcherClosed:
                refused += 1
                continue
            futs.append(fut)
            if rng.random() < 0.1:
                loop.call_later(rng.random() * 0.3, fut.cancel)
            await asyncio.sleep(rng.random() * 0.05)

    producers = [asyncio.create_task(producer(k)) for k in range(4)]
    await asyncio.sleep(1.0)
    await b.aclose(cancel=cancel)
    closed_at = loop.time()
    await asyncio.gather(*producers)
    results = await asyncio.gather(*futs, return_exceptions=True)

    ok = dropped = cancelled = closed = failed = 0
    items = [k * 1000 + j for k in range(4) for j in range(60)]
    for fut, r in zip(futs, results, strict=True):
        if isinstance(r, QueueFull):
            dropped += 1
        elif isinstance(r, asyncio.CancelledError):
            cancelled += 1
        elif isinstance(r, BatcherClosed):
            closed += 1
        elif isinstance(r, ConnectionError | ValueError | TimeoutError):
            failed += 1
        else:
            assert isinstance(r, int)
            assert r % 10 == 0
            assert r // 10 in items
            ok += 1
        assert fut.done()
    assert refused > 0
    assert len(futs) + refused == 240
    s = b.stats
    assert s.submitted == len(futs)
    assert (s.succeeded, s.dropped, s.cancelled, s.expired) == (ok, dropped, cancelled, 0)
    assert s.failed == failed + closed
    if cancel:
        assert closed > 0
        assert closed_at == pytest.approx(1.0)  # nothing waited for
    else:
        assert closed == 0  # a drain gives every accepted item its own outcome
    assert ok > 0
    assert failed > 0
    assert dropped > 0
    assert cancelled > 0
    assert_all_accounted(b)


# ------------------------------------------------------------- several closers


async def test_concurrent_closers_with_mixed_cancel_flags() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink(delay=10)
    b = Batcher(sink, max_size=2, max_wait=60)
    futs = [b.submit_nowait(i) for i in range(6)]  # [0, 1] in flight, [2, 3], [4, 5] due
    await settle()

    async def close_at(t: float, cancel: bool) -> float:
        await asyncio.sleep(t - loop.time())
        await b.aclose(cancel=cancel)
        return loop.time()

    closers = [
        asyncio.create_task(close_at(0.0, False)),  # drains
        asyncio.create_task(close_at(1.0, False)),  # waits for the first
        asyncio.create_task(close_at(15.0, True)),  # escalates: [2, 3] runs since t=10
        asyncio.create_task(close_at(16.0, False)),  # already closed: returns at once
        asyncio.create_task(close_at(16.0, True)),
    ]
    ended = await asyncio.gather(*closers)
    assert ended == pytest.approx([15.0, 15.0, 15.0, 16.0, 16.0])
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert results[:2] == [0, 10]
    assert all(isinstance(r, BatcherClosed) for r in results[2:])
    assert "in flight" in str(results[2])
    assert "before dispatch" in str(results[4])
    assert sink.batches == [[0, 1], [2, 3]]
    s = b.stats
    assert (s.submitted, s.succeeded, s.failed) == (6, 2, 4)
    assert_all_accounted(b)


async def test_concurrent_cancelling_closers() -> None:
    sink = RecordingSink(delay=10)
    b = Batcher(sink, max_size=2, max_wait=60, max_concurrency=2)
    futs = [b.submit_nowait(i) for i in range(7)]
    await settle()
    await asyncio.gather(*(b.aclose(cancel=True) for _ in range(4)))
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert all(isinstance(r, BatcherClosed) for r in results)
    s = b.stats
    assert (s.submitted, s.failed) == (7, 7)
    assert_all_accounted(b)


# ------------------------------------------------------------ a cancelled closer


async def test_cancelled_closer_escalates_and_other_closers_return() -> None:
    loop = asyncio.get_running_loop()
    sink = Failing(failures=None, delay=1.0)
    b = Batcher(sink, max_size=2, max_wait=60, retry=Retry(attempts=5, backoff=2.0, jitter=False))
    futs = [b.submit_nowait(i) for i in range(5)]  # [0, 1] in flight, [2, 3] due, [4] open
    await settle()
    first = asyncio.create_task(b.aclose())
    await asyncio.sleep(0.5)
    second = asyncio.create_task(b.aclose())
    await asyncio.sleep(1.0)  # the first call failed at t=1: backoff until t=3
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await second  # not cancelled: it just sees the close finish
    assert loop.time() == pytest.approx(1.5)
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert all(isinstance(r, BatcherClosed) for r in results)
    assert "in flight" in str(results[0])
    assert "before dispatch" in str(results[2])
    s = b.stats
    assert (s.submitted, s.failed, s.batches) == (5, 5, 1)
    assert_all_accounted(b)


async def test_cancelled_second_closer_does_not_cancel_the_drain() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_size=2, max_wait=60)
    futs = [b.submit_nowait(i) for i in range(5)]
    first = asyncio.create_task(b.aclose())
    await asyncio.sleep(0.5)
    second = asyncio.create_task(b.aclose())
    await asyncio.sleep(0.5)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    await first
    assert loop.time() == pytest.approx(3.0)
    assert [f.result() for f in futs] == [0, 10, 20, 30, 40]
    assert (b.stats.submitted, b.stats.succeeded) == (5, 5)
    assert_all_accounted(b)


async def test_closer_with_a_deadline_cancels_the_rest() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink(delay=10)
    b = Batcher(sink, max_size=1, max_wait=60)
    futs = [b.submit_nowait(i) for i in range(3)]
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(15):
            await b.aclose()  # [0] done at t=10, [1] runs, [2] pending at t=15
    assert loop.time() == pytest.approx(15.0)
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert results[0] == 0
    assert all(isinstance(r, BatcherClosed) for r in results[1:])
    s = b.stats
    assert (s.submitted, s.succeeded, s.failed) == (3, 1, 2)
    assert_all_accounted(b)
