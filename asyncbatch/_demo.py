"""``asyncbatch demo``: watch micro-batching pay off, live in the terminal.

The demo simulates a service whose requests each need one answer from a slow
*backend*: every backend call costs a fixed round trip (``--sink-latency``) plus
a little work per item (``--per-item-cost``), and the backend serves at most
``--max-concurrency`` calls at once (a connection pool, a rate-limited bulk API).
``--concurrency`` clients send requests in a closed loop: each awaits its answer,
then sends the next one.

It runs the same load twice against the same backend:

1. *batched*: every request is an ``await batcher.submit(i)``; the
   :class:`~asyncbatch.Batcher` (``--max-size``, ``--max-wait``,
   ``--max-concurrency``) turns them into one backend call per batch;
2. *unbatched*: every request is its own backend call, with the same clients
   and the same backend capacity.

Every duration on the command line is in seconds, like every duration of the
API (``--max-wait 0.005`` is 5 ms; ``20e-6`` is accepted for 20 µs).

A phase ends when ``--requests`` requests were answered or ``--duration``
seconds passed, whichever comes first (without either: 5 seconds). At the
deadline the requests still waiting are cancelled and not counted. The summary
compares backend calls, throughput and latency of the two runs.

While a phase runs, a status block (requests/s, backend calls/s, batch sizes,
p50/p99 latency, the batcher's own counters) is redrawn in place about every
0.5 s when the output is a terminal, and printed as one plain line per second
otherwise (``--no-live``: neither). Everything is timed with ``loop.time()``,
so the demo also runs on a virtual clock (the tests use ``looptime``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TextIO

from . import Batcher, BatcherStats, BatchReport

__all__ = [
    "Backend",
    "DemoConfig",
    "DemoResult",
    "PhaseResult",
    "build_parser",
    "main",
    "run_demo",
]

LoopName = Literal["asyncio", "uvloop"]
ViewMode = Literal["tty", "lines", "off"]

#: Without --requests and --duration, each phase runs this many seconds.
DEFAULT_DURATION = 5.0


# -- configuration -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """One demo run. Every time is in seconds, as on the command line."""

    requests: int | None = None
    duration: float | None = DEFAULT_DURATION
    concurrency: int = 500
    sink_latency: float = 0.020
    per_item_cost: float = 20e-6
    max_size: int = 128
    max_wait: float = 0.005
    max_concurrency: int = 4
    live: bool = True
    refresh: float = 0.5

    def __post_init__(self) -> None:
        if self.requests is None and self.duration is None:
            raise ValueError("a demo needs requests or a duration (or both), got neither")


# -- the simulated backend ---------------------------------------------------------


def answer(request: int) -> int:
    """What the backend answers for ``request``: each caller checks it got its own."""
    return request * 2 + 1


class Backend:
    """A slow bulk endpoint: one round trip per call plus a small cost per item.

    At most ``connections`` calls run at once; further calls queue (FIFO) for a
    free connection, as they would on a client's connection pool.
    """

    def __init__(self, *, latency: float, per_item: float, connections: int) -> None:
        self.latency = latency
        self.per_item = per_item
        self.connections = connections
        self.calls = 0
        self.items = 0
        self.busy = 0  # calls being served
        self.queued = 0  # calls waiting for a free connection
        self._slots = asyncio.Semaphore(connections)

    async def call(self, requests: list[int]) -> list[int]:
        """Answer a batch of requests: one entry per request, in order."""
        self.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
        self.calls += 1
        self.items += len(requests)
        self.busy += 1
        try:
            await asyncio.sleep(self.latency + len(requests) * self.per_item)
        finally:
            self.busy -= 1
            self._slots.release()
        return [answer(r) for r in requests]

    async def call_one(self, request: int) -> int:
        """The unbatched way: one backend call for one request."""
        (result,) = await self.call([request])
        return result


# -- measuring a phase -------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Recorder:
    """What one phase measured so far; the live view reads it while it grows."""

    name: str
    backend: Backend
    stats: Callable[[], BatcherStats] | None = None
    started: float = 0.0
    deadline: float | None = None
    latencies: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    correct: int = 0

    def on_batch(self, report: BatchReport) -> None:
        self.sizes.append(report.size)


@dataclass(frozen=True, slots=True)
class PhaseResult:
    """The outcome of one phase (``batched`` or ``unbatched``)."""

    name: str
    requests: int
    correct: int
    calls: int
    items: int
    elapsed: float
    p50: float
    p99: float
    min_batch: int
    max_batch: int
    reasons: Mapping[str, int]
    peak_pending: int

    @property
    def throughput(self) -> float:
        """Answered requests per second."""
        return self.requests / self.elapsed if self.elapsed > 0 else math.inf

    @property
    def items_per_call(self) -> float:
        return self.items / self.calls if self.calls else 0.0

    @property
    def calls_saved(self) -> int:
        """Backend calls avoided compared with one call per answered request."""
        return max(self.requests - self.calls, 0)


@dataclass(frozen=True, slots=True)
class DemoResult:
    config: DemoConfig
    batched: PhaseResult
    unbatched: PhaseResult


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (nan when empty)."""
    if not ordered:
        return math.nan
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


async def _drive(rec: _Recorder, send: Callable[[int], Awaitable[int]], config: DemoConfig) -> None:
    """Run the closed-loop clients until the request budget or the deadline."""
    loop = asyncio.get_running_loop()
    limit = config.requests
    # One shared supply of request numbers: clients stop when it runs out.
    ids: Iterator[int] = itertools.count() if limit is None else iter(range(limit))

    async def client() -> None:
        for request in ids:
            sent = loop.time()
            result = await send(request)
            rec.latencies.append(loop.time() - sent)
            rec.correct += result == answer(request)

    clients = config.concurrency if limit is None else min(config.concurrency, limit)
    # The deadline cancels every client still waiting: a request cancelled before
    # its batch is dispatched is withdrawn, one already dispatched is dropped.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(rec.deadline), asyncio.TaskGroup() as tg:
            for _ in range(clients):
                tg.create_task(client())


# -- the live view -----------------------------------------------------------------

_CLEAR_BLOCK = "\x1b[{n}F\x1b[J"  # cursor n lines up to column 0, clear to the end


def _fmt_time(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:,.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:,.1f} ms"
    return f"{seconds:,.2f} s"


def _fmt_rate(per_second: float) -> str:
    return "-" if math.isinf(per_second) else f"{per_second:,.0f}/s"


def _fmt_sizes(w: _WindowStats) -> str:
    if not w.max_batch:
        return "-"
    return f"mean {w.mean_batch:,.1f}  min {w.min_batch:,}  max {w.max_batch:,}"


def _fmt_reasons(reasons: Mapping[str, int]) -> str:
    total = sum(reasons.values())
    if not total:
        return "-"
    ranked = sorted(reasons.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{reason} {count / total:.0%}" for reason, count in ranked if count)


def _buckets(max_size: int) -> list[tuple[int, int]]:
    """Power-of-two batch size buckets up to ``max_size``: 1, 2-3, 4-7, ..."""
    edges: list[tuple[int, int]] = []
    low = 1
    while low <= max_size:
        edges.append((low, min(2 * low - 1, max_size)))
        low *= 2
    return edges


def _histogram(sizes: Sequence[int], max_size: int, *, width: int, bar: str) -> list[str]:
    """Rows of a batch size histogram, from the smallest to the largest non-empty bucket."""
    edges = _buckets(max_size)
    counts = [0] * len(edges)
    for size in sizes:
        counts[min(size.bit_length(), len(edges)) - 1] += 1
    used = [i for i, count in enumerate(counts) if count]
    if not used:
        return []
    top = max(counts)
    lines = []
    for i in range(used[0], used[-1] + 1):
        (low, high), count = edges[i], counts[i]
        label = str(low) if low == high else f"{low}-{high}"
        length = math.ceil(count / top * width)
        lines.append(f"{label:>9} {bar * length:<{width}} {count:,}")
    return lines


class _LiveView:
    """Redraws a phase's status block in place (tty) or prints plain lines."""

    def __init__(self, out: TextIO, mode: ViewMode, config: DemoConfig) -> None:
        self.out = out
        self.mode = mode
        self.config = config
        self.period = config.refresh if mode == "tty" else max(config.refresh, 1.0)
        encoding = (getattr(out, "encoding", None) or "").lower().replace("-", "")
        self.bar = "█" if encoding == "utf8" else "#"
        self._drawn = 0  # lines of the block currently on screen

    async def run(self, rec: _Recorder, done: asyncio.Event) -> None:
        """Draw every period until ``done``, then draw the final state once."""
        if self.mode == "off":
            return
        loop = asyncio.get_running_loop()
        seen = _Window()
        tick = rec.started
        while not done.is_set():
            # Ticks on a fixed grid; a tick already past (a slow draw) is skipped.
            tick += self.period * max(1, math.ceil((loop.time() - tick) / self.period))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(tick):
                    await done.wait()
            if not done.is_set():
                self.draw(rec, seen.advance(rec, loop.time()))
        # The last draw sums up the whole phase, and stays on screen.
        self.draw(rec, _Window().advance(rec, loop.time()))
        self._drawn = 0

    def draw(self, rec: _Recorder, window: _WindowStats) -> None:
        if self.mode == "tty":
            lines = self.block(rec, window)
            prefix = _CLEAR_BLOCK.format(n=self._drawn) if self._drawn else ""
            self.out.write(prefix + "\n".join(lines) + "\n")
            self._drawn = len(lines)
        else:
            self.out.write(self.line(rec, window) + "\n")
        self.out.flush()

    def line(self, rec: _Recorder, w: _WindowStats) -> str:
        return (
            f"{rec.name:>9} {w.now - rec.started:5.1f}s  {_fmt_rate(w.request_rate):>10} req"
            f"  {_fmt_rate(w.call_rate):>8} calls  batch {_fmt_sizes(w)}"
            f"  p50 {_fmt_time(w.p50)}  p99 {_fmt_time(w.p99)}"
        )

    def block(self, rec: _Recorder, w: _WindowStats) -> list[str]:
        c = self.config
        elapsed = w.now - rec.started
        limit = f" of {rec.deadline - rec.started:.1f} s" if rec.deadline is not None else ""
        backend = rec.backend
        lines = [
            f"{rec.name} · {elapsed:.1f} s{limit} · {c.concurrency:,} clients"
            f" · backend {_fmt_time(backend.latency)}/call + {_fmt_time(backend.per_item)}/item,"
            f" {backend.connections} at once",
            f"  requests     {_fmt_rate(w.request_rate):>12}    total {len(rec.latencies):,}",
            f"  sink calls   {_fmt_rate(w.call_rate):>12}    total {backend.calls:,}",
            f"  batch size   {_fmt_sizes(w)}",
            f"  latency      p50 {_fmt_time(w.p50)}   p99 {_fmt_time(w.p99)}",
            f"  backend      busy {backend.busy}/{backend.connections}"
            f"   calls waiting for a connection {backend.queued:,}",
        ]
        if rec.stats is not None:
            s = rec.stats()
            lines.append(
                f"  batcher      items pending {s.pending:,}   in flight {s.in_flight:,}"
                f"   peak pending {s.peak_pending:,}   dispatched on: {_fmt_reasons(s.reasons)}"
            )
            lines.append("  batch sizes so far")
            lines.extend(
                "  " + row for row in _histogram(rec.sizes, c.max_size, width=30, bar=self.bar)
            )
        return lines


@dataclass(frozen=True, slots=True)
class _WindowStats:
    """Rates and percentiles over the last refresh period."""

    now: float
    request_rate: float
    call_rate: float
    mean_batch: float
    min_batch: int
    max_batch: int
    p50: float
    p99: float


@dataclass(slots=True)
class _Window:
    """Where the previous refresh left off, to compute the next window."""

    time: float = math.nan
    requests: int = 0
    calls: int = 0
    items: int = 0
    sizes: int = 0

    def advance(self, rec: _Recorder, now: float) -> _WindowStats:
        if math.isnan(self.time):
            self.time = rec.started
        span = now - self.time
        backend = rec.backend
        latencies = sorted(rec.latencies[self.requests :])
        sizes = rec.sizes[self.sizes :] or [1] * (backend.calls - self.calls)
        calls = backend.calls - self.calls
        items = backend.items - self.items
        stats = _WindowStats(
            now=now,
            request_rate=len(latencies) / span if span > 0 else math.inf,
            call_rate=calls / span if span > 0 else math.inf,
            mean_batch=items / calls if calls else 0.0,
            min_batch=min(sizes, default=0),
            max_batch=max(sizes, default=0),
            p50=_percentile(latencies, 0.50),
            p99=_percentile(latencies, 0.99),
        )
        self.time, self.requests, self.sizes = now, len(rec.latencies), len(rec.sizes)
        self.calls, self.items = backend.calls, backend.items
        return stats


# -- running the two phases --------------------------------------------------------


def _view_mode(out: TextIO, live: bool) -> ViewMode:
    if not live:
        return "off"
    isatty = getattr(out, "isatty", None)
    if callable(isatty) and isatty() and os.environ.get("TERM") != "dumb":
        return "tty"
    return "lines"


async def _phase(
    rec: _Recorder, config: DemoConfig, view: _LiveView, send: Callable[[int], Awaitable[int]]
) -> float:
    """Run one phase with the live view beside it; its duration in seconds."""
    loop = asyncio.get_running_loop()
    rec.started = loop.time()
    rec.deadline = None if config.duration is None else rec.started + config.duration
    done = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(view.run(rec, done))
        try:
            await _drive(rec, send, config)
        finally:
            elapsed = loop.time() - rec.started
            done.set()
    return elapsed


def _backend(config: DemoConfig) -> Backend:
    return Backend(
        latency=config.sink_latency,
        per_item=config.per_item_cost,
        connections=config.max_concurrency,
    )


def _result(rec: _Recorder, elapsed: float, stats: BatcherStats | None) -> PhaseResult:
    latencies = sorted(rec.latencies)
    sizes = rec.sizes or [1]
    return PhaseResult(
        name=rec.name,
        requests=len(latencies),
        correct=rec.correct,
        calls=rec.backend.calls,
        items=rec.backend.items,
        elapsed=elapsed,
        p50=_percentile(latencies, 0.50),
        p99=_percentile(latencies, 0.99),
        min_batch=min(sizes),
        max_batch=max(sizes),
        reasons=dict(stats.reasons) if stats is not None else {},
        peak_pending=stats.peak_pending if stats is not None else 0,
    )


async def run_demo(config: DemoConfig, out: TextIO | None = None) -> DemoResult:
    """Run both phases on the running loop, print the summary and return it."""
    out = sys.stdout if out is None else out
    view = _LiveView(out, _view_mode(out, config.live), config)
    print(_describe(config), file=out)

    # Phase 1: every request goes through one Batcher; one backend call per batch.
    batched_backend = _backend(config)
    batched_rec = _Recorder("batched", batched_backend)
    print("\nbatched: each request is `await batcher.submit(request)`", file=out)
    async with Batcher(
        batched_backend.call,
        max_size=config.max_size,
        max_wait=config.max_wait,
        max_concurrency=config.max_concurrency,
        on_batch=batched_rec.on_batch,
        name="demo",
    ) as batcher:
        batched_rec.stats = lambda: batcher.stats
        elapsed = await _phase(batched_rec, config, view, batcher.submit)
    # Read after aclose(): final counters, with the requests cancelled at the deadline.
    batched = _result(batched_rec, elapsed, batcher.stats)

    # Phase 2: the same clients and backend capacity, one backend call per request.
    backend = _backend(config)
    rec = _Recorder("unbatched", backend)

    async def send_one(request: int) -> int:
        rec.sizes.append(1)
        return await backend.call_one(request)

    print("\nunbatched: each request is its own backend call", file=out)
    elapsed = await _phase(rec, config, view, send_one)
    unbatched = _result(rec, elapsed, None)

    result = DemoResult(config, batched, unbatched)
    out.write(format_summary(result))
    out.flush()
    return result


# -- the summary -------------------------------------------------------------------


def _describe(config: DemoConfig) -> str:
    budget = []
    if config.requests is not None:
        budget.append(f"{config.requests:,} requests")
    if config.duration is not None:
        budget.append(f"{config.duration:g} s")
    return (
        f"asyncbatch demo: {config.concurrency:,} concurrent clients,"
        f" each phase runs {' or '.join(budget)}{', whichever comes first' * (len(budget) > 1)}\n"
        f"backend: {_fmt_time(config.sink_latency)} per call"
        f" + {_fmt_time(config.per_item_cost)} per item, at most"
        f" {config.max_concurrency} calls at once\n"
        f"batcher: max_size={config.max_size}, max_wait={config.max_wait:g} s,"
        f" max_concurrency={config.max_concurrency}"
    )


def _ratio(better: float, worse: float) -> str:
    if not (better > 0 and worse > 0) or math.isinf(better) or math.isinf(worse):
        return "-"
    return f"{better / worse:,.1f}x"


def format_summary(result: DemoResult) -> str:
    """The comparison table printed at the end of the demo."""
    b, u = result.batched, result.unbatched

    def saved(p: PhaseResult) -> str:
        share = p.calls_saved / p.requests if p.requests else 0.0
        return f"{p.calls_saved:,} ({share:.1%})"

    rows = [
        ("", "batched", "unbatched"),
        ("requests served", f"{b.requests:,}", f"{u.requests:,}"),
        ("answers correct", f"{b.correct:,}", f"{u.correct:,}"),
        ("backend calls", f"{b.calls:,}", f"{u.calls:,}"),
        ("calls saved", saved(b), saved(u)),
        ("items per call", f"{b.items_per_call:,.1f}", f"{u.items_per_call:,.1f}"),
        ("batch size min..max", f"{b.min_batch}..{b.max_batch}", f"{u.min_batch}..{u.max_batch}"),
        ("elapsed", _fmt_time(b.elapsed), _fmt_time(u.elapsed)),
        ("throughput", _fmt_rate(b.throughput), _fmt_rate(u.throughput)),
        ("p50 latency", _fmt_time(b.p50), _fmt_time(u.p50)),
        ("p99 latency", _fmt_time(b.p99), _fmt_time(u.p99)),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    table = [
        f"  {label:<{widths[0]}}   {left:>{widths[1]}}   {right:>{widths[2]}}"
        for label, left, right in rows
    ]
    verdict = (
        f"batching: {_ratio(b.throughput, u.throughput)} the throughput,"
        f" {_ratio(u.p99, b.p99)} lower p99 latency,"
        f" {b.items_per_call:,.1f} requests per backend call instead of {u.items_per_call:,.1f}"
    )
    reasons = ", ".join(f"{k}={v:,}" for k, v in sorted(b.reasons.items()) if v) or "-"
    return "\n".join(
        [
            "",
            "Comparison (same clients, same backend):",
            *table,
            "",
            verdict,
            f"batcher dispatch reasons: {reasons}; peak pending {b.peak_pending:,}",
            "",
        ]
    )


# -- command line ------------------------------------------------------------------


def _number(kind: Callable[[str], float], low: float, strict: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < low or (strict and value == low) or math.isnan(value):
            sign = ">" if strict else ">="
            raise argparse.ArgumentTypeError(f"must be {sign} {low:g}, got {text}")
        if math.isinf(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        return value

    return parse


_count = _number(int, 1, strict=False)
_positive = _number(float, 0, strict=True)
_non_negative = _number(float, 0, strict=False)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The demo's options, added to ``parser`` (a new one when None)."""
    if parser is None:
        parser = argparse.ArgumentParser(prog="asyncbatch demo")
    parser.description = (
        "Simulate a service whose clients call a slow backend, once through a "
        "Batcher and once with one call per request, and compare the two."
    )
    add = parser.add_argument
    add("-n", "--requests", type=_count, metavar="N", help="requests per phase (default: no limit)")
    add(
        "--duration",
        type=_positive,
        metavar="SECONDS",
        help=f"seconds per phase (default: {DEFAULT_DURATION:g} unless --requests is given);"
        " with both, a phase ends at whichever comes first",
    )
    add(
        "-c",
        "--concurrency",
        type=_count,
        default=500,
        metavar="C",
        help="concurrent clients, each sending one request at a time (default: %(default)s)",
    )
    add(
        "--sink-latency",
        type=_non_negative,
        default=0.020,
        metavar="SECONDS",
        help="backend round trip per call, in seconds (default: %(default)g = 20 ms)",
    )
    add(
        "--per-item-cost",
        type=_non_negative,
        default=20e-6,
        metavar="SECONDS",
        help="backend work per item, in seconds (default: %(default)g = 20 µs)",
    )
    add(
        "--max-size",
        type=_count,
        default=128,
        metavar="N",
        help="Batcher max_size (default: %(default)s)",
    )
    add(
        "--max-wait",
        type=_non_negative,
        default=0.005,
        metavar="SECONDS",
        help="Batcher max_wait, in seconds like every duration of the API"
        " (default: %(default)g = 5 ms)",
    )
    add(
        "--max-concurrency",
        type=_count,
        default=4,
        metavar="N",
        help="Batcher max_concurrency, and the calls the backend serves at once in both"
        " phases (default: %(default)s)",
    )
    add(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="event loop (default: %(default)s; uvloop must be installed)",
    )
    add(
        "--no-live",
        dest="live",
        action="store_false",
        help="print no live status while the phases run, only the summary",
    )
    return parser


def _config(args: argparse.Namespace) -> DemoConfig:
    duration: float | None = args.duration
    if duration is None and args.requests is None:
        duration = DEFAULT_DURATION
    return DemoConfig(
        requests=args.requests,
        duration=duration,
        concurrency=int(args.concurrency),
        sink_latency=args.sink_latency,
        per_item_cost=args.per_item_cost,
        max_size=int(args.max_size),
        max_wait=args.max_wait,
        max_concurrency=int(args.max_concurrency),
        live=args.live,
    )


def _loop_factory(name: LoopName) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise SystemExit(
                "asyncbatch demo: --loop uvloop needs uvloop, which is not installed"
                " (pip install 'asyncbatch[uvloop]'), or use --loop asyncio"
            ) from None
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the demo for parsed arguments; the exit status."""
    out = sys.stdout if out is None else out
    config = _config(args)
    try:
        factory = _loop_factory(args.loop)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(run_demo(config, out))
        except KeyboardInterrupt:  # pragma: no cover - needs a real Ctrl-C
            print("\ninterrupted", file=out)
            return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``asyncbatch demo [options]`` without the ``demo`` word."""
    args = build_parser().parse_args(argv)
    return run(args)
