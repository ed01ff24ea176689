"""Two reference points: the hand-written floor, and no batching at all."""

from __future__ import annotations

import asyncio

from overhead import CoroFloor, Floor

from . import Handle, Settings, Sink


async def open_floor(sink: Sink, settings: Settings) -> Handle:
    """``benchmarks/overhead.py``'s :class:`Floor`, unchanged (the same floor as there)."""
    floor = Floor(sink, settings.max_size)
    return Handle(floor.submit, floor.aclose)


async def open_floor_coro(sink: Sink, settings: Settings) -> Handle:
    """The floor behind an ``async def submit``: what keeping ``submit``'s contract costs.

    ``Batcher.submit`` must be a coroutine function (``create_task`` and
    ``TaskGroup.create_task`` take coroutines), so one coroutine frame per
    item is the least any contract-keeping ``submit`` adds to the floor;
    aiodataloader's and strawberry's ``load`` return a bare future instead.
    """
    floor = CoroFloor(sink, settings.max_size)
    return Handle(floor.submit_coro, floor.aclose)


async def open_naive(sink: Sink, settings: Settings) -> Handle:
    """One sink call per item: what batching is measured against."""

    async def submit(x: int) -> int:
        return (await sink([x]))[0]

    async def close() -> None:
        await asyncio.sleep(0)

    return Handle(submit, close)
