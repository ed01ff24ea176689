"""Batcher.configure (and the @batch / DataLoader ones): safe while items flow."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from asyncbatch import Adaptive, Batcher, BatcherClosed, DataLoader, batch

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
    with pytest.raises(TypeError, match="max_size must be an int"):
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
