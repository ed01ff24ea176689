"""Room under ``max_pending``: the overflow policy, and callers leaving.

Items accepted but not yet dispatched hold room. When none is left,
``overflow`` decides: ``"block"`` (submitters wait in line, first come first
served: ``_put_when_room``), ``"reject"`` (``QueueFull``) or
``"drop_oldest"`` (the oldest pending item across partitions fails with
``QueueFull``: a heap of batch heads keyed by arrival, O(log n)). A caller
that leaves before dispatch (cancelled, expired) gives its room back at once,
in O(1) (``_withdraw``).
"""

from __future__ import annotations

import asyncio
import heapq
import time
from typing import Literal

from ._batch import _Batch, _extra_list, _extra_of, _Fut, _has_live
from ._core import R, T, _Core, _log, _State
from ._exceptions import BatcherClosed, QueueFull


class _Overflow(_Core[T, R]):
    """Room and overflow (a part of :class:`~asyncbatch.Batcher`)."""

    __slots__ = ()

    def _release(self, n: int) -> None:
        """``n`` pending items leave (dispatched, withdrawn, dropped, failed)."""
        if self._pending > self._peak_pending:
            self._peak_pending = self._pending  # peaks that end without a dispatch count too
        self._pending -= n

    def _caller_left(self, batch: _Batch, fut: _Fut, item: T) -> None:
        """A waiting caller was cancelled: count it and withdraw its item (if its own)."""
        if fut.cancelled():
            self._count_cancelled(batch, fut)
            self._withdraw(batch, fut, item)

    def _withdraw(self, batch: _Batch, fut: _Fut, item: T) -> None:
        """A caller left before its result: release its room if still pending. O(1)."""
        if batch.running:
            return  # in flight (the sink has it) or already swept
        if batch.index is not None:
            # With dedupe the slot keeps its room while another caller waits on it.
            index = item if self._key is None else self._key(item)
            slot = batch.index.get(index)
            if slot is None:
                return  # dropped already
            extra = _extra_of(batch, slot)
            if extra:
                # Count the callers that left rather than scan the slot's
                # callers each time one leaves: O(1) per caller.
                gone = batch.gone_callers
                if gone is None:
                    gone = batch.gone_callers = {}
                left = gone[slot] = gone.get(slot, 0) + 1
                if left <= len(extra):
                    return  # still wanted (or a caller left without saying so)
            elif not batch.futs[slot].done():
                return
            del batch.index[index]  # released once; an equal newcomer takes a new slot
            fut = batch.futs[slot]
        if batch.left is None:
            batch.left = set()
        batch.left.add(fut)
        batch.released += 1
        self._release(1)
        self._wake_putters()

    def _expire(self, batch: _Batch, fut: _Fut, item: T, timeout: float) -> None:
        if fut.done():
            return
        fut.set_exception(TimeoutError(f"item of {self._name!r} not resolved within {timeout} s"))
        self._expired += 1
        self._withdraw(batch, fut, item)

    def _make_room(self, waited: bool) -> bool:
        """No room for one more item: make some (``drop_oldest``), or say there is none."""
        if self._overflow == "drop_oldest":
            return self._drop_oldest()
        self._room_ran_out()
        max_pending = self._max_pending
        assert max_pending is not None
        return self._pending + (0 if waited else self._reserved) < max_pending and (
            waited or not self._putters
        )

    def _room_ran_out(self) -> None:
        """``block``/``reject`` with ``max_pending`` reached: no open batch can grow.

        A batch that cannot grow is as full as it will get, so every open
        batch becomes due at once (reason ``"size"``) rather than lingering
        for ``max_wait``; room comes back as soon as a slot takes them.
        (Under ``drop_oldest`` batches still grow, by dropping old items.)
        """
        for batch in list(self._undue):
            self._make_due(batch, "size")

    def _track_arrival(self, batch: _Batch) -> None:
        """``drop_oldest``: number the item, keep its batch findable by its oldest item."""
        arrivals = batch.arrivals
        assert arrivals is not None
        seq = next(self._arrival)
        arrivals.append(seq)
        if not batch.in_heads:
            batch.in_heads = True
            heapq.heappush(self._heads, (seq, batch.seq, batch))

    def _head(self, batch: _Batch) -> int:
        """First slot at or after the cursor with a caller still waiting (O(1) amortized).

        Slots passed over whose callers all left without giving their room
        back (a cancelled ``submit_nowait`` future) give it back now; then
        ``_reclaimed`` is set and no item needs to be dropped.
        """
        futs = batch.futs
        slot = batch.cursor
        left = batch.left
        while slot < len(futs) and not _has_live(futs[slot], _extra_of(batch, slot)):
            fut = futs[slot]
            if fut is not self._gone and (left is None or fut not in left):
                if left is None:
                    left = batch.left = set()
                left.add(fut)
                batch.released += 1
                self._release(1)
                self._reclaimed = True
            slot += 1
        batch.cursor = slot
        return slot

    def _drop_oldest(self) -> bool:
        """Free one slot of room, failing the oldest live pending item of any partition.

        The batches with droppable items sit in a heap keyed by the arrival
        number of their oldest live item; stale keys are fixed when they come
        up. O(log partitions) per drop, each slot is passed over once.
        """
        heads = self._heads
        self._reclaimed = False
        while heads:
            seq, _, batch = heads[0]
            if batch.running:  # dispatched (or retired) since it was pushed
                heapq.heappop(heads)
                batch.in_heads = False
                continue
            slot = self._head(batch)
            arrivals = batch.arrivals
            assert arrivals is not None
            if self._reclaimed:
                return True
            if slot == len(batch.futs):
                heapq.heappop(heads)
                batch.in_heads = False
                continue
            if arrivals[slot] != seq:
                heapq.heapreplace(heads, (arrivals[slot], batch.seq, batch))
                continue
            self._drop_slot(batch, slot)
            batch.cursor = slot + 1
            nxt = self._head(batch)
            if nxt < len(batch.futs):
                heapq.heapreplace(heads, (arrivals[nxt], batch.seq, batch))
            else:
                heapq.heappop(heads)
                batch.in_heads = False
                if batch.released == len(batch.futs):
                    self._retire(batch)
            return True
        return False

    def _drop_slot(self, batch: _Batch, slot: int) -> None:
        dropped = QueueFull(
            f"dropped by {self!r}: max_pending={self._max_pending} was reached "
            "and overflow='drop_oldest' made room for a newer item"
        )
        futs = batch.futs
        extra = batch.extra.pop(slot, ()) if batch.extra else ()
        for waiter in (futs[slot], *extra):
            if waiter.done():
                # Popped from the batch: the sweep will not see it again.
                self._count_cancelled(batch, waiter)
            else:
                waiter.set_exception(dropped)
                self._dropped += 1
        futs[slot] = self._gone  # type: ignore[assignment]
        if batch.index is not None:
            # Later equal items must not coalesce into the dropped slot.
            item = batch.items[slot]
            k = item if self._key is None else self._key(item)
            if batch.index.get(k) == slot:
                del batch.index[k]
        batch.items[slot] = None  # the sink will never see it: let it go
        batch.released += 1
        self._release(1)
        self._refused("dropped")

    def _retire(self, batch: _Batch) -> None:
        """Forget a batch none of whose items is left to dispatch (all dropped)."""
        if self._open.get(batch.partition) is batch:
            del self._open[batch.partition]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        self._undue.pop(batch, None)
        self._waiting.pop(batch, None)
        batch.running = True  # _pump passes over it in _ready
        self._submitted += len(batch.futs) + batch.coalesced
        self._live(batch, batch.items, batch.futs, _extra_list(batch))  # counts cancellations
        self._signal_done(batch)

    def _refused(self, what: Literal["rejected", "dropped"]) -> None:
        """Count a refused or dropped item; log the counts at most once a second."""
        if what == "rejected":
            self._rejected += 1
        if time.monotonic() - self._refusals_logged >= 1.0:
            self._log_refusals()

    def _log_refusals(self) -> None:
        """Log the refusals not reported yet (also at close: none is left unsaid)."""
        rejected = self._rejected - self._refusals_seen[0]
        dropped = self._dropped - self._refusals_seen[1]
        if rejected or dropped:
            self._refusals_logged = time.monotonic()
            self._refusals_seen = (self._rejected, self._dropped)
            _log.warning(
                "batcher %r is full (max_pending=%s, overflow=%r): %d items rejected and "
                "%d dropped since the last report",
                self._name,
                self._max_pending,
                self._overflow,
                rejected,
                dropped,
            )

    async def _put_when_room(self, item: T, fut: _Fut, deadline: float | None) -> _Batch:
        """Wait in line for room (``overflow="block"``), or refuse."""
        if self._overflow == "reject":
            self._refused("rejected")
            raise QueueFull(self._full_message())
        loop = self._loop
        assert loop is not None
        putters = self._putters
        first = True
        while True:
            putter: _Fut = loop.create_future()
            putters[putter] = None
            # FIFO: a woken putter that lost its room to a newcomer keeps its turn.
            if not first:
                putters.move_to_end(putter, last=False)
            first = False
            try:
                async with asyncio.timeout_at(deadline):
                    await putter
            except BaseException as exc:
                woken = putter.done() and not putter.cancelled() and putter.exception() is None
                if not putter.done():
                    putter.cancel()
                if woken:
                    # Woken but leaving: pass the reserved room on to the next in line.
                    self._reserved -= 1
                    self._wake_putters()
                else:
                    putters.pop(putter, None)
                if isinstance(exc, TimeoutError):
                    self._refused("rejected")
                    raise TimeoutError(
                        f"no room in {self!r} (max_pending={self._max_pending}) "
                        "within the submit timeout"
                    ) from None
                raise
            self._reserved -= 1  # the room held for this putter is its to take now
            if self._state is not _State.RUNNING:
                raise BatcherClosed(f"{self!r} was closed")
            batch = self._put(item, fut, waited=True)
            if batch is not None:
                return batch

    def _wake_putters(self) -> None:
        if not self._putters or self._max_pending is None:
            return
        room = self._max_pending - self._pending - self._reserved
        while room > 0 and self._putters:
            putter, _ = self._putters.popitem(last=False)
            if not putter.done():
                putter.set_result(None)
                # Held until that putter runs: newcomers must not take it first.
                self._reserved += 1
                room -= 1

    def _full_message(self) -> str:
        return (
            f"{self!r} is full: max_pending={self._max_pending} items accepted and "
            f"not yet dispatched (overflow={self._overflow!r})"
        )
