"""``batched`` (PyPI): ``batched.aio.AsyncBatchProcessor``.

A background task started on the first call polls an ``asyncio.Queue``: when
fewer than ``batch_size`` items wait it sleeps ``timeout_ms`` (0 here: one
loop iteration), then cuts what is queued into batches and awaits the sink
for each, one at a time. It has no close; the adapter cancels that task.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import Handle, Settings, Sink


async def open_batched(sink: Sink, settings: Settings) -> Handle:
    from batched.aio import AsyncBatchProcessor

    processor: Any = AsyncBatchProcessor(sink, batch_size=settings.max_size, timeout_ms=0.0)

    async def close() -> None:
        task: asyncio.Task[None] | None = processor._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # The processor itself is the submit function: ``await processor(x)``.
    return Handle(processor, close)
