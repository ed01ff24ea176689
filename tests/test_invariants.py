"""Randomized fault injection against DESIGN.md's invariants.

Hypothesis draws a batcher configuration, a schedule of callers (submit with
and without timeouts, submit_nowait, submit_many, cancellations, flushes, a
close in the middle or at the end) and a sink that randomly answers, fails,
returns per-item errors or the wrong shape, and stalls. Each run happens on a
fresh virtual-time loop (looptime), so stalls cost no real time. After every
run the invariants are checked:

1. every accepted caller is resolved exactly once (no InvalidStateError, no
   future left pending, counters add up);
2. no item reaches the sink twice unless ``retry`` is on;
3. each caller receives the result computed for its own item;
4. per partition, batches are dispatched in the order they became due;
5. (loop binding is covered in test_lifecycle);
6. after ``aclose()`` no task, timer or future of the batcher is left, and the
   loop's exception handler saw nothing ("exception was never retrieved",
   "Task was destroyed but it is pending", errors inside callbacks).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import math
import random
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import looptime
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncbatch import (
    Batcher,
    BatcherClosed,
    BatchReport,
    QueueFull,
    ResultMismatch,
    Retry,
    Retryable,
)

from .conftest import FLAVOURS
from .support import Rows, live_timers


class SinkError(Exception):
    pass


class ItemError(Exception):
    pass


Item = tuple[int, int]  # (caller id, key)


@dataclass
class World:
    rng: random.Random
    timeout: float | None
    calls: list[list[Item]] = field(default_factory=list)
    first_calls: list[list[Item]] = field(default_factory=list)
    seen_ids: set[int] = field(default_factory=set)

    kept: list[list[Item]] = field(default_factory=list)

    async def sink(self, items: list[Item]) -> Any:
        given = list(items)  # the answer follows the order it was handed over
        self.calls.append(given)
        fresh = [it for it in given if it[0] not in self.seen_ids]
        if len(fresh) == len(given):
            self.first_calls.append(given)
        self.seen_ids.update(it[0] for it in given)
        rng = self.rng
        for kept in self.kept:  # a list of an earlier call, changed long after
            kept.append((-1, -1))
            kept.reverse()
        if rng.random() < 0.4:  # the sink owns its list: sort, drain, grow or keep it
            _mutate(rng, items, self.kept)
        roll = rng.random()
        if roll < 0.15:
            await asyncio.sleep(rng.uniform(0, 2))
        elif roll < 0.2 and self.timeout is not None:
            await asyncio.sleep(1000)  # only the sink timeout ends this
        if rng.random() < 0.3:
            _mutate(rng, items, self.kept)  # also after the wait, before answering
        pack = rng.choice([list, tuple, Rows])
        roll = rng.random()
        if roll < 0.12:
            raise SinkError("sink failed")
        if roll < 0.17:
            return pack([("ok", key) for _, key in given][1:])  # wrong length
        if roll < 0.22:  # mapping, one key missing
            table = {key: ("ok", key) for _, key in given[1:]}
            return rng.choice([dict, MappingProxyType])(table)
        if roll < 0.35:
            return pack(
                [_entry(rng, key) if rng.random() < 0.4 else ("ok", key) for _, key in given]
            )
        if roll < 0.45:  # some items ask to be retried on their own
            return pack(
                [
                    Retryable(rng.choice([ItemError, StopIteration])(key))
                    if rng.random() < 0.4
                    else ("ok", key)
                    for _, key in given
                ]
            )
        if roll < 0.5:
            return rng.choice([dict, MappingProxyType])({key: ("ok", key) for _, key in given})
        return pack([("ok", key) for _, key in given])


# Per-item answers: Exception instances fail only their item (StopIteration
# reaches its caller as the cause of a RuntimeError); BaseException instances
# that are not Exceptions are values like any other.
_ENTRIES: tuple[type[BaseException], ...] = (
    ItemError,
    StopIteration,
    StopAsyncIteration,
    asyncio.CancelledError,
    KeyboardInterrupt,
    SystemExit,
    GeneratorExit,
)


_VALUES = (asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit)


def _entry(rng: random.Random, key: int) -> BaseException:
    return rng.choice(_ENTRIES)(key)


def _mutate(rng: random.Random, items: list[Item], kept: list[list[Item]]) -> None:
    how = rng.randrange(6)
    if how == 0:
        items.sort(key=lambda it: (-it[1], -it[0]))
    elif how == 1:
        rng.shuffle(items)
    elif how == 2:
        items.clear()
    elif how == 3:
        while items:
            items.pop()
    elif how == 4:
        items.append((-1, -1))
    else:
        kept.append(items)


configs = st.fixed_dictionaries(
    {
        "max_size": st.sampled_from([1, 1, 2, 3, 5, 8]),
        "max_wait": st.sampled_from([0.0, 0.05, 0.5, math.inf]),
        "interval": st.sampled_from([None, None, 0.3]),
        "max_concurrency": st.sampled_from([1, 2, 3, None]),
        "max_pending": st.sampled_from([None, None, 1, 3, 10]),
        "overflow": st.sampled_from(["block", "reject", "drop_oldest"]),
        "dedupe": st.booleans(),
        "partitions": st.sampled_from([1, 1, 3]),
        "timeout": st.sampled_from([None, 1.5, math.inf]),
        "retry": st.sampled_from([None, None, 2, 3, math.inf]),
        "isolate": st.booleans(),
    }
)

op = st.one_of(
    st.tuples(
        st.just("submit"),
        st.integers(0, 5),
        st.sampled_from([None, None, 0.2, 2.0]),  # per-item timeout
        st.sampled_from([None, None, None, 0.0, 0.1, 1.0]),  # cancel after
    ),
    st.tuples(st.just("nowait"), st.integers(0, 5), st.sampled_from([None, None, 0.0, 0.5])),
    st.tuples(st.just("many"), st.lists(st.integers(0, 5), min_size=1, max_size=4)),
    st.tuples(st.just("put"), st.integers(0, 5), st.booleans()),  # fire-and-forget
    st.tuples(st.just("flush")),
    st.tuples(st.just("close"), st.booleans()),
)
schedules = st.lists(st.tuples(st.sampled_from([0.0, 0.0, 0.01, 0.2, 1.0]), op), max_size=40)


# ~15 s on a quiet 2-core machine; the margin is for a loaded one.
@pytest.mark.timeout(600)
@settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples on every CI run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(config=configs, schedule=schedules, seed=st.integers(0, 2**32), final_cancel=st.booleans())
def test_every_item_is_resolved_exactly_once(
    config: dict[str, Any],
    schedule: list[tuple[float, tuple[Any, ...]]],
    seed: int,
    final_cancel: bool,
) -> None:
    with asyncio.Runner(loop_factory=looptime.new_event_loop) as runner:
        runner.run(_watchdog(_scenario(config, schedule, seed, final_cancel)))
    gc.collect()


async def _watchdog(scenario: Coroutine[Any, Any, None]) -> None:
    # A deadlock leaves the virtual clock nothing to jump to: this deadline
    # turns it into a failure that hypothesis can shrink.
    async with asyncio.timeout(10_000):
        await scenario


async def _scenario(
    config: dict[str, Any],
    schedule: list[tuple[float, tuple[Any, ...]]],
    seed: int,
    final_cancel: bool,
) -> None:
    loop = asyncio.get_running_loop()
    handler_calls: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: handler_calls.append(ctx))
    world = World(random.Random(seed), config["timeout"])
    retry = None
    if config["retry"] is not None:
        retry = Retry(attempts=config["retry"], backoff=0.05, isolate=config["isolate"])
    partitions = config["partitions"]
    reports: list[BatchReport] = []
    options: dict[str, Any] = {
        "max_size": config["max_size"],
        "max_wait": config["max_wait"],
        "interval": config["interval"],
        "max_concurrency": config["max_concurrency"],
        "max_pending": config["max_pending"],
        "overflow": config["overflow"],
        "key": lambda it: it[1],
        "dedupe": config["dedupe"],
        "partition": (lambda it: it[1] % partitions) if partitions > 1 else None,
        "timeout": config["timeout"],
        "retry": retry,
        "on_batch": reports.append,
    }
    try:
        b: Batcher[Item, Any] = Batcher(world.sink, **options)
    except ValueError as exc:
        # Refused only when nothing could ever be dispatched: no deadline and
        # a batch that cannot fill because room runs out first.
        message = str(exc)
        assert options["overflow"] == "drop_oldest", message
        assert math.isinf(options["max_wait"]), message
        assert options["interval"] is None, message
        assert options["max_pending"] < options["max_size"], message
        options["max_wait"] = 0.5
        b = Batcher(world.sink, **options)
    ids = iter(range(10**6))
    callers: list[tuple[Item, asyncio.Future[Any]]] = []
    tasks: list[asyncio.Task[Any]] = []
    refused = 0
    our_timers: list[asyncio.TimerHandle] = []

    def cancel_later(fut: asyncio.Future[Any], after: float | None) -> None:
        if after is not None:
            our_timers.append(loop.call_later(after, fut.cancel))

    async def caller(key: int, deadline: float | None) -> Any:
        # The id is taken when the submit really happens, so ids follow
        # acceptance order (FIFO check below).
        item = (next(ids), key)
        accepted.append(item)
        return item, await b.submit(item, timeout=deadline)

    async def many(keys: list[int]) -> Any:
        items = [(next(ids), key) for key in keys]
        return await b.submit_many(items, return_exceptions=True)

    accepted: list[Item] = []
    for gap, (kind, *args) in schedule:
        if gap:
            await asyncio.sleep(gap)
        if kind == "submit":
            key, timeout, cancel_after = args
            task = asyncio.ensure_future(caller(key, timeout))
            cancel_later(task, cancel_after)
            callers.append(((-1, key), task))
        elif kind == "nowait":
            key, cancel_after = args
            item = (next(ids), key)
            try:
                fut = b.submit_nowait(item)
            except (QueueFull, BatcherClosed):
                refused += 1
                continue
            cancel_later(fut, cancel_after)
            callers.append((item, fut))
        elif kind == "many":
            tasks.append(asyncio.ensure_future(many(args[0])))
        elif kind == "put":
            key, nowait = args
            item = (next(ids), key)
            if nowait:
                try:
                    b.put_nowait(item)
                except (QueueFull, BatcherClosed):
                    continue
            else:
                tasks.append(asyncio.ensure_future(b.put(item)))
        elif kind == "flush":
            tasks.append(asyncio.ensure_future(b.flush()))
        else:
            tasks.append(asyncio.ensure_future(b.aclose(cancel=args[0])))

    await b.aclose(cancel=final_cancel)
    for handle in our_timers:
        handle.cancel()
    outcomes = await asyncio.gather(*(fut for _, fut in callers), *tasks, return_exceptions=True)

    # 1. exactly once: everything finished, counters add up, nothing pending
    assert all(fut.done() for _, fut in callers)
    s = b.stats
    assert s.pending == 0
    assert s.in_flight == 0
    assert s.submitted == s.succeeded + s.failed + s.cancelled + s.expired + s.dropped
    observed_ok = 0
    for (item, _), outcome in zip(callers, outcomes, strict=False):
        # 3. the right result for the right caller
        if isinstance(outcome, tuple) and outcome[0] != "ok":
            (_, key), outcome = outcome  # a submit() caller: (its item, its result)
            item = (-1, key)
        if isinstance(outcome, tuple):
            assert outcome == ("ok", item[1])
            observed_ok += 1
        elif isinstance(outcome, ItemError | StopAsyncIteration):
            assert outcome.args == (item[1],)
        elif isinstance(outcome, RuntimeError):  # a StopIteration entry
            assert isinstance(outcome.__cause__, StopIteration), outcome
            assert outcome.__cause__.args == (item[1],)
        elif isinstance(outcome, _VALUES) and outcome.args not in ((), ("",)):
            # A BaseException value (a CancelledError, KeyboardInterrupt, ...
            # instance): a result like any other, this caller's own.
            assert type(outcome) in _ENTRIES, outcome
            assert outcome.args == (item[1],)
            observed_ok += 1
        else:
            assert isinstance(
                outcome,
                SinkError
                | ResultMismatch
                | TimeoutError
                | QueueFull
                | BatcherClosed
                | asyncio.CancelledError,
            ), outcome
    assert observed_ok <= s.succeeded
    # each item fails at most once in the on_batch reports (put items too)
    failed = [item[0] for report in reports for item, _ in report.failed_items]
    assert len(failed) == len(set(failed)), failed
    assert len(failed) <= s.failed
    assert s.peak_pending <= (config["max_pending"] or s.peak_pending)
    # 2. no item twice without retry
    if retry is None:
        sent = [it[0] for call in world.calls for it in call]
        assert len(sent) == len(set(sent))
    # 4. FIFO per partition (first calls; blocking may reorder acceptance)
    if config["max_pending"] is None:
        for part in range(partitions):
            order = [
                it[0] for call in world.first_calls for it in call if it[1] % partitions == part
            ]
            if not config["dedupe"]:
                assert order == sorted(order)
    # 6. nothing left behind
    current = asyncio.current_task()
    leftovers = [t for t in asyncio.all_tasks() if t is not current]
    assert leftovers == [], leftovers
    assert [h for h in live_timers(loop) if isinstance(_owner(h), Batcher)] == []
    del callers, outcomes, tasks
    gc.collect()
    await asyncio.sleep(0)
    assert handler_calls == [], handler_calls


def _owner(handle: asyncio.TimerHandle) -> object:
    callback = getattr(handle, "_callback", None)
    return getattr(callback, "__self__", None)


# ------------------------------------------------------------------ options

_BAD_OPTIONS: list[tuple[str, object, type[Exception]]] = [
    # counts are ints: a float (even 1.0) or a bool is a TypeError naming it
    *[
        (name, v, TypeError)
        for name in ("max_size", "max_concurrency", "max_pending")
        for v in (1.0, 2.5, True, math.inf, "3")
    ],
    *[
        (name, v, ValueError)
        for name in ("max_size", "max_concurrency", "max_pending")
        for v in (0, -1)
    ],
    # finite where a number is needed; inf only where documented as "no limit"
    *[("interval", v, ValueError) for v in (math.inf, math.nan, 0, -1.0)],
    *[
        (name, v, ValueError)
        for name in ("max_wait", "timeout", "max_weight")
        for v in (math.nan, -1.0, -math.inf)
    ],
    *[(name, "1", TypeError) for name in ("max_wait", "timeout", "max_weight", "interval")],
    ("timeout", 0, ValueError),
    ("max_weight", 0, ValueError),
    *[("retry.attempts", v, TypeError) for v in (2.0, True, "3")],
    *[("retry.attempts", v, ValueError) for v in (0, -1)],
    *[
        (f"retry.{name}", v, ValueError)
        for name in ("backoff", "max_backoff")
        for v in (math.inf, math.nan, -0.5)
    ],
]
_GOOD_OPTIONS: list[tuple[str, object]] = [
    ("max_size", 1),
    ("max_pending", 1),
    ("max_concurrency", None),
    ("max_wait", math.inf),
    ("max_wait", 0),
    ("timeout", math.inf),
    ("max_weight", math.inf),
    ("retry.attempts", math.inf),
    ("retry.backoff", 0),
]


async def _echo(items: list[Any]) -> list[Any]:
    return items


def _build(name: str, value: object) -> Batcher[Any, Any]:
    if name.startswith("retry."):
        field_name = name.removeprefix("retry.")
        return Batcher(_echo, retry=Retry(**{field_name: value}))  # type: ignore[arg-type]
    options: dict[str, Any] = {name: value}
    if name == "max_weight":
        options["weigh"] = lambda x: 1
    return Batcher(_echo, **options)


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(case=st.sampled_from(_BAD_OPTIONS))
def test_invalid_options_are_refused_at_construction(
    case: tuple[str, object, type[Exception]],
) -> None:
    name, value, error = case
    with pytest.raises(error) as info:
        _build(name, value)
    assert name.removeprefix("retry.") in str(info.value), info.value


@pytest.mark.parametrize(("name", "value"), _GOOD_OPTIONS)
def test_extreme_but_valid_options_are_accepted(name: str, value: object) -> None:
    _build(name, value)


# ----------------------------------------------------- loops, threads, close


def _run_on(flavour: str, coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=FLAVOURS[flavour]) as runner:
        return runner.run(coro)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flavour", ["asyncio", "uvloop"])
# A batcher left with stranded items warns when collected: that is the point.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(
    runs=st.lists(
        st.tuples(
            st.integers(0, 3),  # items awaited
            st.integers(0, 2),  # items left pending (submit_nowait or put_nowait)
            st.booleans(),  # put_nowait rather than submit_nowait for those
            st.booleans(),  # close at the end of the run
        ),
        min_size=2,
        max_size=3,
    ),
    options=st.sampled_from(
        [{}, {"max_wait": 0.05}, {"dedupe": True}, {"max_pending": 4}, {"partition": str}]
    ),
)
def test_loop_reuse_after_a_run_ends(
    flavour: str, runs: list[tuple[int, int, bool, bool]], options: dict[str, Any]
) -> None:
    """A batcher used in one ``asyncio.Runner`` then in another: a clean rebind
    when nothing was left behind, a clear error when items were stranded
    (or ``BatcherClosed`` once closed); never a hang."""
    if flavour not in FLAVOURS:
        pytest.skip(f"{flavour} not installed")
    b: Batcher[int, int] = Batcher(_echo, **options)
    stranded = closed = False
    accepted = 0

    async def one_run(awaited: int, left: int, put: bool, close: bool) -> None:
        nonlocal stranded, closed, accepted
        closing = False
        try:
            async with asyncio.timeout(5):  # a hang fails here
                results = [await b.submit(i) for i in range(awaited)]
                assert results == list(range(awaited))
                for i in range(left):
                    if put:
                        b.put_nowait(100 + i)
                    else:
                        b.submit_nowait(100 + i)
                accepted = awaited + left
                if close and (awaited or left or b._loop is None):
                    # (aclose() as the first use in a later loop: see
                    # test_aclose_first_in_a_new_loop_rebinds)
                    await b.aclose()
                    closing = True
        except BatcherClosed:
            assert closed
            return
        except RuntimeError as exc:
            _check_stranded_error(b, stranded, str(exc))
            return
        except TimeoutError:
            pytest.fail(f"hang in a later run of {b!r}")
        assert not closed or (awaited == left == 0)
        assert not stranded or (awaited == left == 0)
        closed = closed or closing

    for awaited, left, put, close in runs:
        accepted = 0
        before = b.stats
        _run_on(flavour, one_run(awaited, left, put, close))
        s = b.stats
        # Every item accepted ended: answered or failed during the loop's
        # shutdown (its sink call cancelled), or failed when the loop ended
        # holding it; nothing is left pending. The latter strand the batcher:
        # it refuses another loop.
        assert s.pending + s.in_flight == 0, s
        failed = s.failed - before.failed
        assert s.succeeded - before.succeeded + failed == accepted, s
        assert 0 <= b._lost <= failed + before.failed, s
        stranded = stranded or b._lost > 0


def _check_stranded_error(b: Batcher[Any, Any], stranded: bool, message: str) -> None:
    assert stranded, message
    assert "bound to another event loop" in message, message
    assert b.name in message, message


def _join_all(pool: list[threading.Thread]) -> None:
    for t in pool:
        t.join()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flavour", ["asyncio", "uvloop"])
@settings(max_examples=15, deadline=None, database=None, derandomize=True)
@given(
    threads=st.integers(1, 4),
    per_thread=st.integers(1, 60),
    cancel=st.booleans(),
    close_after=st.sampled_from([0.0, 0.001, 0.005]),
    max_pending=st.sampled_from([None, 5]),
)
def test_submit_threadsafe_while_the_batcher_closes(
    flavour: str,
    threads: int,
    per_thread: int,
    cancel: bool,
    close_after: float,
    max_pending: int | None,
) -> None:
    """Threads keep calling ``submit_threadsafe`` while the loop closes the
    batcher (and then ends): each call raises (``BatcherClosed`` or a
    ``RuntimeError`` naming the batcher), or its future resolves: a result or
    ``BatcherClosed``. No future is left pending."""
    if flavour not in FLAVOURS:
        pytest.skip(f"{flavour} not installed")

    async def sink(items: list[int]) -> list[int]:
        await asyncio.sleep(0.0005)
        return [x * 2 for x in items]

    b = Batcher(sink, max_size=8, max_wait=0.001, max_pending=max_pending)
    futures: list[tuple[int, concurrent.futures.Future[int]]] = []
    refused: list[BaseException] = []
    lock = threading.Lock()
    started = threading.Barrier(threads + 1)

    def worker(base: int) -> None:
        started.wait()
        for i in range(base, base + per_thread):
            try:
                fut = b.submit_threadsafe(i)
            except (BatcherClosed, RuntimeError) as exc:
                with lock:
                    refused.append(exc)
                continue
            with lock:
                futures.append((i, fut))

    async def main() -> None:
        async with asyncio.timeout(10):
            assert await b.submit(0) == 0  # bound to this loop
            pool = [threading.Thread(target=worker, args=(1000 * (n + 1),)) for n in range(threads)]
            for t in pool:
                t.start()
            await asyncio.to_thread(started.wait)
            await asyncio.sleep(close_after)
            await b.aclose(cancel=cancel)
            await asyncio.to_thread(_join_all, pool)

    _run_on(flavour, main())
    for exc in refused:
        assert isinstance(exc, BatcherClosed) or b.name in str(exc), exc
    for i, fut in futures:
        try:
            assert fut.result(timeout=5) == i * 2
        except BatcherClosed:
            pass
        except concurrent.futures.TimeoutError:
            pytest.fail(f"the future of item {i} never resolved")
    s = b.stats
    assert s.submitted == s.succeeded + s.failed + s.cancelled + s.expired + s.dropped


# Found by the generated kinds.


def test_aclose_first_in_a_new_loop_rebinds() -> None:
    b: Batcher[int, int] = Batcher(_echo)

    async def use() -> None:
        assert await b.submit(1) == 1

    async def close() -> None:
        await b.flush()
        await b.aclose()

    asyncio.run(use())
    asyncio.run(close())  # nothing held: nothing to flush, and the close is clean
    assert b.closed


async def test_submit_many_returns_base_exception_values() -> None:
    value = asyncio.CancelledError("a value, not a cancellation")

    async def sink(items: list[int]) -> list[object]:
        return [value if x == 1 else x for x in items]

    async with Batcher(sink) as b:
        assert await b.submit(1) is value  # submit() returns it, as DESIGN says
        assert await b.submit_many([0, 1, 2]) == [0, value, 2]
