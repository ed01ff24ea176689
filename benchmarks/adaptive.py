"""Adaptive concurrency against simulated backends (issue 13), on a virtual clock.

``Batcher(max_concurrency=Adaptive())`` is run against three backends
simulated in this process, next to every static ``max_concurrency`` in
1, 2, 4, 8, 16, 32, under the same offered load: many callers, each awaiting
``submit`` in a loop (a closed loop: a caller submits its next item when its
last one is answered, so throughput and latency both show what a setting is
worth). Every run uses the same batcher options (``max_size``, ``max_wait=0``)
and the same random seed; ``Adaptive()`` is told nothing about the backend.

Backends (a sink call of ``n`` items costs ``a + b*n`` seconds, times a
uniform jitter of +-10 %):

(a) ``knee``: ``C`` servers; calls beyond ``C`` at once wait for one, in order.
(b) ``ratelimit``: as many servers as needed, but a token bucket of ``R``
    calls/s; a call above it answers 429 at once (an exception with
    ``retry_after``), and the batcher's ``Retry`` waits that long and tries again.
(c) ``capacity``: as (a), but ``C`` halves for the middle third of the run and
    then recovers. Reported also: the settling time after each change, and a
    plot of the limit and the latency over time.

The clock is virtual (:class:`VirtualClockLoop`): ``loop.time()`` jumps to the
next timer whenever nothing is ready, so a run of many simulated seconds takes
well under a second of CPU per simulated second, and every number is exact and
the same on every run (the machine's load does not enter).

Columns: throughput (items answered per simulated second, after a warm-up),
p50 and p99 of the per-item latency (submit to answer), 429s (sink calls that
were answered 429), limit (the mean limit in force, for ``Adaptive``).

Usage (from the repository root)::

    .venv/bin/python benchmarks/adaptive.py                 # all three backends
    .venv/bin/python benchmarks/adaptive.py --backends knee --duration 10
    .venv/bin/python benchmarks/adaptive.py --results benchmarks/RESULTS.md

``--results`` writes the report into its section of ``RESULTS.md`` (between
``<!-- adaptive.py: begin -->`` and ``<!-- adaptive.py: end -->``, which
``compare.py`` keeps) and the plot into ``benchmarks/plots/``. Exit status 1
when a target of issue 13 is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import random
import selectors
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import _common

_common.use_checkout()

from asyncbatch import Adaptive, Batcher, Retry  # noqa: E402

STATIC = (1, 2, 4, 8, 16, 32)
ADAPTIVE: Callable[[], Adaptive] = Adaptive  # what runs as "Adaptive()"
BEGIN = "<!-- adaptive.py: begin -->"
END = "<!-- adaptive.py: end -->"
TITLE = "## Adaptive concurrency vs static max_concurrency (benchmarks/adaptive.py)"
PLOTS = _common.REPO_ROOT / "benchmarks" / "plots"

# Targets of issue 13.
THROUGHPUT_SHARE = 0.95  # of the best static setting's throughput
P99_RATIO = 1.1  # of that setting's p99
SETTLE = 2.0  # seconds after a capacity change


# -- virtual clock -------------------------------------------------------------


class _Clock:
    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0


class _VirtualSelector(selectors.SelectSelector):
    """Polls without blocking; where the loop would sleep, advances the clock instead."""

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise RuntimeError("virtual clock: nothing ready and no timer: the run is stuck")
        self._clock.now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose ``time()`` only moves when every task waits for a timer."""

    def __init__(self) -> None:
        self._clock = _Clock()
        super().__init__(_VirtualSelector(self._clock))

    def time(self) -> float:
        return self._clock.now


# -- simulated backends ----------------------------------------------------------


class Overloaded(Exception):
    """HTTP 429 Too Many Requests, with the server's ``Retry-After`` (seconds)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"429 Too Many Requests (Retry-After: {retry_after:.3f} s)")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Backend:
    """One simulated backend: cost ``a + b*n`` seconds (+- jitter) per call of ``n`` items."""

    key: str
    title: str
    a: float
    b: float
    jitter: float = 0.1
    servers: int | None = None  # None: as many as needed
    rate: float | None = None  # calls/s allowed (token bucket), None: no limit
    burst: float = 10.0  # token bucket depth (calls)
    retry_after: float = 0.05  # what a 429 says, seconds
    reject_cost: float = 0.002  # seconds a 429 takes
    # (from, to) in fractions of the run where ``servers`` is halved
    halved: tuple[float, float] | None = None
    callers: int = 768  # closed-loop callers (offered load)


BACKENDS = {
    "knee": Backend(
        "knee",
        "(a) a + b*n per call, 8 servers (calls beyond 8 wait)",
        a=0.020,
        b=0.00025,
        servers=8,
    ),
    "ratelimit": Backend(
        "ratelimit",
        "(b) a + b*n per call, 429 + Retry-After above 200 calls/s",
        a=0.010,
        b=0.0002,
        rate=200.0,
    ),
    "capacity": Backend(
        "capacity",
        "(c) a + b*n per call, 16 servers, 8 in the middle third of the run",
        a=0.020,
        b=0.00025,
        servers=16,
        halved=(1 / 3, 2 / 3),
        callers=1536,  # enough to keep 16 servers busy
    ),
}


class Simulation:
    """The backend's state during one run: servers in use, waiting calls, tokens."""

    def __init__(self, backend: Backend, rng: random.Random, loop: asyncio.AbstractEventLoop):
        self.backend = backend
        self.rng = rng
        self.loop = loop
        self.capacity = backend.servers
        self.busy = 0
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.tokens = backend.burst
        self.refilled = 0.0
        self.rejected = 0

    def set_capacity(self, servers: int) -> None:
        self.capacity = servers
        self._wake()

    def _wake(self) -> None:
        while self.waiting and (self.capacity is None or self.busy < self.capacity):
            self.busy += 1
            self.waiting.popleft().set_result(None)

    async def call(self, items: list[int]) -> list[int]:
        backend, loop = self.backend, self.loop
        if backend.rate is not None:
            now = loop.time()
            self.tokens = min(backend.burst, self.tokens + (now - self.refilled) * backend.rate)
            self.refilled = now
            if self.tokens < 1:
                self.rejected += 1
                await asyncio.sleep(backend.reject_cost)
                raise Overloaded(backend.retry_after)
            self.tokens -= 1
        if self.capacity is not None and (self.busy >= self.capacity or self.waiting):
            waiter = loop.create_future()
            self.waiting.append(waiter)
            await waiter  # the releasing call counted us in busy
        else:
            self.busy += 1
        try:
            cost = backend.a + backend.b * len(items)
            await asyncio.sleep(cost * self.rng.uniform(1 - backend.jitter, 1 + backend.jitter))
        finally:
            self.busy -= 1
            self._wake()
        return items


# -- one run ---------------------------------------------------------------------


@dataclass
class Run:
    setting: str
    throughput: float
    p50: float
    p99: float
    rejected: int
    mean_limit: float
    # (time, limit, mean latency of items answered in the last tick)
    trace: list[tuple[float, float, float]] = field(default_factory=list)
    # (time, items answered in that tick)
    done: list[tuple[float, int]] = field(default_factory=list)


async def _run(
    backend: Backend,
    setting: int | None,
    *,
    callers: int,
    duration: float,
    warmup: float,
    max_size: int,
    seed: int,
    tick: float,
    think: float,
) -> Run:
    loop = asyncio.get_running_loop()
    sim = Simulation(backend, random.Random(seed), loop)
    policy = ADAPTIVE() if setting is None else None
    retry = Retry(attempts=math.inf, backoff=0.01, jitter=True) if backend.rate else None
    batcher: Batcher[int, int] = Batcher(
        sim.call,
        max_size=max_size,
        max_concurrency=policy if policy is not None else setting,
        retry=retry,
    )
    latencies: list[float] = []  # of items submitted after the warm-up
    answered = 0  # items answered after the warm-up
    answered_in_tick = 0
    tick_latency = 0.0
    stop = False

    async def caller(i: int) -> None:
        nonlocal answered, answered_in_tick, tick_latency
        pause = random.Random(seed * 1_000_003 + i).expovariate
        while not stop:
            await asyncio.sleep(pause(1 / think))
            t0 = loop.time()
            await batcher.submit(i)
            t1 = loop.time()
            if warmup <= t0 and t1 < duration:
                latencies.append(t1 - t0)
            if warmup <= t1 < duration:
                answered += 1
            answered_in_tick += 1
            tick_latency += t1 - t0

    trace: list[tuple[float, float, float]] = []
    done: list[tuple[float, int]] = []
    limits: list[int] = []

    async def ticker() -> None:
        nonlocal answered_in_tick, tick_latency
        halved = backend.halved
        assert backend.servers is not None or halved is None
        while loop.time() < duration:
            await asyncio.sleep(tick)
            now = loop.time()
            if halved is not None and backend.servers is not None:
                half = halved[0] * duration <= now < halved[1] * duration
                sim.set_capacity(backend.servers // 2 if half else backend.servers)
            limit = batcher.stats.concurrency_limit
            if now > warmup:
                limits.append(limit)
            mean = tick_latency / answered_in_tick if answered_in_tick else math.nan
            trace.append((now, limit, mean))
            done.append((now, answered_in_tick))
            answered_in_tick, tick_latency = 0, 0.0

    async with batcher:
        tasks = [loop.create_task(caller(i)) for i in range(callers)]
        await ticker()
        stop = True
        await asyncio.gather(*tasks)
    latencies.sort()
    measured = duration - warmup
    return Run(
        setting="Adaptive()" if setting is None else str(setting),
        throughput=answered / measured,
        p50=_quantile(latencies, 0.50),
        p99=_quantile(latencies, 0.99),
        rejected=sim.rejected,
        mean_limit=sum(limits) / len(limits) if limits else math.nan,
        trace=trace,
        done=done,
    )


def _quantile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def run(backend: Backend, setting: int | None, **options: float) -> Run:
    """One run on a fresh virtual-clock loop."""
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(_run(backend, setting, **options))  # type: ignore[arg-type]
    finally:
        loop.close()


# -- settling, plot, report --------------------------------------------------------


def _changes(backend: Backend, duration: float) -> list[float]:
    if backend.halved is None:
        return []
    return [backend.halved[0] * duration, backend.halved[1] * duration]


def _rolling(done: Sequence[tuple[float, int]], tick: float, span: float) -> list[float]:
    """Items/s over the last ``span`` seconds, at every tick."""
    width = max(1, round(span / tick))
    counts = [n for _, n in done]
    return [sum(counts[max(0, i + 1 - width) : i + 1]) / (width * tick) for i in range(len(counts))]


def settling(
    adaptive: Run, best: Run, backend: Backend, duration: float, tick: float
) -> list[float]:
    """Seconds after each capacity change until Adaptive's throughput stays near the best's.

    Throughput is taken over a sliding 0.25 s; "near" is 90 % of what the best
    static setting sustains in the second half of the same phase. ``inf``:
    it never stayed there before the next change.
    """
    changes = _changes(backend, duration)
    if not changes:
        return []
    ends = [*changes[1:], duration]
    ours = _rolling(adaptive.done, tick, 0.25)
    theirs = _rolling(best.done, tick, 0.25)
    times = [t for t, _ in adaptive.done]
    out = []
    for change, end in zip(changes, ends, strict=True):
        phase = [i for i, t in enumerate(times) if change < t <= end]
        second_half = [theirs[i] for i in phase if times[i] > (change + end) / 2]
        target = 0.9 * sum(second_half) / len(second_half)
        settled = math.inf
        for i in reversed(phase):
            if ours[i] < target:
                break
            settled = times[i] - tick - change
        out.append(max(0.0, settled))
    return out


def write_svg(path: Path, title: str, runs: Sequence[Run], changes: Sequence[float]) -> None:
    """Limit and mean latency over time, one panel each, as a plain SVG (no plotting library)."""
    width, height, left, right, top, gap = 900, 560, 70, 20, 40, 50
    panel = (height - top - gap - 40) / 2
    t_max = max(t for run in runs for t, _, _ in run.trace)
    colours = {"Adaptive()": "#d62728"}
    palette = iter(["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#7f7f7f", "#bcbd22"])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="15">{title}</text>',
    ]

    def x_of(t: float) -> float:
        return left + (width - left - right) * t / t_max

    for index, (label, pick) in enumerate(
        (("concurrency limit", 1), ("mean latency (ms), per 50 ms", 2))
    ):
        y0 = top + index * (panel + gap)
        values = [
            (row[pick] * (1e3 if pick == 2 else 1))
            for run in runs
            for row in run.trace
            if not math.isnan(row[pick])
        ]
        v_max = max(values) * 1.05
        parts.append(
            f'<rect x="{left}" y="{y0}" width="{width - left - right}" height="{panel}" '
            f'fill="none" stroke="#999"/>'
        )
        parts.append(f'<text x="{left}" y="{y0 - 6}">{label}</text>')
        for k in range(5):
            v = v_max * k / 4
            y = y0 + panel - panel * k / 4
            parts.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{v:.0f}</text>')
        for change in changes:
            parts.append(
                f'<line x1="{x_of(change):.1f}" x2="{x_of(change):.1f}" y1="{y0}" '
                f'y2="{y0 + panel}" stroke="#999" stroke-dasharray="4 3"/>'
            )
        for run in runs:
            colour = colours.setdefault(run.setting, next(palette, "#000"))
            scale = 1e3 if pick == 2 else 1.0
            points = " ".join(
                f"{x_of(row[0]):.1f},{y0 + panel - panel * row[pick] * scale / v_max:.1f}"
                for row in run.trace
                if not math.isnan(row[pick])
            )
            stroke = 2 if run.setting == "Adaptive()" else 1
            parts.append(
                f'<polyline points="{points}" fill="none" stroke="{colour}" '
                f'stroke-width="{stroke}"/>'
            )
    for k in range(int(t_max) + 1):
        parts.append(f'<text x="{x_of(k):.1f}" y="{height - 28}" text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">seconds</text>')
    for i, run in enumerate(runs):
        parts.append(
            f'<text x="{width - right - 10}" y="{top + 16 + 15 * i}" text-anchor="end" '
            f'fill="{colours[run.setting]}">max_concurrency={run.setting}</text>'
        )
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


@dataclass
class Verdict:
    backend: Backend
    runs: list[Run]
    best: Run
    adaptive: Run
    settle: list[float]

    @property
    def share(self) -> float:
        return self.adaptive.throughput / self.best.throughput

    @property
    def p99_ratio(self) -> float:
        return self.adaptive.p99 / self.best.p99

    @property
    def met(self) -> bool:
        ok = self.share >= THROUGHPUT_SHARE and self.p99_ratio <= P99_RATIO
        return ok and all(s <= SETTLE for s in self.settle)


def measure(backend: Backend, args: argparse.Namespace) -> Verdict:
    runs = []
    for setting in [*STATIC, None]:
        runs.append(
            run(
                backend,
                setting,
                callers=backend.callers,
                duration=args.duration,
                warmup=args.warmup,
                max_size=args.max_size,
                seed=args.seed,
                tick=args.tick,
                think=args.think,
            )
        )
        print(f"  {backend.key} {runs[-1].setting}: {runs[-1].throughput:,.0f} items/s", flush=True)
    static = runs[:-1]
    best = max(static, key=lambda r: (r.throughput, -r.p99))
    adaptive = runs[-1]
    settle = settling(adaptive, best, backend, args.duration, args.tick)
    return Verdict(backend, runs, best, adaptive, settle)


def report(verdicts: Sequence[Verdict], args: argparse.Namespace, command: str) -> str:
    lines = [
        f"Generated by `{command}` (virtual clock: exact and the same on every run). "
        f"Each run: {args.duration:g} simulated s, the first {args.warmup:g} s not counted "
        f"(throughput counts items answered after it; latency, items submitted after it); "
        f"`max_size={args.max_size}`, `max_wait=0`; closed-loop callers with an "
        f"exponential think time of mean {args.think * 1e3:g} ms; call cost jitter +-10 %; "
        f"seed {args.seed}. Best static: the highest throughput.",
        "",
    ]
    for v in verdicts:
        b = v.backend
        lines += [
            f"### {b.title}",
            "",
            f"a = {b.a * 1e3:g} ms, b = {b.b * 1e3:g} ms/item, {b.callers} callers"
            + (
                f", Retry-After {b.retry_after * 1e3:g} ms, bucket depth {b.burst:g}"
                if b.rate
                else ""
            )
            + ".",
            "",
        ]
        rows = []
        for r in v.runs:
            mark = " (best static)" if r is v.best else ""
            rows.append(
                [
                    f"{r.setting}{mark}",
                    f"{r.throughput:,.0f}",
                    f"{r.throughput / v.best.throughput:.2f}",
                    f"{r.p50 * 1e3:.1f}",
                    f"{r.p99 * 1e3:.1f}",
                    f"{r.p99 / v.best.p99:.2f}",
                    f"{r.rejected}",
                    f"{r.mean_limit:.1f}",
                ]
            )
        lines.append(
            _common.markdown_table(
                [
                    "max_concurrency",
                    "items/s",
                    "vs best",
                    "p50 ms",
                    "p99 ms",
                    "p99 vs best",
                    "429s",
                    "mean limit",
                ],
                rows,
                right=[False, True, True, True, True, True, True, True],
            )
        )
        lines.append("")
        verdict = (
            f"Targets: throughput {v.share:.1%} of the best static (>= {THROUGHPUT_SHARE:.0%}): "
            f"{'met' if v.share >= THROUGHPUT_SHARE else 'MISSED'}; p99 {v.p99_ratio:.2f}x of its "
            f"(<= {P99_RATIO}x): {'met' if v.p99_ratio <= P99_RATIO else 'MISSED'}"
        )
        if v.settle:
            pretty = ", ".join("never" if math.isinf(s) else f"{s:.2f} s" for s in v.settle)
            ok = all(s <= SETTLE for s in v.settle)
            verdict += (
                f"; settling after the capacity halves and after it recovers: {pretty} "
                f"(<= {SETTLE:g} s): {'met' if ok else 'MISSED'}. Settled: throughput over a "
                f"sliding 0.25 s stays >= 90 % of what the best static setting sustains in the "
                f"second half of that phase. Plot: [plots/adaptive_capacity.svg]"
                f"(plots/adaptive_capacity.svg)"
            )
        lines += [verdict + ".", ""]
    return "\n".join(lines).rstrip("\n")


def write_section(path: str, body: str) -> None:
    """Put ``body`` under :data:`TITLE` between the markers in ``path`` (kept by compare.py)."""
    section = "\n".join([BEGIN, TITLE, "", body, "", END, ""])
    file = Path(path)
    text = file.read_text(encoding="utf-8") if file.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    file.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated keys")
    parser.add_argument("--duration", type=float, default=18.0, help="simulated seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="simulated seconds not counted")
    parser.add_argument("--max-size", type=int, default=64)
    parser.add_argument("--think", type=float, default=0.01, help="mean think time, seconds")
    parser.add_argument("--tick", type=float, default=0.05, help="trace resolution, seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--results", help="write the report into this RESULTS.md section")
    args = parser.parse_args(argv)
    keys = args.backends.split(",")
    unknown = [k for k in keys if k not in BACKENDS]
    if unknown:
        parser.error(f"unknown backends {unknown}; known: {list(BACKENDS)}")
    started = time.process_time()
    verdicts = [measure(BACKENDS[k], args) for k in keys]
    command = "python benchmarks/adaptive.py" + (
        " " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""
    )
    body = report(verdicts, args, command)
    body += f"\n\nCPU time for all runs: {time.process_time() - started:.0f} s."
    print(body)
    for v in verdicts:
        if v.backend.halved is not None and args.results:
            PLOTS.mkdir(parents=True, exist_ok=True)
            shown = [v.adaptive, *(r for r in v.runs if r.setting in ("8", "16"))]
            write_svg(
                PLOTS / "adaptive_capacity.svg",
                f"{v.backend.title}: limit and latency over time",
                shown,
                _changes(v.backend, args.duration),
            )
    if args.results:
        write_section(args.results, body)
    return 0 if all(v.met for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
