"""Soak: a million items through a failing, stalling sink, on a real event loop.

Not a speed benchmark and not in CI: a long run that must lose nothing, resolve
nothing twice, and hold its memory flat. It prints

- **lost**: accepted items whose caller never got an outcome (must be 0);
- **double-resolved**: outcomes seen twice for one item, a done-callback
  firing twice, or an ``InvalidStateError`` (must be 0);
- **misrouted**: a result or per-item error that belongs to another item (0);
- **loop errors**: calls of the loop's exception handler ("exception was never
  retrieved", "Task was destroyed but it is pending", errors in callbacks) (0);
- **counters**: ``stats.submitted - (succeeded + failed + cancelled + expired +
  dropped)`` (must be 0), and the harness's own tally against ``stats``;
- **memory**: tracemalloc's peak, and the traced memory after each window of
  ``--window`` items (100,000 by default), measured at a quiet point (every
  caller of the window resolved, ``flush()`` done, a full GC) and leaving out
  the harness's own allocations and the table of asyncio's task registry: the
  last window must not hold more than the first beyond noise (64 KiB, or 0.1
  byte per item in between);
- throughput and the wall time of the whole run.

The workload. ``--workers`` producer tasks share the items of each window;
each takes ``--chunk`` items at a time and waits for all of them before the
next chunk. Per item, at random:

- 94 %: ``submit_nowait``; 2 % of those futures are cancelled at once (before
  dispatch) and 1 % a few milliseconds later (before or after); when it
  raises ``QueueFull`` (no room under ``max_pending``) the item waits for room
  in ``await submit(item)`` instead, as a producer under backpressure would;
- 3 %: ``await submit(item, timeout=...)`` with a short per-item timeout
  (some expire before dispatch, some after);
- 3 %: ``await submit(item)`` in a task that is cancelled after a random
  0-5 ms.

The sink (``max_size=256``, ``max_wait=1 ms``, 4 partitions, 8 sink calls at
once, ``max_pending`` below what the producers offer, ``timeout=20 ms``,
``Retry(attempts=3, backoff=2 ms, isolate=True)``) per call: stalls past the
timeout (2 %), sleeps up to 2 ms (5 %), raises (3 %), answers the wrong shape
(0.5 %); otherwise it answers every item, with 1 % per-item errors and 1 %
``Retryable`` items.

Usage (from the repository root)::

    .venv/bin/python benchmarks/soak.py                  # 1,000,000 items
    .venv/bin/python benchmarks/soak.py --loop uvloop
    .venv/bin/python benchmarks/soak.py --quick          # 50,000 items, seconds
    .venv/bin/python benchmarks/soak.py --items 200000 --json benchmarks/out/soak.json

Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import linecache
import random
import resource
import sys
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import _common
from _common import LoopName, Stopwatch, environment, markdown_table, new_loop

_common.use_checkout()

from asyncbatch import (  # noqa: E402
    Batcher,
    BatcherClosed,
    QueueFull,
    ResultMismatch,
    Retry,
    Retryable,
)

TIMEOUT = 0.02  # the sink timeout, seconds


class SinkError(Exception):
    """The sink failed a whole call."""


class ItemError(Exception):
    """A per-item error; ``args[0]`` is the item."""


class Sink:
    """Fails, stalls and answers at random; counts what it did."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.did: Counter[str] = Counter()

    async def __call__(self, items: list[int]) -> list[Any]:
        rng = self.rng
        did = self.did
        did["calls"] += 1
        did["items"] += len(items)
        roll = rng.random()
        if roll < 0.02:
            did["stalled"] += 1
            await asyncio.sleep(TIMEOUT * 2)  # the sink timeout cancels this
        elif roll < 0.07:
            did["slow"] += 1
            await asyncio.sleep(rng.random() * 0.002)
        else:
            await asyncio.sleep(0)  # an async sink yields at least once
        roll = rng.random()
        if roll < 0.03:
            did["raised"] += 1
            raise SinkError("the backend is down")
        if roll < 0.035:
            did["wrong shape"] += 1
            return [i * 2 + 1 for i in items[1:]]
        out: list[Any] = []
        for i in items:
            roll = rng.random()
            if roll < 0.01:
                out.append(ItemError(i))
            elif roll < 0.02:
                out.append(Retryable(ItemError(i)))
            else:
                out.append(i * 2 + 1)
        return out


@dataclass
class Tally:
    """What the callers saw, and the checks on it."""

    outcomes: Counter[str] = field(default_factory=Counter)
    accepted: int = 0  # submit_nowait futures, and submit() calls not refused
    # submit() calls cancelled by us: accepted, or cancelled while still
    # waiting for room (never accepted); the harness cannot tell which.
    maybe_accepted: int = 0
    refused: int = 0  # submit(timeout=...) that found no room in time: never accepted
    waited: int = 0  # submit_nowait found no room (QueueFull): the item went by submit()
    lost: int = 0
    double: int = 0
    misrouted: int = 0
    # Items accepted and not yet resolved: a resolution of an item not in
    # here is a second one. Bounded by the items in flight, not the run.
    open: set[int] = field(default_factory=set)

    def outcome(self, i: int, value: object = None, error: BaseException | None = None) -> None:
        if i not in self.open:
            self.double += 1
            return
        self.open.discard(i)
        if error is None:
            self.outcomes["succeeded"] += 1
            if value != i * 2 + 1:
                self.misrouted += 1
        elif isinstance(error, asyncio.CancelledError):
            self.outcomes["cancelled"] += 1
        elif isinstance(error, ItemError):
            self.outcomes["per-item error"] += 1
            if error.args != (i,):
                self.misrouted += 1
        elif isinstance(error, SinkError):
            self.outcomes["sink raised"] += 1
        elif isinstance(error, ResultMismatch):
            self.outcomes["wrong shape"] += 1
        elif isinstance(error, TimeoutError):
            late = "did not answer" in str(error)
            self.outcomes["sink timeout" if late else "own timeout"] += 1
        elif isinstance(error, QueueFull):
            self.outcomes["dropped"] += 1
        elif isinstance(error, BatcherClosed):
            self.outcomes["closed"] += 1
        else:
            self.outcomes[f"unexpected {type(error).__name__}"] += 1


@dataclass
class Window:
    index: int
    items: int
    traced: int  # bytes traced by tracemalloc at the quiet point after the window
    elapsed: float
    snapshot: tracemalloc.Snapshot | None = None


@dataclass
class Report:
    loop: str
    items: int
    seconds: float
    cpu_seconds: float
    tally: Tally
    sink: Counter[str]
    stats: Any
    windows: list[Window]
    peak_traced: int
    max_rss_kib: int
    handler_calls: list[str]
    growth: int = 0
    growth_limit: int = 0

    @property
    def unaccounted(self) -> int:
        s = self.stats
        return int(s.submitted - (s.succeeded + s.failed + s.cancelled + s.expired + s.dropped))

    def failures(self) -> list[str]:
        out = []
        t = self.tally
        if t.lost:
            out.append(f"{t.lost} items lost")
        if t.double:
            out.append(f"{t.double} items resolved twice")
        if t.misrouted:
            out.append(f"{t.misrouted} items got another item's answer")
        if self.handler_calls:
            out.append(f"{len(self.handler_calls)} calls of the loop's exception handler")
        if self.unaccounted:
            out.append(f"stats do not add up: {self.unaccounted} callers unaccounted")
        sure = t.accepted - t.maybe_accepted
        if not sure <= self.stats.submitted <= t.accepted:
            out.append(
                f"stats.submitted={self.stats.submitted:,}, the harness accepted "
                f"{sure:,} (+ up to {t.maybe_accepted:,} cancelled while waiting for room)"
            )
        unexpected = [k for k in t.outcomes if k.startswith("unexpected")]
        if unexpected:
            out.append(f"unexpected outcomes: {unexpected}")
        if self.growth > self.growth_limit:
            out.append(
                f"memory grew by {self.growth:,} bytes between the first and last window "
                f"(limit {self.growth_limit:,})"
            )
        return out


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.handler_calls: list[str] = []
        self.sink = Sink(random.Random(args.seed + 1))
        self.batcher: Batcher[int, int] = Batcher(
            self.sink,
            max_size=256,
            max_wait=0.001,
            partition=lambda i: i & 3,
            max_concurrency=8,
            max_pending=args.max_pending,
            timeout=TIMEOUT,
            retry=Retry(attempts=3, backoff=0.002, max_backoff=0.02, isolate=True),
            name="soak",
        )

    # ------------------------------------------------------------ callers

    def _on_done(self, i: int, fut: asyncio.Future[int]) -> None:
        if fut.cancelled():
            self.tally.outcome(i, error=asyncio.CancelledError())
        elif (exc := fut.exception()) is not None:
            self.tally.outcome(i, error=exc)
        else:
            self.tally.outcome(i, fut.result())

    async def _submit(self, i: int, per_item: float | None) -> None:
        # Counted when it runs: a task cancelled before its first step (uvloop
        # can fire a sub-millisecond timer first) never submitted anything.
        self.tally.accepted += 1
        self.tally.open.add(i)
        try:
            value = await self.batcher.submit(i, timeout=per_item)
        except asyncio.CancelledError as exc:
            self.tally.outcome(i, error=exc)
            self.tally.maybe_accepted += 1
            raise
        except TimeoutError as exc:
            if "no room" in str(exc):  # refused, never accepted
                self.tally.open.discard(i)
                self.tally.accepted -= 1
                self.tally.refused += 1
            else:
                self.tally.outcome(i, error=exc)
        except Exception as exc:
            self.tally.outcome(i, error=exc)
        else:
            self.tally.outcome(i, value)

    async def _chunk(self, ids: range) -> None:
        loop = asyncio.get_running_loop()
        rng = self.rng
        tally = self.tally
        b = self.batcher
        waits: list[asyncio.Future[Any]] = []
        for i in ids:
            roll = rng.random()
            if roll < 0.94:
                try:
                    fut = b.submit_nowait(i)
                except QueueFull:
                    # No room: wait for it, as a producer under backpressure would.
                    tally.waited += 1
                    waits.append(asyncio.create_task(self._submit(i, None)))
                    continue
                tally.accepted += 1
                tally.open.add(i)
                fut.add_done_callback(functools.partial(self._on_done, i))
                waits.append(fut)
                roll = rng.random()
                if roll < 0.02:
                    fut.cancel()  # before dispatch: withdrawn
                elif roll < 0.03:
                    loop.call_later(rng.random() * 0.005, fut.cancel)
            else:
                # ``submit`` accepts at once unless there is no room, in which
                # case it waits; a refusal is taken back in ``_submit``.
                timeout = rng.choice([0.001, 0.01, 0.05, 0.2]) if roll < 0.97 else None
                task = asyncio.create_task(self._submit(i, timeout))
                waits.append(task)
                if timeout is None:
                    loop.call_later(rng.random() * 0.005, task.cancel)
        if waits:
            _, pending = await asyncio.wait(waits, timeout=self.args.lost_after)
            for fut in pending:  # never resolved: lost (cancelling it lets the run go on)
                tally.lost += 1
                fut.cancel()

    async def _worker(self, ids: range) -> None:
        chunk = self.args.chunk
        for start in range(ids.start, ids.stop, chunk):
            await self._chunk(range(start, min(start + chunk, ids.stop)))

    # --------------------------------------------------------------- run

    async def run(self) -> Report:
        args = self.args
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(
            lambda _loop, ctx: self.handler_calls.append(str(ctx.get("message")))
        )
        windows: list[Window] = []
        watch = Stopwatch()
        n = args.items
        size = args.window
        workers = args.workers
        for w, start in enumerate(range(0, n, size)):
            stop = min(start + size, n)
            share = -(-(stop - start) // workers)
            await asyncio.gather(
                *(self._worker(range(k, min(k + share, stop))) for k in range(start, stop, share))
            )
            await self.batcher.flush()  # sink calls whose callers all left, too
            windows.append(self._quiet_point(w, stop, watch))
            if args.progress:
                t = windows[-1]
                print(
                    f"  {stop:>9,} items  {t.elapsed:7.1f} s  traced {t.traced / 1024:8.1f} KiB  "
                    f"open {len(self.tally.open)}",
                    file=sys.stderr,
                    flush=True,
                )
        await self.batcher.aclose()
        elapsed = watch.elapsed()
        for _ in range(3):
            await asyncio.sleep(0)  # done-callbacks of the last resolutions
        self.tally.lost += len(self.tally.open)
        gc.collect()
        await asyncio.sleep(0)
        peak = tracemalloc.get_traced_memory()[1] if tracemalloc.is_tracing() else 0
        report = Report(
            loop=args.loop,
            items=n,
            seconds=elapsed.wall,
            cpu_seconds=elapsed.cpu,
            tally=self.tally,
            sink=self.sink.did,
            stats=self.batcher.stats,
            windows=windows,
            peak_traced=peak,
            max_rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            handler_calls=self.handler_calls,
        )
        if len(windows) >= 2 and tracemalloc.is_tracing():
            first, last = windows[0], windows[-1]
            report.growth = last.traced - first.traced
            # Noise: free lists, dict and heap resizes, the loop's scheduled
            # heap; a leak of even one byte per item would pass this limit.
            report.growth_limit = max(64 * 1024, (n - first.items) // 10)
        return report

    def _quiet_point(self, index: int, items: int, watch: Stopwatch) -> Window:
        gc.collect()
        elapsed = watch.elapsed().wall
        if not tracemalloc.is_tracing():
            return Window(index, items, 0, elapsed)
        # Left out: the harness's own allocations (this file: its tallies,
        # these windows), and the table of asyncio's task registry (a
        # WeakSet): its size follows the number of tasks alive when it last
        # resized, a high-water mark of the producers, not of asyncbatch.
        # (A leaked task would still show: as its own objects.)
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [
                tracemalloc.Filter(False, __file__),
                tracemalloc.Filter(False, tracemalloc.__file__),
                tracemalloc.Filter(False, "*/_weakrefset.py"),
            ]
        )
        traced = sum(stat.size for stat in snapshot.statistics("filename"))
        keep = index == 0 or items >= self.args.items
        return Window(index, items, traced, elapsed, snapshot if keep else None)


def print_report(r: Report, args: argparse.Namespace) -> None:
    t = r.tally
    s = r.stats
    print(f"\n## soak: {r.items:,} items on {r.loop} in {r.seconds:.1f} s\n")
    rows = [
        ["items lost", f"{t.lost}"],
        ["items double-resolved", f"{t.double}"],
        ["items misrouted", f"{t.misrouted}"],
        ["loop exception-handler calls", f"{len(r.handler_calls)}"],
        ["stats unaccounted (submitted - outcomes)", f"{r.unaccounted}"],
        [
            "stats.submitted / accepted (harness)",
            f"{s.submitted:,} / {t.accepted - t.maybe_accepted:,} + {t.maybe_accepted:,} maybe",
        ],
        ["submit_nowait full -> waited in submit()", f"{t.waited:,}"],
        ["refused (no room within the per-item timeout)", f"{t.refused:,}"],
        ["peak traced memory", f"{r.peak_traced / 2**20:.1f} MiB"],
        ["max RSS of the process", f"{r.max_rss_kib / 1024:.1f} MiB"],
    ]
    if len(r.windows) >= 2 and r.windows[0].traced:
        first, last = r.windows[0], r.windows[-1]
        rows.append(
            [
                f"traced after the first / last {args.window:,} items",
                f"{first.traced / 1024:.1f} / {last.traced / 1024:.1f} KiB",
            ]
        )
        verdict = "no growth" if r.growth <= r.growth_limit else "GROWS"
        rows.append(
            [
                "growth first -> last window",
                f"{r.growth:+,} bytes ({verdict}; limit {r.growth_limit:,})",
            ]
        )
    rows.append(["throughput", f"{r.items / r.seconds:,.0f} items/s"])
    rows.append(["wall / CPU time", f"{r.seconds:.1f} s / {r.cpu_seconds:.1f} s"])
    print(markdown_table(["check", "value"], rows, right=[False, True]))

    print("\nWhat the callers got (harness tally) and the batcher's counters:\n")
    outcome_rows = [[k, f"{v:,}"] for k, v in sorted(t.outcomes.items())]
    print(markdown_table(["caller outcome", "items"], outcome_rows, right=[False, True]))
    print(
        f"\nstats: submitted {s.submitted:,}, succeeded {s.succeeded:,}, failed {s.failed:,}, "
        f"cancelled {s.cancelled:,}, expired {s.expired:,}, dropped {s.dropped:,}, "
        f"rejected {s.rejected:,}; batches {s.batches:,} (mean size "
        f"{s.mean_batch_size:.1f}), peak pending {s.peak_pending:,}; reasons {dict(s.reasons)}"
    )
    print(f"sink: {dict(r.sink)}")
    if len(r.windows) > 2 and r.windows[0].traced:
        series = ", ".join(f"{w.traced / 1024:.0f}" for w in r.windows)
        print(f"traced KiB after each window: {series}")
    first_snap, last_snap = r.windows[0].snapshot, r.windows[-1].snapshot
    if first_snap is not None and last_snap is not None and len(r.windows) >= 2:
        diff = last_snap.compare_to(first_snap, "lineno")
        top = [d for d in diff if d.size_diff > 0][:5]
        if top:
            print("largest increases, first -> last window (tracemalloc):")
            for d in top:
                frame = d.traceback[0]
                line = linecache.getline(frame.filename, frame.lineno).strip()
                print(f"  {d.size_diff:+,} B  {frame.filename}:{frame.lineno}  {line[:70]}")
    if r.handler_calls:
        print("exception handler:", r.handler_calls[:5])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Soak test: many items through a failing, stalling sink.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--items", type=int, default=1_000_000, help="items in the run")
    p.add_argument("--quick", action="store_true", help="50,000 items (windows of 5,000)")
    p.add_argument("--loop", choices=_common.LOOPS, default="asyncio")
    p.add_argument("--window", type=int, default=None, help="items per memory window")
    p.add_argument("--workers", type=int, default=100, help="producer tasks")
    p.add_argument("--chunk", type=int, default=50, help="items a producer has out at once")
    p.add_argument("--max-pending", type=int, default=2500, help="the batcher's max_pending")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--lost-after",
        type=float,
        default=30.0,
        help="seconds a chunk waits for its items before counting the rest lost",
    )
    p.add_argument("--no-trace", action="store_true", help="no tracemalloc (faster; no memory)")
    p.add_argument("--progress", action="store_true", help="a line per window on stderr")
    p.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.items = 50_000
    if args.window is None:
        args.window = min(100_000, max(1, args.items // 10))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    loop_name: LoopName = args.loop
    if loop_name not in _common.available_loops():
        print(f"{loop_name} is not installed", file=sys.stderr)
        return 2
    env = environment([loop_name])
    print(f"# asyncbatch soak ({env['time']})\n")
    print(
        f"Python {env['python']} on {env['platform']}, {env['cpus']} CPUs; {env['loops'][0]}; "
        f"{args.items:,} items, {args.workers} producers x {args.chunk} items, "
        f"max_pending={args.max_pending}, seed {args.seed}"
        f"{'' if args.no_trace else ', tracemalloc on (slows the run)'}."
    )
    if not args.no_trace:
        tracemalloc.start()
    loop = new_loop(loop_name)
    try:
        report = loop.run_until_complete(Soak(args).run())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        tracemalloc.stop()
    print_report(report, args)
    failures = report.failures()
    print()
    print("FAILED: " + "; ".join(failures) if failures else "OK: every check passed.")
    if args.json:
        _common.write_json(
            args.json,
            {
                "environment": env,
                "items": report.items,
                "seconds": report.seconds,
                "lost": report.tally.lost,
                "double_resolved": report.tally.double,
                "misrouted": report.tally.misrouted,
                "handler_calls": len(report.handler_calls),
                "unaccounted": report.unaccounted,
                "peak_traced_bytes": report.peak_traced,
                "max_rss_kib": report.max_rss_kib,
                "traced_after_window": [w.traced for w in report.windows],
                "growth_bytes": report.growth,
                "growth_limit_bytes": report.growth_limit,
                "outcomes": dict(report.tally.outcomes),
                "failures": failures,
            },
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
