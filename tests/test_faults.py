"""Faults found by trying the library from outside (../shared/cases/faults), as tests.

Each test is named after its case and asserts the right value, not only
"no hang". The randomized suites (test_chaos, test_invariants) generate the
same kinds.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import pytest

from asyncbatch import Batcher, BatcherClosed, DataLoader, Retry, Retryable

from .support import RecordingSink, Rows, settle

pytestmark = pytest.mark.looptime


# ------------------------------------------------ the sink owns its list


async def test_sink_mutates_items_mapping_misroute() -> None:
    async def sink(items: list[int]) -> dict[int, str]:
        items.sort()  # in place, as before a DB query
        return {x: f"value-of-{x}" for x in items}

    async with Batcher(sink, max_size=10) as b:
        res = await asyncio.gather(*(b.submit(x) for x in [3, 1, 2]))
    assert list(res) == ["value-of-3", "value-of-1", "value-of-2"]


async def test_sink_that_reverses_its_list_and_answers_a_sequence_for_the_original_order() -> None:
    async def sink(items: list[int]) -> list[int]:
        answer = [x * 10 for x in items]
        items.reverse()
        return answer

    async with Batcher(sink, max_size=10) as b:
        assert list(await asyncio.gather(*(b.submit(x) for x in [1, 2, 3]))) == [10, 20, 30]


async def test_sink_drains_items_retry_hang() -> None:
    calls = 0

    async def sink(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        while items:
            items.pop()
        raise ConnectionError("backend down")

    b = Batcher(sink, max_size=10, retry=Retry(attempts=3, backoff=0.01, jitter=False))
    futs = [b.submit_nowait(i) for i in range(3)]
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError] * 3
    assert calls == 3
    s = b.stats
    assert (s.submitted, s.failed, s.retries) == (3, 3, 2)
    await b.aclose()


async def test_sink_that_keeps_its_list_and_mutates_it_later() -> None:
    kept: list[list[int]] = []

    async def sink(items: list[int]) -> list[int]:
        kept.append(items)
        return [x + 1 for x in items]

    async with Batcher(sink, max_size=2, retry=Retry(attempts=2, backoff=0)) as b:
        first = await asyncio.gather(b.submit(1), b.submit(2))
        kept[0].clear()
        kept[0].append(99)
        second = await asyncio.gather(b.submit(3), b.submit(4))
    assert (list(first), list(second)) == ([2, 3], [4, 5])


async def test_retry_after_a_mutating_failure_sends_the_original_items() -> None:
    seen: list[list[int]] = []

    async def sink(items: list[int]) -> list[int]:
        seen.append(list(items))
        if len(seen) == 1:
            items[:] = [0] * len(items)
            raise ConnectionError("flaky")
        return items

    async with Batcher(sink, max_size=3, retry=Retry(attempts=2, backoff=0)) as b:
        assert list(await asyncio.gather(*(b.submit(x) for x in [5, 6, 7]))) == [5, 6, 7]
    assert seen == [[5, 6, 7], [5, 6, 7]]


# ------------------------------------------------------- answers and entries


async def test_stopiteration_entry_fails_only_its_item() -> None:
    async def sink(items: list[int]) -> list[object]:
        return [StopIteration("no such row") if x == 1 else x * 10 for x in items]

    async with Batcher(sink, max_size=10) as b:
        res = await asyncio.gather(*(b.submit(x) for x in [0, 1, 2, 3]), return_exceptions=True)
    assert res[0] == 0
    assert res[2] == 20
    assert res[3] == 30
    assert isinstance(res[1], RuntimeError)
    assert isinstance(res[1].__cause__, StopIteration)
    s = b.stats
    assert (s.submitted, s.succeeded, s.failed) == (4, 3, 1)


@pytest.mark.parametrize(
    "entry",
    [StopIteration("x"), StopAsyncIteration("x"), Retryable(StopIteration("x"))],
    ids=["StopIteration", "StopAsyncIteration", "Retryable(StopIteration)"],
)
async def test_every_exception_entry_fails_only_its_item(entry: Exception) -> None:
    async def sink(items: list[int]) -> list[object]:
        return [entry if x == 1 else x for x in items]

    async with Batcher(sink, max_size=10) as b:
        res = await asyncio.gather(*(b.submit(x) for x in [0, 1, 2]), return_exceptions=True)
    assert res[0] == 0
    assert res[2] == 2
    assert isinstance(res[1], Exception)
    assert b.stats.failed == 1


async def test_base_exception_instances_are_values_not_errors() -> None:
    # DESIGN: an entry that is an *Exception* instance fails its item; a
    # BaseException that is not an Exception is a plain value.
    interrupt = KeyboardInterrupt("a value")
    cancelled = asyncio.CancelledError("a value too")

    async def sink(items: list[int]) -> list[object]:
        return [interrupt, cancelled, items[2]]

    async with Batcher(sink, max_size=3) as b:
        res = await asyncio.gather(b.submit(0), b.submit(1), b.submit(2))
    assert res[0] is interrupt
    assert res[1] is cancelled
    assert res[2] == 2


@pytest.mark.parametrize("shape", [list, tuple, Rows], ids=["list", "tuple", "Sequence"])
async def test_every_sequence_type_is_an_answer(shape: Any) -> None:
    async def sink(items: list[int]) -> Sequence[int]:
        return shape([x * 2 for x in items])  # type: ignore[no-any-return]

    async with Batcher(sink, max_size=3) as b:
        assert list(await asyncio.gather(*(b.submit(x) for x in [1, 2, 3]))) == [2, 4, 6]


# --------------------------------------------------------------- retries


async def test_retry_attempts_inf_retries_until_it_works() -> None:
    calls = 0

    async def sink(items: list[str]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls < 1100:  # past 2.0 ** 1024, which overflowed the backoff
            raise ConnectionError("backend down")
        return items

    retry = Retry(attempts=math.inf, backoff=0.0001, max_backoff=0.0001, jitter=False)
    async with Batcher(sink, retry=retry) as b:
        assert await b.submit("x") == "x"
    assert calls == 1100
    assert retry.delay(5000, ConnectionError()) == 0.0001


async def test_retryable_coalesced_caller_is_retried_when_the_first_caller_left() -> None:
    calls: list[list[str]] = []

    async def sink(items: list[str]) -> list[object]:
        calls.append(list(items))
        await asyncio.sleep(0.02)
        if len(calls) == 1:
            return [Retryable(ConnectionError("busy, try again")) for _ in items]
        return [f"v{x}" for x in items]

    b = Batcher(sink, max_size=10, dedupe=True, retry=Retry(attempts=3, backoff=0.01, jitter=False))
    first = asyncio.create_task(b.submit("k"))
    second = asyncio.create_task(b.submit("k"))  # coalesced into the same slot
    await asyncio.sleep(0.005)  # dispatched; the sink runs
    first.cancel()
    assert await second == "vk"
    assert calls == [["k"], ["k"]]
    s = b.stats
    assert (s.succeeded, s.cancelled, s.retries) == (1, 1, 1)
    await b.aclose()


# ------------------------------------------------------------ room and drops


async def test_dedupe_unhashable_submit_drops_no_innocent_item() -> None:
    b = Batcher(
        RecordingSink(lambda items: items),
        max_size=100,
        max_wait=10,
        max_pending=2,
        overflow="drop_oldest",
        dedupe=True,
        partition=lambda x: "p" if isinstance(x, str) else "q",
    )
    f1 = b.submit_nowait("a")
    b.submit_nowait("b")
    with pytest.raises(TypeError, match="cannot hash"):
        b.submit_nowait(["unhashable"])
    assert b.stats.dropped == 0
    await b.aclose()
    assert f1.result() == "a"


async def test_unhashable_partition_and_bad_weight_change_nothing() -> None:
    b: Batcher[Any, Any] = Batcher(
        RecordingSink(lambda items: items),
        max_wait=10,
        max_pending=1,
        overflow="drop_oldest",
        partition=lambda x: x if not isinstance(x, str) else [x],  # type: ignore[return-value,arg-type]
        weigh=lambda x: x if isinstance(x, int) else "heavy",  # type: ignore[return-value,arg-type]
        max_weight=10,
    )
    f1 = b.submit_nowait(1)
    with pytest.raises(TypeError, match=r"partition\(\) of <Batcher .*unhashable \['s'\]"):
        b.submit_nowait("s")
    with pytest.raises(TypeError, match=r"weigh\(\) of <Batcher .* returned 'heavy'"):
        b.submit_nowait(2.5)
    with pytest.raises(ValueError, match=r"weigh\(\) .* returned -1 .* finite number >= 0"):
        b.submit_nowait(-1)
    assert b.stats.dropped == 0
    assert b.stats.pending == 1
    await b.aclose()
    assert f1.result() == 1


async def test_max_wait_inf_with_max_pending_below_max_size_still_dispatches() -> None:
    sink = RecordingSink(lambda items: items)
    b = Batcher(sink, max_size=10, max_wait=math.inf, max_pending=5, overflow="block")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks = [asyncio.create_task(b.submit(i)) for i in range(8)]
    # Room ran out at 5 items: that batch could not grow, so it went at once.
    assert list(await asyncio.gather(*tasks[:5])) == [0, 1, 2, 3, 4]
    assert loop.time() == t0
    # The other three wait, as max_wait=inf says, for more items, flush or close.
    await asyncio.sleep(3600)
    assert not any(t.done() for t in tasks[5:])
    await b.flush()
    assert list(await asyncio.gather(*tasks[5:])) == [5, 6, 7]
    assert sink.batches == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert b.stats.reasons == {"size": 1, "flush": 1}
    await b.aclose()


async def test_drop_oldest_refuses_a_batch_that_could_never_go() -> None:
    with pytest.raises(ValueError, match="could never fill and has no deadline"):
        Batcher(
            RecordingSink(), max_size=10, max_wait=math.inf, max_pending=5, overflow="drop_oldest"
        )


async def test_peak_pending_counts_a_peak_that_ends_by_withdrawals() -> None:
    b = Batcher(RecordingSink(), max_size=100, max_wait=1.0)
    tasks = [asyncio.create_task(b.submit(i)) for i in range(50)]
    await asyncio.sleep(0)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    s = b.stats
    assert (s.peak_pending, s.pending, s.cancelled) == (50, 0, 50)
    await b.aclose()


# ------------------------------------------------------------ re-entrancy


async def _reentrant(body: Any, **options: Any) -> tuple[object, Batcher[int, int]]:
    b: Batcher[int, int]

    async def sink(items: list[int]) -> list[int]:
        await body(b, items)
        return items

    b = Batcher(sink, max_size=10, **options)
    try:
        result: object = await asyncio.wait_for(b.submit(1), 5)
    except Exception as exc:
        result = exc
    await asyncio.wait_for(b.aclose(cancel=True), 5)
    return result, b


async def test_sink_awaiting_its_own_flush_does_not_wait_for_itself() -> None:
    async def body(b: Batcher[int, int], items: list[int]) -> None:
        await b.flush()

    result, _ = await _reentrant(body)
    assert result == 1


async def test_sink_awaiting_its_own_aclose_closes_without_waiting_for_itself() -> None:
    async def body(b: Batcher[int, int], items: list[int]) -> None:
        await b.aclose()

    result, b = await _reentrant(body)
    assert result == 1
    assert b.closed


async def test_nested_submit_beyond_the_slots_raises_instead_of_hanging() -> None:
    depth: list[int] = []

    async def body(b: Batcher[int, int], items: list[int]) -> None:
        depth.append(items[0])
        if items[0] < 3:
            await b.submit(items[0] + 1)

    result, _ = await _reentrant(body, max_concurrency=2)
    assert isinstance(result, RuntimeError)
    assert "its own batcher" in str(result)
    assert "max_concurrency=2" in str(result)
    assert depth == [1, 2]


async def test_nested_submit_works_with_enough_slots() -> None:
    async def body(b: Batcher[int, int], items: list[int]) -> None:
        if items[0] < 3:
            assert await b.submit(items[0] + 1) == items[0] + 1

    for limit in (3, None):
        result, _ = await _reentrant(body, max_concurrency=limit)
        assert result == 1


# ------------------------------------------------------- DataLoader timing


async def test_dataloader_load_from_new_task_is_coalesced() -> None:
    calls: list[list[str]] = []

    async def load(keys: list[str]) -> list[str]:
        calls.append(list(keys))
        return keys

    loader = DataLoader(load)

    async def via_task() -> str:  # gather() wraps it in a task: first step next iteration
        return await loader.load("B")

    assert list(await asyncio.gather(loader.load("A"), via_task())) == ["A", "B"]
    assert calls == [["A", "B"]]


async def test_room_is_due_at_once_when_max_pending_is_below_max_size() -> None:
    # ../shared/cases/friction/max_pending_below_max_size.py
    sink = RecordingSink(lambda items: items)
    loop = asyncio.get_running_loop()
    async with Batcher(sink, max_size=100, max_wait=1.0, max_pending=10) as b:
        t0 = loop.time()
        assert list(await asyncio.gather(*(b.submit(i) for i in range(30)))) == list(range(30))
        assert loop.time() == t0
    assert [len(batch) for batch in sink.batches] == [10, 10, 10]
    assert b.stats.reasons == {"size": 3}


async def test_settle_helper_is_enough_for_two_hop_dispatch() -> None:
    sink = RecordingSink()
    b = Batcher(sink)
    b.submit_nowait(1)
    await settle()
    assert sink.batches == [[1]]
    await b.aclose()


# ------------------------------------------- found by a new user's attack


async def test_flush_from_the_sink_while_another_batch_waits_for_the_slot() -> None:
    b: Batcher[int, int]

    async def sink(items: list[int]) -> list[int]:
        await asyncio.sleep(0.05)  # meanwhile a second batch becomes due
        if 1 in items:
            await b.flush()
        return [i * 2 for i in items]

    b = Batcher(sink, max_size=10, max_wait=0.01)

    async def late() -> int:
        await asyncio.sleep(0.015)
        return await b.submit(99)

    assert list(await asyncio.wait_for(asyncio.gather(b.submit(1), late()), 5)) == [2, 198]
    await b.aclose()


@pytest.mark.parametrize("cancel", [False, True])
async def test_aclose_from_the_sink_while_another_batch_waits_for_the_slot(cancel: bool) -> None:
    b: Batcher[int, int]

    async def sink(items: list[int]) -> list[int]:
        await asyncio.sleep(0.05)
        if 1 in items:
            await b.aclose(cancel=cancel)
        return [i * 2 for i in items]

    b = Batcher(sink, max_size=10, max_wait=0.01)

    async def late() -> int:
        await asyncio.sleep(0.015)
        return await b.submit(99)

    results = await asyncio.wait_for(asyncio.gather(b.submit(1), late(), return_exceptions=True), 5)
    assert results[0] == 2  # its own call is spared, also by cancel=True
    if cancel:
        assert isinstance(results[1], BatcherClosed)
    else:
        assert results[1] == 198  # the close drains
    await asyncio.wait_for(b.aclose(), 5)  # the outer close waits for the inner one
    assert b.closed
    assert b.stats.in_flight == 0


@pytest.mark.parametrize("how", ["gather", "task", "wait_for"])
async def test_flush_from_a_task_the_sink_started_is_recognised(how: str) -> None:
    b: Batcher[int, int]

    async def sink(items: list[int]) -> list[int]:
        if how == "gather":
            await asyncio.gather(b.flush())
        elif how == "task":
            await asyncio.create_task(b.flush())
        else:
            await asyncio.wait_for(b.flush(), 10)
        return items

    b = Batcher(sink)
    assert await asyncio.wait_for(b.submit(1), 5) == 1
    await b.aclose()


async def test_submit_many_from_the_sink_beyond_the_slots_raises() -> None:
    b: Batcher[int, int]

    async def sink(items: list[int]) -> list[int]:
        if items[0] < 100:
            return list(await b.submit_many([i + 100 for i in items]))
        return items

    b = Batcher(sink)
    with pytest.raises(RuntimeError, match=r"submit_many\(\) of its own batcher"):
        await asyncio.wait_for(b.submit(1), 5)
    await b.aclose()


async def test_a_sequence_whose_items_stop_early_fails_the_batch_instead_of_hanging() -> None:
    class Lying(Sequence[int]):
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: Any) -> Any:
            if i >= 2:
                raise IndexError(i)
            return i

    async def sink(items: list[int]) -> Lying:
        return Lying()

    b = Batcher(sink, max_size=5, max_wait=0.01)
    futs = [b.submit_nowait(i) for i in range(5)]
    results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 5)
    assert all(type(r).__name__ == "ResultMismatch" for r in results)
    assert "returned 2 results for a batch of 5 items" in str(results[0])
    await b.aclose()
    s = b.stats
    assert (s.submitted, s.failed) == (5, 5)


async def test_a_sink_raising_cancelled_error_itself_fails_its_batch_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def sink(items: list[int]) -> list[int]:
        raise asyncio.CancelledError("from a library, not from us")

    b = Batcher(sink, name="bx")
    with pytest.raises(RuntimeError, match="raised CancelledError without being cancelled"):
        await b.submit(1)
    assert any("batch of 1 items" in r.getMessage() for r in caplog.records)
    await b.aclose()


async def test_a_tiny_interval_does_not_freeze_the_loop() -> None:
    b = Batcher(RecordingSink(), interval=1e-300)
    assert await asyncio.wait_for(b.submit(1), 5) == 10
    await b.aclose()
