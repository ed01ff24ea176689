"""The behaviours graphql/dataloader's own test suite checks, against our DataLoader.

Each test restates one behaviour of the JavaScript reference implementation in
our API's terms (``load_many`` for ``loadMany``, ``max_batch_size`` for
``maxBatchSize``, ``cache_key`` for ``cacheKeyFn``, ``cache_map`` for
``cacheMap``). Where our design contract decides differently, the test says so
and pins our behaviour:

- a failed load is not cached (the reference caches the rejected promise);
- with ``cache=False`` equal keys of one batch still share one slot (the
  reference repeats them);
- a cached value resolves at once (the reference holds cache hits back until
  the batch that was being built resolves);
- ``None`` is a key like any other (JavaScript refuses ``null``/``undefined``);
- a primed error that is never awaited is not reported (the reference reports
  an unhandled rejection).

Scheduling hooks (``batchScheduleFn``) and ``this`` binding have no
counterpart here; ``max_wait`` and ``Batcher`` options take their place.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Hashable, Iterator, MutableMapping
from typing import Any

import pytest

from asyncbatch import DataLoader, ResultMismatch


def id_loader(**options: Any) -> tuple[DataLoader[Any, Any], list[list[Any]]]:
    """A loader whose values are its keys, and the list of its batch calls."""
    calls: list[list[Any]] = []

    async def identity(keys: list[Any]) -> list[Any]:
        calls.append(list(keys))
        return list(keys)

    return DataLoader(identity, **options), calls


async def both(*aws: Awaitable[Any]) -> list[Any]:
    return list(await asyncio.gather(*aws))


async def errors_of(*aws: Awaitable[Any]) -> list[Any]:
    return list(await asyncio.gather(*aws, return_exceptions=True))


# ----------------------------------------------------------------- primary API


async def test_simplest_loader() -> None:
    loader, _ = id_loader()
    fut = loader.load(1)
    assert isinstance(fut, asyncio.Future)
    assert await fut == 1


async def test_load_many_in_one_call_and_empty() -> None:
    loader, _ = id_loader()
    assert await loader.load_many([1, 2]) == [1, 2]
    assert await loader.load_many([]) == []


async def test_load_many_with_errors_in_place() -> None:
    async def fn(keys: list[str]) -> list[str | Exception]:
        return [ValueError("Bad Key") if k == "bad" else k for k in keys]

    loader = DataLoader(fn)
    values = await loader.load_many(["a", "b", "bad"], return_exceptions=True)
    assert values[:2] == ["a", "b"]
    assert isinstance(values[2], ValueError)
    assert str(values[2]) == "Bad Key"


async def test_batches_multiple_requests() -> None:
    loader, calls = id_loader()
    assert await both(loader.load(1), loader.load(2)) == [1, 2]
    assert calls == [[1, 2]]


async def test_batches_with_max_batch_size() -> None:
    loader, calls = id_loader(max_batch_size=2)
    assert await both(loader.load(1), loader.load(2), loader.load(3)) == [1, 2, 3]
    assert calls == [[1, 2], [3]]


async def test_cached_keys_stay_out_of_the_batch() -> None:
    # Divergence: a cached value resolves at once, not with the batch.
    gate = asyncio.Event()
    calls: list[list[int]] = []

    async def fn(keys: list[int]) -> list[int]:
        calls.append(keys)
        await gate.wait()
        return keys

    loader = DataLoader(fn)
    loader.prime(1, 1)
    one, two = loader.load(1), loader.load(2)
    await asyncio.sleep(0)
    assert one.done()
    assert not two.done()
    gate.set()
    assert await both(one, two) == [1, 2]
    assert calls == [[2]]


async def test_max_batch_size_counts_only_keys_that_need_loading() -> None:
    loader, calls = id_loader(max_batch_size=1)
    loader.prime(1, 1)
    assert await both(loader.load(1), loader.load(2)) == [1, 2]
    assert calls == [[2]]


async def test_coalesces_identical_requests() -> None:
    loader, calls = id_loader()
    assert await both(loader.load(1), loader.load(1)) == [1, 1]
    assert calls == [[1]]


async def test_coalesces_identical_requests_across_sized_batches() -> None:
    loader, calls = id_loader(max_batch_size=2)
    result = await both(loader.load(1), loader.load(2), loader.load(1), loader.load(3))
    assert result == [1, 2, 1, 3]
    assert calls == [[1, 2], [3]]


async def test_caches_repeated_requests() -> None:
    loader, calls = id_loader()
    assert await both(loader.load("A"), loader.load("B")) == ["A", "B"]
    assert calls == [["A", "B"]]
    assert await both(loader.load("A"), loader.load("C")) == ["A", "C"]
    assert calls == [["A", "B"], ["C"]]
    assert await both(loader.load("A"), loader.load("B"), loader.load("C")) == ["A", "B", "C"]
    assert calls == [["A", "B"], ["C"]]


async def test_clears_one_value() -> None:
    loader, calls = id_loader()
    await both(loader.load("A"), loader.load("B"))
    loader.clear("A")
    assert await both(loader.load("A"), loader.load("B")) == ["A", "B"]
    assert calls == [["A", "B"], ["A"]]


async def test_clears_all_values() -> None:
    loader, calls = id_loader()
    await both(loader.load("A"), loader.load("B"))
    loader.clear_all()
    assert await both(loader.load("A"), loader.load("B")) == ["A", "B"]
    assert calls == [["A", "B"], ["A", "B"]]


async def test_priming() -> None:
    loader, calls = id_loader()
    loader.prime("A", "A")
    assert await both(loader.load("A"), loader.load("B")) == ["A", "B"]
    assert calls == [["B"]]


async def test_priming_does_not_overwrite() -> None:
    loader, calls = id_loader()
    loader.prime("A", "X")
    assert await loader.load("A") == "X"
    assert await loader.load("B") == "B"
    loader.prime("A", "Y")
    loader.prime("B", "Y")
    assert await loader.load("A") == "X"
    assert await loader.load("B") == "B"
    assert calls == [["B"]]


async def test_forced_priming_by_clearing_first() -> None:
    loader, calls = id_loader()
    loader.prime("A", "X")
    assert await loader.load("A") == "X"
    assert await loader.load("B") == "B"
    loader.clear("A").prime("A", "Y")
    loader.clear("B").prime("B", "Y")
    assert await loader.load("A") == "Y"
    assert await loader.load("B") == "Y"
    assert calls == [["B"]]


# ------------------------------------------------------------------- errors


def even_loader() -> tuple[DataLoader[int, int], list[list[int]]]:
    calls: list[list[int]] = []

    async def fn(keys: list[int]) -> list[int | Exception]:
        calls.append(keys)
        return [k if k % 2 == 0 else ValueError(f"Odd: {k}") for k in keys]

    return DataLoader(fn), calls


async def test_error_for_one_key() -> None:
    loader, calls = even_loader()
    with pytest.raises(ValueError, match=r"^Odd: 1$"):
        await loader.load(1)
    assert await loader.load(2) == 2
    assert calls == [[1], [2]]


async def test_failures_and_successes_in_one_batch() -> None:
    loader, calls = even_loader()
    one, two = await errors_of(loader.load(1), loader.load(2))
    assert isinstance(one, ValueError)
    assert str(one) == "Odd: 1"
    assert two == 2
    assert calls == [[1, 2]]


async def test_failed_fetches_are_not_cached() -> None:
    # Divergence: the reference caches the failure and asks once.
    calls: list[list[int]] = []

    async def fn(keys: list[int]) -> list[Exception]:
        calls.append(keys)
        return [ValueError(f"Error: {k}") for k in keys]

    loader: DataLoader[int, int] = DataLoader(fn)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"^Error: 1$"):
            await loader.load(1)
    assert calls == [[1], [1]]


async def test_priming_with_an_error() -> None:
    loader, calls = id_loader()
    loader.prime(1, ValueError("Error: 1"))
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match=r"^Error: 1$"):
        await loader.load(1)
    assert calls == []


async def test_clearing_after_an_error() -> None:
    calls: list[list[int]] = []

    async def fn(keys: list[int]) -> list[Exception]:
        calls.append(keys)
        return [ValueError(f"Error: {k}") for k in keys]

    loader: DataLoader[int, int] = DataLoader(fn)

    async def load_clearing_on_error(key: int) -> int:
        try:
            return await loader.load(key)
        except ValueError:
            loader.clear(key)  # e.g. only when the error is transient
            raise

    for _ in range(2):
        with pytest.raises(ValueError, match=r"^Error: 1$"):
            await load_clearing_on_error(1)
    assert calls == [[1], [1]]


async def test_batch_failure_reaches_every_load() -> None:
    calls: list[list[int]] = []
    terrible = RuntimeError("I am a terrible loader")

    async def fn(keys: list[int]) -> list[int]:
        calls.append(keys)
        raise terrible

    loader = DataLoader(fn)
    one, two = await errors_of(loader.load(1), loader.load(2))
    assert one is terrible
    assert two is terrible
    assert calls == [[1, 2]]


async def test_unawaited_primed_error_is_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    # Divergence: the reference reports an unhandled rejection here.
    loader, _ = id_loader()
    loader.prime(1, ValueError("Error: 1"))
    loader.load(1)  # result ignored
    del loader
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


# ------------------------------------------------------------------ any key


class Opaque:
    """A key with identity semantics, like a JavaScript object."""


async def test_objects_as_keys() -> None:
    loader, calls = id_loader()
    a, b = Opaque(), Opaque()
    values = await both(loader.load(a), loader.load(b))
    assert values[0] is a
    assert values[1] is b
    assert len(calls) == 1
    assert calls[0][0] is a
    assert calls[0][1] is b
    loader.clear(a)
    values = await both(loader.load(a), loader.load(b))
    assert values[0] is a
    assert values[1] is b
    assert len(calls) == 2
    assert calls[1] == [a]


async def test_none_and_zero_are_keys() -> None:
    # Divergence: JavaScript refuses null and undefined keys.
    loader, calls = id_loader()
    assert await both(loader.load(None), loader.load(0)) == [None, 0]
    assert calls == [[None, 0]]


# ------------------------------------------------------------------- options


async def test_disabling_batching() -> None:
    loader, calls = id_loader(max_batch_size=1)
    assert await both(loader.load(1), loader.load(2)) == [1, 2]
    assert calls == [[1], [2]]


async def test_disabling_the_cache() -> None:
    loader, calls = id_loader(cache=False)
    assert await both(loader.load("A"), loader.load("B")) == ["A", "B"]
    assert calls == [["A", "B"]]
    assert await both(loader.load("A"), loader.load("C")) == ["A", "C"]
    assert calls == [["A", "B"], ["A", "C"]]
    assert await both(loader.load("A"), loader.load("B"), loader.load("C")) == ["A", "B", "C"]
    assert calls == [["A", "B"], ["A", "C"], ["A", "B", "C"]]


async def test_without_cache_equal_keys_of_a_batch_still_share_a_slot() -> None:
    # Divergence: the reference passes ["A", "C", "D", "C", "D", "A", "A", "B"].
    loader, calls = id_loader(cache=False)
    values = await both(
        loader.load("A"),
        loader.load("C"),
        loader.load("D"),
        loader.load_many(["C", "D", "A", "A", "B"]),
    )
    assert values == ["A", "C", "D", ["C", "D", "A", "A", "B"]]
    assert calls == [["A", "C", "D", "B"]]


async def test_without_cache_sequential_loads_ask_again() -> None:
    loader, calls = id_loader(cache=False)
    await loader.load("A")
    await loader.load("A")
    assert calls == [["A"], ["A"]]


async def test_without_cache_the_cache_map_is_left_alone() -> None:
    x: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    x.set_result("X")
    cache_map: dict[Any, asyncio.Future[Any]] = {"X": x}
    loader, _ = id_loader(cache=False, cache_map=cache_map)
    loader.prime("A", "A")
    assert "A" not in cache_map
    loader.clear("X")
    assert cache_map["X"] is x
    loader.clear_all()
    assert cache_map["X"] is x


async def test_clear_all_from_inside_the_batch_function() -> None:
    calls: list[list[str]] = []
    loader: DataLoader[str, str]

    async def fn(keys: list[str]) -> list[str]:
        loader.clear_all()
        calls.append(keys)
        return keys

    loader = DataLoader(fn)
    assert await both(loader.load("A"), loader.load("B"), loader.load("A")) == ["A", "B", "A"]
    assert await both(loader.load("A"), loader.load("B"), loader.load("A")) == ["A", "B", "A"]
    assert calls == [["A", "B"], ["A", "B"]]


def fields_key(key: dict[str, int]) -> Hashable:
    """A cache key for dict keys that ignores the order of their entries."""
    return tuple(sorted(key.items()))


async def test_cache_key_for_object_keys() -> None:
    loader, calls = id_loader(cache_key=fields_key)
    key1, key2 = {"id": 123}, {"id": 123}
    assert await loader.load(key1) is key1
    assert await loader.load(key2) is key1
    assert calls == [[key1]]


async def test_clearing_by_an_equivalent_object_key() -> None:
    loader, calls = id_loader(cache_key=fields_key)
    key1, key2 = {"id": 123}, {"id": 123}
    assert await loader.load(key1) is key1
    loader.clear(key2)
    assert await loader.load(key1) is key1
    assert calls == [[key1], [key1]]


async def test_object_keys_with_entries_in_another_order() -> None:
    loader, calls = id_loader(cache_key=fields_key)
    key_a, key_b = {"a": 123, "b": 321}, {"b": 321, "a": 123}
    value_a, value_b = await both(loader.load(key_a), loader.load(key_b))
    assert value_a is key_a
    assert value_b is key_a
    assert len(calls) == 1
    assert len(calls[0]) == 1
    assert calls[0][0] is key_a


async def test_priming_with_an_object_key() -> None:
    loader, calls = id_loader(cache_key=fields_key)
    key1, key2 = {"id": 123}, {"id": 123}
    loader.prime(key1, key1)
    assert await loader.load(key1) is key1
    assert await loader.load(key2) is key1
    assert calls == []


class SimpleMap(MutableMapping[Any, "asyncio.Future[Any]"]):
    """A minimal cache map of our own, backed by a dict it exposes."""

    def __init__(self) -> None:
        self.stash: dict[Any, asyncio.Future[Any]] = {}

    def __getitem__(self, key: Any) -> asyncio.Future[Any]:
        return self.stash[key]

    def __setitem__(self, key: Any, value: asyncio.Future[Any]) -> None:
        self.stash[key] = value

    def __delitem__(self, key: Any) -> None:
        del self.stash[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.stash)

    def __len__(self) -> int:
        return len(self.stash)


async def test_custom_cache_map() -> None:
    cache_map = SimpleMap()
    loader, calls = id_loader(cache_map=cache_map)
    assert await both(loader.load("a"), loader.load("b")) == ["a", "b"]
    assert calls == [["a", "b"]]
    assert list(cache_map.stash) == ["a", "b"]
    assert await both(loader.load("c"), loader.load("b")) == ["c", "b"]
    assert calls == [["a", "b"], ["c"]]
    assert list(cache_map.stash) == ["a", "b", "c"]
    loader.clear("b")
    assert await loader.load("b") == "b"
    assert calls == [["a", "b"], ["c"], ["b"]]
    assert list(cache_map.stash) == ["a", "c", "b"]
    loader.clear_all()
    assert cache_map.stash == {}


# --------------------------------------------------- job ordering and nesting


async def test_loads_from_tasks_after_awaits_that_do_not_suspend_share_a_batch() -> None:
    # The counterpart of loads made in chained promise callbacks: resolvers
    # started together whose loads follow awaits that finish at once (they do
    # not suspend) all load in the same loop iteration, so in the same batch.
    loader, calls = id_loader()

    async def ready() -> None:
        return None

    async def later(key: str, depth: int) -> str:
        for _ in range(depth):
            await ready()
        value: str = await loader.load(key)
        return value

    values = await both(later("A", 0), later("B", 1), later("C", 2), later("D", 3))
    assert values == ["A", "B", "C", "D"]
    assert calls == [["A", "B", "C", "D"]]


async def test_a_loader_called_from_loaders() -> None:
    deep_calls: list[list[tuple[str, ...]]] = []

    async def deep_fn(keys: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        deep_calls.append(keys)
        return keys

    deep = DataLoader(deep_fn)
    a_calls: list[list[str]] = []
    b_calls: list[list[str]] = []

    async def a_fn(keys: list[str]) -> tuple[str, ...]:
        a_calls.append(keys)
        return await deep.load(tuple(keys))

    async def b_fn(keys: list[str]) -> tuple[str, ...]:
        b_calls.append(keys)
        return await deep.load(tuple(keys))

    a_loader, b_loader = DataLoader(a_fn), DataLoader(b_fn)
    values = await both(
        a_loader.load("A1"), b_loader.load("B1"), a_loader.load("A2"), b_loader.load("B2")
    )
    assert values == ["A1", "B1", "A2", "B2"]
    assert a_calls == [["A1", "A2"]]
    assert b_calls == [["B1", "B2"]]
    assert deep_calls == [[("A1", "A2"), ("B1", "B2")]]


# --------------------------------------------------------------- misuse


def test_needs_a_batch_function() -> None:
    bad: object
    for bad in (None, {}):
        with pytest.raises(TypeError, match="DataLoader needs an async batch function"):
            DataLoader(bad)  # type: ignore[arg-type]


async def test_load_many_needs_an_iterable() -> None:
    loader, _ = id_loader()
    with pytest.raises(TypeError, match="not iterable"):
        loader.load_many(1)  # type: ignore[call-overload]
    assert await loader.load_many([]) == []


async def test_batch_function_must_be_async() -> None:
    def sync(keys: list[int]) -> list[int]:
        return keys

    with pytest.raises(TypeError, match="must be async"):
        DataLoader(sync)  # type: ignore[arg-type]


async def test_batch_function_must_return_values_not_none() -> None:
    async def nothing(keys: list[int]) -> list[int]:
        return None  # type: ignore[return-value]

    loader = DataLoader(nothing)
    with pytest.raises(ResultMismatch, match="returned None for 1 keys"):
        await loader.load(1)


async def test_batch_function_must_return_one_value_per_key() -> None:
    async def empty(keys: list[int]) -> list[int]:
        return []

    loader = DataLoader(empty)
    with pytest.raises(ResultMismatch) as info:
        await loader.load(1)
    message = str(info.value)
    assert "returned 0 results for a batch of 1 items" in message
    assert "(items: [1], results: [])" in message


def test_cache_map_must_be_a_mutable_mapping() -> None:
    class GetOnly:
        def get(self, key: Any) -> None:
            return None

    with pytest.raises(TypeError, match="cache_map must be a MutableMapping"):
        id_loader(cache_map=GetOnly())


@pytest.mark.parametrize("size", [0, -1])
def test_max_batch_size_must_be_positive(size: int) -> None:
    with pytest.raises(ValueError, match=f"max_batch_size must be >= 1, got {size}"):
        id_loader(max_batch_size=size)


def test_cache_key_must_be_callable() -> None:
    with pytest.raises(TypeError, match="cache_key must be callable"):
        id_loader(cache_key=42)
