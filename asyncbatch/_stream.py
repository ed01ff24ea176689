"""``chunks``: micro-batch an async stream by size and time.

One async generator wraps the source. While a batch is open, a single reader
task pulls items into it (one task per batch, not per item); the consumer waits
on that task with the batch's deadline. When the deadline passes first, the
reader keeps its pending ``__anext__`` and hands the item it gets to the next
batch, so a timeout never loses an item.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from typing import TypeVar

__all__ = ["chunks"]

T = TypeVar("T")


def chunks(
    aiterable: AsyncIterable[T], max_size: int = 100, max_wait: float = 1.0
) -> AsyncGenerator[list[T], None]:
    """Group the items of an async iterable into lists.

    ::

        async with contextlib.aclosing(chunks(events(), max_size=500, max_wait=0.2)) as batches:
            async for batch in batches:
                await bulk_insert(batch)

    A batch is yielded when it holds ``max_size`` items, or ``max_wait`` seconds
    after it received its first item, whichever comes first; the last, partial
    batch is yielded when the source is exhausted. Batches are never empty.
    ``max_wait=0`` yields whatever the source delivers without waiting for
    time to pass; ``max_wait=math.inf`` yields only full batches (and the last).

    The wait is measured on the event loop's clock from the moment the batch
    gets its first item. While you process a batch that was cut by time, one
    read from the source stays pending; the item it brings opens the next batch
    when you ask for it (the clock of that batch starts then). A batch cut by
    size leaves no read pending, so the source is never pulled ahead of you
    by more than one item.

    Errors: an exception raised by the source is raised to you after the items
    read before it have been yielded. ``ValueError`` at the call for a bad
    ``max_size`` or ``max_wait``.

    Closing: closing the generator (``aclose()``, or leaving
    ``contextlib.aclosing``) cancels the pending read, if any, and closes the
    source (its ``aclose()``, when it has one); nothing is left running. A
    bare ``break`` out of ``async for`` leaves the closing to the garbage
    collector and the event loop's async-generator hooks, as with any async
    generator: use ``contextlib.aclosing`` to close at once. Cancelling the
    consumer does the same cleanup.
    """
    if isinstance(max_size, bool) or not isinstance(max_size, int):
        raise TypeError(f"max_size must be an int, got {max_size!r}")
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    if not isinstance(max_wait, int | float) or isinstance(max_wait, bool):
        raise TypeError(f"max_wait must be a number of seconds, got {max_wait!r}")
    if math.isnan(max_wait) or max_wait < 0:
        raise ValueError(f"max_wait must be >= 0, got {max_wait}")
    if not isinstance(aiterable, AsyncIterable):
        raise TypeError(f"chunks() needs an async iterable, got {type(aiterable).__name__}")
    return _chunks(aiter(aiterable), max_size, None if math.isinf(max_wait) else float(max_wait))


async def _chunks(
    source: AsyncIterator[T], max_size: int, max_wait: float | None
) -> AsyncGenerator[list[T], None]:
    loop = asyncio.get_running_loop()
    buf: list[T] = []
    # True while the consumer waits for the open batch: the reader keeps
    # filling it. False while a batch is out with the consumer: the reader
    # stops after the one item it was already waiting for.
    waiting = False
    reader: asyncio.Task[bool] | None = None
    eof = False
    error: BaseException | None = None

    async def fill() -> bool:
        # Appends to whatever list ``buf`` names when an item arrives, so an
        # item that arrives after the consumer took its batch opens the next.
        while True:
            try:
                item = await anext(source)
            except StopAsyncIteration:
                return True
            buf.append(item)
            if len(buf) >= max_size or not waiting:
                return False

    def collect(task: asyncio.Task[bool]) -> None:
        nonlocal eof, error
        try:
            eof = task.result()
        except Exception as exc:
            error = exc

    try:
        while True:
            if reader is not None:
                # A read left pending by the previous (time-cut) batch.
                if not reader.done():
                    await asyncio.wait((reader,))
                collect(reader)
                reader = None
            else:
                try:
                    buf.append(await anext(source))
                except StopAsyncIteration:
                    eof = True
            if buf and len(buf) < max_size and not eof and error is None:
                reader = loop.create_task(fill())
                waiting = True
                try:
                    await asyncio.wait((reader,), timeout=max_wait)
                finally:
                    waiting = False
                if reader.done():
                    collect(reader)
                    reader = None
            batch, buf = buf, []
            if batch:
                yield batch
            if error is not None:
                # Let go of it before raising: its traceback holds this frame.
                exc, error = error, None
                raise exc
            if eof:
                return
    finally:
        if reader is not None:
            reader.cancel()
            await asyncio.wait((reader,))
            if not reader.cancelled():
                reader.exception()  # mark it retrieved: we are closing anyway
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
