"""put / put_nowait (fire-and-forget), BatchReport.wait and failed_items, logging."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
from typing import Any

import pytest

from asyncbatch import Batcher, BatcherClosed, BatchReport, QueueFull, Retry

from .support import RecordingSink, settle

pytestmark = pytest.mark.looptime


async def failing(items: list[str]) -> None:
    raise ConnectionError("collector down")


async def test_put_nowait_failures_are_counted_and_logged_once_per_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # ../shared/cases/friction/fire_and_forget_noise_and_loss.py
    reports: list[BatchReport] = []
    b: Batcher[str, None] = Batcher(failing, max_size=50, on_batch=reports.append)
    with caplog.at_level(logging.INFO):
        for i in range(200):
            b.put_nowait(f"line {i}")
        await b.aclose()
        gc.collect()
        await asyncio.sleep(0)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    ours = [r for r in caplog.records if r.name == "asyncbatch" and r.levelno >= logging.WARNING]
    assert len(ours) == 4  # one per failed batch of 50
    assert "batch of 50 items" in ours[0].getMessage()
    assert "ConnectionError: collector down" in ours[0].getMessage()
    s = b.stats
    assert (s.submitted, s.failed, s.succeeded, s.batches) == (200, 200, 0, 4)
    assert [len(r.failed_items) for r in reports] == [50, 50, 50, 50]
    item, error = reports[0].failed_items[0]
    assert item == "line 0"
    assert isinstance(error, ConnectionError)


async def test_put_items_get_results_counted_and_per_item_errors_reported() -> None:
    reports: list[BatchReport] = []

    async def sink(items: list[int]) -> list[object]:
        return [ValueError(f"bad {x}") if x % 3 == 0 else x for x in items]

    b = Batcher(sink, max_size=10, on_batch=reports.append)
    for i in range(10):
        b.put_nowait(i)
    await b.aclose()
    s = b.stats
    assert (s.submitted, s.succeeded, s.failed) == (10, 6, 4)
    assert [(item, str(err)) for item, err in reports[0].failed_items] == [
        (0, "bad 0"),
        (3, "bad 3"),
        (6, "bad 6"),
        (9, "bad 9"),
    ]
    assert reports[0].error is None


async def test_put_and_submit_share_batches_and_each_caller_gets_its_own() -> None:
    sink = RecordingSink()
    b = Batcher(sink, max_size=4)
    b.put_nowait(1)
    f = b.submit_nowait(2)
    await b.put(3)
    t = asyncio.create_task(b.submit(4))
    assert await f == 20
    assert await t == 40
    await b.aclose()
    assert sink.batches == [[1, 2, 3, 4]]
    assert b.stats.succeeded == 4


async def test_put_waits_for_room_and_put_nowait_refuses() -> None:
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_size=2, max_pending=2)
    for i in range(4):
        await b.put(i)  # [0, 1] goes when room runs out; 2, 3 wait for the slot
    with pytest.raises(QueueFull, match="max_pending=2"):
        b.put_nowait(4)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await b.put(5)  # waits until [2, 3] is dispatched, when [0, 1] is done
    assert loop.time() - t0 == pytest.approx(1.0)
    await b.aclose()
    assert sink.batches == [[0, 1], [2, 3], [5]]
    assert (b.stats.rejected, b.stats.succeeded) == (1, 5)


async def test_put_reject_and_drop_oldest() -> None:
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_wait=1.0, max_pending=1, overflow="reject")
    b.put_nowait(0)
    await b.put(1)  # [0] goes, making room
    with pytest.raises(QueueFull):
        await b.put(2)
    await b.aclose()
    assert sink.items == [0, 1]

    sink = RecordingSink()
    d = Batcher(sink, max_wait=1.0, max_pending=2, overflow="drop_oldest")
    for i in range(5):
        d.put_nowait(i)
    await d.aclose()
    assert sink.items == [3, 4]
    assert (d.stats.dropped, d.stats.succeeded, d.stats.submitted) == (3, 2, 5)


async def test_put_on_a_closed_batcher() -> None:
    b = Batcher(RecordingSink())
    await b.aclose()
    with pytest.raises(BatcherClosed):
        b.put_nowait(1)
    with pytest.raises(BatcherClosed):
        await b.put(1)


async def test_put_cancelled_while_waiting_for_room_was_never_accepted() -> None:
    sink = RecordingSink()
    sink.gate = asyncio.Event()
    b = Batcher(sink, max_size=1, max_pending=1)
    b.put_nowait(0)  # goes at once and holds the slot
    b.put_nowait(1)  # the room
    waiting = asyncio.create_task(b.put(2))
    await settle()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    sink.gate.set()
    await b.aclose()
    assert sink.items == [0, 1]
    assert b.stats.submitted == 2


async def test_put_items_with_retryable_and_retry() -> None:
    from asyncbatch import Retryable

    calls: list[list[int]] = []

    async def sink(items: list[int]) -> list[object]:
        calls.append(list(items))
        if len(calls) == 1:
            return [Retryable("busy") if x == 2 else x for x in items]
        return list(items)

    b = Batcher(sink, max_size=3, retry=Retry(attempts=2, backoff=0))
    for i in (1, 2, 3):
        b.put_nowait(i)
    await b.aclose()
    assert calls == [[1, 2, 3], [2]]
    assert (b.stats.succeeded, b.stats.failed, b.stats.retries) == (3, 0, 1)


async def test_put_under_aclose_cancel_counts_every_item() -> None:
    sink = RecordingSink()
    sink.gate = asyncio.Event()
    b = Batcher(sink, max_size=2)
    for i in range(5):
        b.put_nowait(i)
    await settle()
    await b.aclose(cancel=True)
    s = b.stats
    assert s.submitted == 5
    assert s.succeeded + s.failed == 5
    assert s.failed == 5  # in flight cancelled, pending failed with BatcherClosed


async def test_report_wait_is_the_first_items_wait_before_dispatch() -> None:
    reports: list[BatchReport] = []
    b = Batcher(RecordingSink(), max_size=10, max_wait=0.5, on_batch=reports.append)
    b.put_nowait(1)
    await asyncio.sleep(0.2)
    b.put_nowait(2)
    await b.flush()
    await asyncio.sleep(1)
    b.put_nowait(3)
    await asyncio.sleep(1)
    await b.aclose()
    assert [r.reason for r in reports] == ["flush", "wait"]
    assert [r.wait for r in reports] == [pytest.approx(0.2), pytest.approx(0.5)]


async def test_retry_is_logged_at_info_and_dispatch_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def flaky(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("blip")
        return items

    with caplog.at_level(logging.DEBUG, logger="asyncbatch"):
        async with Batcher(
            flaky, retry=Retry(attempts=2, backoff=0.25, jitter=False), name="flaky"
        ) as b:
            assert await b.submit(7) == 7
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == [
        "batcher 'flaky': sink call failed (attempt 1, ConnectionError: blip); retrying in 0.250 s"
    ]
    debugs = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert "batcher 'flaky': dispatching 1 items (reason 'wait')" in debugs


async def test_full_batcher_is_logged_at_most_once_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = RecordingSink()
    sink.gate = asyncio.Event()
    b = Batcher(sink, max_size=1, max_pending=1, overflow="reject")
    b.put_nowait(0)
    b.put_nowait(1)
    with caplog.at_level(logging.WARNING, logger="asyncbatch"):
        for _ in range(100):
            with pytest.raises(QueueFull):
                b.put_nowait(2)
    full = [r for r in caplog.records if "is full" in r.getMessage()]
    assert len(full) <= 1
    assert b.stats.rejected == 100
    sink.gate.set()
    await b.aclose()


async def test_library_adds_no_handler() -> None:
    assert logging.getLogger("asyncbatch").handlers == []


async def test_nothing_per_item_is_allocated_for_put(monkeypatch: pytest.MonkeyPatch) -> None:
    # put_nowait makes no future: the loop's create_future is never called.
    b = Batcher(RecordingSink(), max_size=1000, max_wait=math.inf)
    b.put_nowait(0)  # binds
    loop = asyncio.get_running_loop()
    made: list[Any] = []
    real = loop.create_future

    def counting() -> asyncio.Future[Any]:
        made.append(1)
        return real()

    monkeypatch.setattr(loop, "create_future", counting)
    for i in range(1, 100):
        b.put_nowait(i)
    assert made == []
    monkeypatch.undo()
    await b.aclose()
    assert b.stats.succeeded == 100


async def test_put_items_failed_by_a_cancelling_close_are_reported() -> None:
    reports: list[BatchReport] = []
    sink = RecordingSink()
    b = Batcher(sink, max_size=4, max_wait=0.001, on_batch=reports.append)
    for i in range(20):
        b.put_nowait(i)
    await asyncio.gather(b.aclose(), b.aclose(cancel=True))
    failed = [item for r in reports for item, _ in r.failed_items]
    delivered = sink.items
    assert sorted(failed + [x for x in delivered if x not in failed]) == list(range(20))
    assert b.stats.failed == len(failed)
    assert all(isinstance(e, BatcherClosed) for r in reports for _, e in r.failed_items)


async def test_refusals_not_logged_yet_are_logged_at_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = RecordingSink()
    sink.gate = asyncio.Event()
    b = Batcher(sink, max_size=1, max_pending=1, overflow="reject")
    b.put_nowait(0)
    b.put_nowait(1)
    with caplog.at_level(logging.WARNING, logger="asyncbatch"):
        for _ in range(3):
            with pytest.raises(QueueFull):
                b.put_nowait(2)
        sink.gate.set()
        await b.aclose()
    full = [r.getMessage() for r in caplog.records if "is full" in r.getMessage()]
    assert sum(int(m.split(": ")[1].split(" items rejected")[0]) for m in full) == 3


async def test_an_observer_detached_during_a_call_still_gets_its_own_call_finished() -> None:
    from asyncbatch._observe import SinkCall

    events: list[tuple[str, str, object]] = []

    class Rec:
        capture = None

        def __init__(self, name: str) -> None:
            self.name = name

        def call_started(self, call: SinkCall) -> object:
            events.append(("start", self.name, None))
            return f"token-{self.name}"

        def call_finished(
            self, call: SinkCall, token: object, duration: float, error: BaseException | None
        ) -> None:
            events.append(("finish", self.name, token))

        def batch_finished(self, batcher: str, report: BatchReport) -> None:
            pass

    gate = asyncio.Event()

    async def sink(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    b = Batcher(sink)
    first, second = Rec("a"), Rec("b")
    b._attach(first)
    b._attach(second)
    f = b.submit_nowait(1)
    await settle()
    b._detach(first)  # while the call runs
    gate.set()
    assert await f == 1
    assert ("finish", "a", "token-a") in events
    assert ("finish", "b", "token-b") in events
    await b.aclose()
