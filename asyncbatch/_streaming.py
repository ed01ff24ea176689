"""Streaming per-item results: each caller's stream, fed by an async generator sink.

A streaming sink is an async generator function: each step it yields one entry
per item of the batch, in order. A value goes to that caller's stream, an
``Exception`` ends that stream with the error, and :data:`END` ends it early.
The generator's end ends every stream still open.

Here are the caller's side (:class:`Stream`, a future that ends with the
stream and buffers the values before that) and the marker. The batcher feeds
streams in ``Batcher._run_stream``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Final

__all__ = ["END", "Stream"]


class _End:
    """The type of :data:`END`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "asyncbatch.END"

    def __reduce__(self) -> str:
        return "END"


END: Final = _End()
"""Yield it as an item's entry to end that item's stream early."""


class Stream(asyncio.Future[None]):
    """One caller's stream, as the batcher holds it in place of a future.

    It is a future that is resolved when the stream ends (``None``: it ended
    normally; an exception: it failed) and cancelled when the caller stops
    iterating. Values pushed before the end wait in a buffer, in order.
    """

    __slots__ = ("_buffer", "_waiter")

    def __init__(self, *, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._buffer: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def push(self, value: Any) -> None:
        """One more value for the caller (ignored once the stream ended)."""
        if self.done():
            return
        self._buffer.append(value)
        self._wake()

    def set_result(self, result: None, /) -> None:
        super().set_result(result)
        self._wake()

    def set_exception(self, exception: type[BaseException] | BaseException, /) -> None:
        super().set_exception(exception)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def values(self) -> AsyncIterator[Any]:
        """The values in order; ends when the stream ends, raises its error."""
        while True:
            if self._buffer:
                yield self._buffer.popleft()
                continue
            if self.done():
                error = self.exception()  # raises CancelledError if cancelled
                if error is not None:
                    raise error
                return
            self._waiter = self.get_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
