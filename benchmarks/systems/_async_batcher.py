"""``async-batcher`` (PyPI): a subclass of ``AsyncBatcher`` whose
``process_batch`` is the sink.

A background task takes the first item from an ``asyncio.Queue``, then every
item already queued (``max_queue_time=0``: no waiting), up to
``max_batch_size``, and runs the batch under a semaphore of ``concurrency``.
"""

from __future__ import annotations

from typing import Any

from . import Handle, Settings, Sink


async def open_async_batcher(sink: Sink, settings: Settings) -> Handle:
    from async_batcher.batcher import AsyncBatcher

    class SinkBatcher(AsyncBatcher):  # type: ignore[misc,type-arg,unused-ignore]
        async def process_batch(self, batch: list[int]) -> list[int]:
            return await sink(batch)

    batcher: Any = SinkBatcher(
        max_batch_size=max(settings.max_size, 2),  # it refuses max_batch_size=1
        max_queue_time=0.0,
        concurrency=settings.concurrency,
    )

    async def close() -> None:
        # stop() without force waits up to 1 s for its queue poll to time out;
        # every caller already has its result, so cancel instead.
        await batcher.stop(force=True)

    return Handle(batcher.process, close)
