"""One batch's record (``_Batch``), and small helpers over its callers' futures."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence
from typing import Any, TypeAlias

from ._stats import DispatchReason

_Fut: TypeAlias = asyncio.Future[Any]
_done = asyncio.Future.done


class _Batch:
    """One batch, from its first item to its last resolved caller.

    ``items[i]`` is slot ``i``; ``futs[i]`` its first caller and, with
    ``dedupe``, ``extra[i]`` the callers coalesced into it. A batch is *open*
    while it is its partition's entry in ``Batcher._open`` (it accepts items),
    *due* once ``reason`` is set (it sits in ``Batcher._ready`` until a slot
    is free), and *running* once its sink call started.
    """

    __slots__ = (
        "arrivals",
        "calls",
        "captured",
        "coalesced",
        "counted",
        "cursor",
        "due_at",
        "extra",
        "failed",
        "finished",
        "full_at",
        "futs",
        "gone_callers",
        "in_heads",
        "index",
        "items",
        "left",
        "on_done",
        "opened",
        "overloaded",
        "partition",
        "reason",
        "released",
        "running",
        "seq",
        "timer",
        "weight",
    )

    def __init__(self, partition: Hashable, seq: int, dedupe: bool) -> None:
        self.partition = partition
        self.seq = seq
        self.items: list[Any] = []
        self.futs: list[_Fut] = []
        self.weight: float = 0
        self.reason: DispatchReason | None = None
        self.timer: asyncio.Handle | None = None
        self.running = False
        self.finished = False
        self.index: dict[Hashable, int] | None = {} if dedupe else None
        self.extra: dict[int, list[_Fut]] | None = None
        self.coalesced = 0
        # Slots whose room under max_pending was already given back (callers
        # that left, dropped items); the dispatch sweep releases the rest.
        self.released = 0
        self.left: set[_Fut] | None = None  # callers whose leaving gave the room back
        self.gone_callers: dict[int, int] | None = None  # dedupe: slot -> callers that left
        self.overloaded = False  # the backend signalled overload (for an Adaptive limit)
        self.cursor = 0  # slots before it have no caller left (drop_oldest scans from here)
        # drop_oldest: each slot's arrival number, and whether Batcher._heads has it.
        self.arrivals: list[int] | None = None
        self.in_heads = False
        # Cancelled futures already counted in stats.cancelled by their caller.
        self.counted: set[_Fut] | None = None
        self.on_done: list[_Fut] | None = None
        self.opened = 0.0  # loop.time() of the first item
        self.due_at = 0.0  # loop.time() when it became due (kept for an Adaptive limit)
        self.calls = 0  # sink calls made for it
        # The inlined submit paths test ``len(futs) >= full_at`` per item and no more:
        # max_size, or the next item to capture for (Batcher._filled).
        self.full_at = 0
        # What observers captured at submit (trace context), first MAX_LINKS items.
        self.captured: list[object] | None = None
        # (item, error) of its failed items, kept only when someone reads reports.
        self.failed: list[tuple[Any, BaseException]] | None = None


def _fail(fut: _Fut, error: BaseException) -> None:
    """``fut.set_exception(error)``, for any exception a sink may hand back.

    ``Future.set_exception`` refuses ``StopIteration`` (it would end a
    generator silently); like a coroutine that raises it (PEP 479), the
    caller gets a ``RuntimeError`` whose ``__cause__`` is the original.
    """
    if isinstance(error, StopIteration):
        wrapped = RuntimeError(f"the sink answered {error!r} for this item")
        wrapped.__cause__ = error
        error = wrapped
    fut.set_exception(error)


def _has_live(fut: _Fut, waiters: Sequence[_Fut] | None) -> bool:
    """Whether a slot still has a caller waiting (its first, or a coalesced one)."""
    if not fut.done():
        return True
    return waiters is not None and not all(map(_done, waiters))


def _extra_of(batch: _Batch, slot: int) -> list[_Fut] | None:
    return batch.extra.get(slot) if batch.extra else None


def _extra_list(batch: _Batch) -> list[list[_Fut]] | None:
    if not batch.extra:
        return None
    extra = batch.extra
    return [extra.get(i, []) for i in range(len(batch.items))]


class _Discard(asyncio.Future[Any]):
    """The caller of every ``put``/``put_nowait`` item: nobody.

    One per bound loop, shared by all such items. It stays pending, so the
    batcher treats its items like any waiting caller's, and it ignores what
    it is given: no future per item, nothing "never retrieved".
    """

    def set_result(self, result: Any, /) -> None:
        pass

    def set_exception(self, exception: type[BaseException] | BaseException, /) -> None:
        pass
