"""Streaming per-entry overhead: ``Batcher.submit_stream`` against a hand-written floor.

    python benchmarks/streaming.py                 # writes its section of RESULTS.md
    python benchmarks/streaming.py --quick --no-write

The same work on both sides: ``S`` callers each want their own stream of
``T`` entries from one async generator that yields, each step, one entry per
caller (``await asyncio.sleep(0)`` per step, as a real model's step would
await something); every caller counts what it receives.

- *floor*: what one would write by hand with no batcher: a task iterates the
  generator and puts each entry on its caller's ``asyncio.Queue``, then a
  sentinel; each caller reads its queue until the sentinel.
- *asyncbatch*: ``Batcher(generator, max_size=S)``; each caller iterates
  ``batcher.submit_stream(item)`` (the ``S`` items make one batch, one
  generator call); the batcher is made and closed in the timed region.

Measured: CPU time of this process (``time.process_time``) per entry
delivered, so other processes on a shared machine count for little; both
systems in the same process, in interleaved rounds (A B, B A, ...), one
untimed warm-up round, the cyclic GC on (a user pays for it); medians of
``--repeat`` rounds and the ratio of the medians. A run whose callers did not
each receive exactly ``T`` entries is left out and reported.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import _common
from _common import LoopName, Summary

_common.use_checkout()

from asyncbatch import Batcher  # noqa: E402

System = Literal["floor", "asyncbatch"]
SYSTEMS: tuple[System, ...] = ("floor", "asyncbatch")
BEGIN = "<!-- streaming.py: begin -->"
END = "<!-- streaming.py: end -->"
TITLE = "## Streaming per-entry overhead (benchmarks/streaming.py)"
ENTRIES = 40_000  # entries per run, all callers together
SHAPES = (1, 16, 256)  # concurrent streams (callers) per run


async def decoder(items: list[int], steps: int) -> AsyncIterator[list[int]]:
    """The shared work: ``steps`` steps of one entry per item, one await per step."""
    for k in range(steps):
        await asyncio.sleep(0)
        yield [k] * len(items)


_DONE = object()


async def floor(streams: int, steps: int) -> list[int]:
    """One generator task feeding one queue per caller: no batcher."""
    queues: list[asyncio.Queue[object]] = [asyncio.Queue() for _ in range(streams)]

    async def pump() -> None:
        async for step in decoder(list(range(streams)), steps):
            for queue, entry in zip(queues, step, strict=True):
                queue.put_nowait(entry)
        for queue in queues:
            queue.put_nowait(_DONE)

    async def caller(queue: asyncio.Queue[object]) -> int:
        n = 0
        while await queue.get() is not _DONE:
            n += 1
        return n

    task = asyncio.create_task(pump())
    counts = await asyncio.gather(*(caller(q) for q in queues))
    await task
    return list(counts)


async def with_asyncbatch(streams: int, steps: int) -> list[int]:
    """The same callers and generator through ``Batcher.submit_stream``."""

    async def generate(items: list[int]) -> AsyncIterator[list[int]]:
        async for step in decoder(items, steps):
            yield step

    batcher = Batcher[int, int](generate, max_size=streams, name="bench")

    async def caller(item: int) -> int:
        n = 0
        async for _ in batcher.submit_stream(item):
            n += 1
        return n

    counts = await asyncio.gather(*(caller(i) for i in range(streams)))
    await batcher.aclose()
    return list(counts)


@dataclass(frozen=True)
class Row:
    loop: LoopName
    streams: int
    steps: int
    floor: Summary  # CPU µs per entry
    asyncbatch: Summary
    invalid: int

    @property
    def ratio(self) -> float:
        return _common.ratio(self.asyncbatch.median, self.floor.median)

    @property
    def added(self) -> float:
        """CPU µs per entry that asyncbatch adds to the floor (difference of medians)."""
        return self.asyncbatch.median - self.floor.median


def measure(loop_name: LoopName, streams: int, repeat: int, entries: int) -> Row:
    """Interleaved rounds of both systems on one loop; CPU µs per entry."""
    steps = max(1, entries // streams)
    total = streams * steps
    loop = _common.new_loop(loop_name)
    try:

        def run(system: System) -> float | None:
            body = floor if system == "floor" else with_asyncbatch
            with _common.gc_state(True):
                watch = _common.Stopwatch()
                counts = loop.run_until_complete(body(streams, steps))
                elapsed = watch.elapsed()
            if counts != [steps] * streams:
                return None
            return elapsed.cpu / total * 1e6

        samples = _common.interleaved(SYSTEMS, repeat, run)
    finally:
        loop.close()
    return Row(
        loop_name,
        streams,
        steps,
        Summary.of(samples.of("floor")),
        Summary.of(samples.of("asyncbatch")),
        sum(len(v) for v in samples.failures.values()),
    )


def table(rows: Sequence[Row]) -> str:
    headers = [
        "loop",
        "streams x steps",
        "floor µs/entry",
        "asyncbatch µs/entry",
        "added µs/entry",
        "asyncbatch / floor",
        "spread (floor, asyncbatch)",
    ]
    body = [
        [
            r.loop,
            f"{r.streams} x {r.steps}",
            f"{r.floor.median:.2f}",
            f"{r.asyncbatch.median:.2f}",
            f"{r.added:+.2f}",
            f"{r.ratio:.2f}x",
            f"{r.floor.spread:.0%}, {r.asyncbatch.spread:.0%}",
        ]
        for r in rows
    ]
    return _common.markdown_table(headers, body, right=[False, True, True, True, True, True, True])


def section(rows: Sequence[Row], repeat: int, loops: Sequence[LoopName]) -> str:
    env = _common.environment(loops)
    invalid = sum(r.invalid for r in rows)
    lines = [
        BEGIN,
        TITLE,
        "",
        f"Python {env['python']}, {env['platform']}, {env['cpus']} CPUs; "
        f"{', '.join(env['loops'])}; {env['time']}. Command: "
        f"`{' '.join(['python benchmarks/streaming.py', *env['argv']])}`.",
        "",
        "S callers each stream their own T entries from one async generator that yields "
        "one entry per caller per step (`await asyncio.sleep(0)` per step). *floor*: a "
        "task iterating the generator into one `asyncio.Queue` per caller, no batcher; "
        "*asyncbatch*: `Batcher(generator, max_size=S)` and `submit_stream` per caller. "
        f"CPU time of the process per entry delivered, medians of {repeat} interleaved "
        "rounds (spread: (max - min) / median); the ratio and the difference are of the "
        "medians of the same run. The GC is on.",
        "",
        table(rows),
        "",
    ]
    if invalid:
        lines += [f"{invalid} run(s) delivered the wrong number of entries and were left out.", ""]
    lines += [END, ""]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Put ``text`` in place of the previous section in ``path`` (or append it)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        new = head + text + tail
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeat", type=int, default=7, help="timed rounds per system (7)")
    p.add_argument("--entries", type=int, default=ENTRIES, help=f"entries per run ({ENTRIES})")
    p.add_argument("--quick", action="store_true", help="3 rounds of 5,000 entries")
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    p.add_argument("--out", type=Path, default=_common.REPO_ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.repeat, args.entries = 3, 5_000
    loops = _common.available_loops()
    rows: list[Row] = []
    for loop_name in loops:
        for streams in SHAPES:
            row = measure(loop_name, streams, args.repeat, args.entries)
            rows.append(row)
            print(
                f"{loop_name:8} {streams:4} streams: floor {row.floor.median:.2f} µs/entry, "
                f"asyncbatch {row.asyncbatch.median:.2f} µs/entry ({row.ratio:.2f}x)",
                file=sys.stderr,
            )
    text = section(rows, args.repeat, loops)
    print(text)
    if not args.no_write:
        write_section(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 1 if any(r.invalid for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
