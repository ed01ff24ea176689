"""asyncbatch's ``Batcher``, configured like the others and with its defaults."""

from __future__ import annotations

from asyncbatch import Batcher

from . import Handle, Settings, Sink


async def open_tuned(sink: Sink, settings: Settings) -> Handle:
    batcher: Batcher[int, int] = Batcher(
        sink,
        max_size=settings.max_size,
        max_wait=0,
        max_concurrency=settings.concurrency,
        name="compare",
    )
    return Handle(batcher.submit, batcher.aclose)


async def open_defaults(sink: Sink, settings: Settings) -> Handle:
    batcher: Batcher[int, int] = Batcher(sink, name="compare-defaults")
    return Handle(batcher.submit, batcher.aclose)


async def open_nowait(sink: Sink, settings: Settings) -> Handle:
    """``submit_nowait``: returns the item's future, like a DataLoader's ``load``."""
    batcher: Batcher[int, int] = Batcher(
        sink,
        max_size=settings.max_size,
        max_wait=0,
        max_concurrency=settings.concurrency,
        name="compare-nowait",
    )
    return Handle(batcher.submit_nowait, batcher.aclose)
