"""DataLoader: batching, caching, results, cancellation, loop binding."""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Any, assert_type

import pytest

from asyncbatch import BatcherClosed, BatchReport, DataLoader, QueueFull, ResultMismatch


class Recorder:
    """A batch function that records its calls and answers ``answer(keys)``.

    ``gate``: when set, each call waits for it before answering.
    """

    def __init__(self, answer: Callable[[list[Any]], Any] | None = None) -> None:
        self.calls: list[list[Any]] = []
        self.answer = answer or (lambda keys: [f"v{k}" for k in keys])
        self.gate: asyncio.Event | None = None
        self.started = 0

    async def __call__(self, keys: list[Any]) -> Any:
        self.calls.append(list(keys))
        self.started += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.answer(keys)


def other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def gather_list(*aws: Awaitable[Any]) -> list[Any]:
    """``asyncio.gather`` as a plain list (its stubs say tuple)."""
    return list(await asyncio.gather(*aws))


async def spin(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


# ------------------------------------------------------------------- batching


async def test_loads_of_one_iteration_share_one_call() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)
    results = await asyncio.gather(loader.load(1), loader.load(2), loader.load(3))
    assert list(results) == ["v1", "v2", "v3"]
    assert rec.calls == [[1, 2, 3]]


async def test_load_returns_a_future_that_can_be_awaited_later() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)
    fut = loader.load(7)
    assert isinstance(fut, asyncio.Future)
    assert not fut.done()
    await spin()
    assert fut.done()
    assert await fut == "v7"
    assert rec.calls == [[7]]


async def test_max_batch_size_splits_in_order() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec, max_batch_size=2)
    assert await loader.load_many([1, 2, 3, 4, 5]) == ["v1", "v2", "v3", "v4", "v5"]
    assert rec.calls == [[1, 2], [3, 4], [5]]


async def test_max_batch_size_one_disables_batching() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec, max_batch_size=1)
    assert await gather_list(loader.load(1), loader.load(2)) == ["v1", "v2"]
    assert rec.calls == [[1], [2]]


@pytest.mark.looptime
async def test_max_wait_lets_a_batch_collect_across_iterations() -> None:
    loop = asyncio.get_running_loop()
    times: list[float] = []

    def answer(keys: list[int]) -> list[int]:
        times.append(loop.time())
        return [k * 2 for k in keys]

    rec = Recorder(answer)
    loader: DataLoader[int, int] = DataLoader(rec, max_wait=0.1)
    t0 = loop.time()
    first = loader.load(1)
    await asyncio.sleep(0.05)
    second = loader.load(2)
    await asyncio.sleep(0.2)
    third = loader.load(3)
    assert await gather_list(first, second, third) == [2, 4, 6]
    assert rec.calls == [[1, 2], [3]]
    assert [round(t - t0, 6) for t in times] == [0.1, 0.35]


async def test_loads_made_by_many_resolver_tasks_are_batched() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)

    async def resolve(key: int) -> str:
        return await loader.load(key)

    assert await gather_list(*(resolve(k) for k in (3, 1, 3, 2))) == ["v3", "v1", "v3", "v2"]
    assert rec.calls == [[3, 1, 2]]


# -------------------------------------------------------------------- caching


async def test_concurrent_loads_of_a_key_share_one_slot_and_later_loads_hit_the_cache() -> None:
    rec = Recorder()
    loader: DataLoader[str, str] = DataLoader(rec)
    assert await gather_list(loader.load("a"), loader.load("a"), loader.load("b")) == [
        "va",
        "va",
        "vb",
    ]
    assert await loader.load("a") == "va"
    assert await loader.load_many(["b", "a"]) == ["vb", "va"]
    assert rec.calls == [["a", "b"]]
    assert loader.stats.submitted == 2  # keys sent to the batcher, not loads


async def test_key_in_flight_is_shared_not_loaded_again() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    loader: DataLoader[int, str] = DataLoader(rec)
    first = loader.load(1)
    await spin()
    assert rec.calls == [[1]]  # dispatched, waiting on the gate
    second = loader.load(1)
    many = loader.load_many([1, 1])
    rec.gate.set()
    assert await gather_list(first, second, many) == ["v1", "v1", ["v1", "v1"]]
    assert rec.calls == [[1]]


async def test_failed_load_is_not_cached() -> None:
    outcomes: list[Any] = [ValueError("flaky"), "ok"]
    rec = Recorder(lambda keys: [outcomes.pop(0)])
    loader: DataLoader[int, str] = DataLoader(rec)
    with pytest.raises(ValueError, match="flaky"):
        await loader.load(1)
    assert await loader.load(1) == "ok"
    assert await loader.load(1) == "ok"
    assert rec.calls == [[1], [1]]


async def test_batch_function_raising_fails_every_key_and_caches_nothing() -> None:
    calls: list[list[int]] = []
    boom = RuntimeError("db down")

    async def fn(keys: list[int]) -> list[int]:
        calls.append(keys)
        if len(calls) == 1:
            raise boom
        return keys

    loader: DataLoader[int, int] = DataLoader(fn)
    results = list(
        await asyncio.gather(loader.load(1), loader.load(2), loader.load(1), return_exceptions=True)
    )
    assert results == [boom, boom, boom]
    assert all(r is boom for r in results)
    assert await loader.load_many([1, 2]) == [1, 2]
    assert calls == [[1, 2], [1, 2]]


async def test_per_key_exception_fails_only_that_key_and_every_caller_of_it() -> None:
    rec = Recorder(lambda keys: [KeyError(k) if k % 2 else k for k in keys])
    loader: DataLoader[int, int] = DataLoader(rec)
    r = await asyncio.gather(loader.load(1), loader.load(2), loader.load(1), return_exceptions=True)
    assert isinstance(r[0], KeyError)
    assert r[2] is r[0]
    assert r[1] == 2
    assert rec.calls == [[1, 2]]
    # 2 is cached, 1 is asked again
    with pytest.raises(KeyError):
        await loader.load_many([2, 1])
    assert rec.calls == [[1, 2], [1]]


async def test_clear_drops_one_key_and_clear_all_everything() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)
    await loader.load_many([1, 2])
    assert loader.clear(1) is loader
    await loader.load_many([1, 2])
    assert rec.calls == [[1, 2], [1]]
    assert loader.clear_all() is loader
    await loader.load_many([1, 2])
    assert rec.calls == [[1, 2], [1], [1, 2]]
    loader.clear(99)  # absent: no error


async def test_clear_while_loading_callers_still_get_the_result() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    loader: DataLoader[int, str] = DataLoader(rec)
    first = loader.load(1)
    await spin()
    loader.clear(1)
    second = loader.load(1)  # a new load: the cleared one is not reused
    rec.gate.set()
    assert await gather_list(first, second) == ["v1", "v1"]
    assert rec.calls == [[1], [1]]


async def test_prime_fills_the_cache_without_overwriting() -> None:
    rec = Recorder()
    loader: DataLoader[str, str] = DataLoader(rec)
    assert loader.prime("a", "primed") is loader
    loader.prime("a", "again")  # already there: ignored
    assert await loader.load_many(["a", "b"]) == ["primed", "vb"]
    loader.prime("b", "late")  # loaded: ignored
    assert await loader.load("b") == "vb"
    assert await loader.clear("b").prime("b", "forced").load("b") == "forced"
    assert rec.calls == [["b"]]


async def test_prime_with_an_exception_caches_that_failure() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)
    loader.prime(1, LookupError("gone"))
    loader.prime(2, LookupError("never loaded, never logged"))
    for _ in range(2):
        with pytest.raises(LookupError, match="gone"):
            await loader.load(1)
    assert rec.calls == []
    loader.clear(1)
    assert await loader.load(1) == "v1"


async def test_prime_answers_a_load_waiting_in_the_open_batch() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)
    pending = loader.load(1)
    loader.prime(1, "primed")
    assert await pending == "primed"
    assert await loader.load(1) == "primed"
    assert rec.calls == []  # its only key was primed: the batch was never sent


async def test_prime_leaves_a_dispatched_load_alone_unless_forced() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    loader: DataLoader[int, str] = DataLoader(rec)
    pending = loader.load(1)
    await spin()  # dispatched: the batch function is running
    loader.prime(1, "primed")
    assert loader.load(1) is not pending  # the load in progress, joined
    loader.prime(1, "forced", force=True)
    later = loader.load(1)
    assert later.done()
    rec.gate.set()
    assert await pending == "v1"  # its callers keep the load's own result
    assert await later == "forced"
    assert await loader.load(1) == "forced"
    assert rec.calls == [[1]]


async def test_cache_false_loads_every_time_but_coalesces_one_batch() -> None:
    rec = Recorder()
    loader: DataLoader[str, str] = DataLoader(rec, cache=False)
    results = await gather_list(
        loader.load("a"), loader.load("b"), loader.load_many(["a", "c", "a"])
    )
    assert results == ["va", "vb", ["va", "vc", "va"]]
    assert rec.calls == [["a", "b", "c"]]
    assert await loader.load("a") == "va"
    assert rec.calls == [["a", "b", "c"], ["a"]]


async def test_cache_false_ignores_cache_map_prime_and_clear() -> None:
    rec = Recorder()
    loop = asyncio.get_running_loop()
    cached: asyncio.Future[str] = loop.create_future()
    cached.set_result("x")
    cache_map: dict[Any, asyncio.Future[str]] = {"x": cached}
    loader: DataLoader[str, str] = DataLoader(rec, cache=False, cache_map=cache_map)
    loader.prime("a", "A").clear("x").clear_all()
    assert cache_map == {"x": cached}
    assert await loader.load("x") == "vx"
    assert "a" not in cache_map


class LRU(OrderedDict[Hashable, "asyncio.Future[Any]"]):
    """A bounded cache: the least recently used entry goes first."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get(self, key: Hashable, default: Any = None) -> Any:
        if key in self:
            self.move_to_end(key)
        return super().get(key, default)

    def __setitem__(self, key: Hashable, value: asyncio.Future[Any]) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


async def test_cache_map_can_be_an_lru() -> None:
    rec = Recorder()
    lru = LRU(2)
    loader: DataLoader[int, str] = DataLoader(rec, cache_map=lru)
    await loader.load_many([1, 2])
    await loader.load(1)  # 1 is now the most recent
    await loader.load(3)  # evicts 2
    assert list(lru) == [1, 3]
    assert all(isinstance(f, asyncio.Future) and f.done() for f in lru.values())
    assert await loader.load_many([1, 2]) == ["v1", "v2"]  # 1 cached, 2 evicted: asked again
    assert rec.calls == [[1, 2], [3], [2]]
    assert list(lru) == [1, 2]


async def test_cache_key_maps_unhashable_keys() -> None:
    rec = Recorder(lambda keys: [k["id"] * 10 for k in keys])

    def by_id(key: dict[str, int]) -> Hashable:
        return key["id"]

    loader: DataLoader[dict[str, int], int] = DataLoader(rec, cache_key=by_id)
    a, b = {"id": 1}, {"id": 1}
    assert await gather_list(loader.load(a), loader.load(b)) == [10, 10]
    assert rec.calls == [[a]]
    assert rec.calls[0][0] is a
    loader.clear({"id": 1})
    assert await loader.load(b) == 10
    assert rec.calls[1][0] is b


async def test_mapping_result_is_looked_up_by_cache_key() -> None:
    async def fn(keys: list[dict[str, int]]) -> Mapping[int, str]:
        return {k["id"]: f"user{k['id']}" for k in keys}

    loader = DataLoader(fn, cache_key=lambda k: k["id"])
    assert await loader.load_many([{"id": 2}, {"id": 1}]) == ["user2", "user1"]


async def test_unhashable_key_without_cache_key_is_a_clear_type_error() -> None:
    loader: DataLoader[Any, Any] = DataLoader(Recorder())
    with pytest.raises(TypeError, match=r"keys must be hashable, or pass cache_key=.*\[1\]"):
        loader.load([1])
    with pytest.raises(TypeError, match="keys must be hashable"):
        loader.load_many([1, [2]])
    await spin()  # the withdrawn 1 leaves nothing behind
    assert other_tasks() == set()


# -------------------------------------------------------------- result shapes


async def test_mapping_result_and_missing_key_fails_only_that_key() -> None:
    async def fn(keys: list[int]) -> dict[int, str]:
        return {k: f"n{k}" for k in keys if k != 3}

    loader = DataLoader(fn)
    results = await loader.load_many([1, 3, 2], return_exceptions=True)
    assert results[0] == "n1"
    assert results[2] == "n2"
    assert isinstance(results[1], ResultMismatch)
    assert "without key 3" in str(results[1])
    assert "'test_mapping_result_and_missing_key_fails_only_that_key.<locals>.fn'" in str(
        results[1]
    )


async def test_wrong_length_names_the_function_and_the_keys() -> None:
    async def users(keys: list[int]) -> list[str]:
        return ["only one"]

    loader = DataLoader(users)
    with pytest.raises(ResultMismatch) as info:
        await loader.load_many([10, 20, 30])
    message = str(info.value)
    assert "users" in message
    assert "returned 1 results for a batch of 3 items" in message
    assert "[10, 20, 30]" in message


async def test_none_result_is_a_mismatch_for_a_loader() -> None:
    async def forgot_return(keys: list[int]) -> Sequence[int]:
        return None  # type: ignore[return-value]

    loader = DataLoader(forgot_return)
    with pytest.raises(ResultMismatch) as info:
        await loader.load(5)
    assert str(info.value) == (
        "batch function 'test_none_result_is_a_mismatch_for_a_loader.<locals>.forgot_return' "
        "returned None for 1 keys; it must return a sequence with one value per key, in key "
        "order, or a mapping keyed by key (keys: [5])"
    )


async def test_string_result_is_a_mismatch() -> None:
    async def fn(keys: list[int]) -> Any:
        return "abc"

    loader: DataLoader[int, Any] = DataLoader(fn)
    with pytest.raises(ResultMismatch, match="returned str"):
        await loader.load_many([1, 2, 3])


async def test_sync_batch_function_is_a_clear_type_error() -> None:
    def not_async(keys: list[int]) -> list[int]:
        return keys

    # A plain function is refused at construction, a partial of one too.
    for fn in (not_async, functools.partial(not_async)):
        with pytest.raises(
            TypeError,
            match=r"batch function '.*not_async.*' of a DataLoader must be async .* "
            r"but it is a plain function",
        ):
            DataLoader(fn)  # type: ignore[arg-type]

    class NotAsync:
        """A callable object: told apart only when it answers."""

        def __call__(self, keys: list[int]) -> list[int]:
            return keys

    loader: DataLoader[int, int] = DataLoader(NotAsync())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"must be async .* but it returned list"):
        await loader.load(1)


# ----------------------------------------------------------------- load_many


async def test_load_many_mixes_cached_loading_and_new_keys_in_input_order() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)
    await loader.load(1)
    loading = loader.load(2)
    result = await loader.load_many([3, 1, 2, 3, 4, 1])
    assert result == ["v3", "v1", "v2", "v3", "v4", "v1"]
    assert await loading == "v2"
    assert rec.calls == [[1], [2, 3, 4]]


async def test_load_many_empty() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)
    assert await loader.load_many([]) == []
    assert await loader.load_many((), return_exceptions=True) == []
    assert rec.calls == []


async def test_load_many_all_cached_is_done_at_once() -> None:
    loader: DataLoader[int, str] = DataLoader(Recorder())
    await loader.load_many([1, 2])
    fut = loader.load_many([2, 1])
    assert fut.done()
    assert fut.result() == ["v2", "v1"]


async def test_load_many_raises_first_failure_in_input_order_after_all_resolve() -> None:
    rec = Recorder(lambda keys: [ValueError(k) if k in (3, 1) else k for k in keys])
    loader: DataLoader[int, int] = DataLoader(rec, max_batch_size=2)
    with pytest.raises(ValueError, match="3"):
        await loader.load_many([2, 3, 4, 1])
    # every key was resolved: the good ones are cached, nothing is pending
    assert await loader.load_many([2, 4]) == [2, 4]
    assert rec.calls == [[2, 3], [4, 1]]
    assert loader.stats.pending == 0


async def test_load_many_return_exceptions() -> None:
    rec = Recorder(lambda keys: [ValueError(k) if k == 2 else k for k in keys])
    loader: DataLoader[int, int] = DataLoader(rec)
    result = await loader.load_many([1, 2, 3], return_exceptions=True)
    assert_type(result, list[int | BaseException])
    assert result[0] == 1
    assert result[2] == 3
    assert isinstance(result[1], ValueError)


async def test_load_many_with_a_primed_failure() -> None:
    loader: DataLoader[int, str] = DataLoader(Recorder())
    loader.prime(2, KeyError("primed"))
    result = await loader.load_many([1, 2], return_exceptions=True)
    assert result[0] == "v1"
    assert isinstance(result[1], KeyError)
    with pytest.raises(KeyError):
        await loader.load_many([1, 2])


async def test_load_many_loads_a_repeated_key_once_and_answers_every_occurrence() -> None:
    rec = Recorder(lambda keys: [KeyError(k) if k == 2 else f"v{k}" for k in keys])
    loader: DataLoader[int, str] = DataLoader(rec)
    result = await loader.load_many([3, 1, 3, 2, 1, 2], return_exceptions=True)
    assert result[:2] == ["v3", "v1"]
    assert result[2] == "v3"
    assert result[4] == "v1"
    assert isinstance(result[3], KeyError)
    assert result[5] is result[3]
    assert rec.calls == [[3, 1, 2]]
    assert loader.stats.submitted == 3


async def test_load_many_without_cache_loads_a_repeated_key_once_across_batches() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec, cache=False, max_batch_size=2)
    assert await loader.load_many([1, 2, 1, 3, 2]) == ["v1", "v2", "v1", "v3", "v2"]
    assert rec.calls == [[1, 2], [3]]


async def test_load_many_with_cache_key_loads_the_first_key_object_seen() -> None:
    rec = Recorder(lambda keys: [k["id"] * 10 for k in keys])
    loader: DataLoader[dict[str, int], int] = DataLoader(rec, cache_key=lambda k: k["id"])
    a, b, c = {"id": 1}, {"id": 1}, {"id": 2}
    assert await loader.load_many([a, c, b]) == [10, 20, 10]
    assert rec.calls == [[a, c]]
    assert rec.calls[0][0] is a


async def test_load_many_of_a_key_cleared_while_pending_shares_the_open_batch_slot() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)
    first = loader.load(1)
    loader.clear(1)  # a new load of 1 starts, but the batch still holds 1
    assert await loader.load_many([2, 1, 3]) == ["v2", "v1", "v3"]
    assert await first == "v1"
    assert rec.calls == [[1, 2, 3]]  # keys deduplicated within the batch


async def test_load_many_with_an_unhashable_cache_key_is_a_clear_type_error() -> None:
    def listed(key: int) -> Any:
        return [key]

    loader: DataLoader[int, str] = DataLoader(Recorder(), cache_key=listed)
    with pytest.raises(TypeError, match=r"keys must be hashable.*cannot hash 2"):
        loader.load_many([2])
    with pytest.raises(TypeError, match="keys must be hashable"):
        loader.load(2)


async def test_load_many_refused_midway_withdraws_the_keys_it_submitted() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    loader: DataLoader[int, str] = DataLoader(
        rec, max_pending=2, overflow="reject", max_concurrency=1
    )
    busy = loader.load(0)
    await spin()  # [0] holds the only slot: the next keys stay pending
    with pytest.raises(QueueFull):
        loader.load_many([1, 2, 3])
    rec.gate.set()
    assert await busy == "v0"
    await spin()
    assert rec.calls == [[0]]  # 1 and 2 were withdrawn
    assert repr(loader).endswith("cached=1 loading=0>")
    assert await loader.load_many([1, 2]) == ["v1", "v2"]
    assert rec.calls == [[0], [1, 2]]


async def test_load_many_with_partitions() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec, partition=lambda k: k % 2)
    assert await loader.load_many([1, 2, 3, 4, 1]) == ["v1", "v2", "v3", "v4", "v1"]
    assert sorted(rec.calls) == [[1, 3], [2, 4]]


async def test_load_many_may_be_given_any_iterable_and_copies_it() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)
    keys = [1, 2]
    fut = loader.load_many(iter(keys))
    again = loader.load_many(keys)
    keys.append(3)  # after the call: not part of it
    assert await gather_list(fut, again) == [["v1", "v2"], ["v1", "v2"]]


# ---------------------------------------------------------------- cancellation


async def test_a_failure_skips_callers_that_left() -> None:
    rec = Recorder(lambda keys: [OSError("io")])
    rec.gate = asyncio.Event()
    loader: DataLoader[int, str] = DataLoader(rec)
    gone, stays = loader.load(1), loader.load(1)
    await spin()
    gone.cancel()
    rec.gate.set()
    with pytest.raises(OSError, match="io"):
        await stays
    assert gone.cancelled()


async def test_overlapping_load_many_calls_share_slots() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)
    first = loader.load_many([1, 2])
    second = loader.load_many([2, 3, 2])
    assert await gather_list(first, second) == [["v1", "v2"], ["v2", "v3", "v2"]]
    assert rec.calls == [[1, 2, 3]]


async def test_cleared_then_cancelled_leaves_the_new_entry_alone() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)
    old = loader.load(1)
    loader.clear(1)
    loader.prime(1, "primed")
    old.cancel()  # withdraws the old load; the primed entry stays
    await spin()
    assert rec.calls == []
    assert await loader.load(1) == "primed"


async def test_a_pending_future_put_in_the_cache_by_someone_else_is_replaced() -> None:
    rec = Recorder()
    foreign: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    cache_map: dict[Any, asyncio.Future[str]] = {1: foreign}
    loader: DataLoader[int, str] = DataLoader(rec, cache_map=cache_map)
    assert await loader.load(1) == "v1"
    assert cache_map[1] is not foreign
    foreign.cancel()


@pytest.mark.looptime
async def test_one_caller_cancelling_does_not_affect_the_others() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec, max_wait=1.0)
    a = asyncio.create_task(asyncio.wait_for(loader.load(1), 0.5))
    b = asyncio.create_task(asyncio.wait_for(loader.load(1), 5))
    with pytest.raises(TimeoutError):
        await a
    assert await b == "v1"
    assert rec.calls == [[1]]
    assert await loader.load(1) == "v1"
    assert rec.calls == [[1]]


@pytest.mark.looptime
async def test_every_caller_cancelling_before_dispatch_withdraws_the_key() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec, max_wait=1.0)

    async def resolve(key: int) -> str:
        return await loader.load(key)

    tasks = [asyncio.create_task(resolve(k)) for k in (1, 2, 1, 3)]
    await asyncio.sleep(0.5)
    tasks[0].cancel()
    tasks[2].cancel()
    assert await gather_list(tasks[1], tasks[3]) == ["v2", "v3"]
    assert rec.calls == [[2, 3]]  # the batch function never saw 1
    assert await loader.load(1) == "v1"  # and it was not cached
    assert rec.calls == [[2, 3], [1]]
    stats = loader.stats
    assert stats.cancelled == 1  # one batcher slot, whatever the number of callers
    assert stats.succeeded == 3


async def test_withdrawn_alone_the_batch_function_is_not_called() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)
    fut = loader.load(1)
    fut.cancel()
    await spin()
    assert rec.calls == []
    assert loader.stats.pending == 0
    assert other_tasks() == set()


async def test_cancel_then_load_again_in_the_same_iteration() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)
    loader.load(1).cancel()
    assert await loader.load(1) == "v1"
    assert rec.calls == [[1]]


async def test_cancelled_after_dispatch_the_result_is_dropped_not_cached() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    loader: DataLoader[int, str] = DataLoader(rec)
    a, b = loader.load(1), loader.load(2)
    await spin()
    assert rec.calls == [[1, 2]]  # in flight
    a.cancel()
    rec.gate.set()
    assert await b == "v2"
    assert await loader.load_many([1, 2]) == ["v1", "v2"]
    assert rec.calls == [[1, 2], [1]]


async def test_cancelling_one_of_two_callers_after_dispatch() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    loader: DataLoader[int, str] = DataLoader(rec)
    a, b = loader.load(1), loader.load(1)
    await spin()
    a.cancel()
    rec.gate.set()
    assert await b == "v1"
    assert await loader.load(1) == "v1"
    assert rec.calls == [[1]]


@pytest.mark.looptime
async def test_cancelled_load_many_withdraws_keys_nobody_else_wants() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec, max_wait=1.0)
    other = loader.load(2)
    many = asyncio.create_task(asyncio.wait_for(loader.load_many([1, 2, 3, 1]), 0.5))
    with pytest.raises(TimeoutError):
        await many
    assert await other == "v2"
    assert rec.calls == [[2]]


async def test_load_many_cancelled_after_it_finished_is_a_no_op() -> None:
    loader: DataLoader[int, str] = DataLoader(Recorder())
    fut = loader.load_many([1])
    assert await fut == ["v1"]
    assert not fut.cancel()
    assert await loader.load(1) == "v1"


async def test_a_finished_key_is_shared_a_pending_one_is_not() -> None:
    loader: DataLoader[int, str] = DataLoader(Recorder())
    first, second = loader.load(1), loader.load(1)
    assert first is not second  # each caller of a pending key has its own future
    await first
    assert loader.load(1) is loader.load(1)  # cancelling a done future does nothing


async def test_without_cache_cancelling_one_load_leaves_the_others() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec, cache=False)
    gone, stays = loader.load(1), loader.load(1)
    gone.cancel()
    assert await stays == "v1"
    assert rec.calls == [[1]]
    alone = loader.load(2)
    alone.cancel()
    await spin()
    assert rec.calls == [[1]]  # withdrawn


async def test_callers_wake_in_the_iteration_that_delivers_the_batch() -> None:
    loop = asyncio.get_running_loop()
    seen: list[bool] = []
    futs: list[asyncio.Future[Any]] = []

    async def fn(keys: list[int]) -> list[int]:
        # Runs right after the sink returns and the batch is delivered: no
        # callback hop between the Batcher and the loader's callers.
        loop.call_soon(lambda: seen.extend(f.done() for f in futs))
        return keys

    loader: DataLoader[int, int] = DataLoader(fn)
    futs += [loader.load(1), loader.load(1), loader.load_many([1, 2])]
    assert await gather_list(*futs) == [1, 1, [1, 2]]
    assert seen == [True, True, True]


async def test_cancelling_a_pending_cache_entry_cancels_its_callers() -> None:
    rec = Recorder()
    cache_map: dict[Any, asyncio.Future[str]] = {}
    loader: DataLoader[int, str] = DataLoader(rec, cache_map=cache_map)
    one = loader.load(1)
    many = loader.load_many([1, 2], return_exceptions=True)
    cache_map[1].cancel()
    assert one.cancelled()
    result = await many
    assert isinstance(result[0], asyncio.CancelledError)
    assert result[1] == "v2"
    assert rec.calls == [[2]]
    assert await loader.load(1) == "v1"  # not cached


async def test_a_cache_map_failing_to_forget_a_failed_key_does_not_strand_callers() -> None:
    class Sticky(dict[Any, Any]):
        def __delitem__(self, key: Any) -> None:
            raise RuntimeError("sticky")

    reported: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
    rec = Recorder(lambda keys: [ValueError(k) for k in keys])
    loader: DataLoader[int, str] = DataLoader(rec, cache_map=Sticky())
    with pytest.raises(ValueError, match="1"):
        await loader.load(1)
    many = await loader.load_many([1, 2], return_exceptions=True)
    assert [type(r) for r in many] == [ValueError, ValueError]
    assert len(reported) == 2
    assert "raised while forgetting" in reported[0]["message"]
    assert isinstance(reported[0]["exception"], RuntimeError)


async def test_a_loader_is_freed_without_the_cycle_collector() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)
    assert await loader.load_many([1, 2]) == ["v1", "v2"]
    assert await loader.load(3) == "v3"
    ref = weakref.ref(loader)
    del loader
    assert ref() is None


# --------------------------------------------------------------- nested loads


async def test_a_batch_function_may_load_from_another_loader() -> None:
    inner_rec = Recorder(lambda keys: [k.upper() for k in keys])
    inner: DataLoader[str, str] = DataLoader(inner_rec)

    async def outer_fn(keys: list[str]) -> list[str]:
        return await inner.load_many([k * 2 for k in keys])

    outer: DataLoader[str, str] = DataLoader(outer_fn)
    assert await gather_list(outer.load("a"), outer.load("b")) == ["AA", "BB"]
    assert inner_rec.calls == [["aa", "bb"]]


# ---------------------------------------------------------- Batcher options


@pytest.mark.looptime
async def test_batcher_options_pass_through() -> None:
    reports: list[BatchReport] = []

    async def slow(keys: list[int]) -> list[int]:
        await asyncio.sleep(10 if 13 in keys else 0.1)
        return keys

    loader: DataLoader[int, int] = DataLoader(
        slow,
        max_batch_size=2,
        max_concurrency=2,
        timeout=1.0,
        on_batch=reports.append,
        name="numbers",
    )
    results = await loader.load_many([1, 2, 13, 4], return_exceptions=True)
    assert results[:2] == [1, 2]
    assert isinstance(results[2], TimeoutError)
    assert isinstance(results[3], TimeoutError)
    assert "sink 'numbers' did not answer within 1.0 s" in str(results[2])
    assert sorted(r.size for r in reports) == [2, 2]
    assert loader.name == "numbers"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("key", "DataLoader sets the Batcher's key= itself; use cache_key="),
        ("max_size", "DataLoader sets the Batcher's max_size= itself; use max_batch_size="),
        ("dedupe", "DataLoader sets the Batcher's dedupe= itself"),
    ],
)
def test_options_the_loader_owns_are_refused(option: str, message: str) -> None:
    options: dict[str, Any] = {option: None}
    with pytest.raises(TypeError) as info:
        DataLoader(Recorder(), **options)
    assert str(info.value) == message


def test_validation() -> None:
    with pytest.raises(ValueError, match=r"^max_batch_size must be >= 1, got 0$"):
        DataLoader(Recorder(), max_batch_size=0)
    with pytest.raises(TypeError, match=r"max_batch_size must be an int, got 1\.5"):
        DataLoader(Recorder(), max_batch_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="DataLoader needs an async batch function"):
        DataLoader(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cache_key must be callable, got 'id'"):
        DataLoader(Recorder(), cache_key="id")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cache_map must be a MutableMapping"):
        DataLoader(Recorder(), cache_map=[])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_wait must be >= 0"):
        DataLoader(Recorder(), max_wait=-1)
    with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
        DataLoader(Recorder(), max_concurrency=0)


# ---------------------------------------------------------------- lifecycle


async def test_async_with_closes_and_drains() -> None:
    rec = Recorder()
    async with DataLoader(rec) as loader:
        pending = loader.load(1)
    assert loader.closed
    assert pending.done()
    assert await pending == "v1"
    assert await loader.load(1) == "v1"  # cached keys still resolve
    with pytest.raises(BatcherClosed):
        loader.load(2)
    with pytest.raises(BatcherClosed):
        loader.load_many([1, 2])
    assert other_tasks() == set()


async def test_aclose_cancel_fails_pending_loads() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec, max_wait=10)
    pending = loader.load(1)
    many = loader.load_many([1, 2], return_exceptions=True)
    await loader.aclose(cancel=True)
    with pytest.raises(BatcherClosed):
        await pending
    assert all(isinstance(r, BatcherClosed) for r in await many)
    assert rec.calls == []
    await loader.aclose()  # idempotent
    assert other_tasks() == set()


async def test_stats_and_repr() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec, name="users")
    pending = loader.load(1)
    assert repr(loader) == "<DataLoader 'users' [open] cached=1 loading=1>"
    await pending
    await loader.load_many([1, 1, 2])
    stats = loader.stats
    assert (stats.submitted, stats.succeeded, stats.batches) == (2, 2, 2)
    assert repr(loader) == "<DataLoader 'users' [open] cached=2 loading=0>"
    assert repr(DataLoader(rec, cache=False)).endswith("[open] cached=off loading=0>")
    await loader.aclose()
    assert repr(loader).startswith("<DataLoader 'users' [closed]")


async def test_name_defaults_to_the_batch_function() -> None:
    async def load_users(keys: list[int]) -> list[int]:
        return keys

    loader = DataLoader(load_users)
    assert loader.name.endswith("load_users")


# ------------------------------------------------------------- loop binding


async def test_use_from_another_loop_while_the_first_runs_is_a_runtime_error() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)
    assert await loader.load(1) == "v1"
    errors: list[BaseException] = []

    def other_thread() -> None:
        async def use() -> None:
            calls: list[Callable[[], object]] = [
                lambda: loader.load(1),
                lambda: loader.load(2),
                lambda: loader.load_many([3]),
            ]
            for call in calls:
                try:
                    call()
                except RuntimeError as exc:
                    errors.append(exc)

        asyncio.run(use())

    thread = threading.Thread(target=other_thread)
    thread.start()
    await asyncio.to_thread(thread.join)
    assert len(errors) == 3  # cached, new, and load_many: all refused
    assert "is bound to another event loop" in str(errors[0])
    assert "Create one loader per request" in str(errors[0])
    # the first loop's loader is unharmed
    assert await loader.load_many([1, 2]) == ["v1", "v2"]
    assert rec.calls == [[1], [2]]


def test_rebinds_once_the_first_loop_is_closed() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)

    async def use() -> str:
        return await loader.load(1)

    assert asyncio.run(use()) == "v1"
    assert asyncio.run(use()) == "v1"
    assert rec.calls == [[1], [1]]  # the cache went with the first loop


def test_use_from_a_second_loop_of_the_same_thread_while_the_first_is_open() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec)

    async def use() -> str:
        return await loader.load(1)

    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        assert first.run_until_complete(use()) == "v1"
        with pytest.raises(RuntimeError, match="bound to another event loop"):
            second.run_until_complete(use())  # a cache hit, still refused
        first.close()
        assert second.run_until_complete(use()) == "v1"  # rebound, cache emptied
        assert rec.calls == [[1], [1]]
    finally:
        first.close()
        second.close()


def test_rebinds_without_a_cache_too() -> None:
    rec = Recorder()
    loader: DataLoader[int, str] = DataLoader(rec, cache=False)

    async def use() -> str:
        async with loader:  # binds here, already bound the second time
            return await loader.load(1)

    assert asyncio.run(use()) == "v1"
    with pytest.raises(BatcherClosed):
        asyncio.run(use())


async def test_async_with_after_first_use() -> None:
    loader: DataLoader[int, str] = DataLoader(Recorder())
    assert await loader.load(1) == "v1"
    async with loader:
        assert await loader.load(2) == "v2"
    assert loader.closed


def test_load_needs_a_running_loop() -> None:
    loader: DataLoader[int, str] = DataLoader(Recorder())
    with pytest.raises(RuntimeError, match=r"<DataLoader .*> needs a running event loop"):
        loader.load(1)
    loader.clear(1).clear_all()  # no loop needed


# ------------------------------------------------------------------- typing


async def test_generic_types_are_inferred() -> None:
    async def fn(keys: list[int]) -> list[str]:
        return [str(k) for k in keys]

    async def mapped(keys: list[str]) -> dict[str, float]:
        return dict.fromkeys(keys, 1.0)

    loader = DataLoader(fn)
    assert_type(loader, DataLoader[int, str])
    assert_type(loader.load(1), asyncio.Future[str])
    assert_type(await loader.load_many([1]), list[str])
    assert_type(DataLoader(mapped), DataLoader[str, float])
    assert await loader.load(4) == "4"
