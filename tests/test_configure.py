"""Batcher.configure (and the @batch / DataLoader ones): safe while items flow."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asyncbatch import (
    Adaptive,
    Batcher,
    BatcherClosed,
    BatchReport,
    DataLoader,
    QueueFull,
    batch,
)

from .conftest import FLAVOURS
from .support import RecordingSink, settle

pytestmark = pytest.mark.looptime


async def test_more_slots_dispatch_waiting_due_batches_now() -> None:
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_size=1, max_concurrency=1)
    futs = [b.submit_nowait(i) for i in range(4)]
    await settle()
    assert (sink.active, b.stats.concurrency_limit) == (1, 1)
    b.configure(max_concurrency=3)
    await settle()
    assert sink.active == 3
    assert b.stats.concurrency_limit == 3
    assert list(await asyncio.gather(*futs)) == [0, 10, 20, 30]
    await b.aclose()


async def test_fewer_slots_let_calls_in_flight_finish() -> None:
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_size=1, max_concurrency=4)
    futs = [b.submit_nowait(i) for i in range(6)]
    await settle()
    assert sink.active == 4
    b.configure(max_concurrency=1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert list(await asyncio.gather(*futs)) == [0, 10, 20, 30, 40, 50]
    # The 4 in flight finished at t0+1; then 4 and 5 went one at a time.
    assert loop.time() - t0 == pytest.approx(3.0)
    assert sink.max_active == 4
    await b.aclose()


async def test_smaller_max_size_seals_full_open_batches_and_splits_calls() -> None:
    sink = RecordingSink()
    b = Batcher(sink, max_size=100, max_wait=10)
    futs = [b.submit_nowait(i) for i in range(7)]
    b.configure(max_size=3)
    assert list(await asyncio.gather(*futs)) == [i * 10 for i in range(7)]
    assert sink.batches == [[0, 1, 2], [3, 4, 5], [6]]
    assert b.stats.reasons == {"size": 1}
    await b.aclose()


async def test_smaller_max_weight_seals_and_splits_by_weight() -> None:
    sink = RecordingSink()
    b = Batcher(sink, max_size=100, max_wait=10, max_weight=100, weigh=float)
    futs = [b.submit_nowait(i) for i in (5, 5, 5, 5)]
    b.configure(max_weight=10)
    assert list(await asyncio.gather(*futs)) == [50, 50, 50, 50]
    assert sink.batches == [[5, 5], [5, 5]]
    assert b.stats.reasons == {"weight": 1}
    await b.aclose()


async def test_larger_max_pending_wakes_blocked_submitters() -> None:
    sink = RecordingSink()
    sink.gate = asyncio.Event()
    b = Batcher(sink, max_size=100, max_wait=10, max_pending=2)
    held = b.submit_nowait(0)  # room runs out at 2: [0, 1] goes and holds the slot
    b.submit_nowait(1)
    pending = [b.submit_nowait(2), b.submit_nowait(3)]
    blocked = [asyncio.create_task(b.submit(i)) for i in (4, 5)]
    await settle()
    assert b.stats.pending == 2
    b.configure(max_pending=4)
    await settle()
    assert b.stats.pending == 4  # both blocked submitters got in
    sink.gate.set()
    assert await held == 0
    assert list(await asyncio.gather(*pending, *blocked)) == [20, 30, 40, 50]
    await b.aclose()


async def test_max_pending_none_lets_everyone_in() -> None:
    sink = RecordingSink()
    sink.gate = asyncio.Event()
    b = Batcher(sink, max_size=100, max_wait=10, max_pending=1)
    b.submit_nowait(0)  # goes at once (room ran out), holds the slot
    b.submit_nowait(1)
    blocked = [asyncio.create_task(b.submit(i)) for i in range(2, 6)]
    await settle()
    b.configure(max_pending=None)
    await settle()
    assert b.stats.pending == 5
    sink.gate.set()
    await b.flush()
    assert list(await asyncio.gather(*blocked)) == [20, 30, 40, 50]
    await b.aclose()


async def test_shorter_max_wait_rearms_open_batches() -> None:
    sink = RecordingSink()
    b = Batcher(sink, max_size=100, max_wait=10)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    f = b.submit_nowait(1)
    await asyncio.sleep(2)
    b.configure(max_wait=5)
    assert await f == 10
    assert loop.time() - t0 == pytest.approx(5)
    g = b.submit_nowait(2)
    await asyncio.sleep(3)
    b.configure(max_wait=1)  # already past: due now
    assert await g == 20
    assert loop.time() - t0 == pytest.approx(8)
    await b.aclose()


async def test_timeout_applies_to_calls_that_start_later() -> None:
    sink = RecordingSink(delay=2.0)
    b = Batcher(sink, max_size=1)
    assert await b.submit(1) == 10
    b.configure(timeout=1.0)
    with pytest.raises(TimeoutError, match=r"did not answer within 1\.0 s"):
        await b.submit(2)
    b.configure(timeout=None)
    assert await b.submit(3) == 30
    await b.aclose()


async def test_configure_checks_everything_before_changing_anything() -> None:
    b = Batcher(RecordingSink(), max_size=10, max_concurrency=2)
    with pytest.raises(TypeError, match="max_pending must be an int"):
        b.configure(max_size=5, max_pending=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval must be finite"):
        b.configure(max_concurrency=8, interval=math.inf)
    with pytest.raises(ValueError, match="max_weight needs weigh="):
        b.configure(max_weight=3)
    with pytest.raises(TypeError, match="max_concurrency must be an int, None"):
        b.configure(max_concurrency="many")  # type: ignore[arg-type]
    s = b.stats
    assert s.concurrency_limit == 2
    b.configure(max_size=5)
    await b.aclose()
    with pytest.raises(BatcherClosed):
        b.configure(max_size=3)


async def test_adaptive_and_auto_start_at_min() -> None:
    a = Batcher(RecordingSink(), max_concurrency=Adaptive(min=2, max=8))
    assert a.stats.concurrency_limit == 2
    auto = Batcher(RecordingSink(), max_concurrency="auto")
    assert auto.stats.concurrency_limit == 1
    auto.configure(max_concurrency=None)
    assert auto.stats.concurrency_limit == 0
    for bad, error in (({"min": 0}, ValueError), ({"max": 1.5}, TypeError)):
        with pytest.raises(error):
            Adaptive(**bad)
    with pytest.raises(ValueError, match="max must be >= min"):
        Adaptive(min=4, max=2)


async def test_batch_wrapper_configure_reaches_current_and_future_batchers() -> None:
    calls: list[list[int]] = []

    @batch(max_size=100, max_wait=10)
    async def double(items: list[int]) -> list[int]:
        calls.append(list(items))
        return [x * 2 for x in items]

    first = asyncio.ensure_future(double(1))
    await settle()
    double.configure(max_size=1)  # the open batch [1] is full now
    assert await first == 2
    await double.aclose()
    assert list(await asyncio.gather(double(2), double(3))) == [4, 6]  # a fresh batcher
    assert calls == [[1], [2], [3]]
    with pytest.raises(ValueError, match="max_size must be >= 1"):
        double.configure(max_size=0)
    await double.aclose()


async def test_dataloader_configure_takes_max_batch_size() -> None:
    calls: list[list[int]] = []

    async def load(keys: list[int]) -> list[int]:
        calls.append(list(keys))
        return keys

    loader = DataLoader(load)
    loader.configure(max_batch_size=2)
    assert list(await loader.load_many([1, 2, 3])) == [1, 2, 3]
    assert calls == [[1, 2], [3]]
    assert loader.stats.concurrency_limit == 0  # no limit: a DataLoader's default
    loader.configure(max_concurrency=2)
    assert loader.stats.concurrency_limit == 2
    with pytest.raises(TypeError, match=r"max_batch_size must be an int, got 2\.0"):
        loader.configure(max_batch_size=2.0)  # type: ignore[arg-type]


async def test_configure_under_load_keeps_every_invariant() -> None:
    sink = RecordingSink(delay=0.05)
    b: Batcher[int, int] = Batcher(sink, max_size=16, max_wait=0.01, max_concurrency=2)
    results: dict[int, Any] = {}

    async def caller(i: int) -> None:
        results[i] = await b.submit(i)

    settings: list[dict[str, Any]] = [
        {"max_size": 4},
        {"max_concurrency": 8},
        {"max_wait": 0.0},
        {"max_pending": 10},
        {"max_size": 32, "max_concurrency": 1},
        {"max_pending": None, "max_wait": 0.02},
    ]
    tasks = []
    for step in range(60):
        tasks.append(asyncio.create_task(caller(step)))
        if step % 10 == 5:
            b.configure(**settings[step // 10])
        await asyncio.sleep(0.003)
    await asyncio.gather(*tasks)
    await b.aclose()
    assert results == {i: i * 10 for i in range(60)}
    assert sorted(sink.items) == list(range(60))  # each exactly once
    s = b.stats
    assert s.submitted == s.succeeded == 60


# ------------------------------------------- found by the second attack round


async def test_configure_max_pending_under_drop_oldest_keeps_dropping_the_oldest() -> None:
    sink = RecordingSink(lambda items: items)
    sink.gate = asyncio.Event()
    b = Batcher(sink, max_size=4, max_wait=0.01, max_pending=50, overflow="drop_oldest")
    busy = b.submit_nowait("busy")
    await asyncio.sleep(0.02)  # holds the only slot
    fs = [b.submit_nowait(i) for i in range(2)]
    b.configure(max_pending=None)
    fs += [b.submit_nowait(i) for i in range(2, 4)]
    b.configure(max_pending=2)
    # Less room applies to newcomers: each drops the oldest pending item (none
    # is dropped by the configure itself).
    fs += [b.submit_nowait(i) for i in range(4, 8)]
    assert b.stats.dropped == 4
    assert [f.done() and isinstance(f.exception(), QueueFull) for f in fs] == [True] * 4 + [
        False
    ] * 4
    sink.gate.set()
    assert list(await asyncio.gather(busy, *fs[4:])) == ["busy", 4, 5, 6, 7]
    await b.aclose()


async def test_drop_oldest_batch_opened_before_max_pending_was_set() -> None:
    sink = RecordingSink(lambda items: items)
    b = Batcher(sink, max_size=10, max_wait=1.0, overflow="drop_oldest")
    fs = [b.submit_nowait(i) for i in range(3)]
    b.configure(max_pending=2)
    f3 = b.submit_nowait(3)  # drops 0, the oldest: room for 3
    assert isinstance(fs[0].exception(), QueueFull)
    assert list(await asyncio.gather(fs[1], fs[2], f3)) == [1, 2, 3]
    await b.aclose()


async def test_max_wait_none_means_the_same_in_configure_as_in_the_constructor() -> None:
    sink = RecordingSink()
    b = Batcher(sink, max_size=5, max_wait=1.0)
    b.configure(max_wait=None)  # the default: 0, end of the loop iteration
    assert await asyncio.wait_for(b.submit(1), 1) == 10
    b.configure(max_wait=math.inf, interval=2.0)
    b.configure(interval=None)  # no heartbeat left; max_wait=inf still means no deadline
    f = b.submit_nowait(2)
    await asyncio.sleep(10)
    assert not f.done()
    await b.flush()
    assert await f == 20
    await b.aclose()


async def test_a_retry_after_configure_goes_in_parts_within_the_new_size() -> None:
    sizes: list[int] = []

    async def sink(items: list[int]) -> list[int]:
        sizes.append(len(items))
        if len(sizes) == 1:
            b.configure(max_size=2)
            raise ConnectionError("retry me")
        return items

    from asyncbatch import Retry

    b = Batcher(sink, max_size=8, max_wait=1.0, retry=Retry(attempts=3, backoff=0))
    futs = [b.submit_nowait(i) for i in range(5)]
    await b.flush()
    assert list(await asyncio.gather(*futs)) == [0, 1, 2, 3, 4]
    assert sizes == [5, 2, 2, 1]
    await b.aclose()


async def test_parts_follow_a_limit_lowered_while_the_batch_runs() -> None:
    sizes: list[int] = []

    async def sink(items: list[int]) -> list[int]:
        sizes.append(len(items))
        if len(sizes) == 2:
            b.configure(max_size=1)
        return items

    b = Batcher(sink, max_size=8, max_wait=1.0)
    futs = [b.submit_nowait(i) for i in range(8)]
    b.configure(max_size=3)  # [0..7] is now handed over in parts
    assert list(await asyncio.gather(*futs)) == list(range(8))
    assert sizes == [3, 3, 1, 1]
    await b.aclose()


async def test_a_limit_lowered_under_a_nested_submit_still_lends_a_slot() -> None:
    gate = asyncio.Event()

    async def sink(items: list[str]) -> list[str]:
        if items == ["outer"]:
            return [await b.submit("inner")]
        if items == ["other"]:
            await gate.wait()
        return items

    b: Batcher[str, str] = Batcher(sink, max_size=1, max_concurrency=2)
    other = asyncio.create_task(b.submit("other"))
    await settle()
    outer = asyncio.create_task(b.submit("outer"))
    await settle()
    b.configure(max_concurrency=1)
    gate.set()
    assert await asyncio.wait_for(outer, 5) == "inner"
    assert await other == "other"
    await b.aclose()


async def test_per_item_overload_answers_reach_the_adaptive_policy() -> None:
    from asyncbatch._concurrency import BatchSample

    class Busy(Exception):
        retry_after = 0.5

    seen: list[BatchSample] = []

    class Recording(Adaptive):
        def on_batch(self, sample: BatchSample) -> int:
            seen.append(sample)
            return super().on_batch(sample)

    async def sink(items: list[int]) -> list[object]:
        return [Busy() if x == 1 else x for x in items]

    b = Batcher(sink, max_size=2, max_concurrency=Recording(min=1, max=4))
    results = await asyncio.gather(b.submit(0), b.submit(1), return_exceptions=True)
    assert results[0] == 0
    assert isinstance(results[1], Busy)
    assert [s.overloaded for s in seen] == [True]
    await b.aclose()


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_configure_from_another_thread_applies_on_the_loop_thread(flavour: str) -> None:
    # A due batch waits for the one slot; another thread raises the limit.
    async def main() -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        release = loop.create_future()

        async def sink(items: list[str]) -> list[str]:
            if items == ["a"]:
                await release
            return [f"{i}!" for i in items]

        b = Batcher(sink, max_size=1, max_concurrency=1)
        first = asyncio.create_task(b.submit("a"))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(b.submit("b"))
        await asyncio.sleep(0.01)  # due, waiting for the slot "a" holds
        errors: list[BaseException] = []

        def other() -> None:
            try:
                with pytest.raises(ValueError, match="max_size must be >= 1"):
                    b.configure(max_size=0)  # still checked here, in the calling thread
                b.configure(max_concurrency=2)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        start = loop.time()
        await asyncio.to_thread(other)
        async with asyncio.timeout(5):  # the loop was idle: it must be woken
            answer = await second
        waited = loop.time() - start
        release.set_result(None)
        assert await first == "a!"
        assert errors == []
        assert b.stats.concurrency_limit == 2
        await b.aclose()
        return answer, waited

    with asyncio.Runner(loop_factory=FLAVOURS[flavour]) as runner:
        answer, waited = runner.run(main())
    assert answer == "b!"
    assert waited < 2.5  # generous: it is answered at the next iteration


def test_configure_on_a_batcher_whose_loop_closed_changes_only_settings() -> None:
    async def double(items: list[int]) -> list[int]:
        return [i * 2 for i in items]

    b = Batcher(double, max_size=10, max_wait=5)

    async def withdrawn() -> None:
        task = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0.01)
        task.cancel()  # its open batch's timer dies with the loop
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(withdrawn())
    b.configure(max_wait=0.01)  # outside any loop: no "Event loop is closed"

    async def again() -> int:
        b.configure(max_wait=0.02)  # the first call of the next run
        async with asyncio.timeout(2):
            answer = await b.submit(3)
        await b.aclose()
        return answer

    assert asyncio.run(again()) == 6
    stats = b.stats
    assert (stats.succeeded, stats.cancelled, stats.pending) == (1, 1, 0)


async def test_retryable_items_retried_after_a_smaller_max_size_go_in_parts() -> None:
    from asyncbatch import Retry, Retryable

    sizes: list[int] = []

    async def sink(items: list[int]) -> list[Any]:
        sizes.append(len(items))
        if len(sizes) == 1:
            return [Retryable(ValueError(i)) for i in items]
        return [i * 10 for i in items]

    b = Batcher(sink, max_size=8, max_wait=0.01, retry=Retry(attempts=3, backoff=0.2, jitter=False))
    tasks = [asyncio.create_task(b.submit(i)) for i in range(8)]
    await asyncio.sleep(0.1)  # the first call is done; the items wait for their retry
    b.configure(max_size=2)
    assert await asyncio.gather(*tasks) == [i * 10 for i in range(8)]
    assert sizes == [8, 2, 2, 2, 2]
    await b.aclose()


async def test_a_retry_split_by_a_smaller_max_size_keeps_counting_tries() -> None:
    from asyncbatch import Retry

    tries: dict[int, int] = {}

    async def sink(items: list[int]) -> list[int]:
        for i in items:
            tries[i] = tries.get(i, 0) + 1
        raise ConnectionError("down")

    b = Batcher(sink, max_size=4, max_wait=0.01, retry=Retry(attempts=2, backoff=0.1, jitter=False))
    tasks = [asyncio.create_task(b.submit(i)) for i in range(4)]
    await asyncio.sleep(0.05)  # the first try failed; backing off
    b.configure(max_size=2)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert tries == {0: 2, 1: 2, 2: 2, 3: 2}  # attempts=2 counts total tries
    assert b.stats.retries == 1
    await b.aclose()


async def test_isolation_halves_respect_a_smaller_max_size() -> None:
    from asyncbatch import Retry

    sizes: list[int] = []

    async def sink(items: list[int]) -> list[int]:
        sizes.append(len(items))
        await asyncio.sleep(0.05)
        if 3 in items:
            raise ValueError("poison 3")
        return [i * 10 for i in items]

    b = Batcher(sink, max_size=8, max_wait=0.01, retry=Retry(attempts=1, isolate=True))
    tasks = [asyncio.create_task(b.submit(i)) for i in range(8)]
    await asyncio.sleep(0.03)  # the first call runs
    b.configure(max_size=2)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [r for i, r in enumerate(results) if i != 3] == [0, 10, 20, 40, 50, 60, 70]
    assert isinstance(results[3], ValueError)
    assert sizes[0] == 8
    assert max(sizes[1:]) <= 2
    await b.aclose()


async def test_a_streaming_retry_respects_a_smaller_max_size() -> None:
    from asyncbatch import Retry

    sizes: list[int] = []

    async def tokens(items: list[int]) -> AsyncIterator[list[str]]:
        sizes.append(len(items))
        if len(sizes) == 1:
            raise ConnectionError("before the first step")
        yield [f"{i}!" for i in items]

    b = Batcher(
        tokens, max_size=4, max_wait=0.01, retry=Retry(attempts=3, backoff=0.1, jitter=False)
    )

    async def read(i: int) -> list[str]:
        return [v async for v in b.submit_stream(i)]

    tasks = [asyncio.create_task(read(i)) for i in range(4)]
    await asyncio.sleep(0.05)  # the first call failed; backing off
    b.configure(max_size=1)
    assert await asyncio.gather(*tasks) == [["0!"], ["1!"], ["2!"], ["3!"]]
    assert sizes == [4, 1, 1, 1, 1]
    await b.aclose()


async def test_a_call_timed_out_says_the_timeout_it_started_with() -> None:
    async def slow(items: list[int]) -> list[int]:
        await asyncio.sleep(10)
        return items

    b = Batcher(slow, max_wait=0.01, timeout=1.0)
    task = asyncio.create_task(b.submit(1))
    await asyncio.sleep(0.5)  # the call runs under timeout=1.0
    b.configure(timeout=None)
    with pytest.raises(TimeoutError, match=r"did not answer within 1\.0 s"):
        await task
    await b.aclose()


async def test_configure_works_while_aclose_drains_and_not_after() -> None:
    holder: list[Batcher[int, int]] = []

    async def sink(items: list[int]) -> list[int]:
        await asyncio.sleep(0.01)
        holder[0].configure(max_concurrency=2)  # e.g. the backend allows more
        return items

    def on_batch(report: BatchReport) -> None:
        holder[0].configure(max_size=max(1, report.size // 2))

    b = Batcher(sink, max_size=4, max_wait=0.01, on_batch=on_batch)
    holder.append(b)
    futs = [b.submit_nowait(i) for i in range(8)]
    await asyncio.sleep(0)
    await b.aclose()
    assert [f.result() for f in futs] == list(range(8))
    with pytest.raises(BatcherClosed, match="cannot be reconfigured"):
        b.configure(max_size=3)
