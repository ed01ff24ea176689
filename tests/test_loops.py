"""Loop, thread and state checks at every entry point (DESIGN: "Every public entry
point checks its loop (and thread) before it changes state")."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import math
import threading
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asyncbatch import Batcher, BatcherClosed, BatchReport, DataLoader

from .conftest import FLAVOURS


async def echo(items: list[int]) -> list[int]:
    return items


async def echo_str(items: list[str]) -> list[str]:
    return items


def _forget(holder: list[Any]) -> None:
    """Drop the last references to what ``holder`` holds and collect it."""
    holder.clear()
    gc.collect()


def test_plain_path_after_a_loop_closed_with_items_stranded_is_a_clear_error() -> None:
    # ../shared/cases/faults/batcher_reuse_after_loop_closed_plain_path.py
    holder = [Batcher(echo, max_wait=0.05)]

    async def first() -> None:
        b = holder[0]
        assert await b.submit(1) == 1
        b.submit_nowait(2)  # left pending at the end of the run

    async def second() -> tuple[str, int, int]:
        b = holder[0]
        before = b.stats.pending
        with pytest.raises(RuntimeError, match="is bound to another event loop") as info:
            await b.submit(3)
        with pytest.raises(RuntimeError, match="is bound to another event loop"):
            await b.submit(4, timeout=1)
        with pytest.raises(RuntimeError, match="is bound to another event loop"):
            b.put_nowait(5)
        return str(info.value), before, b.stats.pending

    asyncio.run(first())
    # The item left pending failed when its loop ended (counted, nothing pending)...
    assert (holder[0].stats.failed, holder[0].stats.pending) == (1, 0)
    message, before, after = asyncio.run(second())
    assert (before, after) == (0, 0)  # ...and nothing joined a dead batch
    assert "<Batcher 'echo' [loop closed] pending=0" in message
    assert "ended with items in it" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)  # told once, at loop end
        _forget(holder)


def test_a_batcher_rebinds_cleanly_when_its_loop_closed_with_nothing_pending() -> None:
    b = Batcher(echo)
    for i in range(3):
        assert asyncio.run(b.submit(i)) == i
    assert b.stats.succeeded == 3


def test_loader_reuse_after_loop_closed_with_a_withdrawn_key() -> None:
    # ../shared/cases/faults/loader_reuse_after_loop_closed_hang.py
    calls: list[list[int]] = []

    async def load(keys: list[int]) -> list[int]:
        calls.append(list(keys))
        return [k * 2 for k in keys]

    loader = DataLoader(load, max_wait=0.05)

    async def first() -> None:
        assert await loader.load(1) == 2
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(loader.load(2), 0.001)  # a resolver that times out

    async def second() -> int:
        return await asyncio.wait_for(loader.load(3), 2)

    asyncio.run(first())
    assert asyncio.run(second()) == 6
    assert calls == [[1], [3]]


def test_loop_shutdown_with_items_pending_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def service() -> Batcher[int, int]:
        b = Batcher(echo, max_size=1000, max_wait=60)
        for i in range(10):
            b.put_nowait(i)
        return b

    with caplog.at_level(logging.WARNING, logger="asyncbatch"):
        b = asyncio.run(service())
    lost = [r for r in caplog.records if r.name == "asyncbatch" and "shutting down" in r.message]
    assert len(lost) == 1
    assert "10 pending" in lost[0].getMessage()
    assert "echo" in lost[0].getMessage()
    assert "[loop closed]" in repr(b)
    assert (b.stats.failed, b.stats.pending, b.stats.in_flight) == (10, 0, 0)
    holder = [b]
    del b
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)  # told once, at loop end
        _forget(holder)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_items_lost_at_loop_end_fail_counted_and_nothing_is_left_running(
    flavour: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A tester's case: 25 put items, one batch in flight, one due behind it,
    # 5 in the open batch when asyncio.run ends: every one must be counted.
    loop_errors: list[dict[str, Any]] = []

    async def slow(items: list[int]) -> None:
        await asyncio.sleep(5)

    def loop_factory() -> asyncio.AbstractEventLoop:
        loop = FLAVOURS[flavour]()
        loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
        return loop

    reports: list[BatchReport] = []
    holder: list[Batcher[int, None]] = [
        Batcher(slow, max_size=10, max_wait=1.0, name="logs", on_batch=reports.append)
    ]

    async def main() -> None:
        b = holder[0]
        for i in range(25):
            b.put_nowait(i)
        await asyncio.sleep(0.05)

    with (
        caplog.at_level(logging.WARNING, logger="asyncbatch"),
        asyncio.Runner(loop_factory=loop_factory) as runner,
    ):
        runner.run(main())
    b = holder[0]
    stats = b.stats
    assert (stats.submitted, stats.failed, stats.pending, stats.in_flight) == (25, 25, 0, 0)
    lost = [r.getMessage() for r in caplog.records if "shutting down" in r.getMessage()]
    assert len(lost) == 1
    assert "5 pending and 10 in-flight" in lost[0]
    assert sorted(i for r in reports for i, _ in r.failed_items) == list(range(25))
    asyncio.run(b.flush())  # nothing left to flush: its items failed with the loop

    async def again() -> None:
        holder[0].put_nowait(99)

    with pytest.raises(RuntimeError, match="ended with items in it"):
        asyncio.run(again())
    asyncio.run(b.aclose())  # and it can be closed anywhere
    assert b.closed
    del b, stats
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        _forget(holder)
    assert loop_errors == []  # no "Task was destroyed but it is pending"


def test_outside_a_loop_the_error_names_the_batcher_and_asyncio() -> None:
    # ../shared/cases/friction/outside_a_loop.py
    b = Batcher(echo, name="orders")
    for call in (lambda: b.submit_nowait(1), lambda: b.put_nowait(1)):
        with pytest.raises(RuntimeError, match=r"'orders'.*running asyncio event loop"):
            call()
    assert b.stats.pending == 0


def test_submit_threadsafe_after_aclose_is_refused_at_the_call() -> None:
    # ../shared/cases/faults/submit_threadsafe_after_close.py
    loop = asyncio.new_event_loop()
    b = Batcher(echo)

    async def use_and_close() -> None:
        assert await b.submit(1) == 1
        await b.aclose()

    try:
        loop.run_until_complete(use_and_close())
        with pytest.raises(BatcherClosed, match="is closed"):
            b.submit_threadsafe(2)
    finally:
        loop.close()


def test_submit_threadsafe_to_a_loop_that_is_not_running_is_refused() -> None:
    loop = asyncio.new_event_loop()
    b = Batcher(echo)
    try:
        assert loop.run_until_complete(b.submit(1)) == 1
        with pytest.raises(RuntimeError, match="not bound to a running event loop"):
            b.submit_threadsafe(2)
    finally:
        loop.run_until_complete(b.aclose())
        loop.close()


def test_submit_threadsafe_from_threads_during_close_always_resolves() -> None:
    outcomes: list[str] = []

    async def main() -> None:
        b: Batcher[int, int] = Batcher(echo, max_size=8)
        await b.__aenter__()
        loop = asyncio.get_running_loop()
        futs: list[concurrent.futures.Future[int]] = []
        stop = threading.Event()

        def hammer() -> None:
            i = 0
            while not stop.is_set() and i < 2000:
                try:
                    futs.append(b.submit_threadsafe(i))
                except (BatcherClosed, RuntimeError):
                    outcomes.append("refused")
                i += 1

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        await asyncio.sleep(0.01)
        await b.aclose()
        stop.set()

        def join() -> None:
            for t in threads:
                t.join()

        await loop.run_in_executor(None, join)
        await asyncio.sleep(0.05)
        for fut in futs:
            try:
                fut.result(timeout=5)
                outcomes.append("ok")
            except BatcherClosed:
                outcomes.append("closed")

    asyncio.run(main())
    assert outcomes
    assert set(outcomes) <= {"ok", "closed", "refused"}


async def test_flush_and_aclose_from_another_loop_are_refused() -> None:
    b = Batcher(echo)
    assert await b.submit(1) == 1

    def elsewhere() -> list[str]:
        errors: list[str] = []

        async def other() -> None:
            for call in (b.flush, b.aclose):
                try:
                    await call()
                except RuntimeError as exc:
                    errors.append(str(exc))

        asyncio.run(other())
        return errors

    errors = await asyncio.get_running_loop().run_in_executor(None, elsewhere)
    assert len(errors) == 2
    assert all("must run on that loop" in e for e in errors)
    assert not b.closed
    await b.aclose()


async def test_submit_many_checks_the_loop_before_taking_any_item() -> None:
    b = Batcher(echo)
    assert await b.submit(0) == 0

    def elsewhere() -> str:
        async def other() -> str:
            try:
                await b.submit_many([1, 2, 3])
            except RuntimeError as exc:
                return str(exc)
            return "accepted"

        return asyncio.run(other())

    message = await asyncio.get_running_loop().run_in_executor(None, elsewhere)
    assert "bound to another event loop" in message
    assert b.stats.pending == 0
    assert b.stats.submitted == 1
    await b.aclose()


def test_garbage_collected_with_items_pending_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    kept: dict[str, Any] = {}

    async def main() -> None:
        # No linger timer (an armed timer would keep the batcher alive).
        b = Batcher(echo, max_size=100, max_wait=math.inf)
        b.put_nowait(1)
        b.put_nowait(2)
        kept["repr"] = repr(b)
        holder = [b]
        del b
        with caplog.at_level(logging.WARNING, logger="asyncbatch"), pytest.warns(ResourceWarning):
            _forget(holder)

    asyncio.run(main())
    lost = [r for r in caplog.records if "garbage-collected" in r.getMessage()]
    assert len(lost) == 1
    assert "2 pending" in lost[0].getMessage()


def test_a_second_loop_in_the_same_thread_while_the_first_is_stopped_not_closed() -> None:
    b = Batcher(echo, max_wait=0.05)
    first = asyncio.new_event_loop()
    second = asyncio.new_event_loop()
    try:

        async def leave_one() -> None:
            b.submit_nowait(1)

        first.run_until_complete(leave_one())
        with pytest.raises(RuntimeError, match="is bound to another event loop"):
            second.run_until_complete(b.submit(2))
        assert b.stats.pending == 1  # nothing joined the first loop's batch
        assert first.run_until_complete(b.flush()) is None
        assert b.stats.succeeded == 1
        first.run_until_complete(b.aclose())
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_items_offered_while_the_loop_shuts_down_are_refused_loudly(flavour: str) -> None:
    # Async generators that put a last item in their finally, closed by
    # shutdown_asyncgens along with the batcher's own watcher (in any order).
    refused: list[str] = []
    loop_errors: list[dict[str, Any]] = []
    b: Batcher[str, str] = Batcher(echo_str, max_size=10, max_wait=0.01)

    async def events(n: int) -> AsyncIterator[int]:
        try:
            while True:
                yield n
                await asyncio.sleep(0)
        finally:
            try:
                b.put_nowait(f"closed-{n}")
            except RuntimeError as exc:
                refused.append(str(exc))

    gens: list[AsyncIterator[int]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: loop_errors.append(context)
        )
        await b.put("hello")
        for n in range(8):
            gen = events(n)
            gens.append(gen)
            await anext(gen)
        await b.flush()

    with asyncio.Runner(loop_factory=FLAVOURS[flavour]) as runner:
        runner.run(main())
    stats = b.stats
    # Each closing item was either taken before the watcher heard of the end
    # (and failed with the loop, counted) or refused with a clear error.
    assert stats.submitted == 1 + 8 - len(refused)
    assert (stats.succeeded, stats.failed, stats.pending) == (1, 8 - len(refused), 0)
    assert all("is shutting down" in message for message in refused)
    assert loop_errors == []


def test_callbacks_run_while_failing_lost_items_count_each_item_once() -> None:
    reports: list[BatchReport] = []

    def on_batch(report: BatchReport) -> None:
        reports.append(report)
        b.configure(max_size=1)  # "smaller batches after a failure"

    b: Batcher[int, int] = Batcher(
        echo, max_size=10, max_wait=5, partition=lambda i: i % 2, on_batch=on_batch
    )

    async def main() -> None:
        for i in range(4):
            b.put_nowait(i)
        await asyncio.sleep(0.01)

    asyncio.run(main())
    stats = b.stats
    assert (stats.submitted, stats.failed, stats.pending, stats.batches) == (4, 4, 0, 0)
    failed = sorted(i for r in reports for i, _ in r.failed_items)
    assert failed == [0, 1, 2, 3]


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_a_call_in_flight_when_asyncio_run_ends_is_logged_and_strands_the_batcher(
    flavour: str, caplog: pytest.LogCaptureFixture
) -> None:
    # asyncio.run cancels every task (the sink's too) before its loop-end hook.
    async def slow(items: list[int]) -> list[int]:
        await asyncio.sleep(5)
        return items

    b: Batcher[int, int] = Batcher(slow, max_wait=0.001)
    futs: list[asyncio.Future[int]] = []

    async def main() -> None:
        futs.append(b.submit_nowait(1))
        await asyncio.sleep(0.05)  # in flight

    with (
        caplog.at_level(logging.WARNING, logger="asyncbatch"),
        asyncio.Runner(loop_factory=FLAVOURS[flavour]) as runner,
    ):
        runner.run(main())
    assert isinstance(futs[0].exception(), BatcherClosed)
    warned = [r.getMessage() for r in caplog.records if "cancelled from outside" in r.getMessage()]
    assert len(warned) == 1
    assert "1 items" in warned[0]
    assert (b.stats.failed, b.stats.in_flight) == (1, 0)

    async def again() -> None:
        b.put_nowait(2)

    with pytest.raises(RuntimeError, match="ended with items in it"):
        asyncio.run(again())
