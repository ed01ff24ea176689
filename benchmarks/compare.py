"""asyncbatch next to the alternatives: same workloads, same process, same run.

Systems (``benchmarks/systems/``; how each is configured is printed in
RESULTS.md): asyncbatch configured like the others and with its defaults, the
hand-written floor of ``overhead.py``, aiodataloader, strawberry's
``DataLoader``, Ray Serve's ``@serve.batch``, ``batched``, ``async-batcher``,
and naive per-item calls. Each workload runs on the default asyncio loop and
on uvloop, every system in a fresh loop per run, systems interleaved (A B ..
B A ..) so machine drift hits them alike; tables show medians of the repeats.
Every run is checked (each caller got exactly ``2 * x`` for its own ``x``,
the sink saw every item exactly once) and a wrong or hung run is reported and
not counted. A system that is not installed or cannot do a workload is marked
so, with the reason.

Workloads:

``throughput`` (1)
    A no-op sink (``[2 * x for x in items]``), ``max_size`` 256, in two
    shapes: *burst* (50,000 tasks, one item each, all in one loop iteration;
    ``--burst 100000`` for the issue's size) and *sustained* (1,000 tasks x
    100 sequential submits), GC on and off. Reported: CPU µs per item, the
    cost each system ADDS over the floor measured in the same rounds, and
    throughput relative to the floor.
``alloc`` (1)
    Memory held per pending item in a burst (20,000 callers submitted, no
    batch dispatched yet): heap blocks, GC-tracked objects, tracemalloc bytes.
``low-load`` (2)
    One sequential caller, a sink of 1 ms: the latency a system adds, i.e.
    each call's time minus the time its sink call took (the sink times
    itself), median over the calls.
``mid-load`` (3)
    64 closed-loop callers, a sink of 2 ms served by a backend process over
    loopback TCP (a remote service with room for every call): throughput,
    p50/p99 latency, batch size.
``sweep`` (4)
    Open-loop Poisson arrivals at increasing rates, streamed by the backend
    process, against a backend that serves one batch at a time (FIFO) in
    ``fixed + per_item * n`` seconds (2 ms + 50 µs per item): achieved
    throughput, p50/p99 latency (from each item's scheduled arrival) and
    mean batch size per rate. A system that cannot keep up at a rate is cut
    off (its backlog is not drained for minutes) and not run at higher rates.
    Why a backend process: see the comment above :func:`serve_backend`.

Usage (from the repository root, in the benchmark virtualenv)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -e . -r benchmarks/requirements-compare.txt
    .venv-bench/bin/python benchmarks/compare.py            # full run, ~15 min
    .venv-bench/bin/python benchmarks/compare.py --quick    # smoke run, ~2 min
    .venv-bench/bin/python benchmarks/compare.py --workloads throughput,alloc \\
        --systems asyncbatch,aiodataloader --loop uvloop --out /tmp/r.md

Writes ``benchmarks/RESULTS.md`` and ``benchmarks/plots/*.png`` (``--out``,
``--plots``; ``--quick`` writes to ``benchmarks/out/`` instead so a smoke run
never overwrites the real results), and ``--json PATH`` dumps every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import heapq
import itertools
import math
import os
import random
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar

import _common
from _common import (
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

from overhead import CountingSink, Tally, spawn_load  # noqa: E402
from systems import SYSTEMS, Handle, Settings, System, by_key  # noqa: E402

Shape: TypeAlias = Literal["burst", "sustained"]
SHAPES: tuple[Shape, ...] = ("burst", "sustained")
WORKLOADS = ("throughput", "alloc", "low-load", "mid-load", "sweep")
#: Systems an order of magnitude slower per item; fewer repeats keep the run short.
SLOW = frozenset({"ray-serve", "batched", "async-batcher"})
#: A run that takes longer than this is a hang, not a measurement.
RUN_TIMEOUT = 180.0
BENCH_DIR = Path(__file__).resolve().parent

_T = TypeVar("_T")

#: Every latency is read from this clock. Not ``loop.time()``: uvloop's is
#: libuv's cached loop time, in whole milliseconds.
clock = time.perf_counter


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- plan ----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Sizes and repeats of every workload (full run or ``--quick``)."""

    max_size: int = 256
    # (1) throughput
    tasks: int = 1000
    per_task: int = 100
    burst: int = 50_000
    repeat: int = 4
    repeat_slow: int = 2
    # (1) allocations
    alloc_items: int = 20_000
    # (2) low load
    low_calls: int = 300
    low_sink: float = 0.001
    low_repeat: int = 3
    # (3) mid load
    mid_callers: int = 64
    mid_sink: float = 0.002
    mid_seconds: float = 1.0
    mid_repeat: int = 3
    # (4) sweep
    rates: tuple[int, ...] = (250, 500, 1000, 2000, 4000, 8000, 16000)
    sweep_fixed: float = 0.002
    sweep_per_item: float = 50e-6
    sweep_seconds: float = 1.0
    sweep_repeat: int = 4
    #: After the last arrival, wait this long for the backlog before calling it overload.
    sweep_drain: float = 1.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            tasks=100,
            per_task=20,
            burst=2000,
            repeat=2,
            repeat_slow=1,
            alloc_items=2000,
            low_calls=40,
            low_repeat=1,
            mid_seconds=0.25,
            mid_repeat=1,
            rates=(500, 4000),
            sweep_seconds=0.3,
            sweep_repeat=1,
            sweep_drain=0.5,
        )


# -- running one measurement ---------------------------------------------------


class RunFailed(Exception):
    """A run that must not be counted (wrong results, hang, library error)."""


def run_in_loop(loop_name: LoopName, coro: Coroutine[Any, Any, _T]) -> _T:
    """Run one measurement in a fresh event loop, from a collected heap."""
    gc.collect()
    with asyncio.Runner(loop_factory=lambda: new_loop(loop_name)) as runner:
        return runner.run(coro)


async def _finish_callers(callers: Sequence[asyncio.Task[Any]]) -> str | None:
    """After the last result: every caller task done, none raised anything unexpected."""
    await asyncio.sleep(0)
    running = [t for t in callers if not t.done()]
    if running:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        return f"{len(running)} callers still running after the last result"
    for task in callers:
        if task.cancelled():
            return "a caller was cancelled"
        exc = task.exception()
        if exc is not None:
            return f"a caller raised {type(exc).__name__}: {exc}"
    return None


async def _abandon(callers: Sequence[asyncio.Task[Any]], handle: Handle) -> None:
    for task in callers:
        task.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    try:
        async with asyncio.timeout(5):
            await handle.close()
    except Exception:  # a hung or broken system: the run is already not counted
        pass


def _able(systems: Sequence[System], workload: str) -> list[System]:
    """The systems that take part in ``workload`` (see :attr:`System.cannot`)."""
    return [s for s in systems if workload not in s.cannot]


def interleave(
    systems: Sequence[System],
    repeat: int,
    run: Callable[[System], _T],
    *,
    warmup: int = 1,
) -> Samples[str, _T]:
    """``_common.interleaved`` over systems, by key, logging runs not counted."""
    by_name = {s.key: s for s in systems}

    def on_failure(key: str, reason: str) -> None:
        log(f"    ! {key} run not counted: {reason}")

    return _common.interleaved(
        [s.key for s in systems],
        repeat,
        lambda key: run(by_name[key]),
        warmup=warmup,
        on_failure=on_failure,
    )


def _tiers(systems: Sequence[System], plan: Plan) -> list[tuple[list[System], int, int]]:
    """Groups run interleaved together: (systems with the floor, repeats, warm-up rounds).

    The slow systems get fewer repeats and no warm-up round of their own (each
    of their runs takes seconds; :func:`warm_up` ran them once already).
    """
    floor = [s for s in systems if s.key == "floor"]
    fast = [s for s in systems if s.key not in SLOW]
    slow = [s for s in systems if s.key in SLOW]
    tiers = [(fast, plan.repeat, 1)]
    if slow:
        tiers.append((floor + slow, plan.repeat_slow, 0))
    return tiers


def warm_up(systems: Sequence[System], loops: Sequence[LoopName], plan: Plan) -> None:
    """One small untimed run of every system on every loop: imports and lazy set-up."""
    small = Plan(tasks=20, per_task=10, burst=200, max_size=plan.max_size)
    for loop_name in loops:
        for system in systems:
            for shape in SHAPES:
                try:
                    run_in_loop(loop_name, measure_throughput(system, shape, small))
                except Exception as exc:
                    log(f"    ! warm-up of {system.key} on {loop_name} failed: {exc}")


# -- (1) throughput ------------------------------------------------------------


@dataclass(frozen=True)
class ThroughputRun:
    elapsed: Elapsed
    items: int
    batches: int

    @property
    def us_per_item(self) -> float:
        return self.elapsed.cpu / self.items * 1e6


async def measure_throughput(system: System, shape: Shape, plan: Plan) -> ThroughputRun:
    sink = CountingSink()
    handle = await system.open(sink.__call__, Settings(plan.max_size))
    if shape == "burst":
        tasks, per_task, items = plan.burst, 1, plan.burst
    else:
        tasks, per_task = plan.tasks, plan.per_task
        items = tasks * per_task
    watch = Stopwatch()
    callers, tally = spawn_load(shape, handle.submit, tasks, per_task, items)
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            await tally.done
    except TimeoutError:
        await _abandon(callers, handle)
        raise RunFailed(f"hung: no result for every item within {RUN_TIMEOUT:.0f} s") from None
    elapsed = watch.elapsed()
    problem = await _finish_callers(callers)
    await handle.close()
    problem = problem or _check_tally(tally, items) or _check_sink(sink.items, items)
    if problem:
        raise RunFailed(problem)
    return ThroughputRun(elapsed, items, sink.batches)


def _check_tally(tally: Tally, items: int) -> str | None:
    if tally.raised:
        return f"{tally.raised} callers raised, e.g. {'; '.join(tally.errors)}"
    if tally.ok != items or tally.wrong:
        return f"{tally.ok} right and {tally.wrong} wrong results for {items} items"
    return None


def _check_sink(seen: int, items: int) -> str | None:
    if seen != items:
        return f"the sink saw {seen} items for {items} submitted"
    return None


@dataclass
class ThroughputCell:
    """One system in one configuration (loop x GC x shape)."""

    us: list[float]  # CPU µs per item, one per counted run
    floor_us: list[float]  # the floor's, from the same interleaved rounds
    #: (system, floor) µs per item of each round where both were counted:
    #: the two runs were taken back to back.
    pairs: list[tuple[float, float]]
    batch_sizes: list[float]
    failures: list[str]
    #: process CPU time / wall time of each counted run
    cpu_shares: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return Summary.of(self.us).median

    @property
    def floor(self) -> float:
        return Summary.of(self.floor_us).median

    @property
    def added(self) -> float:
        """Median over the rounds of (system - floor), µs per item.

        Paired by round, so drift of the machine between rounds cancels out.
        """
        return Summary.of([a - f for a, f in self.pairs]).median

    @property
    def added_range(self) -> tuple[float, float]:
        diffs = [a - f for a, f in self.pairs]
        return (min(diffs), max(diffs)) if diffs else (float("nan"), float("nan"))

    @property
    def relative_throughput(self) -> float:
        """Throughput as a fraction of the floor's: median over rounds of floor / system."""
        return Summary.of([_common.ratio(f, a) for a, f in self.pairs]).median


ConfigKey: TypeAlias = tuple[str, bool, str]  # loop, gc on, shape


def run_throughput(
    systems: Sequence[System], loops: Sequence[LoopName], plan: Plan
) -> dict[ConfigKey, dict[str, ThroughputCell]]:
    results: dict[ConfigKey, dict[str, ThroughputCell]] = {}
    for loop_name in loops:
        for gc_on in (True, False):
            for shape in SHAPES:
                key = (loop_name, gc_on, shape)
                log(f"  throughput: {loop_name}, GC {'on' if gc_on else 'off'}, {shape}")
                t0 = now()
                cells: dict[str, ThroughputCell] = {}
                for tier, repeat, warmup in _tiers(systems, plan):

                    def run(
                        system: System, loop_name: LoopName = loop_name, shape: Shape = shape
                    ) -> ThroughputRun:
                        return run_in_loop(loop_name, measure_throughput(system, shape, plan))

                    with gc_state(gc_on):
                        samples = interleave(tier, repeat, run, warmup=warmup)
                    floor_us = [r.us_per_item for r in samples.of("floor")]
                    for system in tier:
                        if system.key == "floor" and "floor" in cells:
                            continue
                        runs = samples.of(system.key)
                        pairs = samples.pairs(system.key, "floor")
                        cells[system.key] = ThroughputCell(
                            [r.us_per_item for r in runs],
                            floor_us,
                            [(a.us_per_item, f.us_per_item) for a, f in pairs],
                            [r.items / max(r.batches, 1) for r in runs],
                            samples.failures[system.key],
                            [_common.ratio(r.elapsed.cpu, r.elapsed.wall) for r in runs],
                        )
                results[key] = cells
                log(f"    {now() - t0:.0f} s")
    return results


# -- (1) allocations -----------------------------------------------------------


@dataclass(frozen=True)
class AllocRun:
    blocks: float
    objects: float
    bytes: float


async def measure_alloc(system: System, plan: Plan, trace: bool) -> AllocRun:
    """What one pending item holds, read before any batch reached the sink.

    As ``overhead.py --alloc``: every caller task of a burst is created (the
    baseline), then one loop iteration runs them all, so each submits its
    item; a callback queued behind them reads the heap before any dispatch
    (checked: the sink has seen no batch). The run then completes and is
    verified like every other.
    """
    loop = asyncio.get_running_loop()
    items = plan.alloc_items
    sink = CountingSink()
    handle = await system.open(sink.__call__, Settings(plan.max_size))
    callers, tally = spawn_load("burst", handle.submit, items, 1, items)
    if trace:
        tracemalloc.start()
    base = (sys.getallocatedblocks(), len(gc.get_objects()))
    base_bytes = tracemalloc.get_traced_memory()[0] if trace else 0
    reading: asyncio.Future[tuple[int, int, int, int]] = loop.create_future()

    def read() -> None:
        traced = tracemalloc.get_traced_memory()[0] if trace else 0
        reading.set_result((sys.getallocatedblocks(), len(gc.get_objects()), traced, sink.batches))

    loop.call_soon(read)
    blocks, objects, traced, batches_seen = await reading
    if trace:
        tracemalloc.stop()
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            await tally.done
    except TimeoutError:
        await _abandon(callers, handle)
        raise RunFailed("hung") from None
    problem = await _finish_callers(callers)
    await handle.close()
    problem = problem or _check_tally(tally, items) or _check_sink(sink.items, items)
    if batches_seen:
        problem = f"{batches_seen} batches reached the sink before the reading"
    if problem:
        raise RunFailed(problem)
    return AllocRun(
        (blocks - base[0]) / items, (objects - base[1]) / items, (traced - base_bytes) / items
    )


@dataclass
class AllocCell:
    blocks: float = float("nan")
    objects: float = float("nan")
    bytes: float = float("nan")
    problem: str | None = None


def run_alloc(
    systems: Sequence[System], loops: Sequence[LoopName], plan: Plan
) -> dict[str, dict[str, AllocCell]]:
    results: dict[str, dict[str, AllocCell]] = {}
    for loop_name in loops:
        log(f"  alloc: {loop_name}")
        cells: dict[str, AllocCell] = {}
        for system in systems:
            if "alloc" in system.cannot:
                cells[system.key] = AllocCell(problem=system.cannot["alloc"])
                continue
            try:
                with gc_state(False):
                    # The first run warms free lists and caches; the next ones count.
                    run_in_loop(loop_name, measure_alloc(system, plan, trace=False))
                    plain = run_in_loop(loop_name, measure_alloc(system, plan, trace=False))
                    traced = run_in_loop(loop_name, measure_alloc(system, plan, trace=True))
            except Exception as exc:
                cells[system.key] = AllocCell(problem=f"{type(exc).__name__}: {exc}")
                log(f"    ! {system.key}: {exc}")
                continue
            cells[system.key] = AllocCell(plain.blocks, plain.objects, traced.bytes)
        results[loop_name] = cells
    return results


# -- timed sinks (workloads 2-4) -----------------------------------------------


class TimedSink:
    """A sink that costs time: ``fixed + per_item * len(items)`` seconds.

    ``serial``: a backend that serves one batch at a time, first come first
    served (a model replica, a single connection). Its schedule is kept as
    arithmetic (``free_at``), and each call sleeps until its own end, so
    timer granularity never changes the backend's throughput. Otherwise each
    call sleeps its cost concurrently with the others (a remote service with
    room for every call).

    ``spans``: when recording, each item's sink call start and end
    (``time.perf_counter()``), so callers can subtract the sink's own time.
    """

    __slots__ = ("batches", "fixed", "free_at", "items", "per_item", "record", "serial", "spans")

    def __init__(self, fixed: float, per_item: float, *, serial: bool, record: bool) -> None:
        self.fixed = fixed
        self.per_item = per_item
        self.serial = serial
        self.record = record
        self.batches = 0
        self.items = 0
        self.free_at = 0.0
        self.spans: dict[int, tuple[float, float]] = {}

    async def __call__(self, items: list[int]) -> list[int]:
        start = clock()
        cost = self.fixed + self.per_item * len(items)
        if self.serial:
            end = max(start, self.free_at) + cost
            self.free_at = end
        else:
            end = start + cost
        self.batches += 1
        self.items += len(items)
        await asyncio.sleep(end - start)
        if self.record:
            finished = clock()
            for x in items:
                self.spans[x] = (start, finished)
        return [x * 2 for x in items]


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# -- the backend process (workloads 3 and 4) -----------------------------------
#
# In workloads 3 and 4 the sink talks to a backend in another process over a
# loopback TCP connection, the way a real sink talks to a database or a model
# server, and in workload 4 the arrivals come from that process too, the way
# requests reach a service. Both then reach the event loop as socket
# readiness, not as timers: asyncio's timers wake up to 1 ms late (epoll
# timeouts are whole milliseconds; libuv's timers too), and by less when
# something keeps the loop busy, so with in-process sleeps a library that
# busy-polls the loop (``batched`` with ``timeout_ms=0``) would get more
# punctual sink completions and arrivals than one that lets the loop sleep,
# which measures the benchmark, not the library. The backend keeps its own
# clock with ``select`` (microsecond timeouts) on its own core.
#
# Protocol (little-endian). A connection starts with one kind byte:
#   b"S" + <dd?> (fixed s, per-item s, serial): a sink connection; then each
#        request <II> (seq, n) is answered with <I> (seq) once served: after
#        fixed + per_item * n seconds from its receipt, or, serial, from when
#        the previous request was done (one batch at a time, FIFO).
#   b"A" + <ddQ> (rate/s, seconds, seed): an arrival stream; the backend sends
#        <Id> (index, scheduled perf_counter time) at each Poisson arrival of
#        :func:`arrival_times`, then <Id> (ARRIVALS_END, 0.0).
# perf_counter is CLOCK_MONOTONIC on Linux: the same clock in both processes.

_HELLO_SINK = struct.Struct("<dd?")
_HELLO_ARRIVALS = struct.Struct("<ddQ")
_REQUEST = struct.Struct("<II")
_RESPONSE = struct.Struct("<I")
_ARRIVAL = struct.Struct("<Id")
ARRIVALS_END = 0xFFFFFFFF


def arrival_times(rate: float, seconds: float, seed: int) -> list[float]:
    """Poisson arrivals: offsets (s) from the start, the same for every system."""
    rng = random.Random(seed)
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds:
        times.append(t)
        t += rng.expovariate(rate)
    return times


class _Conn:
    __slots__ = ("buf", "free_at", "kind", "params")

    def __init__(self) -> None:
        self.buf = b""
        self.kind = b""
        self.params: tuple[float, ...] = ()
        self.free_at = 0.0


def serve_backend() -> None:
    """The backend process: print the port, serve until stdin closes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(listener.getsockname()[1], flush=True)
    conns: dict[socket.socket, _Conn] = {}
    events: list[tuple[float, int, socket.socket, bytes]] = []  # (due, tiebreak, conn, data)
    tiebreak = itertools.count()
    stdin = sys.stdin.buffer
    while True:
        timeout = max(0.0, events[0][0] - clock()) if events else None
        readable, _, _ = select.select([listener, stdin, *conns], [], [], timeout)
        for sock in readable:
            if sock is stdin:
                if not os.read(stdin.fileno(), 4096):
                    return  # the benchmark exited
            elif sock is listener:
                conn, _ = listener.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[conn] = _Conn()
            else:
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except OSError:  # reset by a client that gave up (an overloaded run)
                    data = b""
                if not data:
                    del conns[sock]
                    sock.close()
                    continue
                _on_backend_data(sock, conns[sock], data, events, tiebreak)
        now = clock()
        while events and events[0][0] <= now:
            _, _, sock, payload = heapq.heappop(events)
            if sock in conns:
                try:
                    sock.sendall(payload)
                except OSError:
                    del conns[sock]
                    sock.close()


def _on_backend_data(
    sock: socket.socket,
    conn: _Conn,
    data: bytes,
    events: list[tuple[float, int, socket.socket, bytes]],
    tiebreak: itertools.count[int],
) -> None:
    now = clock()
    buf = conn.buf + data
    if not conn.kind:
        hello = _HELLO_SINK if buf[:1] == b"S" else _HELLO_ARRIVALS
        if len(buf) < 1 + hello.size:
            conn.buf = buf
            return
        conn.kind = buf[:1]
        conn.params = tuple(hello.unpack_from(buf, 1))
        buf = buf[1 + hello.size :]
        if conn.kind == b"A":
            rate, seconds, seed = conn.params
            start = now + 0.005
            for i, offset in enumerate(arrival_times(rate, seconds, int(seed))):
                due = start + offset
                heapq.heappush(events, (due, next(tiebreak), sock, _ARRIVAL.pack(i, due)))
            end = start + seconds
            heapq.heappush(events, (end, next(tiebreak), sock, _ARRIVAL.pack(ARRIVALS_END, 0.0)))
    if conn.kind == b"S":
        fixed, per_item, serial = conn.params
        whole = len(buf) - len(buf) % _REQUEST.size
        for seq, n in _REQUEST.iter_unpack(buf[:whole]):
            cost = fixed + per_item * n
            if serial:
                due = max(now, conn.free_at) + cost
                conn.free_at = due
            else:
                due = now + cost
            heapq.heappush(events, (due, next(tiebreak), sock, _RESPONSE.pack(seq)))
        buf = buf[whole:]
    conn.buf = buf


class Backend:
    """The backend subprocess, started once per benchmark run."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve-backend"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip():
            raise RuntimeError("the backend process did not start")
        self.port = int(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _connect(port: int, hello: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(hello)
    return reader, writer


class BackendSink:
    """A sink whose cost is served by the backend process (see above).

    Each call sends ``(seq, len(items))`` and waits for the backend's answer
    on a shared connection (a reader task resolves the calls by ``seq``), so
    concurrent calls are pipelined, as with a real client library.
    """

    def __init__(self, port: int, fixed: float, per_item: float, *, serial: bool) -> None:
        self.port = port
        self.hello = b"S" + _HELLO_SINK.pack(fixed, per_item, serial)
        self.batches = 0
        self.items = 0
        self._seq = itertools.count()
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        reader, self._writer = await _connect(self.port, self.hello)
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.readexactly(_RESPONSE.size)
            (seq,) = _RESPONSE.unpack(data)
            fut = self._waiting.pop(seq, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def __call__(self, items: list[int]) -> list[int]:
        assert self._writer is not None
        seq = next(self._seq) & 0xFFFFFFFF
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = fut
        self.batches += 1
        self.items += len(items)
        self._writer.write(_REQUEST.pack(seq, len(items)))
        await fut
        return [x * 2 for x in items]

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass


# -- (2) low load --------------------------------------------------------------


@dataclass(frozen=True)
class LowLoadRun:
    added_us: float  # median over the calls
    added_p90_us: float
    total_ms: float  # median call latency, sink included
    batches: int


async def measure_low_load(system: System, plan: Plan) -> LowLoadRun:
    sink = TimedSink(plan.low_sink, 0.0, serial=False, record=True)
    handle = await system.open(sink.__call__, Settings(plan.max_size))
    added: list[float] = []
    totals: list[float] = []
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            for x in range(plan.low_calls):
                t0 = clock()
                result = await handle.submit(x)
                t1 = clock()
                if result != 2 * x:
                    raise RunFailed(f"item {x} got {result!r}")
                start, end = sink.spans[x]
                added.append(((t1 - t0) - (end - start)) * 1e6)
                totals.append((t1 - t0) * 1e3)
    except TimeoutError:
        await _abandon([], handle)
        raise RunFailed("hung") from None
    await handle.close()
    problem = _check_sink(sink.items, plan.low_calls)
    if problem:
        raise RunFailed(problem)
    added.sort()
    return LowLoadRun(
        statistics.median(added), _percentile(added, 90), statistics.median(totals), sink.batches
    )


def run_low_load(
    systems: Sequence[System], loops: Sequence[LoopName], plan: Plan
) -> dict[str, Samples[str, LowLoadRun]]:
    results: dict[str, Samples[str, LowLoadRun]] = {}
    for loop_name in loops:
        log(f"  low-load: {loop_name}")

        def run(system: System, loop_name: LoopName = loop_name) -> LowLoadRun:
            return run_in_loop(loop_name, measure_low_load(system, plan))

        results[loop_name] = interleave(systems, plan.low_repeat, run)
    return results


# -- (3) mid load --------------------------------------------------------------


@dataclass(frozen=True)
class MidLoadRun:
    throughput: float  # items/s, wall clock
    p50_ms: float
    p99_ms: float
    batch_size: float


async def measure_mid_load(system: System, plan: Plan, port: int) -> MidLoadRun:
    loop = asyncio.get_running_loop()
    sink = BackendSink(port, plan.mid_sink, 0.0, serial=False)
    await sink.open()
    handle = await system.open(sink.__call__, Settings(plan.max_size))
    latencies: list[float] = []
    wrong: list[str] = []
    t_start = clock()
    deadline = t_start + plan.mid_seconds

    async def caller(first: int) -> None:
        x = first
        while clock() < deadline:
            t0 = clock()
            result = await handle.submit(x)
            latencies.append(clock() - t0)
            if result != 2 * x:
                wrong.append(f"item {x} got {result!r}")
            x += plan.mid_callers

    callers = [loop.create_task(caller(i)) for i in range(plan.mid_callers)]
    try:
        async with asyncio.timeout(plan.mid_seconds + RUN_TIMEOUT):
            await asyncio.gather(*callers)
    except TimeoutError:
        await _abandon(callers, handle)
        await sink.close()
        raise RunFailed("hung") from None
    elapsed = clock() - t_start
    await handle.close()
    await sink.close()
    if wrong:
        raise RunFailed(f"{len(wrong)} wrong results, e.g. {wrong[0]}")
    problem = _check_sink(sink.items, len(latencies))
    if problem:
        raise RunFailed(problem)
    latencies.sort()
    return MidLoadRun(
        len(latencies) / elapsed,
        _percentile(latencies, 50) * 1e3,
        _percentile(latencies, 99) * 1e3,
        sink.items / max(sink.batches, 1),
    )


def run_mid_load(
    systems: Sequence[System], loops: Sequence[LoopName], plan: Plan, port: int
) -> dict[str, Samples[str, MidLoadRun]]:
    results: dict[str, Samples[str, MidLoadRun]] = {}
    for loop_name in loops:
        log(f"  mid-load: {loop_name}")

        def run(system: System, loop_name: LoopName = loop_name) -> MidLoadRun:
            return run_in_loop(loop_name, measure_mid_load(system, plan, port))

        results[loop_name] = interleave(systems, plan.mid_repeat, run)
    return results


# -- (4) offered-load sweep ----------------------------------------------------


@dataclass(frozen=True)
class SweepRun:
    offered: float  # items/s scheduled
    achieved: float  # items/s completed, first arrival to last completion
    p50_ms: float
    p99_ms: float
    batch_size: float
    #: Items still waiting when the drain limit ran out (0: kept up).
    unfinished: int

    @property
    def overloaded(self) -> bool:
        return self.unfinished > 0


async def measure_sweep(system: System, plan: Plan, rate: int, port: int) -> SweepRun:
    """One system at one offered rate; arrivals streamed by the backend."""
    loop = asyncio.get_running_loop()
    sink = BackendSink(port, plan.sweep_fixed, plan.sweep_per_item, serial=True)
    await sink.open()
    handle = await system.open(sink.__call__, Settings(plan.max_size, concurrency=1))
    latencies: list[float] = []
    wrong: list[str] = []
    last_done = [0.0]
    total: list[int] = []  # set to [n] once the stream has ended
    all_done: asyncio.Future[None] = loop.create_future()

    async def caller(x: int, scheduled: float) -> None:
        result = await handle.submit(x)
        t = clock()
        latencies.append(t - scheduled)
        if result != 2 * x:
            wrong.append(f"item {x} got {result!r}")
        last_done[0] = t
        if total and len(latencies) == total[0] and not all_done.done():
            all_done.set_result(None)

    callers: list[asyncio.Task[None]] = []
    scheduled: list[float] = []
    hello = b"A" + _HELLO_ARRIVALS.pack(rate, plan.sweep_seconds, rate)
    reader, writer = await _connect(port, hello)
    buf = b""
    ended = False
    # Open loop: each arrival becomes a caller task as soon as the loop reads
    # it; latency counts from its scheduled time, so a lagging loop is charged.
    while not ended:
        data = await reader.read(65536)
        if not data:
            raise RunFailed("the backend closed the arrival stream early")
        buf += data
        whole = len(buf) - len(buf) % _ARRIVAL.size
        for x, when in _ARRIVAL.iter_unpack(buf[:whole]):
            if x == ARRIVALS_END:
                ended = True
                break
            scheduled.append(when)
            callers.append(loop.create_task(caller(x, when)))
        buf = buf[whole:]
    writer.close()
    n = len(callers)
    total.append(n)
    if len(latencies) == n and not all_done.done():
        all_done.set_result(None)
    unfinished = 0
    try:
        async with asyncio.timeout(plan.sweep_drain):
            await all_done
    except TimeoutError:
        unfinished = n - len(latencies)
    end = clock()
    if unfinished:
        # Censored: these waited at least this long (percentiles become lower bounds).
        latencies.extend(end - scheduled[k] for k, c in enumerate(callers) if not c.done())
        await _abandon(callers, handle)
    else:
        problem = await _finish_callers(callers)
        await handle.close()
        if problem:
            raise RunFailed(problem)
    await sink.close()
    if wrong:
        raise RunFailed(f"{len(wrong)} wrong results, e.g. {wrong[0]}")
    if not unfinished and sink.items != n:
        raise RunFailed(f"the sink saw {sink.items} items for {n} submitted")
    latencies.sort()
    completed = n - unfinished
    span = (end if unfinished else last_done[0]) - (scheduled[0] if scheduled else end)
    return SweepRun(
        rate,
        completed / span if span > 0 else float("nan"),
        _percentile(latencies, 50) * 1e3,
        _percentile(latencies, 99) * 1e3,
        sink.items / max(sink.batches, 1),
        unfinished,
    )


@dataclass
class SweepPoint:
    """One system at one rate: medians over the repeats, or why it was not run."""

    runs: list[SweepRun] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    skipped: str | None = None

    def median(self, attr: str) -> float:
        values = [getattr(r, attr) for r in self.runs]
        return statistics.median(values) if values else float("nan")

    @property
    def overloaded(self) -> bool:
        return any(r.overloaded for r in self.runs)

    @property
    def p99_range(self) -> str:
        """min..max of the runs' p99 (ms): how much one point's p99 moves between runs."""
        values = [r.p99_ms for r in self.runs]
        return f"{_f(min(values), 1)}..{_f(max(values), 1)}" if values else "n/a"


def run_sweep(
    systems: Sequence[System], loops: Sequence[LoopName], plan: Plan, port: int
) -> dict[str, dict[str, dict[int, SweepPoint]]]:
    results: dict[str, dict[str, dict[int, SweepPoint]]] = {}
    for loop_name in loops:
        table: dict[str, dict[int, SweepPoint]] = {s.key: {} for s in systems}
        saturated: dict[str, int] = {}
        for rate in plan.rates:
            live = [s for s in systems if s.key not in saturated]
            for system in systems:
                if system.key in saturated:
                    table[system.key][rate] = SweepPoint(
                        skipped=f"overloaded at {saturated[system.key]}/s"
                    )
            if not live:
                continue
            log(f"  sweep: {loop_name}, {rate}/s ({len(live)} systems)")

            def run(system: System, loop_name: LoopName = loop_name, rate: int = rate) -> SweepRun:
                return run_in_loop(loop_name, measure_sweep(system, plan, rate, port))

            # No warm-up round: every system has run the other workloads already
            # in this process, and each run opens a fresh loop anyway.
            samples = interleave(live, plan.sweep_repeat, run, warmup=0)
            for system in live:
                point = SweepPoint(samples.of(system.key), samples.failures[system.key])
                table[system.key][rate] = point
                if point.overloaded or (not point.runs and point.failures):
                    saturated[system.key] = rate
        results[loop_name] = table
    return results


# -- reporting -----------------------------------------------------------------


def _f(value: float, digits: int = 2, *, sign: bool = False, suffix: str = "") -> str:
    if value != value:
        return "n/a"
    return f"{value:{'+' if sign else ''},.{digits}f}{suffix}"


def _label(system: System) -> str:
    return system.label


def versions_table(systems: Sequence[System]) -> str:
    rows = []
    for s in systems:
        problem = s.problem()
        status = "not run: " + problem if problem else "ok"
        if not problem and s.cannot:
            status += f"; not in {', '.join(s.cannot)}: {next(iter(s.cannot.values()))}"
        rows.append([s.label, s.version(), status, s.config])
    return markdown_table(
        ["system", "version", "status", "configuration (M = max batch size, C = capacity)"],
        rows,
        right=[False, False, False, False],
    )


CONFIG_ORDER: tuple[tuple[bool, Shape], ...] = (
    (True, "burst"),
    (True, "sustained"),
    (False, "burst"),
    (False, "sustained"),
)


def throughput_tables(
    systems: Sequence[System],
    loops: Sequence[LoopName],
    results: dict[ConfigKey, dict[str, ThroughputCell]],
) -> str:
    """Added µs/item over the floor (headline), then CPU µs/item and relative throughput."""
    cols = [(lp, g, sh) for lp in loops for g, sh in CONFIG_ORDER if (lp, g, sh) in results]
    heads = [f"{lp} GC {'on' if g else 'off'} {sh}" for lp, g, sh in cols]
    out = []

    def cell(system: System, col: ConfigKey) -> ThroughputCell | None:
        return results[col].get(system.key)

    added_rows = []
    for s in systems:
        row = [_label(s)]
        for col in cols:
            c = cell(s, col)
            if c is None or not c.us:
                row.append(_why_missing(c))
            elif s.key == "floor":
                row.append(f"({_f(c.median)})")
            else:
                row.append(_f(c.added, sign=True))
        added_rows.append(row)
    out.append(
        "**Added cost over the floor, CPU µs per item**: the median, over the interleaved "
        "rounds, of (system's run - the floor's run of the same round); the floor row shows "
        "the floor's own µs/item in parentheses. Lower is better.\n"
    )
    out.append(markdown_table(["system", *heads], added_rows, right=[False] + [True] * len(cols)))

    rel_rows = []
    for s in systems:
        row = [_label(s)]
        for col in cols:
            c = cell(s, col)
            if c is None or not c.us:
                row.append(_why_missing(c))
            else:
                row.append(f"{_f(1e6 / c.median / 1e3, 0)}k ({_f(c.relative_throughput, 2)}x)")
        rel_rows.append(row)
    out.append(
        "\n**Throughput, items per CPU-second** (1e6 / µs per item) and, in parentheses, "
        "as a fraction of the floor's.\n"
    )
    out.append(markdown_table(["system", *heads], rel_rows, right=[False] + [True] * len(cols)))

    detail = []
    for s in systems:
        for col in cols:
            c = cell(s, col)
            if c is None:
                continue
            summary = Summary.of(c.us)
            detail.append(
                [
                    _label(s),
                    col[0],
                    "on" if col[1] else "off",
                    col[2],
                    _f(summary.median),
                    f"{_f(summary.low)}..{_f(summary.high)}",
                    _f(c.floor),
                    _f(c.added, sign=True),
                    f"{_f(c.added_range[0], sign=True)}..{_f(c.added_range[1], sign=True)}",
                    _f(statistics.median(c.batch_sizes), 0) if c.batch_sizes else "n/a",
                    f"{summary.n}" + (f" ({len(c.failures)} not counted)" if c.failures else ""),
                ]
            )
    out.append("\n<details><summary>Every configuration (medians, ranges, batch sizes)</summary>\n")
    out.append(
        markdown_table(
            [
                "system",
                "loop",
                "GC",
                "shape",
                "µs/item",
                "min..max",
                "floor µs/item",
                "added",
                "added per round min..max",
                "items/batch",
                "runs",
            ],
            detail,
            right=[False] * 4 + [True] * 7,
        )
    )
    out.append("\n</details>")
    failures = [
        f"- {s.label}, {col[0]} GC {'on' if col[1] else 'off'} {col[2]}: {reason}"
        for s in systems
        for col in cols
        if (c := cell(s, col)) is not None
        for reason in c.failures
    ]
    if failures:
        out.append("\nRuns not counted:\n\n" + "\n".join(failures))
    return "\n".join(out)


def _why_missing(cell: ThroughputCell | None) -> str:
    if cell is None:
        return "not run"
    if cell.failures:
        return "failed"
    return "n/a"


def alloc_table(
    systems: Sequence[System], loops: Sequence[LoopName], results: dict[str, dict[str, AllocCell]]
) -> str:
    rows = []
    for loop_name in loops:
        cells = results.get(loop_name, {})
        floor = cells.get("floor")
        for s in systems:
            c = cells.get(s.key)
            if c is None:
                continue
            if c.problem:
                rows.append([_label(s), loop_name, "n/a", "n/a", "n/a", "n/a", c.problem])
                continue
            vs = (
                _f(c.objects - floor.objects, sign=True)
                if floor is not None and not floor.problem
                else "n/a"
            )
            rows.append(
                [
                    _label(s),
                    loop_name,
                    _f(c.objects),
                    vs,
                    _f(c.blocks),
                    _f(c.bytes, 0),
                    "ok",
                ]
            )
    return markdown_table(
        [
            "system",
            "loop",
            "GC objects/item",
            "vs floor",
            "heap blocks/item",
            "bytes/item",
            "check",
        ],
        rows,
        right=[False, False, True, True, True, True, False],
    )


def low_load_table(
    systems: Sequence[System],
    loops: Sequence[LoopName],
    results: dict[str, Samples[str, LowLoadRun]],
) -> str:
    rows = []
    for loop_name in loops:
        samples = results.get(loop_name)
        if samples is None:
            continue
        for s in systems:
            runs = samples.of(s.key)
            if not runs:
                rows.append([_label(s), loop_name, "failed", "", "", "", _fails(samples, s)])
                continue
            rows.append(
                [
                    _label(s),
                    loop_name,
                    _f(statistics.median(r.added_us for r in runs), 1),
                    _f(statistics.median(r.added_p90_us for r in runs), 1),
                    _f(statistics.median(r.total_ms for r in runs), 3),
                    _f(statistics.median(r.batches for r in runs), 0),
                    str(len(runs)),
                ]
            )
    return markdown_table(
        [
            "system",
            "loop",
            "added µs (median)",
            "added µs (p90)",
            "call latency ms (median)",
            "sink calls",
            "runs",
        ],
        rows,
        right=[False, False, True, True, True, True, True],
    )


def _fails(samples: Samples[str, Any], system: System) -> str:
    reasons = samples.failures.get(system.key, [])
    return f"0 ({reasons[0]})" if reasons else "0"


def mid_load_table(
    systems: Sequence[System],
    loops: Sequence[LoopName],
    results: dict[str, Samples[str, MidLoadRun]],
) -> str:
    rows = []
    for loop_name in loops:
        samples = results.get(loop_name)
        if samples is None:
            continue
        floor_tp = _median_of(samples.of("floor"), "throughput")
        for s in systems:
            runs = samples.of(s.key)
            if not runs:
                rows.append([_label(s), loop_name, "failed", "", "", "", "", _fails(samples, s)])
                continue
            tp = _median_of(runs, "throughput")
            rows.append(
                [
                    _label(s),
                    loop_name,
                    _f(tp, 0),
                    _f(_common.ratio(tp, floor_tp), 2, suffix="x"),
                    _f(_median_of(runs, "p50_ms"), 2),
                    _f(_median_of(runs, "p99_ms"), 2),
                    _f(_median_of(runs, "batch_size"), 1),
                    str(len(runs)),
                ]
            )
    return markdown_table(
        [
            "system",
            "loop",
            "items/s",
            "vs floor",
            "p50 ms",
            "p99 ms",
            "items/batch",
            "runs",
        ],
        rows,
        right=[False, False, True, True, True, True, True, True],
    )


def _median_of(runs: Sequence[Any], attr: str) -> float:
    values = [getattr(r, attr) for r in runs]
    return statistics.median(values) if values else float("nan")


def sweep_tables(
    systems: Sequence[System],
    loops: Sequence[LoopName],
    plan: Plan,
    results: dict[str, dict[str, dict[int, SweepPoint]]],
) -> str:
    out = []
    for loop_name in loops:
        table = results.get(loop_name)
        if table is None:
            continue
        out.append(
            f"\n**{loop_name}**: p99 latency ms (p50 / achieved items/s / items per batch)\n"
        )
        rows = []
        for s in systems:
            row = [_label(s)]
            for rate in plan.rates:
                point = table.get(s.key, {}).get(rate)
                row.append(_sweep_cell(point))
            rows.append(row)
        heads = ["system", *(f"{r:,}/s" for r in plan.rates)]
        out.append(markdown_table(heads, rows, right=[False] + [True] * len(plan.rates)))
    out.append(
        "\n`>` marks a point where the system fell behind: arrivals went on at the offered "
        "rate, and items still waiting "
        f"{plan.sweep_drain:g} s after the last arrival were given up on (their latency "
        "counted as the time they had waited, so the figure is a lower bound); "
        "such a system is not run at higher rates (`-`)."
    )
    return "\n".join(out)


def _sweep_cell(point: SweepPoint | None) -> str:
    if point is None:
        return ""
    if point.skipped:
        return "-"
    if not point.runs:
        return "failed" if point.failures else "n/a"
    mark = ">" if point.overloaded else ""
    return (
        f"{mark}{_f(point.median('p99_ms'), 1)} ({_f(point.median('p50_ms'), 1)} / "
        f"{_f(point.median('achieved'), 0)} / {_f(point.median('batch_size'), 1)})"
    )


# -- targets -------------------------------------------------------------------


@dataclass
class Target:
    name: str
    met: bool | None  # None: not measured in this run
    detail: str


ANCHORS = ("aiodataloader", "strawberry", "ray-serve", "batched", "async-batcher")
AB = "asyncbatch"


def check_targets(
    w1: dict[ConfigKey, dict[str, ThroughputCell]] | None,
    alloc: dict[str, dict[str, AllocCell]] | None,
    low: dict[str, Samples[str, LowLoadRun]] | None,
    mid: dict[str, Samples[str, MidLoadRun]] | None,
    sweep: dict[str, dict[str, dict[int, SweepPoint]]] | None,
) -> list[Target]:
    """Issue 6's targets, judged from this run's figures."""
    targets: list[Target] = []
    if w1:
        targets += _throughput_targets(w1)
    if alloc:
        targets += _alloc_targets(alloc)
    if low:
        targets += _low_load_targets(low)
    if mid:
        targets += _mid_load_targets(mid)
    if sweep:
        targets += _sweep_targets(sweep)
    return targets


def _config_name(key: ConfigKey) -> str:
    return f"{key[0]} GC {'on' if key[1] else 'off'} {key[2]}"


def _throughput_targets(w1: dict[ConfigKey, dict[str, ThroughputCell]]) -> list[Target]:
    targets = []
    misses, details = [], []
    for key, cells in w1.items():
        a, d = cells.get(AB), cells.get("aiodataloader")
        if a is None or d is None or not a.us or not d.us:
            continue
        details.append(f"{_config_name(key)}: {_f(a.added, sign=True)} vs {_f(d.added, sign=True)}")
        if a.added > d.added:
            misses.append(_config_name(key))
    contract = [
        f"{_config_name(key)} {_f(c.added, sign=True)}"
        for key, cells in w1.items()
        if (c := cells.get("floor-coro")) is not None and c.us
    ]
    if contract:
        details.append(
            "for scale, one coroutine frame per item (the floor behind async def) adds: "
            + ", ".join(contract)
        )
    if details:
        targets.append(
            Target(
                "(1) added cost over the floor <= aiodataloader's, every shape/loop/GC",
                not misses,
                ("missed in " + ", ".join(misses) + ". " if misses else "")
                + "asyncbatch vs aiodataloader, µs/item: "
                + "; ".join(details),
            )
        )
    for rival in ("ray-serve", "batched"):
        ratios = []
        for key, cells in w1.items():
            a, r = cells.get(AB), cells.get(rival)
            if a is None or r is None or not a.us or not r.us:
                continue
            ratios.append((key, r.median / a.median))
        if ratios:
            worst_key, worst = min(ratios, key=lambda kv: kv[1])
            targets.append(
                Target(
                    f"(1) >= 2x the throughput of {rival}",
                    worst >= 2,
                    f"lowest ratio {_f(worst, 1)}x ({_config_name(worst_key)}); "
                    f"highest {_f(max(v for _, v in ratios), 1)}x",
                )
            )
    return targets


def _alloc_targets(alloc: dict[str, dict[str, AllocCell]]) -> list[Target]:
    details, ok = [], True
    for loop_name, cells in alloc.items():
        a, f = cells.get(AB), cells.get("floor")
        if a is None or f is None or a.problem or f.problem:
            continue
        extra = a.objects - f.objects
        ok = ok and extra <= 1.0 + 0.05
        details.append(f"{loop_name}: {_f(extra, sign=True)} GC objects/item")
    if not details:
        return []
    return [Target("(1) allocations <= floor + 1 object per item", ok, "; ".join(details))]


def _low_load_targets(low: dict[str, Samples[str, LowLoadRun]]) -> list[Target]:
    details, ok = [], True
    for loop_name, samples in low.items():
        runs = samples.of(AB)
        if not runs:
            continue
        added = statistics.median(r.added_us for r in runs)
        ok = ok and added < 100
        details.append(f"{loop_name}: {_f(added, 1)} µs")
    if not details:
        return []
    return [Target("(2) added latency at low load < 100 µs median", ok, "; ".join(details))]


def _mid_load_targets(mid: dict[str, Samples[str, MidLoadRun]]) -> list[Target]:
    misses, details = [], []
    for loop_name, samples in mid.items():
        runs = samples.of(AB)
        if not runs:
            continue
        mine = _median_of(runs, "p99_ms")
        theirs = [(k, _median_of(samples.of(k), "p99_ms")) for k in ANCHORS if samples.of(k)]
        if not theirs:
            continue
        best_key, best = min(theirs, key=lambda kv: kv[1])
        details.append(f"{loop_name}: {_f(mine)} ms vs best anchor {best_key} {_f(best)} ms")
        if mine > best * 1.05:  # within 5%: the noise of a 1 s run
            misses.append(loop_name)
    if not details:
        return []
    return [Target("(3) p99 no worse than any anchor (within 5%)", not misses, "; ".join(details))]


def _sweep_targets(sweep: dict[str, dict[str, dict[int, SweepPoint]]]) -> list[Target]:
    misses, compared = [], 0
    for loop_name, table in sweep.items():
        for rate, point in table.get(AB, {}).items():
            if not point.runs:
                continue
            p99 = point.median("p99_ms")
            for k in ANCHORS:
                other = table.get(k, {}).get(rate)
                if other is None or not other.runs:
                    continue
                compared += 1
                theirs = other.median("p99_ms")
                if p99 > theirs * 1.10 and p99 - theirs > 0.5:
                    misses.append(
                        f"{loop_name} {rate}/s vs {k}: {_f(p99)} ({point.p99_range}) > "
                        f"{_f(theirs)} ({other.p99_range}) ms"
                    )
    if not compared:
        return []
    return [
        Target(
            "(4) p99 no worse than any anchor at any rate (within 10% or 0.5 ms; "
            "figures: median (min..max of the runs))",
            not misses,
            "; ".join(misses) if misses else f"{compared} comparisons, none worse",
        )
    ]


def targets_table(targets: Sequence[Target]) -> str:
    rows = [
        [t.name, "n/a" if t.met is None else ("met" if t.met else "**missed**"), t.detail]
        for t in targets
    ]
    return markdown_table(["target", "result", "figures"], rows, right=[False, False, False])


# -- plots ---------------------------------------------------------------------

_STYLES: dict[str, tuple[str, str]] = {
    "floor": ("#7f7f7f", "o"),
    "floor-coro": ("#bcbd22", "h"),
    "asyncbatch": ("#d62728", "o"),
    "asyncbatch-defaults": ("#ff9896", "s"),
    "asyncbatch-nowait": ("#e377c2", "p"),
    "aiodataloader": ("#1f77b4", "^"),
    "strawberry": ("#9467bd", "v"),
    "ray-serve": ("#2ca02c", "D"),
    "batched": ("#ff7f0e", "P"),
    "async-batcher": ("#8c564b", "X"),
    "naive": ("#17becf", "*"),
}


def _rate_label(value: float, _pos: object = None) -> str:
    return f"{value / 1000:g}k" if value >= 1000 else f"{value:g}"


def _plain_label(value: float, _pos: object = None) -> str:
    return f"{value:,.0f}" if value >= 1 else f"{value:g}"


def plot_sweep(
    systems: Sequence[System],
    loops: Sequence[LoopName],
    plan: Plan,
    results: dict[str, dict[str, dict[int, SweepPoint]]],
    out_dir: Path,
) -> list[Path]:
    """Latency (p99 and p50), batch size and achieved throughput against offered load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    out_dir.mkdir(parents=True, exist_ok=True)
    loops = [lp for lp in loops if lp in results]
    backend = (
        f"Backend serves one batch at a time in {plan.sweep_fixed * 1e3:g} ms + "
        f"{plan.sweep_per_item * 1e6:g} µs/item; Poisson arrivals, "
        f"{plan.sweep_seconds:g} s per point. Circled: fell behind (lower bound)."
    )
    figures: list[tuple[str, str, list[tuple[str, str]]]] = [
        (
            "sweep_latency.png",
            "Latency vs offered load (lower is better)",
            [("p99_ms", "p99 latency (ms, log)"), ("p50_ms", "p50 latency (ms, log)")],
        ),
        (
            "sweep_batch_size.png",
            "Mean batch size vs offered load",
            [("batch_size", "mean batch size (items, log)")],
        ),
        (
            "sweep_throughput.png",
            "Achieved vs offered throughput (dotted: achieved = offered)",
            [("achieved", "achieved throughput (items/s, log)")],
        ),
    ]
    written = []
    for filename, title, rows in figures:
        fig, axes = plt.subplots(
            len(rows),
            len(loops),
            figsize=(5.4 * len(loops) + 2.6, 3.9 * len(rows) + 0.9),
            squeeze=False,
            sharex=True,
            sharey="row",
        )
        for r, (attr, ylabel) in enumerate(rows):
            for c, loop_name in enumerate(loops):
                ax = axes[r][c]
                _plot_sweep_panel(ax, systems, plan, results[loop_name], attr)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xticks(list(plan.rates))
                ax.xaxis.set_major_formatter(FuncFormatter(_rate_label))
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(_plain_label))
                ax.grid(True, which="major", alpha=0.35)
                ax.grid(True, which="minor", alpha=0.1)
                if r == 0:
                    ax.set_title(loop_name, fontsize=11)
                if r == len(rows) - 1:
                    ax.set_xlabel("offered load (items/s, log)")
                if c == 0:
                    ax.set_ylabel(ylabel)
        handles: list[Any] = []
        labels: list[str] = []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="center right", fontsize=9, frameon=False)
        fig.suptitle(f"{title}\n{backend}", fontsize=10)
        width = fig.get_size_inches()[0]
        fig.tight_layout(rect=(0, 0, 1 - 2.5 / width, 1))
        path = out_dir / filename
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def _plot_sweep_panel(
    ax: Any,
    systems: Sequence[System],
    plan: Plan,
    table: dict[str, dict[int, SweepPoint]],
    attr: str,
) -> None:
    for s in systems:
        xs, ys, over_x, over_y = [], [], [], []
        for rate in plan.rates:
            point = table.get(s.key, {}).get(rate)
            if point is None or not point.runs:
                continue
            xs.append(rate)
            ys.append(point.median(attr))
            if point.overloaded:
                over_x.append(rate)
                over_y.append(point.median(attr))
        if not xs:
            continue
        color, marker = _STYLES.get(s.key, ("black", "."))
        is_ab = s.key == "asyncbatch"
        ax.plot(
            xs,
            ys,
            label=s.label,
            color=color,
            marker=marker,
            markersize=6.5 if is_ab else 5,
            linewidth=2.8 if is_ab else 1.5,
            linestyle="--" if s.reference else "-",
            zorder=3 if is_ab else 2,
        )
        if over_x:
            ax.scatter(over_x, over_y, s=110, facecolors="none", edgecolors=color, linewidths=1.3)
    if attr == "achieved":
        lims = [min(plan.rates), max(plan.rates)]
        ax.plot(lims, lims, color="black", linewidth=0.9, linestyle=":")


def plot_added(
    systems: Sequence[System],
    loops: Sequence[LoopName],
    results: dict[ConfigKey, dict[str, ThroughputCell]],
    out_dir: Path,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    out_dir.mkdir(parents=True, exist_ok=True)
    cols = [(lp, g, sh) for lp in loops for g, sh in CONFIG_ORDER if (lp, g, sh) in results]
    shown = [s for s in systems if s.key != "floor"]
    fig, ax = plt.subplots(figsize=(13, 5.2))
    width = 0.8 / max(len(shown), 1)
    for i, s in enumerate(shown):
        values = []
        for col in cols:
            c = results[col].get(s.key)
            values.append(c.added if c is not None and c.us else float("nan"))
        color, _ = _STYLES.get(s.key, ("black", "."))
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(cols))]
        ax.bar(
            xs,
            values,
            width=width,
            label=s.label,
            color=color,
            edgecolor="black" if s.key == "asyncbatch" else color,
            linewidth=1.0,
        )
    # symlog: linear within +-1 µs (where noise and the negatives live), log beyond.
    ax.set_yscale("symlog", linthresh=1.0, linscale=1.0)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{lp}\nGC {'on' if g else 'off'}\n{sh}" for lp, g, sh in cols], fontsize=9)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.set_ylabel("added CPU µs per item over the floor\n(symlog: linear within ±1)")
    ax.set_title(
        "Workload 1: CPU time each system adds per item to the hand-written floor "
        "(lower is better; below 0 = cheaper than the floor)",
        fontsize=10.5,
    )
    ax.grid(True, axis="y", which="major", alpha=0.35)
    ax.legend(ncol=1, fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    path = out_dir / "throughput_added.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# -- RESULTS.md ----------------------------------------------------------------


@dataclass
class Report:
    plan: Plan
    systems: list[System]
    loops: list[LoopName]
    env: dict[str, Any]
    seconds: float = 0.0
    w1: dict[ConfigKey, dict[str, ThroughputCell]] | None = None
    alloc: dict[str, dict[str, AllocCell]] | None = None
    low: dict[str, Samples[str, LowLoadRun]] | None = None
    mid: dict[str, Samples[str, MidLoadRun]] | None = None
    sweep: dict[str, dict[str, dict[int, SweepPoint]]] | None = None
    plots: list[Path] = field(default_factory=list)


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_share(w1: dict[ConfigKey, dict[str, ThroughputCell]] | None) -> str:
    """Median CPU time / wall time of the workload-1 runs (1.00: a core to ourselves)."""
    shares = [x for cells in (w1 or {}).values() for c in cells.values() for x in c.cpu_shares]
    return f"{statistics.median(shares):.2f}" if shares else "n/a"


def git_state() -> str:
    """The commit measured, and whether asyncbatch/ had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=_common.REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "asyncbatch"],
            cwd=_common.REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}" + (" with uncommitted changes in asyncbatch/" if dirty else "")


def render(report: Report, out_path: Path, command: str) -> str:
    plan, systems, loops, env = report.plan, report.systems, report.loops, report.env
    parts = [
        "# asyncbatch vs the alternatives",
        "",
        f"Generated by `{command}` on {env['time']} in {report.seconds / 60:.1f} min, "
        f"asyncbatch at {env.get('git', 'unknown')}. Do not edit by hand; rerun instead.",
        "",
        f"Machine: {env['cpus']} CPUs, {env['platform']}, {env['implementation']} "
        f"{env['python']}; loops: {'; '.join(env['loops'])}. Load average (1, 5, 15 min) "
        f"{env.get('load_start', 'n/a')} at the start and {env.get('load_end', 'n/a')} at "
        "the end; workload-1 runs had a median CPU share (process CPU time / wall time) "
        f"of {env.get('cpu_share', 'n/a')} (1.00 = a core to ourselves). A shared, noisy "
        "machine: compare rows of one table (measured in the same interleaved rounds), "
        "not absolute figures across runs; wall-clock workloads (3, 4) are the most "
        "exposed to other processes.",
        "",
        "## Systems",
        "",
        versions_table(systems),
    ]
    if report.w1 is not None or report.alloc is not None:
        parts += [
            "",
            "## 1. Throughput and per-item overhead, no-op sink",
            "",
            f"Sink: `[2 * x for x in items]`, M = {plan.max_size}. *burst*: {plan.burst:,} tasks "
            f"submitting one item each, all in one loop iteration (creating them is timed, for "
            f"every system alike); *sustained*: {plan.tasks:,} tasks x {plan.per_task} "
            f"sequential submits. Process CPU time; {plan.repeat} interleaved rounds after one "
            f"warm-up round ({plan.repeat_slow} rounds, no warm-up round, for "
            f"{', '.join(sorted(SLOW))}, interleaved with floor runs of their own; every "
            "system had one small untimed run on each loop first). GC on = CPython's default "
            "thresholds; the objects the libraries created at import and warm-up "
            "(~120,000, mostly Ray's) are frozen (`gc.freeze()`) so that collections scan "
            "what the runs allocate, not the seven libraries' modules (in every workload).",
            "",
        ]
    if report.w1 is not None:
        parts.append(throughput_tables(systems, loops, report.w1))
        parts += _images(report, out_path, [("throughput_added.png", "added cost per item")])
    if report.alloc is not None:
        parts += [
            "",
            f"**Memory held per pending item** (burst of {plan.alloc_items:,} callers, read after "
            "every caller submitted and before any batch reached the sink; GC off; "
            "`len(gc.get_objects())`, `sys.getallocatedblocks()`, tracemalloc). Includes the "
            "caller's task and coroutine, which every system has.",
            "",
            alloc_table(systems, loops, report.alloc),
        ]
    if report.low is not None:
        parts += [
            "",
            "## 2. Added latency at low load",
            "",
            f"One caller, {plan.low_calls} sequential submits, sink of "
            f"{plan.low_sink * 1e3:g} ms (`asyncio.sleep`). *added* = each call's latency "
            "minus its own sink call's duration (measured inside the sink), i.e. the time "
            "before the sink starts plus the time from its return to the caller's wake-up; "
            f"median over the calls, then median of {plan.low_repeat} interleaved runs. "
            "Timer granularity inside the sink does not enter.",
            "",
            low_load_table(_able(systems, "low-load"), loops, report.low),
        ]
    if report.mid is not None:
        parts += [
            "",
            "## 3. Mid load",
            "",
            f"{plan.mid_callers} closed-loop callers for {plan.mid_seconds:g} s each run; the "
            f"sink's call takes {plan.mid_sink * 1e3:g} ms in a backend process reached over "
            "loopback TCP (a remote service with room for every call: calls overlap). Wall "
            f"clock; medians of {plan.mid_repeat} interleaved runs. Latency is per call, as "
            "the caller sees it.",
            "",
            mid_load_table(_able(systems, "mid-load"), loops, report.mid),
        ]
    if report.sweep is not None:
        parts += [
            "",
            "## 4. Offered-load sweep",
            "",
            "Open-loop Poisson arrivals (the same seeded schedule for every system), sent by "
            "a backend process over loopback TCP at their scheduled times for "
            f"{plan.sweep_seconds:g} s per rate; one task per arrival; latency from each "
            "item's *scheduled* arrival to its result, so a lagging loop is charged to the "
            "system. Sink calls go to the same backend, which serves one batch at a time, "
            "first come first served, in "
            f"{plan.sweep_fixed * 1e3:g} ms + {plan.sweep_per_item * 1e6:g} µs per item "
            f"(so it can serve at most {1 / plan.sweep_per_item:,.0f} items/s with "
            f"unbounded batches, {_capacity(plan, plan.max_size):,.0f} with batches of "
            f"{plan.max_size}, and {_capacity(plan, 1):,.0f} one item at a time). "
            "C = 1 where a library has a concurrency knob. Median of "
            f"{plan.sweep_repeat} interleaved runs per point.",
            "",
            sweep_tables(_able(systems, "sweep"), loops, plan, report.sweep),
        ]
        parts += _images(
            report,
            out_path,
            [
                ("sweep_latency.png", "p99 latency vs offered load"),
                ("sweep_batch_size.png", "batch size vs offered load"),
                ("sweep_throughput.png", "achieved vs offered throughput"),
            ],
        )
    targets = check_targets(report.w1, report.alloc, report.low, report.mid, report.sweep)
    if targets:
        parts += ["", "## Targets (issue 6)", "", targets_table(targets)]
    parts.append("")
    text = "\n".join(parts) + _kept_section(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text, encoding="utf-8")
    return text


#: Scripts that write a section of RESULTS.md between their own markers
#: (``<!-- NAME: begin -->`` ... ``<!-- NAME: end -->``); regenerating keeps them.
KEPT_SECTIONS = ("redis_streams.py", "scaling.py", "adaptive.py", "streaming.py")


def _kept_section(out_path: Path) -> str:
    """The sections other scripts wrote between their markers, kept as they are."""
    old = out_path.read_text(encoding="utf-8") if out_path.exists() else ""
    kept = ""
    for name in KEPT_SECTIONS:
        begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
        if begin in old and end in old:
            kept += "\n" + begin + old.split(begin, 1)[1].split(end, 1)[0] + end + "\n"
    return kept


def _capacity(plan: Plan, batch: int) -> float:
    """Items/s the sweep's backend serves with batches of ``batch`` items."""
    return batch / (plan.sweep_fixed + plan.sweep_per_item * batch)


def _images(report: Report, out_path: Path, wanted: Sequence[tuple[str, str]]) -> list[str]:
    """Markdown image lines for the plots written, relative to the report."""
    lines = []
    for name, alt in wanted:
        for path in report.plots:
            if path.name == name:
                rel = os.path.relpath(path.resolve(), out_path.resolve().parent)
                lines += ["", f"![{alt}]({Path(rel).as_posix()})"]
    return lines


def to_json(report: Report) -> dict[str, Any]:
    def samples(s: Samples[str, Any]) -> dict[str, Any]:
        return {
            "rounds": [{k: asdict(v) for k, v in r.items()} for r in s.rounds],
            "failures": s.failures,
        }

    return {
        "environment": report.env,
        "plan": asdict(report.plan),
        "systems": {s.key: {"version": s.version(), "config": s.config} for s in report.systems},
        "throughput": None
        if report.w1 is None
        else [
            {"loop": k[0], "gc": k[1], "shape": k[2], **{s: asdict(c) for s, c in v.items()}}
            for k, v in report.w1.items()
        ],
        "alloc": None
        if report.alloc is None
        else {lp: {s: asdict(c) for s, c in v.items()} for lp, v in report.alloc.items()},
        "low_load": None if report.low is None else {k: samples(v) for k, v in report.low.items()},
        "mid_load": None if report.mid is None else {k: samples(v) for k, v in report.mid.items()},
        "sweep": None
        if report.sweep is None
        else {
            lp: {s: {str(r): asdict(p) for r, p in pts.items()} for s, pts in t.items()}
            for lp, t in report.sweep.items()
        },
    }


# -- command line --------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="asyncbatch vs aiodataloader, strawberry, Ray Serve, batched, "
        "async-batcher, a hand-written floor and naive calls.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes, 1-2 repeats: a smoke run")
    p.add_argument(
        "--workloads",
        default="all",
        help=f"comma-separated subset of {','.join(WORKLOADS)}",
    )
    p.add_argument(
        "--systems",
        default="all",
        help="comma-separated subset of "
        + ",".join(s.key for s in SYSTEMS)
        + " (floor is always in)",
    )
    p.add_argument("--loop", choices=["asyncio", "uvloop", "both"], default="both")
    p.add_argument("--repeat", type=int, help="override the repeats of workload 1")
    p.add_argument("--burst", type=int, help="override the burst size of workload 1 (50,000)")
    p.add_argument("--out", type=Path, help="markdown report (default benchmarks/RESULTS.md)")
    p.add_argument("--plots", type=Path, help="PNG directory (default benchmarks/plots)")
    p.add_argument("--no-plots", action="store_true", help="skip matplotlib")
    p.add_argument("--json", type=Path, metavar="PATH", help="also dump every sample as JSON")
    args = p.parse_args(argv)
    if args.workloads == "all":
        args.workloads = list(WORKLOADS)
    else:
        args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
        unknown = set(args.workloads) - set(WORKLOADS)
        if unknown:
            p.error(f"unknown workload(s) {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    try:
        args.system_list = by_key(args.systems)
    except ValueError as exc:
        p.error(str(exc))
    scratch = BENCH_DIR / "out"
    if args.out is None:
        args.out = scratch / "RESULTS-quick.md" if args.quick else BENCH_DIR / "RESULTS.md"
    if args.plots is None:
        args.plots = scratch / "plots-quick" if args.quick else BENCH_DIR / "plots"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and sys.argv[1:] == ["--serve-backend"]:
        serve_backend()
        return 0
    args = parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    overrides = {
        name: value
        for name, value in (("repeat", args.repeat), ("burst", args.burst))
        if value is not None
    }
    if overrides:
        plan = dataclasses.replace(plan, **overrides)
    available = _common.available_loops()
    loops: list[LoopName] = []
    for name in _common.LOOPS:
        if args.loop in ("both", name):
            if name in available:
                loops.append(name)
            else:
                log(f"skipping {name}: not installed")
    systems: list[System] = []
    for system in args.system_list:
        problem = system.problem()
        if problem:
            log(f"not running {system.key}: {problem}")
        else:
            systems.append(system)
    env = {**environment(loops), "git": git_state(), "load_start": _loadavg()}
    report = Report(plan, list(args.system_list), loops, env)
    started = now()
    log(f"compare: {', '.join(s.key for s in systems)} on {', '.join(loops)}")
    warm_up(systems, loops, plan)
    # Importing the seven libraries leaves ~120,000 objects (mostly Ray's) on
    # the heap, and a full collection then takes ~60 ms here: a pause that
    # lands on whichever system happens to be running (and sets its p99).
    # Freeze them, so the collector sees what a run allocates, as in a
    # process that imports one of these libraries rather than all of them.
    gc.collect()
    gc.freeze()
    if "throughput" in args.workloads:
        report.w1 = run_throughput(systems, loops, plan)
    if "alloc" in args.workloads:
        report.alloc = run_alloc(systems, loops, plan)
    if "low-load" in args.workloads:
        report.low = run_low_load(_able(systems, "low-load"), loops, plan)
    if "mid-load" in args.workloads or "sweep" in args.workloads:
        backend = Backend()
        try:
            if "mid-load" in args.workloads:
                report.mid = run_mid_load(_able(systems, "mid-load"), loops, plan, backend.port)
            if "sweep" in args.workloads:
                report.sweep = run_sweep(_able(systems, "sweep"), loops, plan, backend.port)
        finally:
            backend.close()
    report.seconds = now() - started
    report.env["load_end"] = _loadavg()
    report.env["cpu_share"] = _cpu_share(report.w1)
    if not args.no_plots:
        try:
            if report.w1:
                report.plots.append(plot_added(systems, loops, report.w1, args.plots))
            if report.sweep:
                report.plots += plot_sweep(
                    _able(systems, "sweep"), loops, plan, report.sweep, args.plots
                )
        except Exception as exc:  # a plotting problem must not lose the measurements
            log(f"no plots: {type(exc).__name__}: {exc}")
    command = "python benchmarks/compare.py" + (
        " " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""
    )
    text = render(report, args.out, command)
    print(text)
    log(f"wrote {args.out} and {len(report.plots)} plots in {report.seconds / 60:.1f} min")
    if args.json:
        _common.write_json(args.json, to_json(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
