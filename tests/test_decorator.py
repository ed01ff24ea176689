"""``@batch``: functions and methods called one item at a time, one batcher per loop."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import gc
import inspect
import itertools
import pickle
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from asyncbatch import (
    Adaptive,
    BatchedFunction,
    BatchedMethod,
    Batcher,
    BatcherClosed,
    BatcherStats,
    BatchOptions,
    BatchReport,
    BoundBatchedMethod,
    ResultMismatch,
    batch,
)
from asyncbatch._observe import figures_of

from .support import settle

# ----------------------------------------------------------------- functions


async def test_concurrent_calls_are_batched_and_each_gets_its_own_result() -> None:
    batches: list[list[int]] = []

    @batch(max_size=3)
    async def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        return [2 * i for i in items]

    results = await asyncio.gather(*(double(i) for i in range(7)))

    assert results == [0, 2, 4, 6, 8, 10, 12]
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]
    assert double.stats.reasons == {"size": 2, "wait": 1}


async def test_sequential_calls_each_make_a_batch() -> None:
    batches: list[list[int]] = []

    @batch()
    async def echo(items: list[int]) -> list[int]:
        batches.append(list(items))
        return items

    assert [await echo(1), await echo(2)] == [1, 2]
    assert batches == [[1], [2]]


@pytest.mark.looptime
async def test_max_wait_is_forwarded_and_lingers_on_the_loop_clock() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    seen: list[tuple[float, list[str]]] = []

    @batch(max_wait=0.5)
    async def upper(items: list[str]) -> list[str]:
        seen.append((round(loop.time() - t0, 6), list(items)))
        return [s.upper() for s in items]

    async def later(delay: float, item: str) -> str:
        await asyncio.sleep(delay)
        return await upper(item)

    results = list(await asyncio.gather(later(0, "a"), later(0.2, "b"), later(0.6, "c")))

    assert results == ["A", "B", "C"]
    assert seen == [(0.5, ["a", "b"]), (1.1, ["c"])]


async def test_per_item_errors_reach_only_their_caller() -> None:
    @batch()
    async def check(items: list[int]) -> list[int | Exception]:
        return [ValueError(f"bad {i}") if i < 0 else i for i in items]

    results = await asyncio.gather(check(1), check(-2), check(3), return_exceptions=True)

    assert results[0] == 1
    assert results[2] == 3
    assert isinstance(results[1], ValueError)
    assert str(results[1]) == "bad -2"
    assert check.stats.succeeded == 2
    assert check.stats.failed == 1


async def test_a_raising_function_fails_every_caller_of_the_batch() -> None:
    boom = RuntimeError("backend down")

    @batch()
    async def broken(items: list[int]) -> list[int]:
        raise boom

    results = list(await asyncio.gather(broken(1), broken(2), return_exceptions=True))

    assert results == [boom, boom]


async def test_mapping_and_none_answers() -> None:
    @batch(key=lambda user: user["id"])
    async def names(users: list[dict[str, int]]) -> dict[int, str]:
        return {u["id"]: f"user{u['id']}" for u in users if u["id"] != 3}

    written: list[list[str]] = []

    @batch()
    async def write(lines: list[str]) -> None:
        written.append(list(lines))

    results = list(
        await asyncio.gather(
            names({"id": 1}), names({"id": 3}), write("x"), write("y"), return_exceptions=True
        )
    )

    assert results[0] == "user1"
    assert isinstance(results[1], ResultMismatch)
    assert results[2:] == [None, None]
    assert written == [["x", "y"]]


async def test_name_defaults_to_the_qualname_and_shows_in_errors() -> None:
    @batch()
    async def short(items: list[int]) -> list[int]:
        return []

    @batch(name="embeddings")
    async def named(items: list[int]) -> list[int]:
        return []

    with pytest.raises(ResultMismatch, match=r"'test_name_defaults_.*\.<locals>\.short'"):
        await short(1)
    with pytest.raises(ResultMismatch, match=r"sink 'embeddings' returned 0 results"):
        await named(1)


async def test_options_are_forwarded() -> None:
    reports: list[BatchReport] = []
    batches: list[list[str]] = []

    @batch(max_size=2, dedupe=True, key=str.lower, on_batch=reports.append)
    async def lookup(words: list[str]) -> list[int]:
        batches.append(list(words))
        return [len(w) for w in words]

    results = list(await asyncio.gather(lookup("a"), lookup("A"), lookup("bb"), lookup("ccc")))

    assert results == [1, 1, 2, 3]
    assert batches == [["a", "bb"], ["ccc"]]  # "A" shares the slot of "a"
    assert [(r.size, r.reason) for r in reports] == [(2, "size"), (1, "wait")]
    assert lookup.stats.submitted == 4


@pytest.mark.looptime
async def test_timeout_is_the_batchers_per_item_timeout() -> None:
    batches: list[list[int]] = []

    @batch(max_wait=10)
    async def slow(items: list[int]) -> list[int]:
        batches.append(list(items))
        return items

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TimeoutError):
        await slow(1, timeout=1.5)

    assert loop.time() - t0 == pytest.approx(1.5)
    assert batches == []  # withdrawn before dispatch
    assert slow.stats.expired == 1


async def test_a_cancelled_call_is_withdrawn_before_dispatch() -> None:
    batches: list[list[int]] = []

    @batch()
    async def echo(items: list[int]) -> list[int]:
        batches.append(list(items))
        return items

    first = asyncio.create_task(echo(1))
    second = asyncio.create_task(echo(2))
    await asyncio.sleep(0)  # both submitted, the batch is not dispatched yet
    first.cancel()

    assert await second == 2
    assert first.cancelled()
    assert batches == [[2]]
    assert echo.stats.cancelled == 1


async def test_submit_many_keeps_input_order() -> None:
    batches: list[list[int]] = []

    @batch(max_size=2)
    async def inverse(items: list[int]) -> list[float | Exception]:
        batches.append(list(items))
        return [ZeroDivisionError(i) if i == 0 else 1 / i for i in items]

    assert await inverse.submit_many([4, 2, 1]) == [0.25, 0.5, 1.0]
    assert batches == [[4, 2], [1]]

    results = await inverse.submit_many([1, 0], return_exceptions=True)
    assert results[0] == 1.0
    assert isinstance(results[1], ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        await inverse.submit_many([0, 1])


# ------------------------------------------------------ flush, aclose, stats


@pytest.mark.looptime
async def test_flush_dispatches_now_and_waits_for_the_results() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    seen: list[tuple[float, list[int]]] = []

    @batch(max_wait=10)
    async def echo(items: list[int]) -> list[int]:
        seen.append((loop.time() - t0, list(items)))
        return items

    tasks = [asyncio.create_task(echo(i)) for i in range(3)]
    await asyncio.sleep(0)
    await echo.flush()

    assert seen == [(0, [0, 1, 2])]
    assert await asyncio.gather(*tasks) == [0, 1, 2]
    assert loop.time() == t0
    assert echo.stats.reasons == {"flush": 1}


@pytest.mark.looptime
async def test_aclose_drains_then_the_next_call_starts_a_fresh_batcher() -> None:
    batches: list[list[int]] = []

    @batch(max_wait=10)
    async def echo(items: list[int]) -> list[int]:
        batches.append(list(items))
        return items

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks = [asyncio.create_task(echo(i)) for i in range(2)]
    await asyncio.sleep(0)
    await echo.aclose()

    assert batches == [[0, 1]]
    assert await asyncio.gather(*tasks) == [0, 1]
    assert loop.time() == t0  # drained at once, not after max_wait
    # Until the next call, stats are the closed batcher's final counts.
    closed = echo.stats
    assert (closed.submitted, closed.succeeded, closed.reasons) == (2, 2, {"close": 1})

    assert await echo(5) == 5
    assert batches == [[0, 1], [5]]
    fresh = echo.stats
    assert (fresh.submitted, fresh.reasons) == (1, {"wait": 1})
    assert loop.time() - t0 == pytest.approx(10)
    await echo.aclose()
    await echo.aclose()  # idempotent


async def test_aclose_cancel_fails_pending_calls() -> None:
    @batch(max_wait=60)
    async def never(items: list[int]) -> list[int]:
        raise AssertionError("not dispatched")

    task = asyncio.create_task(never(1))
    await asyncio.sleep(0)
    await never.aclose(cancel=True)

    with pytest.raises(BatcherClosed):
        await task


async def test_a_call_racing_aclose_goes_to_a_fresh_batcher() -> None:
    gate = asyncio.Event()
    batches: list[list[str]] = []

    @batch()
    async def echo(items: list[str]) -> list[str]:
        batches.append(list(items))
        if "old" in items:
            await gate.wait()
        return items

    old = asyncio.create_task(echo("old"))
    await settle()  # "old" is in flight, held by the gate
    closing = asyncio.create_task(echo.aclose())
    await settle()  # the close is draining

    assert await echo("new") == "new"  # served while the old batcher drains
    assert not closing.done()
    assert not old.done()
    gate.set()
    await closing
    assert await old == "old"
    assert batches == [["old"], ["new"]]
    assert echo.stats.submitted == 1  # the fresh batcher's


async def test_flush_and_a_second_aclose_wait_for_a_draining_close() -> None:
    gate = asyncio.Event()

    @batch()
    async def held(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    call = asyncio.create_task(held(1))
    await settle()  # in flight, held by the gate
    first = asyncio.create_task(held.aclose())
    await settle()
    second = asyncio.create_task(held.aclose())
    flushing = asyncio.create_task(held.flush())
    await settle()

    assert [first.done(), second.done(), flushing.done()] == [False, False, False]
    gate.set()
    await asyncio.gather(first, second, flushing)
    assert await call == 1
    assert held.stats.reasons == {"wait": 1}


async def test_flush_aclose_and_stats_before_any_call() -> None:
    calls = 0

    @batch()
    async def unused(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        return items

    await unused.flush()
    await unused.aclose()
    await unused.aclose(cancel=True)

    assert unused.stats == BatcherStats()
    assert calls == 0
    assert await unused(1) == 1  # still usable
    assert unused.stats.submitted == 1


# ---------------------------------------------------------------- event loops


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_factory(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def test_each_event_loop_gets_its_own_batcher(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    batches: list[list[int]] = []

    @batch(max_size=10)
    async def echo(items: list[int]) -> list[int]:
        batches.append(list(items))
        return items

    async def main(first: int) -> tuple[list[int], int]:
        results = list(await asyncio.gather(echo(first), echo(first + 1)))
        return results, echo.stats.submitted

    for first in (0, 10, 20):  # like tests calling asyncio.run() repeatedly
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            assert runner.run(main(first)) == ([first, first + 1], 2)

    assert batches == [[0, 1], [10, 11], [20, 21]]
    # Outside any loop: the snapshot of the batcher created last.
    assert echo.stats.submitted == 2
    # Batchers of closed loops are dropped when a new one is created.
    assert len(echo._state._live) == 1


async def test_a_second_loop_running_at_the_same_time_has_its_own_batcher() -> None:
    threads: list[list[tuple[str, int]]] = []

    @batch()
    async def where(items: list[int]) -> list[tuple[str, int]]:
        answer = [(threading.current_thread().name, i) for i in items]
        threads.append(answer)
        return answer

    main_thread = threading.current_thread().name
    assert await where(1) == (main_thread, 1)
    # The call is created here but awaited in a thread's own loop: the batcher
    # is picked when the call runs, on the loop that runs it.
    name, item = await asyncio.to_thread(asyncio.run, where(2))
    assert (name != main_thread, item) == (True, 2)
    assert await where(3) == (main_thread, 3)
    assert where.stats.submitted == 2  # this loop's batcher saw 1 and 3


# -------------------------------------------------------------------- methods


class Store:
    """A store whose reads are batched per instance."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.batches: list[list[int]] = []

    @batch(max_size=10)
    async def get(self, ids: list[int]) -> list[str]:
        """Read many ids at once."""
        self.batches.append(list(ids))
        return [f"{self.label}{i}" for i in ids]


async def test_methods_have_one_batcher_per_instance() -> None:
    a, b = Store("a"), Store("b")

    results = list(await asyncio.gather(a.get(1), b.get(2), a.get(3), Store.get(b, 4)))

    assert results == ["a1", "b2", "a3", "b4"]
    assert a.batches == [[1, 3]]
    assert b.batches == [[2, 4]]
    assert a.get.stats.submitted == 2
    assert b.get.stats.submitted == 2


async def test_flush_aclose_and_stats_of_a_bound_method_act_on_its_instance() -> None:
    a, b = Store("a"), Store("b")
    await a.get(1)

    assert b.get.stats == BatcherStats()
    await b.get.aclose()
    assert a.get.stats.submitted == 1

    await a.get.aclose()
    assert a.get.stats.reasons == {"wait": 1}  # the closed batcher's
    await a.get.flush()
    assert await a.get(2) == "a2"
    assert a.get.stats.submitted == 1  # a fresh batcher


def test_methods_have_one_batcher_per_instance_and_loop() -> None:
    store = Store("s")

    async def main(item: int) -> tuple[str, int]:
        return await store.get(item), store.get.stats.submitted

    assert asyncio.run(main(1)) == ("s1", 1)
    assert asyncio.run(main(2)) == ("s2", 1)
    assert store.batches == [[1], [2]]


async def test_instances_are_not_kept_alive_by_their_batchers() -> None:
    method = Store.__dict__["get"]
    assert isinstance(method, BatchedMethod)
    store = Store("x")
    assert await store.get(1) == "x1"
    key = id(store)
    assert key in method._instances
    ref = weakref.ref(store)

    del store
    gc.collect()

    assert ref() is None
    assert key not in method._instances


async def test_an_instance_without_weakref_support_is_refused() -> None:
    class Slotted:
        __slots__ = ()

        @batch()
        async def get(self, ids: list[int]) -> list[int]:
            return ids

    with pytest.raises(TypeError, match=r"add '__weakref__' to .*Slotted\.__slots__"):
        _ = Slotted().get


async def test_bound_methods_behave_like_bound_methods() -> None:
    a, b = Store("a"), Store("b")
    method = Store.__dict__["get"]

    assert isinstance(a.get, BoundBatchedMethod)
    assert Store.get is method
    assert a.get.__self__ is a
    assert a.get.__func__ is method
    assert a.get == a.get
    assert hash(a.get) == hash(a.get)
    assert a.get != b.get
    assert a.get != method
    assert a.get.__name__ == "get"
    assert a.get.__qualname__ == "Store.get"
    assert a.get.__doc__ == "Read many ids at once."
    assert a.get.__wrapped__ is method.__wrapped__
    assert str(inspect.signature(a.get)) == "(item, /, *, timeout=None)"
    assert str(inspect.signature(Store.get)) == "(self, item, /, *, timeout=None)"
    assert repr(a.get).startswith("<bound batched method Store.get of <")
    assert repr(Store.get) == "<batched method Store.get>"
    assert BoundBatchedMethod.__doc__ is not None
    assert BoundBatchedMethod.__doc__.startswith("A :class:`BatchedMethod` bound")


# ------------------------------------------------------- decoration and shape


async def test_the_wrapper_keeps_the_functions_metadata() -> None:
    async def embed(texts: list[str]) -> list[int]:
        """Embed texts."""
        return [len(t) for t in texts]

    wrapped = batch()(embed)

    assert isinstance(wrapped, BatchedFunction)
    assert wrapped.__name__ == "embed"
    assert wrapped.__qualname__ == embed.__qualname__
    assert wrapped.__doc__ == "Embed texts."
    assert wrapped.__module__ == __name__
    assert wrapped.__wrapped__ is embed
    assert str(inspect.signature(wrapped)) == "(item, /, *, timeout=None)"
    assert repr(wrapped) == f"<batched function {embed.__qualname__}>"
    assert await wrapped("four") == 4


async def test_a_batched_function_on_a_class_does_not_bind() -> None:
    @batch()
    async def double(items: list[int]) -> list[int]:
        return [2 * i for i in items]

    class Holder:
        fn = double

    assert await Holder().fn(21) == 42


async def test_async_callables_and_partials_can_be_decorated() -> None:
    class Sink:
        async def __call__(self, items: list[int]) -> list[int]:
            return [i + 1 for i in items]

    async def scaled(factor: int, items: list[int]) -> list[int]:
        return [factor * i for i in items]

    assert await batch()(Sink())(1) == 2
    assert await batch()(functools.partial(scaled, 3))(2) == 6


def test_decoration_rejects_what_cannot_be_a_batch_function() -> None:
    def sync(items: list[int]) -> list[int]:
        return items

    async def no_args() -> list[int]:
        return []

    async def three(a: object, b: list[int], c: int) -> list[int]:
        return b

    async def ok(items: list[int]) -> list[int]:
        return items

    deco: Any = batch()  # the static types reject these too
    with pytest.raises(TypeError, match=r"needs an async function \(async def\), got '.*sync'"):
        deco(sync)
    with pytest.raises(TypeError, match=r"the function '.*no_args' takes 0$"):
        deco(no_args)
    with pytest.raises(TypeError, match=r"the function '.*three' takes 3$"):
        deco(three)
    with pytest.raises(TypeError, match=r"it cannot read the signature of '.*'$"):
        deco(_NoSignature())
    # Options are checked at decoration, with the batcher's own messages.
    with pytest.raises(ValueError, match="max_size must be >= 1, got 0"):
        batch(max_size=0)(ok)
    with pytest.raises(ValueError, match="overflow must be one of"):
        batch(overflow="nope")(ok)  # type: ignore[arg-type]


def test_batch_takes_every_option_of_the_batcher() -> None:
    batcher_options = set(inspect.signature(Batcher).parameters) - {"sink"}
    assert set(BatchOptions.__optional_keys__) == batcher_options
    assert not BatchOptions.__required_keys__


class _NoSignature:
    """An async callable whose signature ``inspect`` cannot read."""

    __signature__ = "not a signature"

    async def __call__(self, items: list[int]) -> list[int]:
        return items


@batch()
async def module_level(items: list[int]) -> list[int]:
    return items


async def test_wrappers_pickle_and_copy_like_functions_and_bound_methods() -> None:
    store = Store("p")
    assert await module_level(1) == 1

    assert pickle.loads(pickle.dumps(module_level)) is module_level
    assert pickle.loads(pickle.dumps(Store.get)) is Store.get
    assert copy.copy(module_level) is module_level
    assert copy.deepcopy(module_level) is module_level

    bound = pickle.loads(pickle.dumps(store.get))
    assert isinstance(bound, BoundBatchedMethod)
    assert isinstance(bound.__self__, Store)
    assert bound.__self__.label == "p"
    assert bound.__self__ is not store
    assert await bound(2) == "p2"
    assert copy.copy(store.get) == store.get
    blank = BoundBatchedMethod.__new__(BoundBatchedMethod)  # as a copier makes one
    assert not hasattr(blank, "__func__")  # an AttributeError, not a RecursionError


async def test_unhashable_instances_have_their_own_batchers() -> None:
    @dataclasses.dataclass
    class Row:  # eq=True: unhashable
        n: int

        @batch()
        async def plus(self, items: list[int]) -> list[int]:
            return [self.n + i for i in items]

    a, b = Row(1), Row(1)
    assert list(await asyncio.gather(a.plus(1), b.plus(2))) == [2, 3]
    assert (a.plus.stats.submitted, b.plus.stats.submitted) == (1, 1)


# --------------------------------------- function or method: the kind is decided once


async def scale_all(items: list[int], scale: int) -> list[int]:
    return [i * scale for i in items]


_NEEDS = (
    "@batch needs `async def f(items)` (one positional parameter: the list of items) "
    "or, in a class body, a method `async def m(self, items)`"
)


def test_a_module_level_function_of_two_parameters_is_refused() -> None:
    # ../shared/cases/friction/batch_two_param_function.py
    deco: Any = batch(max_size=8)
    with pytest.raises(TypeError) as info:
        deco(scale_all)
    assert str(info.value) == (
        f"{_NEEDS}; 'scale_all' takes 2 positional parameters but is not defined in a "
        "class body, so it is not a method: give the extra parameter a default, or bind "
        "it first (functools.partial), so that only the list of items is left"
    )


async def test_what_is_a_function_and_what_is_a_method() -> None:
    deco: Any = batch()

    async def nested(items: list[int], scale: int) -> list[int]:
        return items

    class Sink2:
        async def __call__(self, items: list[int], scale: int) -> list[int]:
            return items

    for not_a_method in (nested, Sink2(), functools.partial(scale_all)):
        with pytest.raises(TypeError, match=r"takes 2 positional parameters but is not defined"):
            deco(not_a_method)

    # A function with the extra parameter bound or defaulted is a function.
    bound = deco(functools.partial(scale_all, scale=3))
    assert isinstance(bound, BatchedFunction)
    assert await bound(2) == 6

    async def defaulted(items: list[int], scale: int = 5) -> list[int]:
        return [i * scale for i in items]

    assert await deco(defaulted)(2) == 10


async def test_methods_of_class_bodies_are_methods_wherever_the_class_is() -> None:
    def logged(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapper(*args: Any) -> Any:
            return await fn(*args)

        return wrapper

    class Local:
        factor = 2

        @batch()
        async def plain(self, items: list[int]) -> list[int]:
            return [self.factor * i for i in items]

        @batch()
        @logged
        async def wrapped(self, items: list[int]) -> list[int]:
            return [self.factor * i + 1 for i in items]

        async def helper(self) -> Any:
            async def inner(items: list[int], scale: int) -> list[int]:
                return items

            deco: Any = batch()
            return deco(inner)

    assert isinstance(Local.__dict__["plain"], BatchedMethod)
    assert isinstance(Local.__dict__["wrapped"], BatchedMethod)
    obj = Local()
    assert await obj.plain(3) == 6
    assert await obj.wrapped(3) == 7
    with pytest.raises(TypeError, match=r"'.*Local\.helper\.<locals>\.inner' takes 2 positional"):
        await obj.helper()
    # A bound method is already bound: a function of the items.
    bound = batch()(Local().plain.__wrapped__.__get__(obj))
    assert isinstance(bound, BatchedFunction)
    assert await bound(5) == 10


async def test_staticmethods_and_classmethods() -> None:
    class Holder:
        @staticmethod
        @batch()
        async def static_below(items: list[int]) -> list[int]:
            return [i + 1 for i in items]

        @batch()
        @staticmethod
        async def static_above(items: list[int]) -> list[int]:
            return [i + 2 for i in items]

        @batch()
        async def in_body(items: list[int]) -> list[int]:  # no self: does not bind
            return [i + 3 for i in items]

        @classmethod
        @batch()
        async def per_class(cls, items: list[int]) -> list[str]:
            return [f"{cls.__name__}:{i}" for i in items]

    holder = Holder()
    untyped: Any = Holder  # mypy does not follow classmethod over a descriptor
    assert await Holder.static_below(1) == 2
    assert await holder.static_below(1) == 2
    assert await Holder.static_above(1) == 3
    assert await Holder.in_body(1) == 4
    assert await holder.in_body(1) == 4
    assert list(await asyncio.gather(untyped.per_class(1), untyped().per_class(2))) == [
        "Holder:1",
        "Holder:2",
    ]

    def make_classmethod() -> Any:
        async def m(cls: type, items: list[int]) -> list[int]:
            return items

        return classmethod(m)

    deco: Any = batch()
    with pytest.raises(TypeError, match=r"cannot wrap the classmethod object .*put @classmethod"):
        deco(make_classmethod())


# ------------------------------------- what a wrapper's batchers add up to (metrics)


def _succeeded(target: Any) -> int:
    figures = figures_of(target)
    assert figures is not None
    return figures.total().succeeded


def test_the_wrappers_can_be_weakly_referenced() -> None:
    async def gen(items: list[int]) -> AsyncIterator[list[int]]:
        yield items

    streaming: Any = batch()(gen)
    for wrapper in (Store.__dict__["get"], batch()(_double), streaming):
        assert weakref.ref(wrapper)() is wrapper
    assert Store.get.name == "Store.get"
    assert figures_of(Batcher(_double)) is None  # a Batcher is read through its stats


async def _double(items: list[int]) -> list[int]:
    return [i * 2 for i in items]


def test_a_function_keeps_the_counts_of_the_batchers_it_let_go() -> None:
    double = batch(max_size=2)(_double)

    async def work(n: int, close: bool = False) -> None:
        await asyncio.gather(*(double(i) for i in range(n)))
        if close:
            await double.aclose()
            await double(0)  # a fresh batcher replaces the closed one

    assert _succeeded(double) == 0
    asyncio.run(work(3))
    asyncio.run(work(2, close=True))  # forgets the first loop's batcher, replaces one
    figures = figures_of(double)
    assert figures is not None
    assert figures.kept == []  # no loop runs: every batcher is let go
    assert figures.draining == []
    assert figures.retired.counts["succeeded"] == 6
    assert figures.retired.reasons == {"size": 2, "wait": 2}
    assert figures.total().batches == 4
    assert double.stats.submitted == 1  # ``stats`` is still the latest batcher's own


def test_a_method_keeps_the_counts_of_the_instances_that_are_gone() -> None:
    method = Store.__dict__["get"]
    before = _succeeded(method)  # Store is shared by this module's tests

    async def read(store: Store, n: int) -> None:
        await asyncio.gather(*(store.get(i) for i in range(n)))

    for n in range(1, 21):  # twenty instances made, used once and collected
        asyncio.run(read(Store(str(n)), n))
    gc.collect()
    kept = Store("kept")  # tracking a new instance folds the gone ones in
    asyncio.run(read(kept, 3))
    assert method._family.dead == deque()  # nothing piles up, read or not
    assert _succeeded(method) == before + 210 + 3
    assert _succeeded(kept.get) == 3

    # The weak reference's callback caught between leaving the instance's
    # batchers for the family and removing them: counted once, not twice.
    state = method._instances[id(kept)]
    method._family.dead.append(state)
    assert _succeeded(method) == before + 213
    assert _succeeded(method) == before + 213
    del kept, state
    gc.collect()
    assert _succeeded(method) == before + 213
    # Nothing is left listed: no loop runs, no instance is alive.
    assert figures_of(method) is not None
    assert method._family.by_loop == {}
    assert method._family.retired.draining == []


def test_counts_never_go_back_while_loops_and_instances_come_and_go() -> None:
    """Threads run loops (a function, and instances made and dropped) while another
    reads the sums: every read is at least the one before, the last one exact."""

    class Repo:
        @batch(max_size=2)
        async def get(self, ids: list[int]) -> list[int]:
            return ids

    double = batch(max_size=2)(_double)
    runs, done = 40, threading.Event()
    seen: dict[str, list[int]] = {"function": [], "method": []}

    async def work() -> None:
        await asyncio.gather(*(double(i) for i in range(3)), *(Repo().get(i) for i in range(3)))

    def loops() -> None:
        for _ in range(runs):
            asyncio.run(work())  # its instances are freed as it ends (reference counts)

    def reader() -> None:
        while not done.is_set():
            seen["function"].append(_succeeded(double))
            seen["method"].append(_succeeded(Repo.get))

    threads = [threading.Thread(target=loops) for _ in range(2)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join()
    for reads in seen.values():
        assert reads
        assert all(a <= b for a, b in itertools.pairwise(reads)), reads
    assert _succeeded(double) == _succeeded(Repo.get) == 2 * runs * 3


def test_a_read_of_a_method_snapshots_its_batchers_and_reads_them_unlocked() -> None:
    """``instrument(Cls.m)``: a read lists every live instance's batchers under the
    family lock, then reads their stats without it, so the loop's first call on a
    new instance (which takes that lock) never waits for a scrape's reading."""

    class Repo:
        @batch(max_size=2)
        async def get(self, ids: list[int]) -> list[int]:
            return ids

    async def work() -> list[Repo]:
        repos = [Repo() for _ in range(50)]
        await asyncio.gather(*(r.get(i) for r in repos for i in range(3)))
        figures = figures_of(Repo.get)
        assert figures is not None
        assert len(figures.kept) == 50  # one batcher per instance, on this loop
        assert figures.draining == []
        assert figures.retired.counts["succeeded"] == 0
        family = Repo.__dict__["get"]._family
        totals: list[BatcherStats] = []
        with family.lock:  # held, as by the loop starting a new instance's batcher
            reader = threading.Thread(target=lambda: totals.append(figures.total()))
            reader.start()
            reader.join(10)
        (total,) = totals
        assert (total.succeeded, total.batches, total.pending) == (150, 100, 0)
        assert total.reasons == {"size": 50, "wait": 50}
        return repos

    repos = asyncio.run(work())
    figures = figures_of(Repo.get)  # the loop is closed: its batchers are let go
    assert figures is not None
    assert figures.kept == []
    assert figures.retired.counts["succeeded"] == 150
    assert Repo.__dict__["get"]._family.by_loop == {}
    assert _succeeded(repos[0].get) == 3  # one instance's own, kept apart
    del repos
    gc.collect()
    assert _succeeded(Repo.get) == 150


def _limit(target: Any) -> int:
    figures = figures_of(target)
    assert figures is not None
    return figures.total().concurrency_limit


def test_the_concurrency_limit_without_a_batcher_is_the_decorated_one() -> None:
    """No batcher (before the first call, after the loop closed): the limit a new
    batcher would get, as decorated or configured; 0 for none. Summed over the
    batchers there are, and 0 (no limit) if one of them has none."""
    limited = batch(max_concurrency=8)(_double)
    unlimited = batch(max_concurrency=None)(_double)

    class Repo:
        @batch(max_concurrency=4)
        async def get(self, ids: list[int]) -> list[int]:
            return ids

    assert (_limit(limited), _limit(unlimited), _limit(Repo.get)) == (8, 0, 4)

    async def work() -> tuple[Repo, Repo]:
        a, b = Repo(), Repo()
        await asyncio.gather(limited(1), unlimited(1), a.get(1), b.get(1))
        assert (_limit(limited), _limit(unlimited), _limit(Repo.get)) == (8, 0, 8)
        b.get.configure(max_concurrency=None)
        assert (_limit(Repo.get), _limit(a.get), _limit(b.get)) == (0, 4, 0)
        b.get.configure(max_concurrency=2)
        assert _limit(Repo.get) == 6
        b.get.configure(max_concurrency=None)
        return a, b

    a, b = asyncio.run(work())
    assert (_limit(limited), _limit(unlimited), _limit(Repo.get)) == (8, 0, 4)
    assert (_limit(a.get), _limit(b.get)) == (4, 0)  # each instance's own settings
    limited.configure(max_concurrency=3)
    unlimited.configure(max_concurrency=5)
    assert (_limit(limited), _limit(unlimited)) == (3, 5)


async def test_every_batcher_of_a_wrapper_gets_an_adaptive_of_its_own() -> None:
    # "One Adaptive serves one Batcher": a sick instance's timeouts must not cut
    # a healthy one's limit, nor threads' loops share one policy's state.
    template = Adaptive(min=1, max=16)

    class Repo:
        @batch(max_concurrency=template, max_wait=0.001)
        async def get(self, ids: list[int]) -> list[int]:
            return ids

    one, two = Repo(), Repo()
    assert await one.get(1) == 1
    assert await two.get(2) == 2
    policies = [Repo.get._batchers_of(repo).current()._policy for repo in (one, two)]
    assert all(isinstance(p, Adaptive) for p in policies)
    assert policies[0] is not policies[1]
    assert template not in policies
    replacement = Adaptive(min=2, max=8)
    one.get.configure(max_concurrency=replacement)
    after = Repo.get._batchers_of(one).current()._policy
    assert isinstance(after, Adaptive)
    assert after is not replacement
    assert (after.min, after.max) == (2, 8)
