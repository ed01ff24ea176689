"""Per-item cost of every per-item path at 1k, 10k and 100k items, and its growth.

DESIGN.md promises that every per-item operation is O(1) amortized. This
script holds each path to it: it measures the cost per item of a path at
``n`` = 1,000, 10,000 and 100,000 items (the items pending *at once*, or in
one batch, or cancelled, dropped or retried together: whatever makes the path
work on a large collection) and reports the **growth ratio**, the cost per
item at the largest ``n`` divided by the cost per item at the smallest. A
flat path stays near 1.0x (caches and allocator effects of a larger heap
give it a little); an O(n)-per-item path grows ~100x over that range. The
bar is **1.5x**.

Paths (``--paths`` takes their keys, comma-separated):

==========================  =================================================================
``submit_nowait``           n ``submit_nowait``, batches of 256, then ``flush``
``submit``                  n tasks each ``await submit(x)`` (all pending at once)
``submit_timeout``          the same with ``submit(x, timeout=60)``: a timer per item, cancelled
``put_nowait``              n ``put_nowait`` (fire-and-forget), then ``flush``
``put``                     one task ``await put(x)`` n times, then ``flush``
``submit_many``             ``await submit_many(range(n))``
``load_many``               ``DataLoader.load_many(range(n))`` (fresh loader, no cache hits)
``partitions``              ``submit_nowait`` into n distinct partitions, then ``flush``
``cancel_pending``          n callers pending in one batch, cancelled in random order
``expire_pending``          n callers in one batch whose ``submit(timeout=)`` runs out
``cancel_blocked``          n submitters blocked for room (``overflow="block"``), cancelled
                            in random order
``block_admit``             n submitters, ``max_pending=256`` (``block``): each waits in
                            line, then goes in
``drop_oldest``             ``drop_oldest``, one partition, batches of 64, ``max_pending=n/10``
``drop_oldest_partitions``  ``drop_oldest`` with every item in its own partition
``drop_oldest_withdrawn``   n callers withdrawn (cancelled) in due batches ahead, then n new
                            items, ``max_pending=n/10``: 0.9n drop the oldest
``drop_oldest_dedupe``      ``drop_oldest`` + ``dedupe``, one large open batch,
                            ``max_pending=n/10``
``dedupe``                  ``dedupe``: 4 callers per key, batches of 256 slots
``dedupe_hot``              ``dedupe``: n callers of 10 keys in one open batch
``dedupe_cancel``           n callers coalesced on one key leave (cancelled) one per loop
                            iteration, oldest first
``dedupe_expire``           n callers coalesced on one key whose ``submit(timeout=)`` runs out
``loader_cancel``           n ``DataLoader.load`` of one key, cancelled in arrival order
``retryable``               one n-item batch whose sink answers ``Retryable`` for every
                            item, then succeeds
``retry_batch``             one n-item batch whose sink raises once (``Retry``), then succeeds
``isolate``                 one n-item batch with one poison item (``Retry(isolate=True)``)
==========================  =================================================================

Method: each measurement runs in a fresh asyncio event loop, after
``gc.collect()``; the collector is off inside the measured window by default
(``--gc off``: the library's own cost, without collection pauses whose size
depends on the rest of the heap; ``--gc on`` leaves CPython's defaults). Only
the measured part is timed (``time.perf_counter``): batcher creation, setup
(e.g. the callers that are then cancelled) and clean-up are not. Each path
runs once untimed at the smallest ``n``, then ``--repeat`` rounds (default
5); in each round every path runs at every ``n``, the sizes in alternating
order, so drift in the machine's load is spread over all of them. The table
shows the median µs per item of the rounds. Every run checks its outcome
(``stats`` counters, results); after a wrong run the path is not run again,
and the script exits 2 (``--results`` is then not written). A run at the
size that takes longer than ``--slow`` seconds (60) is not repeated (the path
is plainly not flat; its median is then of fewer runs, shown in the ``runs``
column). In the first round, a path whose CPU time per item already grew
more than 3x between the two sizes before ``n`` is not run at ``n`` if, its
cost per item growing with ``n``, that run would take longer than
``--budget`` seconds (120): the cell
says "skipped" with that projection, the ratio is taken at the largest size
run, and the path counts as above the bar.

Exit status: 0 if every growth ratio is <= ``--max-ratio`` (1.5), 1 if any
ratio exceeds it (the paths are listed on stderr), 2 on a wrong run or a bad
argument.

Usage (from the repository root)::

    .venv/bin/python benchmarks/scaling.py                    # full run, ~20 min
    .venv/bin/python benchmarks/scaling.py --quick            # smoke test, seconds
    .venv/bin/python benchmarks/scaling.py --paths cancel_pending,retryable --repeat 9
    .venv/bin/python benchmarks/scaling.py --json benchmarks/out/scaling.json \\
        --results benchmarks/RESULTS.md                       # the section in RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any, Literal, TypeAlias

import _common

_common.use_checkout()

from asyncbatch import Batcher, DataLoader, Retry, Retryable  # noqa: E402

#: A measurement: ``run(n)`` returns the window that timed its measured part.
Measure: TypeAlias = Callable[[int], Coroutine[Any, Any, "Window"]]

Clock: TypeAlias = Literal["wall", "cpu"]
CLOCKS: tuple[Clock, ...] = ("wall", "cpu")

MAX_RATIO = 1.5
SIZES = (1_000, 10_000, 100_000)
QUICK_SIZES = (100, 200, 400)


class WrongRun(AssertionError):
    """A run whose outcome was not what the path promises (not a timing)."""


def check(ok: bool, what: str) -> None:
    if not ok:
        raise WrongRun(what)


class Window:
    """The measured window (may be entered more than once): wall and CPU time in it.

    Wall time is ``time.perf_counter``; CPU time ``time.process_time`` (this
    process only: on a shared machine it leaves out the time other processes
    held the CPU). The collector is off inside unless ``--gc on``.
    """

    gc_on = False

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self._wall0 = self._cpu0 = 0.0

    def __enter__(self) -> Window:
        if not Window.gc_on:
            gc.disable()
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._wall0
        self.cpu += time.process_time() - self._cpu0
        gc.enable()


async def echo(items: list[int]) -> list[int]:
    return items


async def nothing(items: list[int]) -> None:
    return None


def gated() -> tuple[asyncio.Event, Callable[[list[int]], Awaitable[None]]]:
    """A sink that waits for the event: it holds its dispatch slot until then."""
    gate = asyncio.Event()

    async def sink(items: list[int]) -> None:
        await gate.wait()

    return gate, sink


def retrieve(futs: Sequence[asyncio.Future[Any]]) -> int:
    """Mark every failure retrieved; return how many failed."""
    return sum(1 for f in futs if not f.cancelled() and f.exception() is not None)


# -- the plain paths -------------------------------------------------------------


async def p_submit_nowait(n: int) -> Window:
    b: Batcher[int, int] = Batcher(echo, max_size=256)
    with Window() as w:
        futs = [b.submit_nowait(i) for i in range(n)]
        await b.flush()
    check(all(f.result() == i for i, f in enumerate(futs)), "wrong results")
    await b.aclose()
    return w


async def p_submit(n: int) -> Window:
    b: Batcher[int, int] = Batcher(echo, max_size=256)
    with Window() as w:
        tasks = [asyncio.create_task(b.submit(i)) for i in range(n)]
        results = await asyncio.gather(*tasks)
    check(results == list(range(n)), "wrong results")
    await b.aclose()
    return w


async def p_submit_timeout(n: int) -> Window:
    b: Batcher[int, int] = Batcher(echo, max_size=256)
    with Window() as w:
        tasks = [asyncio.create_task(b.submit(i, timeout=60)) for i in range(n)]
        results = await asyncio.gather(*tasks)
    check(results == list(range(n)), "wrong results")
    await b.aclose()
    return w


async def p_put_nowait(n: int) -> Window:
    b: Batcher[int, None] = Batcher(nothing, max_size=256)
    with Window() as w:
        for i in range(n):
            b.put_nowait(i)
        await b.flush()
    check(b.stats.succeeded == n, f"succeeded {b.stats.succeeded} != {n}")
    await b.aclose()
    return w


async def p_put(n: int) -> Window:
    b: Batcher[int, None] = Batcher(nothing, max_size=256)
    with Window() as w:
        for i in range(n):
            await b.put(i)
        await b.flush()
    check(b.stats.succeeded == n, f"succeeded {b.stats.succeeded} != {n}")
    await b.aclose()
    return w


async def p_submit_many(n: int) -> Window:
    b: Batcher[int, int] = Batcher(echo, max_size=256)
    with Window() as w:
        results = await b.submit_many(range(n))
    check(results == list(range(n)), "wrong results")
    await b.aclose()
    return w


async def p_load_many(n: int) -> Window:
    async def load(keys: list[int]) -> list[int]:
        return keys

    loader: DataLoader[int, int] = DataLoader(load, max_batch_size=256)
    with Window() as w:
        results = await loader.load_many(range(n))
    check(results == list(range(n)), "wrong results")
    await loader.aclose()
    return w


async def p_partitions(n: int) -> Window:
    b: Batcher[int, int] = Batcher(echo, max_size=256, partition=lambda x: x)
    with Window() as w:
        futs = [b.submit_nowait(i) for i in range(n)]
        await b.flush()
    check(all(f.result() == i for i, f in enumerate(futs)), "wrong results")
    await b.aclose()
    return w


# -- cancellation and expiry ------------------------------------------------------


async def p_cancel_pending(n: int) -> Window:
    b: Batcher[int, int] = Batcher(echo, max_size=10**9, max_wait=30)
    tasks = [asyncio.create_task(b.submit(i)) for i in range(n)]
    await asyncio.sleep(0)
    random.Random(1).shuffle(tasks)
    with Window() as w:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    check(b.stats.cancelled == n and b.stats.pending == 0, f"stats {b.stats}")
    await b.aclose()
    return w


async def p_expire_pending(n: int) -> Window:
    b: Batcher[int, int] = Batcher(echo, max_size=10**9, max_wait=300)
    timeout = 0.02
    with Window() as w:
        tasks = [asyncio.create_task(b.submit(i, timeout=timeout)) for i in range(n)]
        await asyncio.sleep(0)  # every caller has submitted (timers run later)
    time.sleep(timeout * 1.5)  # noqa: ASYNC251 - blocks on purpose, untimed: every deadline passes
    with w:
        results = await asyncio.gather(*tasks, return_exceptions=True)
    expired = sum(isinstance(r, TimeoutError) for r in results)
    check(expired == n and b.stats.expired == n, f"{expired} of {n} expired; {b.stats}")
    check(b.stats.pending == 0, f"stats {b.stats}")
    await b.aclose()
    return w


async def p_cancel_blocked(n: int) -> Window:
    gate, sink = gated()
    b: Batcher[int, None] = Batcher(sink, max_size=10, max_pending=10, overflow="block")
    tasks = [asyncio.create_task(b.submit(i)) for i in range(n + 20)]
    await asyncio.sleep(0.001)
    await asyncio.sleep(0)
    victims = tasks[20:]
    check(not any(t.done() for t in victims), "a blocked submitter finished early")
    random.Random(1).shuffle(victims)
    with Window() as w:
        for t in victims:
            t.cancel()
        await asyncio.gather(*victims, return_exceptions=True)
    check(all(t.cancelled() for t in victims), "a victim was not cancelled")
    gate.set()
    await b.aclose()
    results = await asyncio.gather(*tasks[:20])
    check(results == [None] * 20, "wrong results for the admitted submitters")
    return w


async def p_block_admit(n: int) -> Window:
    b: Batcher[int, int] = Batcher(echo, max_size=64, max_pending=256, overflow="block")
    with Window() as w:
        tasks = [asyncio.create_task(b.submit(i)) for i in range(n)]
        results = await asyncio.gather(*tasks)
    check(results == list(range(n)), "wrong results")
    await b.aclose()
    return w


# -- drop_oldest ------------------------------------------------------------------


async def _drop_run(n: int, **options: Any) -> Window:
    """Submit n items with room for n/10 (the sink holds its slot): 0.9n drops."""
    gate, sink = gated()
    room = max(100, n // 10)
    b: Batcher[int, None] = Batcher(
        sink, max_pending=room, overflow="drop_oldest", max_wait=30, **options
    )
    with Window() as w:
        futs = [b.submit_nowait(i) for i in range(n)]
    check(b.stats.dropped >= n - room - 128, f"only {b.stats.dropped} dropped of {n}")
    check(b.stats.pending <= room, f"pending {b.stats.pending} > {room}")
    gate.set()
    await b.aclose(cancel=True)
    retrieve(futs)
    return w


async def p_drop_oldest(n: int) -> Window:
    # max_size below the room even at n=1,000, so that batches fill and wait at every n.
    return await _drop_run(n, max_size=64)


async def p_drop_oldest_partitions(n: int) -> Window:
    return await _drop_run(n, max_size=128, partition=lambda x: x)


async def p_drop_oldest_dedupe(n: int) -> Window:
    return await _drop_run(n, max_size=10**9, dedupe=True)


async def p_drop_oldest_withdrawn(n: int) -> Window:
    gate, sink = gated()
    room = max(100, n // 10)  # as in _drop_run: 0.9n of the new items drop the oldest
    b: Batcher[int, None] = Batcher(sink, max_size=128, max_pending=room, overflow="drop_oldest")
    holder = b.submit_nowait(-1)  # holds the only dispatch slot
    await asyncio.sleep(0)
    for first in range(0, n, room):  # rounds of callers that give up before dispatch
        tasks = [asyncio.create_task(b.submit(i)) for i in range(first, min(n, first + room))]
        await asyncio.sleep(0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    check(b.stats.cancelled == n, f"stats {b.stats}")
    with Window() as w:
        futs = [b.submit_nowait(i) for i in range(n)]  # all but `room` drop the oldest
    check(b.stats.dropped >= n - room - 128, f"only {b.stats.dropped} dropped of {n}")
    gate.set()
    await b.aclose(cancel=True)
    retrieve([holder, *futs])
    return w


# -- dedupe -----------------------------------------------------------------------


async def p_dedupe(n: int) -> Window:
    b: Batcher[int, int] = Batcher(echo, max_size=256, dedupe=True)
    with Window() as w:
        futs = [b.submit_nowait(i // 4) for i in range(n)]
        await b.flush()
    check(all(f.result() == i // 4 for i, f in enumerate(futs)), "wrong results")
    # 256 slots per batch (a key's 4 callers may straddle two batches: 2 slots).
    check(n // 4 // 256 <= b.stats.batches <= n // 4 // 255 + 1, f"stats {b.stats}")
    await b.aclose()
    return w


async def p_dedupe_hot(n: int) -> Window:
    b: Batcher[int, int] = Batcher(echo, max_size=256, max_wait=300, dedupe=True)
    with Window() as w:
        futs = [b.submit_nowait(i % 10) for i in range(n)]
        await b.flush()
    check(all(f.result() == i % 10 for i, f in enumerate(futs)), "wrong results")
    check(b.stats.batches == 1, f"stats {b.stats}")
    await b.aclose()
    return w


async def p_dedupe_cancel(n: int) -> Window:
    """One caller leaves per loop iteration, oldest first (clients going away one by one)."""
    b: Batcher[int, int] = Batcher(echo, max_size=256, max_wait=300, dedupe=True)
    tasks = [asyncio.create_task(b.submit(0)) for _ in range(n)]
    await asyncio.sleep(0)
    with Window() as w:
        for t in tasks:
            t.cancel()
            await asyncio.sleep(0)
        await asyncio.gather(*tasks, return_exceptions=True)
    check(b.stats.cancelled == n and b.stats.pending == 0, f"stats {b.stats}")
    await b.aclose()
    return w


async def p_dedupe_expire(n: int) -> Window:
    b: Batcher[int, int] = Batcher(echo, max_size=256, max_wait=300, dedupe=True)
    timeout = 0.02
    with Window() as w:
        tasks = [asyncio.create_task(b.submit(0, timeout=timeout)) for _ in range(n)]
        await asyncio.sleep(0)  # every caller has submitted (timers run later)
    time.sleep(timeout * 1.5)  # noqa: ASYNC251 - blocks on purpose, untimed: every deadline passes
    with w:
        results = await asyncio.gather(*tasks, return_exceptions=True)
    expired = sum(isinstance(r, TimeoutError) for r in results)
    check(expired == n and b.stats.expired == n, f"{expired} of {n} expired; {b.stats}")
    check(b.stats.pending == 0, f"stats {b.stats}")
    await b.aclose()
    return w


async def p_loader_cancel(n: int) -> Window:
    calls: list[list[int]] = []

    async def load(keys: list[int]) -> list[int]:
        calls.append(keys)
        return keys

    loader: DataLoader[int, int] = DataLoader(load, max_wait=300)
    futs = [loader.load(0) for _ in range(n)]
    with Window() as w:
        for f in futs:
            f.cancel()
        await asyncio.sleep(0)
    await loader.aclose()
    check(calls == [], f"a withdrawn key was loaded: {len(calls)} calls")
    return w


# -- retries ----------------------------------------------------------------------


async def p_retryable(n: int) -> Window:
    first = [True]

    async def sink(items: list[int]) -> Sequence[int | Retryable]:
        if first[0]:
            first[0] = False
            return [Retryable(ConnectionError("busy"), retry_after=0) for _ in items]
        return items

    b: Batcher[int, int] = Batcher(sink, max_size=n, max_wait=300, retry=Retry(attempts=2))
    with Window() as w:
        futs = [b.submit_nowait(i) for i in range(n)]
        await b.flush()
    check(all(f.result() == i for i, f in enumerate(futs)), "wrong results")
    check(b.stats.retries == 1, f"stats {b.stats}")
    await b.aclose()
    return w


async def p_retry_batch(n: int) -> Window:
    first = [True]

    async def sink(items: list[int]) -> list[int]:
        if first[0]:
            first[0] = False
            raise ConnectionError("busy")
        return items

    retry = Retry(attempts=2, backoff=0, jitter=False)
    b: Batcher[int, int] = Batcher(sink, max_size=n, max_wait=300, retry=retry)
    with Window() as w:
        futs = [b.submit_nowait(i) for i in range(n)]
        await b.flush()
    check(all(f.result() == i for i, f in enumerate(futs)), "wrong results")
    check(b.stats.retries == 1, f"stats {b.stats}")
    await b.aclose()
    return w


async def p_isolate(n: int) -> Window:
    poison = n // 2

    async def sink(items: list[int]) -> list[int]:
        if poison in items:
            raise ValueError("poison")
        return items

    retry = Retry(attempts=1, isolate=True)
    b: Batcher[int, int] = Batcher(sink, max_size=n, max_wait=300, retry=retry)
    with Window() as w:
        futs = [b.submit_nowait(i) for i in range(n)]
        await b.flush()
    check(retrieve(futs) == 1 and isinstance(futs[poison].exception(), ValueError), "isolation")
    check(all(f.result() == i for i, f in enumerate(futs) if i != poison), "wrong results")
    await b.aclose()
    return w


@dataclass(frozen=True)
class Path:
    key: str
    label: str
    run: Measure


PATHS: tuple[Path, ...] = (
    Path("submit_nowait", "submit_nowait, batches of 256", p_submit_nowait),
    Path("submit", "await submit(), n callers pending", p_submit),
    Path("submit_timeout", "await submit(timeout=60), resolved in time", p_submit_timeout),
    Path("put_nowait", "put_nowait (fire-and-forget)", p_put_nowait),
    Path("put", "await put() x n in one task", p_put),
    Path("submit_many", "submit_many(range(n))", p_submit_many),
    Path("load_many", "DataLoader.load_many(range(n))", p_load_many),
    Path("partitions", "submit_nowait, n distinct partitions", p_partitions),
    Path("cancel_pending", "cancel n callers of one batch (random order)", p_cancel_pending),
    Path("expire_pending", "submit(timeout=) runs out, n callers of one batch", p_expire_pending),
    Path("cancel_blocked", "cancel n blocked submitters (random order)", p_cancel_blocked),
    Path("block_admit", "n submitters wait for room (block, max_pending=256)", p_block_admit),
    Path(
        "drop_oldest", "drop_oldest, one partition, batches of 64, max_pending=n/10", p_drop_oldest
    ),
    Path(
        "drop_oldest_partitions",
        "drop_oldest, n partitions, max_pending=n/10",
        p_drop_oldest_partitions,
    ),
    Path(
        "drop_oldest_withdrawn",
        "drop_oldest, n withdrawn items in due batches ahead, max_pending=n/10",
        p_drop_oldest_withdrawn,
    ),
    Path(
        "drop_oldest_dedupe",
        "drop_oldest + dedupe, one open batch, max_pending=n/10",
        p_drop_oldest_dedupe,
    ),
    Path("dedupe", "dedupe, 4 callers per key, batches of 256", p_dedupe),
    Path("dedupe_hot", "dedupe, n callers of 10 keys in one batch", p_dedupe_hot),
    Path(
        "dedupe_cancel",
        "dedupe, n callers of one key leave one per iteration, oldest first",
        p_dedupe_cancel,
    ),
    Path(
        "dedupe_expire",
        "dedupe, submit(timeout=) of n callers of one key runs out",
        p_dedupe_expire,
    ),
    Path("loader_cancel", "DataLoader, cancel n loads of one key (arrival order)", p_loader_cancel),
    Path("retryable", "Retryable for every item of one n-item batch", p_retryable),
    Path("retry_batch", "Retry: one n-item batch fails once, then succeeds", p_retry_batch),
    Path("isolate", "Retry(isolate=True), one poison item in n", p_isolate),
)
PATH_KEYS = tuple(p.key for p in PATHS)


# -- running ----------------------------------------------------------------------


def run_once(path: Path, n: int) -> dict[Clock, float]:
    """Seconds per item of one run of ``path`` at ``n`` (each clock), in a fresh event loop."""
    gc.collect()
    with asyncio.Runner() as runner:
        w = runner.run(path.run(n))
    return {"wall": w.wall / n, "cpu": w.cpu / n}


@dataclass
class Result:
    key: str
    label: str
    sizes: tuple[int, ...]
    clock: Clock  # the one the table and the ratio use
    samples: dict[int, list[dict[Clock, float]]]  # n -> seconds per item, one per round
    #: Sizes not run because the path grew so fast that a run would take this long (s).
    projected: dict[int, float] = field(default_factory=dict)
    max_ratio: float = MAX_RATIO
    #: Runs whose outcome checks failed (then the path is not run again).
    wrong: list[str] = field(default_factory=list)

    @property
    def largest(self) -> int:
        """The largest size measured (the last one, unless it was skipped)."""
        return max((n for n in self.sizes if self.samples[n]), default=self.sizes[-1])

    @property
    def above(self) -> bool:
        """Whether the path misses the bar (a size skipped as too slow misses it too)."""
        return bool(self.projected) or not self.ratio <= self.max_ratio

    def median_us(self, n: int, clock: Clock | None = None) -> float:
        runs = [run[clock or self.clock] for run in self.samples[n]]
        return statistics.median(runs) * 1e6 if runs else float("nan")

    def ratio_on(self, clock: Clock | None = None) -> float:
        """µs per item at the largest size measured / at the smallest."""
        return _common.ratio(
            self.median_us(self.largest, clock), self.median_us(self.sizes[0], clock)
        )

    @property
    def ratio(self) -> float:
        return self.ratio_on()

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.key,
            "label": self.label,
            **{
                f"{clock}_us_per_item": {
                    str(n): [run[clock] * 1e6 for run in self.samples[n]] for n in self.sizes
                }
                for clock in CLOCKS
            },
            **{
                f"{clock}_median_us_per_item": {
                    str(n): self.median_us(n, clock) for n in self.sizes
                }
                for clock in CLOCKS
            },
            **{f"{clock}_ratio": self.ratio_on(clock) for clock in CLOCKS},
            "ratio_at": self.largest,
            "skipped_projected_seconds": {str(n): t for n, t in self.projected.items()},
        }


def measure(
    paths: Sequence[Path],
    sizes: Sequence[int],
    repeat: int,
    slow: float,
    clock: Clock,
    max_ratio: float,
    budget: float,
) -> list[Result]:
    results = [
        Result(p.key, p.label, tuple(sizes), clock, {n: [] for n in sizes}, max_ratio=max_ratio)
        for p in paths
    ]
    for path in paths:
        run_once(path, sizes[0])  # warm-up: imports, code paths, free lists
    skip: set[tuple[str, int]] = set()
    try:
        _rounds(paths, results, sizes, repeat, slow, max_ratio, budget, skip)
    except KeyboardInterrupt:
        # Ctrl-C: report the rounds done so far (the runs column shows how many).
        print("interrupted: reporting the runs done so far", file=sys.stderr)
    return results


def _rounds(
    paths: Sequence[Path],
    results: Sequence[Result],
    sizes: Sequence[int],
    repeat: int,
    slow: float,
    max_ratio: float,
    budget: float,
    skip: set[tuple[str, int]],
) -> None:
    for round_no in range(repeat):
        order = list(sizes) if round_no % 2 == 0 else list(reversed(sizes))
        for path, result in zip(paths, results, strict=True):
            for n in order:
                if (path.key, n) in skip:
                    continue
                if round_no == 0:
                    projected = _projected_seconds(result, n, max_ratio)
                    if projected > budget:
                        result.projected[n] = projected
                        skip.add((path.key, n))
                        continue
                started = time.perf_counter()
                try:
                    result.samples[n].append(run_once(path, n))
                except WrongRun as exc:
                    result.wrong.append(f"n={n:,}: {exc}")
                    skip.update((path.key, m) for m in sizes)  # not counted, not run again
                    print(f"WRONG RUN: {path.key} n={n:,}: {exc}", file=sys.stderr, flush=True)
                    break
                if time.perf_counter() - started > slow:
                    skip.add((path.key, n))
            cells = " ".join(
                f"{runs[-1]['wall'] * 1e6:8.3f} ({runs[-1]['cpu'] * 1e6:.3f})" if runs else "-"
                for runs in (result.samples[n] for n in sizes)
            )
            print(
                f"  round {round_no + 1}/{repeat} {path.key:24s} µs/item wall (cpu) {cells}",
                file=sys.stderr,
                flush=True,
            )


def _projected_seconds(result: Result, n: int, max_ratio: float) -> float:
    """How long a run at ``n`` would take if the path goes on growing (round 1 only).

    Only for a path whose CPU time per item already grew more than 3x (and
    more than the bar) between the two sizes before ``n``, in this round: its
    cost per item is taken to grow in proportion to ``n`` (O(n) per item), from
    the last size measured. Otherwise 0 (run it).
    """
    done = [m for m in result.sizes if m < n and result.samples[m]]
    if len(done) < 2:
        return 0.0
    a, b = done[-2], done[-1]
    # CPU time: on a busy machine one wall-clock sample can easily be 2x off.
    ca, cb = result.samples[a][-1]["cpu"], result.samples[b][-1]["cpu"]
    if not cb / ca > max(3.0, max_ratio):
        return 0.0
    return cb * (n / b) * n


def other_clock(clock: Clock) -> Clock:
    return "cpu" if clock == "wall" else "wall"


def table(results: Sequence[Result], max_ratio: float) -> str:
    sizes = results[0].sizes
    headers = [
        "path",
        "what",
        *(f"µs/item n={n:,}" for n in sizes),
        f"ratio {sizes[-1]:,}/{sizes[0]:,}",
        f"ratio on {other_clock(results[0].clock)} time",
        "runs",
    ]
    rows = []
    for r in results:
        flag = f" **> {max_ratio:g}x**" if r.above else ""
        at = "" if r.largest == sizes[-1] else f" (at {r.largest:,})"
        rows.append(
            [
                f"`{r.key}`",
                r.label,
                *(
                    f"skipped (~{r.projected[n]:,.0f} s)"
                    if n in r.projected
                    else f"{r.median_us(n):.3f}"
                    for n in sizes
                ),
                f"{r.ratio:.2f}x{at}{flag}",
                f"{r.ratio_on(other_clock(r.clock)):.2f}x",
                "/".join(str(len(r.samples[n])) for n in sizes),
            ]
        )
    right = [False, False] + [True] * (len(headers) - 2)
    return _common.markdown_table(headers, rows, right=right)


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


BEGIN = "<!-- scaling.py: begin -->"
END = "<!-- scaling.py: end -->"
TITLE = "## Per-item cost at scale (benchmarks/scaling.py)"


def write_section(path: str, report: str) -> None:
    """Put ``report`` under :data:`TITLE` between the markers in ``path``.

    It replaces the previous section between those markers, or is appended.
    ``compare.py`` keeps this section when it regenerates ``RESULTS.md``.
    """
    section = "\n".join([BEGIN, TITLE, "", report, "", END, ""])
    file = FilePath(path)
    text = file.read_text(encoding="utf-8") if file.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    file.write_text(text, encoding="utf-8")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(_common.REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(_common.REPO_ROOT), "status", "--porcelain", "--", "asyncbatch"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out + (" (asyncbatch/ modified)" if dirty else "")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Per-item cost of each asyncbatch path at growing n, and its growth ratio. "
        f"Exit status 1 if any ratio exceeds --max-ratio ({MAX_RATIO}).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--repeat", type=int, default=5, help="timed rounds (medians are reported)")
    p.add_argument(
        "--paths",
        default="all",
        help="comma-separated subset of: " + ",".join(PATH_KEYS),
    )
    p.add_argument(
        "--sizes",
        default=",".join(map(str, SIZES)),
        help="comma-separated item counts, smallest first",
    )
    p.add_argument("--gc", choices=["on", "off"], default="off", help="collector in the window")
    p.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="what the table and the ratios use: wall time (time.perf_counter) or this "
        "process's CPU time (time.process_time; leaves out other processes' turns); "
        "--json stores both",
    )
    p.add_argument("--max-ratio", type=float, default=MAX_RATIO, help="the bar for every path")
    p.add_argument(
        "--slow",
        type=float,
        default=60.0,
        help="a run longer than this many seconds is not repeated at that size",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=120.0,
        help="in round 1, a size is skipped if a path already growing > 3x per size step "
        "would take longer than this many seconds there (its cost per item taken to grow "
        "with n)",
    )
    p.add_argument(
        "--quick", action="store_true", help=f"sizes {QUICK_SIZES}, 1 round: a smoke test"
    )
    p.add_argument("--json", metavar="PATH", help="also write every sample to this JSON file")
    p.add_argument(
        "--results",
        metavar="PATH",
        help="also put the report in this markdown file (benchmarks/RESULTS.md), in place "
        "of its previous section between the scaling.py markers (or appended)",
    )
    args = p.parse_args(argv)
    if args.paths == "all":
        args.path_list = list(PATHS)
    else:
        wanted = [k.strip() for k in args.paths.split(",") if k.strip()]
        unknown = sorted(set(wanted) - set(PATH_KEYS))
        if unknown:
            p.error(f"unknown path(s) {unknown}; known: {', '.join(PATH_KEYS)}")
        args.path_list = [path for path in PATHS if path.key in wanted]
    try:
        args.size_list = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must be integers, got {args.sizes!r}")
    if args.quick:
        args.size_list, args.repeat = list(QUICK_SIZES), 1
    if len(args.size_list) < 2 or sorted(args.size_list) != args.size_list:
        p.error("--sizes needs at least two counts, smallest first")
    if min(args.size_list) < 10:
        p.error("--sizes: every count must be >= 10")
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    Window.gc_on = args.gc == "on"
    # The paths fail, drop and retry items on purpose: keep the library's
    # warnings about that ("batch failed", "is full") out of the output.
    logging.getLogger("asyncbatch").setLevel(logging.ERROR)
    env = _common.environment(["asyncio"])
    commit = git_commit()
    words = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python benchmarks/scaling.py", *words])
    load_start = _loadavg()
    started = time.perf_counter()
    results = measure(
        args.path_list,
        args.size_list,
        args.repeat,
        args.slow,
        args.clock,
        args.max_ratio,
        args.budget,
    )
    minutes = (time.perf_counter() - started) / 60
    timer = (
        "wall clock (`time.perf_counter`)"
        if args.clock == "wall"
        else "process CPU time (`time.process_time`)"
    )
    bad = [r for r in results if r.above]
    verdict = (
        f"{len(bad)} path(s) above it: {', '.join(r.key for r in bad)}."
        if bad
        else "Every path is within it."
    )
    report = "\n".join(
        [
            f"Generated by `{command}` on {env['time']} in {minutes:.1f} min, asyncbatch at "
            f"{commit}. Python {env['python']} on {env['platform']}, {env['cpus']} CPUs "
            f"(shared with other jobs); asyncio loop; GC {args.gc} in the measured window; "
            f"median of {args.repeat} interleaved rounds (after one warm-up run per path); "
            f"{timer} around the measured part only. Load average (1, 5, 15 min) "
            f"{load_start} at the start, {_loadavg()} at the end.",
            "",
            table(results, args.max_ratio),
            "",
            f"ratio = µs/item at n={args.size_list[-1]:,} / µs/item at "
            f"n={args.size_list[0]:,}; the bar is {args.max_ratio:g}x. {verdict}",
        ]
    )
    print(report)
    wrong = [f"{r.key} {w}" for r in results for w in r.wrong]
    for w in wrong:
        print(f"WRONG RUN (not counted): {w}", file=sys.stderr)
    if args.results and not wrong:
        write_section(args.results, report)
    if args.json:
        _common.write_json(
            args.json,
            {
                "environment": env,
                "commit": commit,
                "gc": args.gc,
                "repeat": args.repeat,
                "sizes": args.size_list,
                "max_ratio": args.max_ratio,
                "results": [r.to_json() for r in results],
                "wrong_runs": wrong,
            },
        )
    if wrong:
        return 2
    if bad:
        for r in bad:
            skipped = (
                f"; skipped at {', '.join(f'{n:,}' for n in r.projected)}" if r.projected else ""
            )
            print(f"{r.key}: x{r.ratio:.2f} at {r.largest:,}{skipped}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
