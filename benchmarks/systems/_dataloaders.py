"""DataLoader-style coalescers: aiodataloader and strawberry's ``DataLoader``.

Both are key loaders with a cache; the cache is switched off (``cache=False``)
so that every ``load`` is one item for the sink, as with the other systems
(the items of a run are distinct anyway). Neither has a close: once every
caller has its result, nothing of theirs is left to wait for.
"""

from __future__ import annotations

import asyncio

from . import Handle, Settings, Sink


async def _nothing_to_close() -> None:
    await asyncio.sleep(0)  # let a finished dispatch task take its last step


async def open_aiodataloader(sink: Sink, settings: Settings) -> Handle:
    from aiodataloader import DataLoader

    loader: DataLoader[int, int] = DataLoader(
        sink,  # type: ignore[arg-type]  # it asks for a Coroutine; any awaitable works
        max_batch_size=settings.max_size,
        cache=False,
    )
    return Handle(loader.load, _nothing_to_close)


async def open_strawberry(sink: Sink, settings: Settings) -> Handle:
    from strawberry.dataloader import DataLoader

    loader: DataLoader[int, int] = DataLoader(sink, max_batch_size=settings.max_size, cache=False)
    return Handle(loader.load, _nothing_to_close)
