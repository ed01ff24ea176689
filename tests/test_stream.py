"""``chunks``: batches by size and time, ordering, errors, closing."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Iterable

import pytest

from asyncbatch import chunks

# A source script: numbers are items, ("sleep", s) waits s seconds,
# ("raise", exc) raises, ("block",) waits forever.
Step = int | tuple[str, object]


class Source:
    """A scripted async generator that records what happened to it."""

    def __init__(self, script: Iterable[Step]) -> None:
        self.script = list(script)
        self.pulled = 0
        self.closed = False
        self.cancelled = False

    async def run(self) -> AsyncIterator[int]:
        try:
            for step in self.script:
                if isinstance(step, int):
                    self.pulled += 1
                    yield step
                elif step[0] == "sleep":
                    assert isinstance(step[1], int | float)
                    await asyncio.sleep(step[1])
                elif step[0] == "raise":
                    assert isinstance(step[1], BaseException)
                    raise step[1]
                else:
                    await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.closed = True


async def collect(
    source: AsyncIterator[int], max_size: int, max_wait: float
) -> list[tuple[float, list[int]]]:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out: list[tuple[float, list[int]]] = []
    async with contextlib.aclosing(chunks(source, max_size=max_size, max_wait=max_wait)) as gen:
        async for batch in gen:
            out.append((round(loop.time() - t0, 6), batch))
    return out


def no_other_tasks() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


async def test_size_only_batches_and_final_partial() -> None:
    src = Source(range(7))
    got = await collect(src.run(), max_size=3, max_wait=math.inf)
    assert [b for _, b in got] == [[0, 1, 2], [3, 4, 5], [6]]
    assert src.closed


async def test_empty_source_yields_nothing() -> None:
    assert await collect(Source([]).run(), max_size=3, max_wait=1.0) == []


async def test_exact_multiple_of_max_size_has_no_empty_tail() -> None:
    got = await collect(Source(range(4)).run(), max_size=2, max_wait=1.0)
    assert [b for _, b in got] == [[0, 1], [2, 3]]


@pytest.mark.looptime
async def test_batch_cut_by_time_after_first_item() -> None:
    script: list[Step] = [0, ("sleep", 0.1), 1, ("sleep", 0.1), 2, ("sleep", 5), 3, ("sleep", 0.5)]
    script += [4, ("sleep", 3)]
    got = await collect(Source(script).run(), max_size=10, max_wait=1.0)
    # [0, 1, 2] goes at 0 + 1.0; 3 arrives at 5.2 and its batch goes at 6.2;
    # the source then ends at 8.7 with nothing pending.
    assert got == [(1.0, [0, 1, 2]), (6.2, [3, 4])]


@pytest.mark.looptime
async def test_full_batch_goes_at_once_without_waiting() -> None:
    script: list[Step] = [0, ("sleep", 0.25), 1, 2, ("sleep", 0.25), 3, ("sleep", 10), 4]
    got = await collect(Source(script).run(), max_size=3, max_wait=1.0)
    assert got == [(0.25, [0, 1, 2]), (1.5, [3]), (10.5, [4])]


@pytest.mark.looptime
async def test_item_pending_at_timeout_is_not_lost_and_opens_next_batch() -> None:
    # The read for 1 is pending when [0]'s deadline passes; 1 then opens the
    # next batch, whose clock starts at its own arrival (t=2).
    script: list[Step] = [0, ("sleep", 2), 1, ("sleep", 0.5), 2, ("sleep", 2), 3]
    got = await collect(Source(script).run(), max_size=10, max_wait=1.0)
    assert got == [(1.0, [0]), (3.0, [1, 2]), (4.5, [3])]


@pytest.mark.looptime
async def test_final_partial_batch_goes_at_end_of_source_not_at_deadline() -> None:
    script: list[Step] = [0, 1, ("sleep", 0.3)]
    got = await collect(Source(script).run(), max_size=10, max_wait=1.0)
    assert got == [(0.3, [0, 1])]


@pytest.mark.looptime
async def test_max_wait_zero_takes_what_is_ready_now() -> None:
    script: list[Step] = [0, 1, 2, ("sleep", 1), 3, 4, ("sleep", 1), 5]
    got = await collect(Source(script).run(), max_size=10, max_wait=0)
    assert got == [(0.0, [0, 1, 2]), (1.0, [3, 4]), (2.0, [5])]


@pytest.mark.looptime
async def test_slow_consumer_gets_read_ahead_item_in_next_batch_with_fresh_clock() -> None:
    loop = asyncio.get_running_loop()
    src = Source([0, ("sleep", 1.5), 1, 2, ("sleep", 0.2), 3, ("sleep", 9), 4])
    seen: list[tuple[float, list[int]]] = []
    async with contextlib.aclosing(chunks(src.run(), max_size=10, max_wait=1.0)) as gen:
        async for batch in gen:
            seen.append((loop.time(), batch))
            if len(seen) == 1:
                await asyncio.sleep(5)  # busy with [0] while 1 and more are ready
                # Only the one read that was pending went ahead.
                assert src.pulled == 2
    # [0] at 1.0; consumer back at 6.0 with 1 in hand: [1, 2] waits its own
    # max_wait from then, picks up 3 at 6.2 and goes at 7.0.
    assert [(round(t, 6), b) for t, b in seen] == [(1.0, [0]), (7.0, [1, 2, 3]), (15.2, [4])]


async def test_full_batch_leaves_no_read_pending() -> None:
    src = Source(range(10))
    async with contextlib.aclosing(chunks(src.run(), max_size=3, max_wait=math.inf)) as gen:
        assert await anext(gen) == [0, 1, 2]
        assert src.pulled == 3
        assert no_other_tasks()
    assert src.closed
    assert src.pulled == 3


async def test_source_error_propagates_after_items_read_are_yielded() -> None:
    boom = ValueError("boom")
    src = Source([1, 2, 3, ("raise", boom)])
    gen = chunks(src.run(), max_size=2, max_wait=math.inf)
    got: list[list[int]] = []

    async def drain() -> None:
        async for batch in gen:
            got.append(batch)

    with pytest.raises(ValueError, match="boom") as info:
        await drain()
    assert info.value is boom
    assert got == [[1, 2], [3]]
    assert no_other_tasks()


async def test_source_error_first_item() -> None:
    src = Source([("raise", KeyError("k"))])
    with pytest.raises(KeyError):
        await collect(src.run(), max_size=2, max_wait=1.0)


@pytest.mark.looptime
async def test_source_error_after_timed_out_batch() -> None:
    src = Source([0, ("sleep", 2), ("raise", RuntimeError("late"))])
    gen = chunks(src.run(), max_size=5, max_wait=1.0)
    assert await anext(gen) == [0]
    with pytest.raises(RuntimeError, match="late"):
        await anext(gen)
    assert no_other_tasks()


async def test_aclose_closes_source() -> None:
    src = Source(range(100))
    gen = chunks(src.run(), max_size=4, max_wait=1.0)
    assert await anext(gen) == [0, 1, 2, 3]
    await gen.aclose()
    assert src.closed
    assert no_other_tasks()


async def test_break_under_aclosing_closes_source() -> None:
    src = Source(range(100))
    async with contextlib.aclosing(chunks(src.run(), max_size=4, max_wait=1.0)) as gen:
        async for batch in gen:
            assert batch == [0, 1, 2, 3]
            break
    assert src.closed
    assert no_other_tasks()


@pytest.mark.looptime
async def test_aclose_with_a_read_pending_cancels_it_and_leaves_no_task() -> None:
    src = Source([0, ("block", None)])
    gen = chunks(src.run(), max_size=4, max_wait=1.0)
    assert await anext(gen) == [0]
    assert len(asyncio.all_tasks()) == 2  # the pending read
    await gen.aclose()
    assert src.cancelled
    assert src.closed
    assert no_other_tasks()


@pytest.mark.looptime
async def test_aclose_after_the_pending_read_finished_drops_that_item() -> None:
    src = Source([0, ("sleep", 2), 1, ("raise", ValueError("unseen"))])
    gen = chunks(src.run(), max_size=4, max_wait=1.0)
    assert await anext(gen) == [0]
    await asyncio.sleep(5)  # the read brought 1 meanwhile
    assert src.pulled == 2
    await gen.aclose()
    assert src.closed
    assert not src.cancelled
    assert no_other_tasks()


@pytest.mark.looptime
async def test_cancelling_the_consumer_cleans_up() -> None:
    src = Source([0, ("block", None)])
    got: list[list[int]] = []

    async def consume() -> None:
        async for batch in chunks(src.run(), max_size=4, max_wait=math.inf):
            got.append(batch)  # pragma: no cover - the batch never fills

    task = asyncio.create_task(consume())
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert got == []
    assert src.cancelled
    assert src.closed
    assert no_other_tasks()


async def test_plain_async_iterator_without_aclose() -> None:
    class Countdown:
        def __init__(self, n: int) -> None:
            self.n = n

        def __aiter__(self) -> Countdown:
            return self

        async def __anext__(self) -> int:
            if self.n == 0:
                raise StopAsyncIteration
            self.n -= 1
            return self.n

    got = [b async for b in chunks(Countdown(5), max_size=2, max_wait=0.5)]
    assert got == [[4, 3], [2, 1], [0]]


async def test_custom_iterator_aclose_is_called() -> None:
    closed: list[bool] = []

    class Endless:
        def __aiter__(self) -> Endless:
            return self

        async def __anext__(self) -> int:
            return 7

        async def aclose(self) -> None:
            closed.append(True)

    gen = chunks(Endless(), max_size=3, max_wait=0.5)
    assert await anext(gen) == [7, 7, 7]
    await gen.aclose()
    assert closed == [True]


async def test_order_is_kept_across_many_batches() -> None:
    async def ticking() -> AsyncIterator[int]:
        for i in range(1000):
            if i % 7 == 0:
                await asyncio.sleep(0)
            yield i

    flat: list[int] = []
    sizes: set[int] = set()
    async for batch in chunks(ticking(), max_size=16, max_wait=0):
        flat.extend(batch)
        sizes.add(len(batch))
    assert flat == list(range(1000))
    assert max(sizes) <= 16
    assert 0 not in sizes


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_size": 0}, ValueError, "max_size must be >= 1, got 0"),
        ({"max_size": -3}, ValueError, "max_size must be >= 1, got -3"),
        ({"max_size": 2.5}, TypeError, "max_size must be an int, got 2.5"),
        ({"max_size": True}, TypeError, "max_size must be an int, got True"),
        ({"max_wait": -0.5}, ValueError, "max_wait must be >= 0, got -0.5"),
        ({"max_wait": math.nan}, ValueError, "max_wait must be >= 0, got nan"),
        ({"max_wait": "1"}, TypeError, "max_wait must be a number of seconds, got '1'"),
    ],
)
def test_validation_happens_at_the_call(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    async def empty() -> AsyncIterator[int]:
        return
        yield  # pragma: no cover

    source = empty()
    with pytest.raises(error) as info:
        chunks(source, **kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_sync_iterable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="chunks\\(\\) needs an async iterable, got list"):
        chunks([1, 2, 3], max_size=2)  # type: ignore[arg-type]
