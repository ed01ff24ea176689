"""Errors raised by asyncbatch.

Every error of our own derives from one root, so ``except AsyncBatchError``
catches exactly what the library adds on top of your sink's own failures::

    AsyncBatchError
    ├── BatcherClosed    the batcher was closed: it takes no new items, and
    │                    ``aclose(cancel=True)`` fails what it still held
    ├── QueueFull        ``max_pending`` was reached (``overflow="reject"``,
    │                    ``submit_nowait``), or the item was the oldest pending
    │                    one under ``overflow="drop_oldest"``
    └── ResultMismatch   the sink's answer does not fit the batch: wrong length,
                         wrong type, or a mapping without an item's key

Not in the tree on purpose:

- timeouts (a per-item ``timeout`` or the sink ``timeout``) raise the builtin
  :class:`TimeoutError`, as :func:`asyncio.timeout` does;
- an exception raised (or returned per item) by your sink reaches the caller
  as it is, with its own type and traceback;
- :class:`asyncio.CancelledError` is never wrapped, subclassed or swallowed.
"""

from __future__ import annotations

__all__ = ["AsyncBatchError", "BatcherClosed", "QueueFull", "ResultMismatch"]


class AsyncBatchError(Exception):
    """Root of every error asyncbatch raises on its own account."""


class BatcherClosed(AsyncBatchError):
    """The batcher is closed (or closing) and did not, or will not, run this item.

    Raised by ``submit*`` after :meth:`Batcher.aclose` started, given to
    submitters that were still blocked waiting for room when it started, and,
    with ``aclose(cancel=True)``, to every item still pending or in flight.
    """


class QueueFull(AsyncBatchError):
    """No room for the item under ``max_pending``.

    Raised at once by ``submit`` with ``overflow="reject"`` and by
    ``submit_nowait`` (which never waits), and given to the oldest pending item
    when ``overflow="drop_oldest"`` makes room for a new one.
    """


class ResultMismatch(AsyncBatchError):
    """The sink's answer cannot be mapped back onto the batch's items.

    A sequence of the wrong length, a value of the wrong type (``str`` and
    ``bytes`` are not sequences of results) or an unhashable item looked up in
    a mapping fails every item of the batch; a mapping that lacks one item's
    key fails only that item. The message names the sink and what it expected.
    """
