"""DataLoader parity: prime/prime_many (strawberry's semantics), cache stats,
recursive loads with default options, ``None`` keys, and the entry-point checks."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
from typing import Any

import pytest

from asyncbatch import BatcherClosed, DataLoader

from .test_loader import Recorder, gather_list, spin


def identity_loader(**options: Any) -> tuple[DataLoader[Any, Any], list[list[Any]]]:
    """A loader answering each key with itself; ``calls`` records every batch."""
    calls: list[list[Any]] = []

    async def idx(keys: list[Any]) -> list[Any]:
        assert keys, "the batch function is never called with no keys"
        calls.append(list(keys))
        return keys

    return DataLoader(idx, **options), calls


# ---------------------------------------------------------------------- prime


async def test_prime_answers_a_pending_key_after_clear_the_friction_case() -> None:
    # ../shared/cases/friction/dataloader_prime_force_on_pending_key.py
    loader, calls = identity_loader()
    pending = loader.load(3)
    loader.clear(3).prime(3, 3.3)
    assert await pending == 3.3

    nocache, nocache_calls = identity_loader(cache=False)
    pending2 = nocache.load(2)
    nocache.prime(2, 2.2)
    assert await pending2 == 2.2
    await spin()
    assert (calls, nocache_calls) == ([], [])


async def test_prime_port_of_strawberrys_test_prime() -> None:
    loader, calls = identity_loader()
    assert await loader.load(1) == 1

    # prime does not override a cached value...
    loader.prime(1, 1.1)
    loader.prime(2, 2.1)
    assert await gather_list(loader.load(1), loader.load(2)) == [1, 2.1]

    # ...unless forced.
    loader.prime(1, 1.2, force=True)
    loader.prime(2, 2.2, force=True)
    assert await gather_list(loader.load(1), loader.load(2)) == [1.2, 2.2]

    # prime_many overrides pending loads, not cached values (without force).
    c2 = loader.load(2)  # cached
    c3 = loader.load(3)  # pending
    loader.prime_many({2: 2.3, 3: 3.3})
    assert await gather_list(c2, c3) == [2.2, 3.3]

    # A batch whose keys are all primed never reaches the batch function.
    c4 = loader.load(4)
    loader.prime_many({4: 4.4})
    assert await c4 == 4.4
    await spin()
    assert calls == [[1]]


async def test_prime_port_of_strawberrys_test_prime_nocache() -> None:
    loader, calls = identity_loader(cache=False)
    loader.prime(1, 1.1)  # nothing pending, no cache: ignored
    assert await loader.load(1) == 1
    b1 = loader.load(2)
    loader.prime(2, 2.2)  # pending in the open batch: answered
    assert await b1 == 2.2
    await spin()
    assert calls == [[1]]


async def test_prime_withdraws_only_its_key_from_the_batch() -> None:
    loader, calls = identity_loader()
    loads = [loader.load(1), loader.load(2), loader.load_many([2, 3])]
    loader.prime(2, "two")
    assert await gather_list(*loads) == [1, "two", ["two", 3]]
    assert calls == [[1, 3]]
    assert await loader.load(2) == "two"  # cached


async def test_prime_answers_every_caller_of_a_coalesced_slot() -> None:
    loader, calls = identity_loader()
    first = loader.load(1)
    loader.clear(1)
    second = loader.load(1)  # a new load, coalesced into the open batch's slot
    loader.prime(1, "p")
    assert await gather_list(first, second) == ["p", "p"]
    await spin()
    assert calls == []


async def test_prime_with_an_exception_fails_pending_loads_and_caches_it() -> None:
    loader, calls = identity_loader()
    pending = loader.load(1)
    many = loader.load_many([1, 2], return_exceptions=True)
    error = LookupError("gone")
    loader.prime(1, error)
    with pytest.raises(LookupError, match="gone"):
        await pending
    assert await many == [error, 2]
    with pytest.raises(LookupError, match="gone"):
        await loader.load(1)  # a primed failure is cached, until cleared
    assert calls == [[2]]
    loader.clear(1)
    assert await loader.load(1) == 1


async def test_prime_many_takes_pairs_in_order_and_checks_every_key_first() -> None:
    loader, calls = identity_loader()
    pending = loader.load("a")
    assert loader.prime_many([("a", "A"), ("b", "B"), ("b", "B2")]) is loader
    assert await pending == "A"
    assert await loader.load("b") == "B"  # the second pair did not force
    loader.prime_many(iter([("b", "B3")]), force=True)
    assert await loader.load("b") == "B3"

    other = loader.load("c")
    with pytest.raises(TypeError, match=r"keys must be hashable.*cannot hash \[1\]"):
        loader.prime_many([("c", "C"), ([1], "x")])
    assert await other == "c"  # nothing was primed
    assert calls == [["c"]]


async def test_prime_with_cache_key() -> None:
    rec = Recorder()
    loader: DataLoader[dict[str, int], str] = DataLoader(rec, cache_key=lambda k: k["id"])
    pending = loader.load({"id": 1})
    loader.prime({"id": 1}, "one")
    assert await pending == "one"
    assert await loader.load({"id": 1}) == "one"
    assert rec.calls == []


async def test_prime_in_a_sealed_batch_waiting_for_a_slot() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    loader: DataLoader[int, str] = DataLoader(rec, max_batch_size=2, max_concurrency=1)
    running = loader.load_many([1, 2])
    await spin()  # [1, 2] holds the slot
    waiting = loader.load_many([3, 4])  # full and due, waiting for the slot
    loader.prime(4, "four")
    rec.gate.set()
    assert await gather_list(running, waiting) == [["v1", "v2"], ["v3", "four"]]
    assert rec.calls == [[1, 2], [3]]


def test_prime_needs_a_running_loop() -> None:
    loader, _ = identity_loader()
    with pytest.raises(RuntimeError, match=r"<DataLoader .*> needs a running event loop"):
        loader.prime(1, 1)
    with pytest.raises(RuntimeError, match=r"<DataLoader .*> needs a running event loop"):
        loader.prime_many({1: 1})


# ---------------------------------------------------------------------- stats


async def test_cache_hits_and_misses_count_loads() -> None:
    loader, calls = identity_loader()
    assert await gather_list(loader.load(1), loader.load(1), loader.load(2)) == [1, 1, 2]
    stats = loader.stats
    assert (stats.cache_misses, stats.cache_hits) == (2, 1)  # the second load of 1 joined

    assert await loader.load(1) == 1  # from the cache
    assert await loader.load_many([1, 3, 3, 4]) == [1, 3, 3, 4]  # 1 cached, 3 repeated
    stats = loader.stats
    assert (stats.cache_misses, stats.cache_hits) == (4, 4)
    assert (stats.submitted, stats.succeeded) == (4, 4)  # keys sent to the batch function
    assert calls == [[1, 2], [3, 4]]


async def test_cache_false_counts_every_load_as_a_miss() -> None:
    loader, calls = identity_loader(cache=False)
    assert await gather_list(loader.load(1), loader.load(1)) == [1, 1]
    assert await loader.load_many([1, 2, 1]) == [1, 2, 1]
    stats = loader.stats
    assert (stats.cache_misses, stats.cache_hits) == (4, 1)  # the repeat in load_many joined
    assert calls == [[1], [1, 2]]


async def test_primed_pending_keys_are_counted_as_resolved() -> None:
    loader, _ = identity_loader()
    loads = [loader.load(1), loader.load(2), loader.load(3)]
    loader.prime(1, "one").prime(2, ValueError("two"))
    results = await asyncio.gather(*loads, return_exceptions=True)
    assert results[0] == "one"
    assert isinstance(results[1], ValueError)
    assert results[2] == 3
    stats = loader.stats
    assert (stats.submitted, stats.succeeded, stats.failed, stats.cancelled) == (3, 2, 1, 0)
    assert stats.batches == 1
    assert stats.mean_batch_size == 1.0  # only 3 reached the batch function
    assert stats.cache_misses == 3


async def test_failed_refused_loads_are_not_counted() -> None:
    loader, _ = identity_loader()
    with pytest.raises(TypeError):
        loader.load([1])
    await loader.aclose()
    with pytest.raises(BatcherClosed):
        loader.load(1)
    assert (loader.stats.cache_hits, loader.stats.cache_misses) == (0, 0)


async def test_stats_is_a_replaced_snapshot() -> None:
    loader, _ = identity_loader()
    before = loader.stats
    await loader.load(1)
    assert before.cache_misses == 0
    assert dataclasses.replace(loader.stats, cache_hits=0, cache_misses=0) == (
        dataclasses.replace(loader._batcher.stats, cache_hits=0, cache_misses=0)
    )


# ------------------------------------------------------------ recursive loads


async def test_a_batch_function_may_load_from_its_own_loader() -> None:
    # ../shared/cases/faults/dataloader_recursive_load.py: default options.
    loader: DataLoader[int, int]
    calls: list[list[int]] = []

    async def factorial(keys: list[int]) -> list[int]:
        calls.append(list(keys))
        return [1 if n == 0 else n * await loader.load(n - 1) for n in keys]

    loader = DataLoader(factorial)
    assert await asyncio.wait_for(loader.load(3), 2) == 6
    assert calls == [[3], [2], [1], [0]]
    assert await loader.load_many([4, 2]) == [24, 2]
    assert calls == [[3], [2], [1], [0], [4]]


async def test_tree_loads_share_one_batch_per_level() -> None:
    children = {0: [1, 2], 1: [3, 4], 2: [5, 6]}
    loader: DataLoader[int, int]
    calls: list[list[int]] = []

    async def subtree_size(keys: list[int]) -> list[int]:
        calls.append(sorted(keys))
        sizes = []
        for key in keys:
            below = await loader.load_many(children.get(key, []))
            sizes.append(1 + sum(below))
        return sizes

    loader = DataLoader(subtree_size)
    assert await loader.load(0) == 7
    assert calls[:2] == [[0], [1, 2]]
    assert sorted(k for batch in calls for k in batch) == [0, 1, 2, 3, 4, 5, 6]


async def test_recursive_loads_with_a_limit_above_the_depth() -> None:
    loader: DataLoader[int, int]

    async def factorial(keys: list[int]) -> list[int]:
        return [1 if n == 0 else n * await loader.load(n - 1) for n in keys]

    loader = DataLoader(factorial, max_concurrency=5)
    assert await asyncio.wait_for(loader.load(4), 2) == 24


async def test_default_max_concurrency_is_no_limit() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    loader: DataLoader[int, str] = DataLoader(rec, max_batch_size=1)
    loads = loader.load_many(range(50))
    await spin()
    assert rec.started == 50  # every batch in flight at once
    rec.gate.set()
    assert await loads == [f"v{i}" for i in range(50)]


# ---------------------------------------------------------------- None keys


async def test_none_is_a_key_like_any_other() -> None:
    loader, calls = identity_loader()
    assert await gather_list(loader.load(None), loader.load(None), loader.load(1)) == [
        None,
        None,
        1,
    ]
    assert await loader.load_many([None, 2, None]) == [None, 2, None]
    assert calls == [[None, 1], [2]]
    assert loader.stats.cache_hits == 3


async def test_none_key_in_a_mapping_answer_and_as_a_cache_key() -> None:
    async def by_key(keys: list[str | None]) -> dict[str | None, str]:
        return {k: f"<{k}>" for k in keys}

    loader = DataLoader(by_key)
    assert await loader.load_many([None, "a"]) == ["<None>", "<a>"]
    loader.clear(None).prime(None, "primed")
    assert await loader.load(None) == "primed"

    rec = Recorder()
    by_none: DataLoader[str, str] = DataLoader(rec, cache_key=lambda k: None)
    assert await gather_list(by_none.load("x"), by_none.load("y")) == ["vx", "vx"]
    assert rec.calls == [["x"]]


# ---------------------------------------------------- entry-point checks


def test_load_many_needs_a_running_loop_and_changes_nothing() -> None:
    loader, _ = identity_loader()
    with pytest.raises(RuntimeError, match=r"<DataLoader 'identity_loader\.<locals>\.idx'"):
        loader.load_many([1, 2])
    assert loader.stats.cache_misses == 0


async def test_load_and_load_many_from_another_thread_are_clear_errors() -> None:
    loader, _ = identity_loader()
    assert await loader.load(1) == 1
    errors: list[BaseException] = []

    def other_thread() -> None:
        for call in (
            lambda: loader.load(2),
            lambda: loader.load_many([2]),
            lambda: loader.prime(2, 2),
            lambda: loader.clear(1),
            lambda: loader.clear_all(),
        ):
            try:
                call()
            except RuntimeError as exc:
                errors.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert len(errors) == 5
    assert all(str(e).startswith("<DataLoader 'identity_loader.<locals>.idx'") for e in errors)
    assert repr(loader).endswith("cached=1 loading=0>")
    assert await loader.load(1) == 1


async def test_load_many_from_another_open_loop_is_refused() -> None:
    loader, _ = identity_loader()
    assert await loader.load(1) == 1
    errors: list[BaseException] = []

    async def use() -> None:
        for call in (lambda: loader.load(2), lambda: loader.load_many([1, 2])):
            try:
                call()
            except RuntimeError as exc:
                errors.append(exc)

    thread = threading.Thread(target=asyncio.run, args=(use(),))
    thread.start()
    thread.join()
    assert [str(e).split(" is bound")[0] for e in errors] == [repr(loader)] * 2
    assert "still open" in str(errors[1])


async def test_load_many_on_a_closed_loader_changes_nothing() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    loader: DataLoader[int, str] = DataLoader(rec)
    rec.gate.set()
    assert await loader.load(1) == "v1"
    rec.gate.clear()
    loading = loader.load(2)
    await spin()
    closing = asyncio.ensure_future(loader.aclose())
    await spin()
    assert loader.closed
    # Cached and loading keys are still answered; a new key is refused, naming the loader.
    answered = loader.load_many([1, 2])
    with pytest.raises(BatcherClosed, match=r"^<DataLoader .* \[closed\] .* is closed"):
        loader.load_many([1, 2, 3])
    with pytest.raises(BatcherClosed, match=r"^<DataLoader .* \[closed\] .* is closed"):
        loader.load(3)
    stats = loader.stats
    assert (stats.cache_hits, stats.cache_misses) == (2, 2)
    rec.gate.set()
    await closing
    assert await answered == ["v1", "v2"]
    assert await loading == "v2"
    assert rec.calls == [[1], [2]]


# --------------------------------------------------------- numeric options


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"max_batch_size": 1.0}, TypeError, "max_batch_size must be an int, got 1.0"),
        ({"max_batch_size": True}, TypeError, "max_batch_size must be an int, got True"),
        ({"max_batch_size": 0}, ValueError, "max_batch_size must be >= 1, got 0"),
        ({"max_concurrency": 2.0}, TypeError, "max_concurrency must be an int, got 2.0"),
        ({"max_concurrency": 0}, ValueError, "max_concurrency must be >= 1, got 0"),
        ({"max_pending": 10.0}, TypeError, "max_pending must be an int, got 10.0"),
        ({"max_wait": math.nan}, ValueError, "max_wait must be >= 0, got nan"),
        ({"max_wait": "0"}, TypeError, "max_wait must be a number, got '0'"),
        ({"timeout": 0}, ValueError, "timeout must be > 0, got 0"),
        ({"interval": math.inf}, ValueError, "interval must be finite, got inf"),
    ],
)
def test_every_numeric_option_is_checked_where_given(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^{message}"):
        identity_loader(**options)


def test_constructing_needs_no_loop() -> None:
    loader, _ = identity_loader(max_concurrency=None)
    assert loader.stats.cache_hits == 0
    assert not loader.closed
