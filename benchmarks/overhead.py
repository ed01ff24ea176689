"""Per-item overhead of ``await batcher.submit(x)``, against a hand-written floor.

What is measured: the cost the *framework* adds to each item, with a sink that
does nothing (it returns ``[x * 2 for x in items]``), so every microsecond is
bookkeeping: futures, batches, timers, dispatch, result mapping, task wake-ups.

Two systems run side by side in the same process, interleaved:

``floor``
    The least any micro-batcher must do (:class:`Floor`): one future per item
    from ``loop.create_future()``, appended to a list; the list is handed to
    one sink call (in its own task) when it reaches ``max_size`` or at the end
    of the loop iteration (``loop.call_soon``); then every future that is not
    already done gets its result with ``set_result``. It loses no item and
    never resolves a cancelled future, and does nothing else: no timers, no
    limits, no stats, no error mapping beyond "the sink raised".

``asyncbatch``
    ``Batcher(sink, max_size=256)``: the defaults otherwise (``max_wait=0``,
    i.e. end of the loop iteration, ``max_concurrency=1``).

Two load shapes:

``sustained``
    ``--tasks`` (1,000) tasks each ``await submit(x)`` ``--per-task`` (100)
    times in a row: 100,000 items, at most 1,000 pending at once.
``burst``
    as many tasks as there are items (100,000), each submitting one item:
    everything arrives in one loop iteration. Task creation is part of the
    measured time for both systems, so the ratio is diluted; read the
    *added* column.

``--integrations`` adds the same ``asyncbatch`` batcher with each metrics
integration attached (the core's observer hooks; see the README section
"Metrics and traces"), each in a fresh registry or provider per run:

``asyncbatch+prometheus``
    ``asyncbatch.contrib.prometheus.instrument(batcher, registry=CollectorRegistry())``.
``asyncbatch+otel``
    ``asyncbatch.contrib.otel.instrument(batcher, meter_provider=MeterProvider())``
    (the OpenTelemetry SDK; no tracer provider, so nothing is captured per item).
``asyncbatch+otel-traces``
    the same with an SDK ``TracerProvider()`` too: a span per sink call, and the
    submitter's context captured for the first 128 items of each batch (the
    callers run under no span here, so the spans have no links).

and prints a second table: each one's median µs per item beside the plain
batcher's, from the same interleaved runs, and the difference (the target is
at most +0.1 µs per item).

``--fire`` times fire-and-forget hand-over instead: one task calls
``put_nowait(x)`` (no future per item), ``submit_nowait(x)`` (a future per
item, dropped) or the floor's ``submit(x)`` for ``--tasks x --per-task`` items
without awaiting any, then waits for delivery (``flush``; the floor's
``aclose``). Interleaved, medians; the table gives ``put_nowait`` against
``submit_nowait`` (difference, ratio of medians, range of the pair ratios),
with the floor as the reference for a future per item.

Every run is verified (each caller gets exactly ``2 * x`` for its own ``x``,
and the sink saw every item exactly once); a wrong run is reported and not
counted. Each configuration (loop x GC x shape) runs ``--repeat`` times per
system, interleaved (floor, asyncbatch, asyncbatch, floor, ...), after one
untimed warm-up each; the table shows medians, the ratio of medians, and the
range of the ratios of the back-to-back pairs.

Usage (from the repository root)::

    .venv/bin/python benchmarks/overhead.py                 # full run, 1.5-3.5 min
    .venv/bin/python benchmarks/overhead.py --quick         # smoke test, seconds
    .venv/bin/python benchmarks/overhead.py --loop uvloop --gc off --repeat 11
    .venv/bin/python benchmarks/overhead.py --alloc         # memory per pending item
    .venv/bin/python benchmarks/overhead.py --integrations --loop asyncio --gc on  # metrics cost
    .venv/bin/python benchmarks/overhead.py --fire          # put_nowait vs submit_nowait
    .venv/bin/python benchmarks/overhead.py --profile cprofile --loop asyncio
    .venv/bin/python benchmarks/overhead.py --json benchmarks/out/overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import sys
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar

import _common
from _common import (
    Clock,
    Elapsed,
    LoopName,
    Samples,
    Stopwatch,
    Summary,
    environment,
    gc_state,
    markdown_table,
    new_loop,
    now,
)

_common.use_checkout()

Shape: TypeAlias = Literal["sustained", "burst"]
SystemName: TypeAlias = Literal[
    "floor",
    "asyncbatch",
    "floor-coro",
    "asyncbatch-nowait",
    "asyncbatch+prometheus",
    "asyncbatch+otel",
    "asyncbatch+otel-traces",
]
SHAPES: tuple[Shape, ...] = ("sustained", "burst")
SYSTEMS: tuple[SystemName, ...] = ("floor", "asyncbatch")
#: Reference points added by ``--extra``, to split asyncbatch's added cost in two.
EXTRA_SYSTEMS: tuple[SystemName, ...] = ("floor-coro", "asyncbatch-nowait")
#: Added by ``--integrations``: the same batcher with a metrics integration attached.
INTEGRATION_SYSTEMS: tuple[SystemName, ...] = (
    "asyncbatch+prometheus",
    "asyncbatch+otel",
    "asyncbatch+otel-traces",
)

_S = TypeVar("_S", bound=str)

Submit: TypeAlias = Callable[[int], Awaitable[int]]
Close: TypeAlias = Callable[[], Awaitable[None]]

#: A run that takes longer than this is a hang, not a measurement.
RUN_TIMEOUT = 120.0


# -- the sink ------------------------------------------------------------------


class CountingSink:
    """A no-op sink that counts what it saw: ``[x * 2 for x in items]``.

    The two counters are what lets a run prove that no item was dropped or
    sent twice (together with each caller checking its own result).
    """

    __slots__ = ("batches", "items")

    def __init__(self) -> None:
        self.batches = 0
        self.items = 0

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches += 1
        self.items += len(items)
        return [x * 2 for x in items]


# -- the floor -----------------------------------------------------------------


class Floor:
    """The least work a correct micro-batcher can do per item.

    ``submit`` returns the item's future itself (awaiting it is all a caller
    needs), so there is not even a coroutine frame per item. Batches go to the
    sink in a task of their own: one task per batch, none per item. The task is
    kept in a set until it finishes (the loop holds tasks only weakly).
    """

    __slots__ = ("_flush_armed", "_futures", "_items", "_loop", "_max_size", "_sink", "_tasks")

    def __init__(self, sink: Callable[[list[int]], Awaitable[list[int]]], max_size: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._sink = sink
        self._max_size = max_size
        self._items: list[int] = []
        self._futures: list[asyncio.Future[int]] = []
        self._flush_armed = False
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, item: int) -> asyncio.Future[int]:
        future = self._loop.create_future()
        items = self._items
        items.append(item)
        self._futures.append(future)
        if len(items) >= self._max_size:
            self._dispatch()
        elif not self._flush_armed:
            # One callback per loop iteration, not per item: every item that
            # arrives before it runs joins the same batch.
            self._flush_armed = True
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_armed = False
        if self._items:
            self._dispatch()

    def _dispatch(self) -> None:
        items, futures = self._items, self._futures
        self._items, self._futures = [], []
        task = self._loop.create_task(self._run(items, futures))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, items: list[int], futures: list[asyncio.Future[int]]) -> None:
        try:
            results = await self._sink(items)
            if len(results) != len(futures):
                raise RuntimeError(f"sink returned {len(results)} results for {len(futures)}")
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, result in zip(futures, results, strict=True):
            # A caller cancelled while its batch was in flight: drop its result.
            if not future.done():
                future.set_result(result)

    async def aclose(self) -> None:
        self._flush()
        while self._tasks:
            await asyncio.gather(*self._tasks)


class CoroFloor(Floor):
    """The floor behind ``submit``'s contract: a coroutine function.

    ``Batcher.submit`` must be an ``async def`` (``create_task(b.submit(x))``
    and ``TaskGroup.create_task`` take only coroutines), so one coroutine
    frame per item, created, resumed and finished, is the least any
    contract-keeping ``submit`` pays on top of :class:`Floor`. (``--extra``)
    """

    __slots__ = ()

    async def submit_coro(self, item: int, *, timeout: float | None = None) -> int:  # noqa: ASYNC109
        future = self.submit(item)
        try:
            return await future
        except asyncio.CancelledError:
            # Where a real batcher would withdraw the item; the floor has no
            # bookkeeping to undo (its sink call skips done futures).
            raise


async def open_system(
    system: SystemName, sink: CountingSink, max_size: int
) -> tuple[Submit, Close]:
    """The system's ``submit`` and a coroutine function that closes it."""
    if system == "floor":
        floor = Floor(sink, max_size)
        return floor.submit, floor.aclose
    if system == "floor-coro":
        coro_floor = CoroFloor(sink, max_size)
        return coro_floor.submit_coro, coro_floor.aclose
    from asyncbatch import Batcher

    batcher = Batcher(sink, max_size=max_size)
    if system == "asyncbatch-nowait":
        return batcher.submit_nowait, batcher.aclose
    if system in INTEGRATION_SYSTEMS:
        handle = _instrument(system, batcher)

        async def close() -> None:
            await batcher.aclose()
            handle.remove()

        return batcher.submit, close
    return batcher.submit, batcher.aclose


def _instrument(system: SystemName, batcher: Any) -> Any:
    """Attach ``system``'s integration to ``batcher``, in a fresh registry or provider."""
    if system == "asyncbatch+prometheus":
        from prometheus_client import CollectorRegistry

        from asyncbatch.contrib import prometheus

        handle: Any = prometheus.instrument(batcher, registry=CollectorRegistry())
    else:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.trace import TracerProvider

        from asyncbatch.contrib import otel

        tracer_provider = (
            TracerProvider(shutdown_on_exit=False) if system == "asyncbatch+otel-traces" else None
        )
        handle = otel.instrument(
            batcher,
            meter_provider=MeterProvider(shutdown_on_exit=False),
            tracer_provider=tracer_provider,
        )
        assert handle.tracing == (tracer_provider is not None)
    return handle


# -- the load ------------------------------------------------------------------


@dataclass
class Tally:
    """What the callers saw. ``done`` resolves when the last caller finished."""

    remaining: int
    done: asyncio.Future[None]
    ok: int = 0
    wrong: int = 0
    raised: int = 0
    errors: list[str] = field(default_factory=list)  # the first few

    def finish_one(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set_result(None)

    def error(self, exc: BaseException) -> None:
        self.raised += 1
        if len(self.errors) < 3:
            self.errors.append(f"{type(exc).__name__}: {exc}")


async def _sustained_worker(submit: Submit, first: int, count: int, tally: Tally) -> None:
    ok = 0
    try:
        for x in range(first, first + count):
            if await submit(x) == x + x:
                ok += 1
    except Exception as exc:
        tally.error(exc)
    finally:
        tally.ok += ok
        tally.wrong += count - ok
        tally.finish_one()


async def _one_item(submit: Submit, x: int, tally: Tally) -> None:
    try:
        if await submit(x) == x + x:
            tally.ok += 1
        else:
            tally.wrong += 1
    except Exception as exc:
        tally.wrong += 1
        tally.error(exc)
    finally:
        tally.finish_one()


def spawn_load(
    shape: Shape, submit: Submit, tasks: int, per_task: int, tally_items: int
) -> tuple[list[asyncio.Task[None]], Tally]:
    """Create (not yet run) the caller tasks of one run."""
    loop = asyncio.get_running_loop()
    if shape == "sustained":
        tally = Tally(tasks, loop.create_future())
        callers = [
            loop.create_task(_sustained_worker(submit, i * per_task, per_task, tally))
            for i in range(tasks)
        ]
    else:
        tally = Tally(tally_items, loop.create_future())
        callers = [loop.create_task(_one_item(submit, x, tally)) for x in range(tally_items)]
    return callers, tally


async def _cancel_all(callers: Sequence[asyncio.Task[None]]) -> None:
    for task in callers:
        task.cancel()
    await asyncio.gather(*callers, return_exceptions=True)


@dataclass(frozen=True)
class Config:
    tasks: int
    per_task: int
    max_size: int

    @property
    def items(self) -> int:
        return self.tasks * self.per_task


@dataclass(frozen=True)
class Profiling:
    """How to switch a profiler on and off around the timed window of a run."""

    start: Callable[[], object]
    stop: Callable[[], object]


@dataclass(frozen=True)
class RunResult:
    elapsed: Elapsed
    items: int
    batches: int
    problem: str | None

    def us_per_item(self, clock: Clock) -> float:
        return self.elapsed.on(clock) / self.items * 1e6


def _verify(tally: Tally, sink: CountingSink, items: int) -> str | None:
    if tally.raised:
        return f"{tally.raised} callers raised, e.g. {'; '.join(tally.errors)}"
    if tally.ok != items or tally.wrong:
        return f"{tally.ok} right and {tally.wrong} wrong results for {items} items"
    if sink.items != items:
        return f"sink saw {sink.items} items, expected {items}"
    return None


async def measure(
    system: SystemName,
    shape: Shape,
    config: Config,
    profiler: Profiling | None = None,
) -> RunResult:
    """One timed run: open the system, run the load, verify, close (untimed)."""
    sink = CountingSink()
    submit, close = await open_system(system, sink, config.max_size)
    items = config.items
    if profiler is not None:
        profiler.start()
    watch = Stopwatch()
    callers, tally = spawn_load(shape, submit, config.tasks, config.per_task, items)
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            await tally.done
    except TimeoutError:
        await _cancel_all(callers)
        await close()
        hung = f"hung: timed out after {RUN_TIMEOUT}s"
        return RunResult(watch.elapsed(), items, sink.batches, hung)
    finally:
        if profiler is not None:
            profiler.stop()
    elapsed = watch.elapsed()
    problem = await _settle(callers)
    await close()
    return RunResult(elapsed, items, sink.batches, problem or _verify(tally, sink, items))


async def _settle(callers: Sequence[asyncio.Task[None]]) -> str | None:
    """Check that every caller task has finished, and surface what it raised.

    Cheaper than ``gather`` over 100,000 finished tasks (which schedules a
    callback per task). The last caller returns in the step that resolved
    ``done``, so after one more loop iteration every task is finished.
    """
    await asyncio.sleep(0)
    running = sum(1 for task in callers if not task.done())
    if running:
        await _cancel_all(callers)
        return f"{running} callers still running after the last result"
    for task in callers:
        task.result()  # callers catch Exception; anything else propagates
    return None


def run_in_loop(loop_name: LoopName, coro: Coroutine[Any, Any, RunResult]) -> RunResult:
    """Run one measurement in a fresh event loop, from a collected heap."""
    gc.collect()
    with asyncio.Runner(loop_factory=lambda: new_loop(loop_name)) as runner:
        return runner.run(coro)


# -- timing mode ---------------------------------------------------------------


@dataclass
class Row:
    """The samples of one configuration, both systems, both clocks."""

    loop: LoopName
    gc: bool
    shape: Shape
    items: int
    clock: Clock
    samples: Samples[SystemName, RunResult]
    systems: tuple[SystemName, ...] = SYSTEMS

    def us(self, system: SystemName, clock: Clock | None = None) -> list[float]:
        return [r.us_per_item(clock or self.clock) for r in self.samples.of(system)]

    def summary(self, system: SystemName) -> Summary:
        return Summary.of(self.us(system))

    @property
    def ratio(self) -> float:
        """median(asyncbatch) / median(floor)."""
        return _common.ratio(self.summary("asyncbatch").median, self.summary("floor").median)

    @property
    def added(self) -> float:
        """median(asyncbatch) - median(floor), µs per item."""
        return self.summary("asyncbatch").median - self.summary("floor").median

    @property
    def paired(self) -> Summary:
        """asyncbatch / floor of each back-to-back pair."""
        return Summary.of(
            [
                _common.ratio(a.us_per_item(self.clock), f.us_per_item(self.clock))
                for a, f in self.samples.pairs("asyncbatch", "floor")
            ]
        )

    def items_per_batch(self, system: SystemName) -> float:
        return Summary.of([r.items / max(r.batches, 1) for r in self.samples.of(system)]).median

    def cpu_share(self) -> list[float]:
        """cpu / wall of every counted run: 1.0 means the run had a CPU to itself."""
        return [
            _common.ratio(r.elapsed.cpu, r.elapsed.wall)
            for s in self.systems
            for r in self.samples.of(s)
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "loop": self.loop,
            "gc": self.gc,
            "shape": self.shape,
            "items": self.items,
            "clock": self.clock,
            "ratio": self.ratio,
            "added_us_per_item": self.added,
            "us_per_item": {s: self.us(s) for s in self.systems},
            "wall_us_per_item": {s: self.us(s, "wall") for s in self.systems},
            "cpu_us_per_item": {s: self.us(s, "cpu") for s in self.systems},
            "items_per_batch": {s: self.items_per_batch(s) for s in self.systems},
            "failures": self.samples.failures,
        }


def time_config(
    loop_name: LoopName,
    gc_on: bool,
    shape: Shape,
    config: Config,
    repeat: int,
    clock: Clock,
    *,
    systems: tuple[SystemName, ...] = SYSTEMS,
    log: Callable[[str], None],
) -> Row:
    """Time one configuration: ``repeat`` interleaved runs of each system."""

    def run(system: SystemName) -> RunResult:
        result = run_in_loop(loop_name, measure(system, shape, config))
        if result.problem is not None:
            raise RuntimeError(result.problem)
        return result

    def on_failure(system: SystemName, reason: str) -> None:
        log(f"  ! {system} run not counted: {reason}")

    with gc_state(gc_on):
        samples = _common.interleaved(systems, repeat, run, on_failure=on_failure)
    return Row(loop_name, gc_on, shape, config.items, clock, samples, systems)


def _fmt(value: float, digits: int = 2, suffix: str = "", sign: bool = False) -> str:
    if value != value:
        return "n/a"
    return f"{value:{'+' if sign else ''}.{digits}f}{suffix}"


def timing_table(rows: Sequence[Row]) -> str:
    """The results as a markdown table, one row per configuration."""
    extras = [s for s in EXTRA_SYSTEMS if any(s in row.systems for row in rows)]
    headers = [
        "loop",
        "GC",
        "shape",
        "floor µs/item",
        "asyncbatch µs/item",
        "ratio",
        "added µs/item",
        "pair ratios min..max",
        *(f"{s} µs/item (vs floor)" for s in extras),
        "items/batch floor / ab",
        "runs",
    ]
    body = []
    for row in rows:
        floor, ab, paired = row.summary("floor"), row.summary("asyncbatch"), row.paired
        sizes = [row.items_per_batch(s) for s in SYSTEMS]
        extra_cells = []
        for system in extras:
            median = row.summary(system).median if system in row.systems else float("nan")
            vs_floor = _fmt(_common.ratio(median, floor.median), suffix="x")
            extra_cells.append(f"{_fmt(median)} ({vs_floor})")
        body.append(
            [
                row.loop,
                "on" if row.gc else "off",
                row.shape,
                _fmt(floor.median),
                _fmt(ab.median),
                _fmt(row.ratio, suffix="x"),
                _fmt(row.added, sign=True),
                f"{_fmt(paired.low)}..{_fmt(paired.high)}",
                *extra_cells,
                f"{_fmt(sizes[0], 0)} / {_fmt(sizes[1], 0)}",
                "+".join(str(row.summary(s).n) for s in row.systems),
            ]
        )
    right = [False] * 3 + [True] * (len(headers) - 3)
    return markdown_table(headers, body, right=right)


def integrations_table(rows: Sequence[Row]) -> str:
    """Each integration's median µs per item beside the plain batcher's (same runs).

    ``paired`` is the median of the differences of back-to-back runs, the
    figure least moved by a machine whose load drifts.
    """
    headers = ["loop", "GC", "shape", "asyncbatch (none) µs/item"]
    for system in INTEGRATION_SYSTEMS:
        headers += [f"{system.removeprefix('asyncbatch+')} µs/item", "added (paired)"]
    body = []
    for row in rows:
        none = row.summary("asyncbatch").median
        cells = [row.loop, "on" if row.gc else "off", row.shape, _fmt(none, 3)]
        for system in INTEGRATION_SYSTEMS:
            median = row.summary(system).median
            paired = Summary.of(
                [
                    a.us_per_item(row.clock) - b.us_per_item(row.clock)
                    for a, b in row.samples.pairs(system, "asyncbatch")
                ]
            ).median
            added = _fmt(median - none, 3, sign=True)
            cells += [_fmt(median, 3), f"{added} ({_fmt(paired, 3, sign=True)})"]
        body.append(cells)
    return markdown_table(headers, body, right=[False] * 3 + [True] * (len(headers) - 3))


def hook_costs(max_size: int, rounds: int = 2000, repeat: int = 7) -> list[list[str]]:
    """What each integration's hooks cost per batch, timed alone (CPU, best of ``repeat``).

    One batch of ``max_size`` items makes one sink call: ``call_started``,
    ``call_finished`` and ``batch_finished`` of the observer ``instrument``
    attached, and (traces) ``capture`` for the first 128 items; the links are
    built from contexts captured in one task with no span current. This is the
    noise-free part of the end-to-end figure; the end-to-end one also holds
    what the batcher does differently with an observer attached.
    """
    import time

    from asyncbatch import Batcher, BatchReport
    from asyncbatch._observe import MAX_LINKS, SinkCall

    async def sink(items: list[int]) -> list[int]:
        return items

    report = BatchReport(max_size, 0, None, "size", 1, 0.0, 0.001, None, 0.0001, ())
    rows = []
    for system in INTEGRATION_SYSTEMS:
        observer = _instrument(system, Batcher(sink, max_size=max_size, name=system))
        capture = observer.capture
        captures = min(max_size, MAX_LINKS) if capture is not None else 0

        def one_batch(
            observer: Any = observer, capture: Any = capture, n: int = captures, name: str = system
        ) -> None:
            captured = [capture() for _ in range(n)] if n else []
            call = SinkCall(name, max_size, 1, captured, 0.0)
            token = observer.call_started(call)
            observer.call_finished(call, token, 0.001, None)
            observer.batch_finished(name, report)

        best = float("inf")
        for _ in range(repeat):
            start = time.process_time()
            for _ in range(rounds):
                one_batch()
            best = min(best, (time.process_time() - start) / rounds)
        observer.remove()
        rows.append(
            [
                system.removeprefix("asyncbatch+"),
                _fmt(best * 1e6, 2),
                str(captures),
                _fmt(best * 1e6 / max_size, 3),
            ]
        )
    rows.append(_sdk_span_floor(max_size, rounds, repeat))
    return rows


def _sdk_span_floor(max_size: int, rounds: int, repeat: int) -> list[str]:
    """The OpenTelemetry SDK's own cost of one span per sink call (the floor under traces).

    One ``start_span`` with the three attributes asyncbatch sets, made
    current and ended: what any per-call tracing pays, before asyncbatch's
    captures and links.
    """
    import time

    from opentelemetry import context, trace
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("floor")
    root = context.Context()
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(rounds):
            span = tracer.start_span(
                "asyncbatch.sink floor",
                context=root,
                attributes={"asyncbatch.batcher": "floor", "messaging.batch.message_count": 256},
                links=[],
            )
            token = context.attach(trace.set_span_in_context(span))
            context.detach(token)
            span.end()
        best = min(best, (time.process_time() - start) / rounds)
    return ["(SDK span alone)", _fmt(best * 1e6, 2), "0", _fmt(best * 1e6 / max_size, 3)]


# -- allocation mode -----------------------------------------------------------


@dataclass(frozen=True)
class AllocResult:
    blocks_per_item: float
    gc_objects_per_item: float
    bytes_per_item: float
    retained_blocks: int
    problem: str | None


def _heap() -> tuple[int, int]:
    blocks = sys.getallocatedblocks()
    return blocks, len(gc.get_objects())


async def measure_alloc(system: SystemName, config: Config, trace: bool) -> AllocResult:
    """What one pending item costs in memory, and what a whole run leaves behind.

    A burst: every caller task is created first (the baseline), then one loop
    iteration runs them all, so each submits its item and waits. A callback
    queued behind them takes the second reading, before any batch reaches the
    sink (checked). The difference, per item, is what the system holds per
    pending item: its future, its list slots, any per-item coroutine frame,
    wrapper or handle. ``bytes`` come from ``tracemalloc`` (a separate,
    traced run when ``trace``), blocks from ``sys.getallocatedblocks`` and
    objects from ``gc.get_objects``. Then the run completes and closes; the
    blocks still allocated after a collection, compared with before the
    batcher was created, are ``retained`` (a leak check, in blocks, total).
    """
    loop = asyncio.get_running_loop()
    items = config.items
    gc.collect()
    start_blocks = sys.getallocatedblocks()
    sink = CountingSink()
    submit, close = await open_system(system, sink, config.max_size)
    callers, tally = spawn_load("burst", submit, 1, 1, items)
    if trace:
        tracemalloc.start()
    base_heap = _heap()
    base_bytes = tracemalloc.get_traced_memory()[0] if trace else 0
    reading: asyncio.Future[tuple[int, int, int, int]] = loop.create_future()

    def read(sink: CountingSink = sink) -> None:
        heap = _heap()
        traced = tracemalloc.get_traced_memory()[0] if trace else 0
        reading.set_result((*heap, traced, sink.batches))

    loop.call_soon(read)
    blocks, objects, traced, batches_seen = await reading
    if trace:
        tracemalloc.stop()
    problem = None
    if batches_seen:
        problem = f"{batches_seen} batches reached the sink before the reading"
    async with asyncio.timeout(RUN_TIMEOUT):
        await tally.done
    # (Not ``gather``: its future would outlive the collection below.)
    problem = problem or await _settle(callers)
    await close()
    problem = problem or _verify(tally, sink, items)
    del callers, tally, submit, close, sink
    gc.collect()
    retained = sys.getallocatedblocks() - start_blocks
    return AllocResult(
        (blocks - base_heap[0]) / items,
        (objects - base_heap[1]) / items,
        (traced - base_bytes) / items,
        retained,
        problem,
    )


def alloc_rows(loops: Sequence[LoopName], config: Config) -> list[list[str]]:
    rows = []
    for loop_name in loops:
        for system in SYSTEMS:
            # The first run warms caches and free lists; only later ones count.
            with gc_state(False):
                _run_alloc(loop_name, system, config, trace=False)
                plain = _run_alloc(loop_name, system, config, trace=False)
                traced = _run_alloc(loop_name, system, config, trace=True)
            problem = plain.problem or traced.problem
            rows.append(
                [
                    loop_name,
                    system,
                    _fmt(plain.blocks_per_item),
                    _fmt(plain.gc_objects_per_item),
                    _fmt(traced.bytes_per_item, 0),
                    str(plain.retained_blocks),
                    problem or "ok",
                ]
            )
    return rows


def _run_alloc(loop_name: LoopName, system: SystemName, config: Config, trace: bool) -> AllocResult:
    with asyncio.Runner(loop_factory=lambda: new_loop(loop_name)) as runner:
        return runner.run(measure_alloc(system, config, trace))


# -- fire-and-forget mode --------------------------------------------------------

FireSystem: TypeAlias = Literal["floor", "submit_nowait", "put_nowait"]
FIRE_SYSTEMS: tuple[FireSystem, ...] = ("floor", "submit_nowait", "put_nowait")


async def measure_fire(system: FireSystem, items: int, max_size: int) -> RunResult:
    """``--fire``: one task hands over ``items`` items without awaiting any, then flushes.

    Timed: the submitting loop and the delivery of every batch (``flush``; the
    floor's ``aclose``). ``floor`` is :meth:`Floor.submit` (a future per item,
    the least a future-returning ``submit_nowait`` costs); ``submit_nowait``
    makes a future per item too, ``put_nowait`` none. Verified: the sink saw
    every item once, and every item succeeded.
    """
    sink = CountingSink()
    from asyncbatch import Batcher

    batcher: Batcher[int, int] | None = None
    if system == "floor":
        floor = Floor(sink, max_size)
        hand: Callable[[int], object] = floor.submit
        deliver: Close = floor.aclose
    else:
        batcher = Batcher(sink, max_size=max_size)
        hand = batcher.submit_nowait if system == "submit_nowait" else batcher.put_nowait
        deliver = batcher.flush
    watch = Stopwatch()
    for x in range(items):
        hand(x)
    await deliver()
    elapsed = watch.elapsed()
    problem = None if sink.items == items else f"sink saw {sink.items} of {items} items"
    if batcher is not None:
        await batcher.aclose()
        if batcher.stats.succeeded != items:
            problem = problem or f"{batcher.stats.succeeded} of {items} items succeeded"
    return RunResult(elapsed, items, sink.batches, problem)


def fire_rows(
    loops: Sequence[LoopName], gcs: Sequence[bool], items: int, max_size: int, args: Any
) -> tuple[list[list[str]], list[str]]:
    """``--fire``: the three systems interleaved, per loop and GC; medians, µs per item.

    Returns the table rows and why any run was not counted.
    """
    rows = []
    failures = []
    for loop_name in loops:
        for gc_on in gcs:

            def run(system: FireSystem, loop_name: LoopName = loop_name) -> RunResult:
                result = run_in_loop(loop_name, measure_fire(system, items, max_size))
                if result.problem is not None:
                    raise RuntimeError(result.problem)
                return result

            with gc_state(gc_on):
                samples = _common.interleaved(FIRE_SYSTEMS, args.repeat, run)
            us = {
                s: Summary.of([r.us_per_item(args.clock) for r in samples.of(s)]).median
                for s in FIRE_SYSTEMS
            }
            pairs = [
                _common.ratio(p.us_per_item(args.clock), s.us_per_item(args.clock))
                for p, s in samples.pairs("put_nowait", "submit_nowait")
            ]
            paired = Summary.of(pairs)
            rows.append(
                [
                    loop_name,
                    "on" if gc_on else "off",
                    _fmt(us["floor"], 3),
                    _fmt(us["submit_nowait"], 3),
                    _fmt(us["put_nowait"], 3),
                    _fmt(us["put_nowait"] - us["submit_nowait"], 3, sign=True),
                    _fmt(_common.ratio(us["put_nowait"], us["submit_nowait"]), suffix="x"),
                    f"{_fmt(paired.low)}..{_fmt(paired.high)}",
                    "+".join(str(len(samples.of(s))) for s in FIRE_SYSTEMS),
                ]
            )
            failures += [
                f"{loop_name} GC {'on' if gc_on else 'off'} {system}: {reason}"
                for system, reasons in samples.failures.items()
                for reason in reasons
            ]
    return rows, failures


FIRE_HEADERS = [
    "loop",
    "GC",
    "floor µs/item",
    "submit_nowait µs/item",
    "put_nowait µs/item",
    "put - submit",
    "put / submit",
    "pair ratios min..max",
    "runs",
]


# -- profile mode --------------------------------------------------------------


def profile(loop_name: LoopName, shape: Shape, config: Config, tool: str, top: int) -> None:
    """Profile the timed window of one run of each system; print µs per item."""
    for system in SYSTEMS:
        print(f"\n### {system}, {shape}, {loop_name} ({tool}; times inflated by the profiler)\n")
        if tool == "pyinstrument":
            from pyinstrument import Profiler

            sampler = Profiler(interval=0.0005, async_mode="disabled")
            result = run_in_loop(
                loop_name, measure(system, shape, config, Profiling(sampler.start, sampler.stop))
            )
            print(sampler.output_text(unicode=True, color=False, show_all=False))
        else:
            prof = cProfile.Profile()
            result = run_in_loop(
                loop_name, measure(system, shape, config, Profiling(prof.enable, prof.disable))
            )
            print(_profile_table(prof, result.items, top))
        status = result.problem or "ok"
        us = result.us_per_item("cpu")
        print(f"\n{us:.2f} µs/item (CPU) under the profiler; {status}")


def _profile_table(prof: cProfile.Profile, items: int, top: int) -> str:
    entries = sorted(prof.getstats(), key=lambda e: e.inlinetime, reverse=True)[:top]
    rows = []
    for e in entries:
        code = e.code
        if isinstance(code, str):
            where = code
        else:
            filename = code.co_filename.rsplit("/", 1)[-1]
            where = f"{code.co_qualname} ({filename}:{code.co_firstlineno})"
        rows.append(
            [
                where,
                _fmt(e.callcount / items, 3),
                _fmt(e.inlinetime / items * 1e6, 3),
                _fmt(e.totaltime / items * 1e6, 3),
            ]
        )
    return markdown_table(
        ["function", "calls/item", "self µs/item", "cum µs/item"],
        rows,
        right=[False, True, True, True],
    )


# -- command line --------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Per-item overhead of asyncbatch's submit() against a hand-written floor.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--repeat", type=int, default=7, help="timed runs per system and config")
    p.add_argument("--tasks", type=int, default=1000, help="concurrent callers (sustained)")
    p.add_argument("--per-task", type=int, default=100, help="sequential submits per caller")
    p.add_argument("--max-size", type=int, default=256, help="batch size for both systems")
    p.add_argument(
        "--loop", choices=["asyncio", "uvloop", "both"], default="both", help="event loop(s)"
    )
    p.add_argument(
        "--gc", choices=["on", "off", "both"], default="both", help="cyclic garbage collector"
    )
    p.add_argument(
        "--shape",
        choices=["sustained", "burst", "both"],
        default="both",
        help="sustained: TASKS callers x PER_TASK submits; burst: TASKS*PER_TASK callers x 1",
    )
    p.add_argument(
        "--clock",
        choices=_common.CLOCKS,
        default="cpu",
        help="what the table shows: process CPU time (robust on a shared machine) or wall time",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, 3 repeats: a smoke test")
    p.add_argument(
        "--extra",
        action="store_true",
        help="also time floor-coro (the floor behind an async def submit) and "
        "asyncbatch-nowait (submit_nowait), to split the added cost",
    )
    p.add_argument(
        "--integrations",
        action="store_true",
        help="also time the batcher with each metrics integration attached "
        "(prometheus, otel, otel with traces) and print their added cost",
    )
    p.add_argument("--json", metavar="PATH", help="also write every sample to this JSON file")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--alloc", action="store_true", help="memory per pending item instead of time"
    )
    mode.add_argument(
        "--fire",
        action="store_true",
        help="fire-and-forget: put_nowait vs submit_nowait (and the floor) per item",
    )
    mode.add_argument(
        "--profile",
        choices=["cprofile", "pyinstrument"],
        help="profile one run of each system (per loop and shape) instead of timing",
    )
    p.add_argument("--top", type=int, default=25, help="functions shown by --profile cprofile")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.per_task = min(args.tasks, 100), min(args.per_task, 20)
        args.repeat = min(args.repeat, 3)
    for name in ("repeat", "tasks", "per_task", "max_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _choices(value: str, every: Sequence[_S]) -> list[_S]:
    """``every`` for ``"both"``, else the one element of ``every`` equal to ``value``."""
    return [e for e in every if value in ("both", e)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from asyncbatch import Batcher  # noqa: F401
    except ImportError as exc:
        print(f"cannot import asyncbatch.Batcher from {_common.REPO_ROOT}: {exc}", file=sys.stderr)
        return 2
    available = _common.available_loops()
    loops: list[LoopName] = []
    for name in _choices(args.loop, _common.LOOPS):
        if name in available:
            loops.append(name)
        else:
            print(f"skipping {name}: not installed", file=sys.stderr)
    gcs = [g == "on" for g in _choices(args.gc, ["on", "off"])]
    shapes = _choices(args.shape, SHAPES)
    config = Config(args.tasks, args.per_task, args.max_size)
    env = environment(loops)

    print(f"# asyncbatch per-item overhead ({env['time']})\n")
    print(
        f"Python {env['python']} on {env['platform']}, {env['cpus']} CPUs; "
        f"{'; '.join(env['loops'])}."
    )
    if args.profile or args.alloc:
        method = "one run per system" if args.profile else "burst; 1 warm-up, then 1 run per system"
    else:
        method = f"median of {args.repeat} interleaved runs per system (after 1 warm-up)"
    print(
        f"sustained: {config.tasks} tasks x {config.per_task} submits; "
        f"burst: {config.items} tasks x 1 submit; max_size={config.max_size}; {method}.\n"
    )

    if args.profile:
        for loop_name in loops:
            for shape in shapes:
                profile(loop_name, shape, config, args.profile, args.top)
        return 0

    if args.alloc:
        rows = alloc_rows(loops, config)
        print(
            markdown_table(
                [
                    "loop",
                    "system",
                    "blocks/pending item",
                    "GC objects/pending item",
                    "bytes/pending item",
                    "blocks retained after close",
                    "check",
                ],
                rows,
                right=[False, False, True, True, True, True, False],
            )
        )
        if args.json:
            _common.write_json(args.json, {"environment": env, "alloc": rows})
        return 0

    if args.fire:
        fire, fire_failures = fire_rows(loops, gcs, config.items, config.max_size, args)
        print(
            f"Fire-and-forget: one task hands over {config.items:,} items without awaiting, "
            f"then waits for delivery; {args.clock} time.\n"
        )
        print(markdown_table(FIRE_HEADERS, fire, right=[False, False] + [True] * 7))
        for failure in fire_failures:
            print(f"NOT COUNTED: {failure}")
        if args.json:
            _common.write_json(args.json, {"environment": env, "fire": fire})
        return 1 if fire_failures else 0

    systems = SYSTEMS + EXTRA_SYSTEMS if args.extra else SYSTEMS
    if args.integrations:
        systems += INTEGRATION_SYSTEMS
    results: list[Row] = []
    for loop_name in loops:
        for gc_on in gcs:
            for shape in shapes:
                label = f"{loop_name}, GC {'on' if gc_on else 'off'}, {shape}"
                print(f"running {label} ...", file=sys.stderr, flush=True)
                t = now()
                results.append(
                    time_config(
                        loop_name,
                        gc_on,
                        shape,
                        config,
                        args.repeat,
                        args.clock,
                        systems=systems,
                        log=lambda msg: print(msg, file=sys.stderr, flush=True),
                    )
                )
                print(f"  done in {now() - t:.1f}s", file=sys.stderr, flush=True)
    clock_name = "process CPU time" if args.clock == "cpu" else "wall-clock time"
    print(f"Times are {clock_name} (--clock {args.clock}).\n")
    print(timing_table(results))
    print(
        "\nratio = median(asyncbatch) / median(floor); added = the difference, "
        "µs per item;\npair ratios = asyncbatch/floor of each back-to-back pair "
        "(their range shows the noise)."
    )
    if args.integrations:
        print(
            "\nWith a metrics integration attached (medians of the same interleaved runs; "
            "added = integration - none, µs per item; target <= +0.1):\n"
        )
        print(integrations_table(results))
        print(
            f"\nThe hooks alone, per batch of {config.max_size} items (one sink call; CPU time, "
            "best of 7 x 2,000 batches):\n"
        )
        print(
            markdown_table(
                ["integration", "µs per batch", "captures per batch", "µs per item"],
                hook_costs(config.max_size),
                right=[False, True, True, True],
            )
        )
    shares = [x for row in results for x in row.cpu_share()]
    if shares:
        share = Summary.of(shares)
        print(
            f"CPU share of the runs (process CPU time / wall time): median {share.median:.2f}, "
            f"min {share.low:.2f} (1.00 = a CPU to ourselves)."
        )
    failed = [r for r in results if any(r.samples.failures.values())]
    for r in failed:
        for system, reasons in r.samples.failures.items():
            for reason in reasons:
                print(f"NOT COUNTED: {r.loop} GC {r.gc} {r.shape} {system}: {reason}")
    if args.json:
        dumped = [row.to_json() for row in results]
        _common.write_json(args.json, {"environment": env, "config": config, "rows": dumped})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
