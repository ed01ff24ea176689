"""DataLoader throughput: asyncbatch vs aiodataloader vs strawberry.

Each run makes 100,000 loads over 10,000 distinct keys (every key asked ten
times, in shuffled order) through a fresh loader per repeat, the way a
per-request loader lives, with the same identity batch function and the same
``max_batch_size`` (1000) for every library. Workloads:

- ``gather``: ``await asyncio.gather(*(loader.load(k) for k in keys))``, every
  load issued in one loop iteration (graphql/dataloader's ``Promise.all``).
- ``load_many``: ``await loader.load_many(keys)``, one call.
- ``resolvers``: 100 waves of 1,000 resolver tasks, each doing
  ``await loader.load(k)``; a wave is gathered before the next starts, as a
  GraphQL executor resolves a list field level by level. Task creation is
  most of the cost here, for every library.

The three libraries run interleaved inside every repeat, on the same loop, so
machine noise hits them alike; the table shows medians over the repeats, and
the ratio of asyncbatch's throughput to the faster of the other two. Time is
wall-clock; ``--cpu`` measures the process's CPU time instead, steadier on a
shared machine.

    .venv/bin/python benchmarks/dataloader.py [--repeats 7] [--loops asyncio,uvloop]
        [--workloads gather,load_many,resolvers] [--cpu] [--floors]

``--floors`` adds two "loaders" that do the least any loader can (no checks,
no errors, no cancellation handling; ``FloorLoader``), for ``gather`` and
``resolvers``: ``floor/shared`` hands every caller of a key one shared
future, as aiodataloader and strawberry do; ``floor/per-caller`` gives every
caller of a pending key its own future, the least that per-caller
cancellation needs. Their "vs best other" column, ``max N``, is the highest
ratio any loader of that kind could reach here: where it is below the target,
the workload's own cost (a future per caller and its ``gather`` callback, a
task per resolver) rules the target out, whatever the loader does.

What the numbers mean: asyncbatch hands every caller of a pending key its
own future, so that one caller's cancellation (a timeout in one resolver)
cannot cancel the load for the others; aiodataloader and strawberry hand all
of them one shared future, which ``gather`` counts once. That is most of the
difference in ``gather``, where 90,000 of the loads wait on a key already
loading: ``floor/per-caller`` shows what those 100,000 futures cost by
themselves. A finished key is shared by every library (cancelling a done
future does nothing). ``load_many`` needs no future per load.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiodataloader
from strawberry.dataloader import DataLoader as StrawberryLoader

from asyncbatch import DataLoader

LOADS = 100_000
DISTINCT = 10_000
BATCH = 1000
WAVE = 1000


class Loader(Protocol):
    def load(self, key: int) -> Awaitable[int]: ...


async def identity(keys: Sequence[int]) -> list[int]:
    return list(keys)


def make_asyncbatch() -> Any:
    return DataLoader(identity, max_batch_size=BATCH)


def make_aiodataloader() -> Any:
    return aiodataloader.DataLoader(identity, max_batch_size=BATCH)


def make_strawberry() -> Any:
    return StrawberryLoader(identity, max_batch_size=BATCH)


class FloorLoader:
    """The least a DataLoader can do: a bound for the table, not a loader.

    One future per key in a dict; new keys go to the batch function at the
    end of the loop iteration, ``max_batch_size`` at a time (a task per
    chunk), and their results are set on the keys' futures. No checks, no
    errors, no cancellation. ``per_caller``: every load of a pending key
    gets its own future, set in the same step as the key's (the least that
    per-caller cancellation needs); otherwise every caller gets the key's
    future.
    """

    def __init__(self, fn: Callable[[list[int]], Awaitable[list[int]]], per_caller: bool) -> None:
        self._fn = fn
        self._per_caller = per_caller
        self._loop = asyncio.get_running_loop()
        self._futs: dict[int, asyncio.Future[int]] = {}
        self._callers: dict[int, list[asyncio.Future[int]]] = {}
        self._queue: list[int] = []

    def load(self, key: int) -> asyncio.Future[int]:
        fut = self._futs.get(key)
        if fut is None:
            fut = self._futs[key] = self._loop.create_future()
            if not self._queue:
                self._loop.call_soon(self._dispatch)
            self._queue.append(key)
        elif fut.done():
            return fut
        if not self._per_caller:
            return fut
        caller: asyncio.Future[int] = self._loop.create_future()
        callers = self._callers.get(key)
        if callers is None:
            self._callers[key] = [caller]
        else:
            callers.append(caller)
        return caller

    def _dispatch(self) -> None:
        queue, self._queue = self._queue, []
        for i in range(0, len(queue), BATCH):
            self._loop.create_task(self._run(queue[i : i + BATCH]))

    async def _run(self, keys: list[int]) -> None:
        values = await self._fn(keys)
        futs, callers = self._futs, self._callers
        for key, value in zip(keys, values, strict=True):
            futs[key].set_result(value)
            for caller in callers.pop(key, ()):
                caller.set_result(value)


LIBRARIES: dict[str, Callable[[], Any]] = {
    "asyncbatch": make_asyncbatch,
    "aiodataloader": make_aiodataloader,
    "strawberry": make_strawberry,
}
COMPETITORS = ("aiodataloader", "strawberry")
FLOORS: dict[str, Callable[[], Any]] = {
    "floor/shared": lambda: FloorLoader(identity, per_caller=False),
    "floor/per-caller": lambda: FloorLoader(identity, per_caller=True),
}
FLOOR_WORKLOADS = ("gather", "resolvers")  # load_many needs no future per load


async def run_gather(loader: Any, keys: list[int]) -> list[int]:
    return list(await asyncio.gather(*[loader.load(k) for k in keys]))


async def run_load_many(loader: Any, keys: list[int]) -> list[int]:
    return list(await loader.load_many(keys))


async def run_resolvers(loader: Any, keys: list[int]) -> list[int]:
    async def resolve(key: int) -> int:
        value: int = await loader.load(key)
        return value

    out: list[int] = []
    for i in range(0, len(keys), WAVE):
        out += await asyncio.gather(*[resolve(k) for k in keys[i : i + WAVE]])
    return out


WORKLOADS: dict[str, Callable[[Any, list[int]], Awaitable[list[int]]]] = {
    "gather": run_gather,
    "load_many": run_load_many,
    "resolvers": run_resolvers,
}


CLOCK: Callable[[], float] = time.perf_counter


async def measure(
    workload: Callable[[Any, list[int]], Awaitable[list[int]]],
    make: Callable[[], Any],
    keys: list[int],
) -> float:
    loader = make()
    gc.collect()
    start = CLOCK()
    values = await workload(loader, keys)
    elapsed = CLOCK() - start
    if values != keys:
        raise AssertionError("wrong values")
    if hasattr(loader, "aclose"):
        await loader.aclose()
    return elapsed


def contenders(workload: str, floors: bool) -> dict[str, Callable[[], Any]]:
    if floors and workload in FLOOR_WORKLOADS:
        return {**LIBRARIES, **FLOORS}
    return LIBRARIES


async def bench(
    repeats: int, workloads: list[str], floors: bool
) -> dict[tuple[str, str], list[float]]:
    rng = random.Random(42)
    keys = [k for k in range(DISTINCT) for _ in range(LOADS // DISTINCT)]
    rng.shuffle(keys)
    times: dict[tuple[str, str], list[float]] = {}
    for name in workloads:
        workload = WORKLOADS[name]
        makers = contenders(name, floors)
        for make in makers.values():  # warm-up
            await measure(workload, make, keys[:5000])
        for r in range(repeats):
            # Rotate the order so that no library always runs first.
            libs = list(makers)
            libs = libs[r % len(libs) :] + libs[: r % len(libs)]
            for lib in libs:
                t = await measure(workload, makers[lib], keys)
                times.setdefault((name, lib), []).append(t)
    return times


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--cpu", action="store_true", help="CPU time instead of wall time")
    parser.add_argument(
        "--floors",
        action="store_true",
        help="add the floor/shared and floor/per-caller bounds (gather, resolvers)",
    )
    args = parser.parse_args(argv)
    workloads = args.workloads.split(",")
    global CLOCK
    CLOCK = time.process_time if args.cpu else time.perf_counter
    print(
        f"{LOADS:,} loads over {DISTINCT:,} distinct keys, max_batch_size={BATCH}, "
        f"median of {args.repeats} repeats, {'CPU' if args.cpu else 'wall'} time, "
        f"Python {sys.version.split()[0]}"
    )
    header = (
        f"{'loop':8} {'workload':10} {'library':16} {'loads/s':>12} {'us/load':>9} "
        f"{'vs best other':>14}"
    )
    print(header)
    print("-" * len(header))
    for loop_name in args.loops.split(","):
        with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
            times = runner.run(bench(args.repeats, workloads, args.floors))
        for name in workloads:
            libs = contenders(name, args.floors)
            medians = {lib: statistics.median(times[(name, lib)]) for lib in libs}
            best_other = min(medians[lib] for lib in COMPETITORS)
            for lib, t in medians.items():
                ratio = ""
                if lib == "asyncbatch":
                    ratio = f"{best_other / t:.2f}x"
                elif lib in FLOORS:
                    ratio = f"max {best_other / t:.2f}x"
                print(
                    f"{loop_name:8} {name:10} {lib:16} {LOADS / t:>12,.0f} "
                    f"{t / LOADS * 1e6:>9.2f} {ratio:>14}"
                )


if __name__ == "__main__":
    main()
