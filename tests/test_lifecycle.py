"""flush, aclose, loop binding, threads, repr, leaks."""

from __future__ import annotations

import asyncio
import gc
import threading
import warnings
from typing import Any

import pytest

from asyncbatch import Batcher, BatcherClosed

from .support import RecordingSink, live_timers, other_tasks, settle


@pytest.mark.looptime
async def test_flush_waits_for_in_flight_and_pending() -> None:
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_size=2, max_wait=50)
    futs = [b.submit_nowait(i) for i in range(3)]  # [0,1] in flight, [2] pending
    await settle()
    await b.flush()
    assert all(f.done() for f in futs)
    assert b.stats.reasons == {"size": 1, "flush": 1}
    await b.aclose()


@pytest.mark.looptime
async def test_flush_respects_max_concurrency() -> None:
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink, max_size=1, max_wait=50, max_concurrency=2)
    for i in range(6):
        b.submit_nowait(i)
    await b.flush()
    assert sink.max_active == 2
    await b.aclose()


async def test_flush_on_unused_batcher_is_a_no_op() -> None:
    b = Batcher(RecordingSink())
    await b.flush()
    await b.aclose()


@pytest.mark.looptime
async def test_aclose_drains_in_batches_and_leaves_nothing_behind() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink(delay=0.5)
    b = Batcher(sink, max_size=3, max_wait=60, max_concurrency=2, interval=30)
    futs = [b.submit_nowait(i) for i in range(8)]
    before = other_tasks()
    await b.aclose()
    assert [f.result() for f in futs] == [i * 10 for i in range(8)]
    assert sink.batches == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert sink.max_active == 2
    assert b.stats.reasons == {"size": 2, "close": 1}
    assert other_tasks() <= before
    assert not any(t.get_coro().__qualname__.startswith("Batcher") for t in other_tasks())  # type: ignore[union-attr]
    assert live_timers(loop) == []
    assert b.closed
    assert b.stats.pending == b.stats.in_flight == 0


async def test_submit_after_close_raises() -> None:
    b = Batcher(RecordingSink())
    await b.aclose()
    with pytest.raises(BatcherClosed):
        await b.submit(1)
    with pytest.raises(BatcherClosed):
        b.submit_nowait(1)
    with pytest.raises(BatcherClosed):
        await b.submit_many([1])


@pytest.mark.looptime
async def test_aclose_cancel_fails_pending_and_cancels_in_flight() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink(delay=10)
    b = Batcher(sink, max_size=2, max_wait=5)
    futs = [b.submit_nowait(i) for i in range(3)]  # [0,1] in flight, [2] pending
    await settle()
    await b.aclose(cancel=True)
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert all(isinstance(r, BatcherClosed) for r in results)
    assert "cancel=True" in str(results[0])
    assert sink.batches == [[0, 1]]
    assert b.stats.failed == 3
    assert live_timers(loop) == []
    assert loop.time() < 10


@pytest.mark.looptime
async def test_aclose_is_idempotent_and_second_call_waits() -> None:
    sink = RecordingSink(delay=1.0)
    b = Batcher(sink)
    f = b.submit_nowait(1)
    first = asyncio.create_task(b.aclose())
    await settle()
    second = asyncio.create_task(b.aclose())
    await settle()
    assert not second.done()
    await asyncio.gather(first, second)
    assert f.result() == 10
    await b.aclose()


@pytest.mark.looptime
async def test_second_aclose_with_cancel_escalates_a_drain() -> None:
    sink = RecordingSink(delay=100)
    b = Batcher(sink)
    f = b.submit_nowait(1)
    drain = asyncio.create_task(b.aclose())
    await asyncio.sleep(1)
    await b.aclose(cancel=True)
    await drain
    with pytest.raises(BatcherClosed):
        await f


@pytest.mark.looptime
async def test_cancelling_the_closer_cancels_the_work_and_propagates() -> None:
    loop = asyncio.get_running_loop()
    sink = RecordingSink(delay=100)
    b = Batcher(sink, max_size=1)
    futs = [b.submit_nowait(i) for i in range(3)]
    closer = asyncio.create_task(b.aclose())
    await asyncio.sleep(1)
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    assert all(f.done() for f in futs)
    assert b.closed
    assert live_timers(loop) == []
    assert not [t for t in other_tasks() if "Batcher" in repr(t.get_coro())]
    for f in futs:
        assert isinstance(f.exception(), BatcherClosed)


async def test_async_with_binds_and_closes() -> None:
    sink = RecordingSink()
    async with Batcher(sink) as b:
        assert "[running]" in repr(b)
        f = b.submit_nowait(1)
    assert f.result() == 10
    assert b.closed
    assert "[closed]" in repr(b)


async def test_repr_shows_name_state_and_counts() -> None:
    b = Batcher(RecordingSink(), name="emails", max_wait=10)
    assert repr(b) == "<Batcher 'emails' [idle] pending=0 in_flight=0>"
    f = b.submit_nowait(1)
    assert repr(b) == "<Batcher 'emails' [running] pending=1 in_flight=0>"
    await b.aclose()
    assert f.done()


def test_use_from_second_loop_while_first_runs_is_a_runtime_error() -> None:
    b = Batcher(RecordingSink(delay=0.05), max_wait=0.2)
    started = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    async def first() -> None:
        f = b.submit_nowait(1)
        started.set()
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 5)
        await f

    async def second() -> None:
        try:
            await b.submit(2)
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=asyncio.run, args=(first(),))
    t.start()
    assert started.wait(5)
    asyncio.run(second())
    release.set()
    t.join(5)
    assert len(errors) == 1
    assert "another event loop" in str(errors[0])


def test_rebinds_after_the_first_loop_closed() -> None:
    sink = RecordingSink()
    b = Batcher(sink)

    async def use(x: int) -> Any:
        return await b.submit(x)

    assert asyncio.run(use(1)) == 10
    assert asyncio.run(use(2)) == 20
    assert sink.batches == [[1], [2]]


def test_submit_threadsafe_from_other_threads() -> None:
    sink = RecordingSink()
    results: list[Any] = []

    async def main() -> None:
        async with Batcher(sink, max_size=50, max_wait=0.01) as b:
            loop = asyncio.get_running_loop()

            def worker(i: int) -> Any:
                return b.submit_threadsafe(i).result(timeout=5)

            results.extend(
                await asyncio.gather(*(loop.run_in_executor(None, worker, i) for i in range(20)))
            )

    asyncio.run(main())
    assert results == [i * 10 for i in range(20)]


def test_submit_threadsafe_needs_a_bound_loop() -> None:
    b = Batcher(RecordingSink())
    with pytest.raises(RuntimeError, match="not bound"):
        b.submit_threadsafe(1)


def test_submit_nowait_needs_a_running_loop() -> None:
    b = Batcher(RecordingSink())
    with pytest.raises(RuntimeError):
        b.submit_nowait(1)


def test_gc_with_pending_items_warns() -> None:
    # A loop closed by hand, without shutdown_asyncgens(): the batcher never
    # heard that its loop ended, so its items are still pending when collected.
    async def leave_pending() -> None:
        b = Batcher(RecordingSink(), max_wait=60)
        b.submit_nowait(1)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(leave_pending())
    loop.close()
    with pytest.warns(ResourceWarning, match="1 pending"):
        gc.collect()


def test_items_lost_at_asyncio_run_end_are_told_once() -> None:
    async def leave_pending() -> Batcher[int, int]:
        b = Batcher(RecordingSink(), max_wait=60)
        b.submit_nowait(1)
        return b

    holder = [asyncio.run(leave_pending())]  # logged and failed at loop end
    assert (holder[0].stats.failed, holder[0].stats.pending) == (1, 0)
    holder.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        gc.collect()


def test_gc_of_closed_batcher_is_silent() -> None:
    async def clean() -> None:
        b = Batcher(RecordingSink())
        await b.submit(1)
        await b.aclose()

    asyncio.run(clean())
    gc.collect()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_size": 0}, "max_size must be >= 1, got 0"),
        ({"max_concurrency": 0}, "max_concurrency must be >= 1, got 0"),
        ({"max_pending": 0}, "max_pending must be >= 1, got 0"),
        ({"max_wait": -1}, "max_wait must be >= 0, got -1"),
        ({"interval": 0}, "interval must be > 0, got 0"),
        ({"timeout": 0}, "timeout must be > 0, got 0"),
        ({"max_weight": 10}, "max_weight needs weigh="),
        ({"max_weight": -1, "weigh": len}, "max_weight must be > 0"),
        ({"overflow": "spill"}, "overflow must be one of"),
    ],
)
def test_validation_messages(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Batcher(RecordingSink(), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_size": 1.5},
        {"max_size": True},
        {"max_wait": "1"},
        {"retry": 3},
        {"key": 1},
        {"on_batch": 1},
    ],
)
def test_type_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        Batcher(RecordingSink(), **kwargs)


def test_sink_must_be_callable() -> None:
    with pytest.raises(TypeError, match="sink"):
        Batcher(42)  # type: ignore[arg-type]


def test_items_stranded_on_a_closed_loop_fail_the_next_loop_instead_of_hanging() -> None:
    def scenario() -> None:
        b = Batcher(RecordingSink(), max_wait=60)

        async def strand() -> None:
            b.submit_nowait(1)

        async def again() -> Any:
            async with asyncio.timeout(5):
                return await b.submit(2)

        asyncio.run(strand())
        with pytest.raises(RuntimeError):
            asyncio.run(again())

    scenario()


async def test_aclose_lets_done_callbacks_of_the_last_batch_run() -> None:
    seen: list[int] = []
    b = Batcher(RecordingSink())
    for i in range(3):
        b.submit_nowait(i).add_done_callback(lambda f: seen.append(f.result()))
    await settle(2)  # the batch is delivered; its callbacks are only scheduled
    await b.aclose()
    assert sorted(seen) == [0, 10, 20]
