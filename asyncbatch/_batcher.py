"""The Batcher: its public surface and the per-item hot path.

The Batcher is assembled from parts, one concern per module (see ``_core``):

- here: ``submit*``/``put*`` and ``_put`` (the per-item hot path: one
  future, two appends, maybe a timer), loop binding, ``configure``,
  re-entrancy, ``flush``/``aclose``;
- ``_dispatch``: the dispatch rule (``_make_due`` / ``_pump`` / ``_start``);
- ``_runner``: one batch's sink calls (timeout, retry, isolation,
  streaming) and ``_deliver`` (per-item results onto futures; the mapping
  itself is in ``_results``, the time triggers in ``_timers``);
- ``_overflow``: room under ``max_pending`` and callers leaving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import math
import warnings
import weakref
from collections import OrderedDict, deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Sequence,
)
from typing import Any, Literal, Self, overload

from ._batch import _Batch, _Discard, _extra_list, _extra_of, _Fut, _has_live
from ._concurrency import Adaptive
from ._core import _IN_SINK, Overflow, R, SinkResult, T, _get_ident, _log, _State
from ._dispatch import _Dispatch
from ._exceptions import BatcherClosed, QueueFull
from ._loopwatch import LoopWatch
from ._observe import MAX_LINKS, Observer
from ._options import (
    _check_int,
    _check_number,
    _check_sink,
    _checked_weight,
    _concurrency,
    _linger,
)
from ._options import _Unset as _Unset  # re-exported for _decorator and _loader
from ._overflow import _Overflow
from ._retry import Retry
from ._runner import _Runner
from ._stats import BatcherStats, BatchReport
from ._streaming import Stream
from ._timers import Deadlines

__all__ = ["Batcher", "Overflow", "SinkResult"]

_OVERFLOWS = ("block", "reject", "drop_oldest")
_UNSET = _Unset.UNSET


class Batcher(_Overflow[T, R], _Runner[T, R], _Dispatch[T, R]):
    """Gathers concurrent submissions into batches for one async *sink* call each.

    Each caller awaits its own item's result::

        async def sink(items: list[str]) -> list[int]:
            return [len(s) for s in items]

        async with Batcher(sink, max_size=64, max_wait=0.005) as batcher:
            n = await batcher.submit("hello")       # 5

    Args:
        sink: ``async def sink(items: list[T])`` returning a ``Sequence`` with
            one result per item (in order), a ``Mapping`` keyed by
            ``key(item)`` (or the item), or ``None`` (every item resolves to
            ``None``). An entry that is an ``Exception`` instance fails only
            its item; raising fails the whole batch.
        max_size: items per batch, ``>= 1``.
        max_wait: seconds the first item of an open batch waits for
            companions. ``0`` dispatches at the end of the current loop
            iteration (DataLoader semantics). ``None`` (the default) means
            ``0``, or no linger at all when ``interval`` is given; an explicit
            ``None`` together with ``interval`` keeps only the heartbeat.
        interval: fixed-rate heartbeat, seconds. Pending items are flushed on
            the absolute grid ``t0 + k * interval`` (``t0``: the loop time when
            the batcher first binds to its loop); a tick that is already past
            when it would be armed is skipped, never bunched.
        max_weight: a batch is sealed before its summed ``weigh(item)`` would
            pass this; a batch whose weight reaches it exactly is full. An item
            heavier than ``max_weight`` goes in a batch of its own.
        weigh: ``weigh(item) -> number >= 0``; required with ``max_weight``.
        max_concurrency: sink calls running at once, ``>= 1``.
        max_pending: bound on items accepted but not yet dispatched.
        overflow: what happens at ``max_pending``: ``"block"`` (``submit``
            waits for room, first come first served), ``"reject"`` (raise
            :class:`QueueFull`), ``"drop_oldest"`` (the oldest pending item
            fails with ``QueueFull`` and the new one enters).
        key: ``key(item) -> Hashable``: item identity, used to look items up
            in a ``Mapping`` answer and, with ``dedupe``, to coalesce.
        dedupe: equal items (by ``key``) of one open batch share one sink
            slot; every caller receives that slot's result.
        partition: ``partition(item) -> Hashable``: items of different
            partitions never share a batch; each has its own open batch and
            timer, the concurrency limit is shared.
        timeout: seconds for one sink call; past it the call is cancelled and
            its items fail with ``TimeoutError`` (or are retried).
        retry: a :class:`Retry` policy for failed sink calls.
        on_batch: called with a :class:`BatchReport` once per finished batch.
            Exceptions it raises go to the loop's exception handler.
        name: used in ``repr`` and error messages; defaults to the sink's
            qualified name.

    Dispatch rule: a batch is *due* when it is full (size or weight), when
    ``max_wait`` has passed since its first item, at a heartbeat tick, or on
    ``flush``/``aclose``. Due batches are dispatched in the order they became
    due, as soon as one of the ``max_concurrency`` slots is free. A due batch
    that is not full keeps accepting items while it waits for a slot, so
    batches grow by themselves under load and add no latency when idle.

    Context: each batch's sink calls (its parts, retries and bisection
    halves, one after the other) run in one task with a fresh, empty
    ``contextvars.Context``: a batch serves many callers, so no caller's
    context variables (request ids, tenants, trace context, baggage) are
    visible to the sink or sent on by it, nor what another batch's sink set.
    Tasks the sink starts inherit the sink's context.

    Cancellation: a caller cancelled (or timed out) before its item is
    dispatched withdraws the item; the sink never sees it. After dispatch the
    sink call goes on and that caller's result is dropped. Nothing else in
    the batch is affected.

    Loop binding: a batcher binds to the first running event loop that uses
    it. Using it from another loop while that one runs raises
    ``RuntimeError``; once the first loop is closed and nothing is pending,
    the next use rebinds.
    """

    __slots__ = ("__weakref__",)

    def __init__(
        self,
        sink: Callable[[list[T]], Awaitable[SinkResult[R]]]
        | Callable[[list[T]], AsyncIterator[Sequence[R]]],
        *,
        max_size: int = 128,
        max_wait: float | None = None,
        interval: float | None = None,
        max_weight: float | None = None,
        weigh: Callable[[T], float] | None = None,
        max_concurrency: int | Adaptive | Literal["auto"] | None = 1,
        max_pending: int | None = None,
        overflow: Overflow = "block",
        key: Callable[[T], Hashable] | None = None,
        dedupe: bool = False,
        partition: Callable[[T], Hashable] | None = None,
        timeout: float | None = None,
        retry: Retry | None = None,
        on_batch: Callable[[BatchReport], object] | None = None,
        name: str | None = None,
    ) -> None:
        self._streaming = _check_sink(sink)
        _check_int("max_size", max_size, 1)
        policy, limit = _concurrency(max_concurrency)
        _claim_policy(self, policy)
        if max_pending is not None:
            _check_int("max_pending", max_pending, 1)
        if interval is not None:
            _check_number("interval", interval, positive=True, infinite=False)
        if max_wait is not None:
            _check_number("max_wait", max_wait, positive=False, infinite=True)
        self._max_wait_setting = max_wait
        max_wait = _linger(max_wait, interval)
        if max_weight is not None:
            _check_number("max_weight", max_weight, positive=True, infinite=True)
            if weigh is None:
                raise ValueError("max_weight needs weigh=, a function item -> weight")
        if timeout is not None:
            _check_number("timeout", timeout, positive=True, infinite=True)
            if math.isinf(timeout):
                timeout = None
        if overflow not in _OVERFLOWS:
            raise ValueError(f"overflow must be one of {_OVERFLOWS}, got {overflow!r}")
        if (
            overflow == "drop_oldest"
            and max_pending is not None
            and max_pending < max_size
            and max_weight is None
            and max_wait is None
            and interval is None
        ):
            raise ValueError(
                f"max_pending={max_pending} < max_size={max_size} with overflow='drop_oldest' "
                "and no max_wait or interval: a batch could never fill and has no deadline, "
                "so nothing would ever be dispatched; set max_wait, or max_pending >= max_size"
            )
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"retry must be a Retry(...) policy or None, got {retry!r}")
        for fname, fn in (("weigh", weigh), ("key", key), ("partition", partition)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{fname} must be callable, got {fn!r}")
        if on_batch is not None and not callable(on_batch):
            raise TypeError(f"on_batch must be callable, got {on_batch!r}")

        self._sink = sink
        self._name = name or getattr(sink, "__qualname__", None) or repr(sink)
        self._max_size = max_size
        self._max_weight = math.inf if max_weight is None else max_weight
        self._weigh = weigh
        # None (no limit) is kept as infinity: the slot test stays one comparison.
        self._max_concurrency = limit
        self._policy = policy
        self._max_pending = max_pending
        self._overflow = overflow
        self._key = key
        self._dedupe = dedupe
        self._partition = partition
        self._timeout = timeout
        self._retry = retry
        self._on_batch = on_batch
        self._deadlines = Deadlines(max_wait, interval)
        # max_wait=0 with no heartbeat: every batch is due at the end of the
        # iteration that opened it, armed with call_soon rather than call_at.
        self._soon = max_wait == 0 and interval is None
        self._observers = ()
        self._capture = ()
        self._plain = self._plain_keyed = False
        self._choose_paths()

        self._state = _State.IDLE
        self._loop = None
        # Per item, the fast paths check only ``self._hot._thread_id`` against the
        # calling thread: for an asyncio loop ``_hot`` is the bound loop itself,
        # whose ``_thread_id`` is its thread while it runs and None once it stops
        # (a stopped loop, another loop in this thread, or another thread all go
        # through _bind); get_running_loop() would cost 5x more on 3.11.
        self._hot = _UNBOUND
        self._open = {}
        self._waiting = {}  # undispatched batches, oldest first
        self._ready = deque()
        self._inflight = {}
        # Submitters waiting for room, in line (an OrderedDict: leaving is O(1)).
        self._putters = OrderedDict()
        self._reserved = 0  # room held for woken putters that have not run yet
        self._busy = 0
        self._seq = itertools.count()
        self._closing = None
        self._cancel_on_close = False
        self._undue = {}  # open batches not yet due, oldest first
        # drop_oldest: (arrival number of its oldest live item, seq, batch), a heap.
        self._heads = []
        self._arrival = itertools.count()
        # Batches whose sink waits on this same batcher (nested submit, flush,
        # aclose), with how many such waits: a re-entrant wait never waits for them.
        self._reentrant = {}
        self._close_when_idle = False  # a close started from inside a sink
        self._discard = None  # the "caller" of put/put_nowait items
        self._gone = None  # stands in for the caller of a dropped slot
        self._watch = None
        self._refusals_logged = -math.inf
        self._reclaimed = False
        self._refusals_seen = (0, 0)
        self._lost = 0  # items lost when the bound loop ended: it may not be replaced

        self._pending = 0
        self._peak_pending = 0
        self._in_flight = 0
        self._submitted = 0  # callers of dispatched or discarded batches
        self._succeeded = 0
        self._failed = 0
        self._cancelled = 0
        self._expired = 0
        self._rejected = 0
        self._dropped = 0
        self._batches = 0
        self._dispatched_slots = 0
        self._retries = 0
        self._reasons = {}

    # ------------------------------------------------------------------ public

    @property
    def name(self) -> str:
        """The batcher's name (``name=`` or the sink's qualified name)."""
        return self._name

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has started: no new items are accepted."""
        return self._state is _State.CLOSING or self._state is _State.CLOSED

    @property
    def stats(self) -> BatcherStats:
        """A snapshot of the counters; see :class:`BatcherStats`."""
        waiting = 0
        for batch in self._undispatched():
            waiting += len(batch.futs) + batch.coalesced
        dispatched = self._dispatched_slots
        limit = self._max_concurrency
        return BatcherStats(
            submitted=self._submitted + waiting,
            succeeded=self._succeeded,
            failed=self._failed,
            cancelled=self._cancelled,
            expired=self._expired,
            rejected=self._rejected,
            dropped=self._dropped,
            batches=self._batches,
            pending=self._pending,
            in_flight=self._in_flight,
            peak_pending=max(self._peak_pending, self._pending),
            mean_batch_size=dispatched / self._batches if self._batches else 0.0,
            reasons=dict(self._reasons),
            retries=self._retries,
            concurrency_limit=0 if math.isinf(limit) else int(limit),
        )

    async def submit(self, item: T, *, timeout: float | None = None) -> R:  # noqa: ASYNC109
        """Submit one item and wait for its own result.

        Args:
            item: the item; it reaches the sink in a batch with others.
            timeout: seconds for the whole wait (room under ``max_pending``
                included); ``None`` or ``math.inf``: no limit. When it runs
                out the item is withdrawn if not yet dispatched, and
                ``TimeoutError`` is raised.

        Returns:
            The sink's result for this item.

        Raises:
            Exception: this item's error: the sink's exception (the whole
                batch failed), an exception instance the sink returned for
                this item, ``ResultMismatch``, or ``TimeoutError`` (sink
                ``timeout``).
            TimeoutError: ``timeout`` ran out.
            QueueFull: no room and ``overflow="reject"``, or the item was
                dropped by ``overflow="drop_oldest"``.
            BatcherClosed: the batcher is closed, or was closed while this
                call waited for room, or with ``aclose(cancel=True)``.
            RuntimeError: no running asyncio loop, a loop other than the bound
                one, or a sink awaiting ``submit`` of its own batcher while
                every dispatch slot is held by sinks doing the same (it would
                wait forever).

        Cancellation: cancelling the caller before dispatch withdraws the
        item and releases its room; after dispatch the result is dropped.
        Others are not affected.
        """
        if self._busy:
            inside = _IN_SINK.get()
            if inside is not None and inside[0] is self:
                return await self._submit_nested(item, timeout, inside[1])
        if self._plain and timeout is None:
            # _put, inlined for the common configuration (as in submit_nowait).
            if self._hot._thread_id != _get_ident():
                self._bind()
            batch = self._open.get(None)
            if batch is None:
                batch = self._open_batch(None)
            fut: _Fut = self._loop.create_future()  # type: ignore[union-attr]
            batch.items.append(item)
            batch.futs.append(fut)
            self._pending += 1
            if len(batch.futs) >= batch.full_at:
                self._filled(batch)
            try:
                return await fut  # type: ignore[no-any-return]
            except asyncio.CancelledError:
                self._caller_left(batch, fut, item)
                raise
        return await self._submit(item, timeout)

    async def _submit(self, item: T, timeout: float | None) -> R:  # noqa: ASYNC109
        """``submit`` on the general path: room, per-item timeout, any option."""
        loop = self._bind()
        if self._streaming:
            raise self._not_streaming("submit")
        if timeout is not None:
            _check_number("timeout", timeout, positive=True, infinite=True)
            if math.isinf(timeout):
                timeout = None
        fut: _Fut = loop.create_future()
        if timeout is not None:
            return await self._submit_with_timeout(loop, item, fut, timeout)
        put = self._put(item, fut)
        batch = put if put is not None else await self._put_when_room(item, fut, None)
        try:
            return await fut  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            self._caller_left(batch, fut, item)
            raise

    async def _submit_nested(
        self,
        item: T,
        timeout: float | None,  # noqa: ASYNC109
        own: _Batch,
    ) -> R:
        """``submit`` from inside this batcher's own sink call (or a task it started)."""
        self._bind()  # closed or wrong loop: that error first
        self._check_nesting("submit()")
        self._enter_reentrant(own)
        try:
            return await self._submit(item, timeout)
        finally:
            self._leave_reentrant(own)

    def _check_nesting(self, what: str) -> None:
        # Every slot held by a sink that waits on this batcher: none of them can
        # finish, so no slot would ever free up for what they wait for.
        if self._busy >= self._max_concurrency and len(self._reentrant) + 1 >= self._busy:
            raise RuntimeError(
                f"the sink of {self!r} awaited {what} of its own batcher while every "
                f"dispatch slot (max_concurrency={self._limit_text()}) is held by a sink "
                "doing the same: it would wait forever. Raise max_concurrency (None: no "
                "limit) above the nesting depth, or call it from outside the sink"
            )

    def _enter_reentrant(self, own: _Batch) -> None:
        """``own``'s sink waits on this batcher from now on: its slot may be lent."""
        self._reentrant[own] = self._reentrant.get(own, 0) + 1
        self._pump()

    def _leave_reentrant(self, own: _Batch) -> None:
        left = self._reentrant[own] - 1
        if left:
            self._reentrant[own] = left
        else:
            del self._reentrant[own]

    def submit_nowait(self, item: T) -> asyncio.Future[R]:
        """Submit one item without waiting; returns the future of its result.

        To gather later. It never waits: with no room under ``max_pending``
        it raises :class:`QueueFull` whatever ``overflow`` says (like
        ``Queue.put_nowait``), except ``"drop_oldest"``, which makes room.
        Cancelling the returned future before dispatch withdraws the item
        (its room is released when its batch is dispatched). For
        fire-and-forget use :meth:`put_nowait`: no future, nothing to
        retrieve.

        Must be called from the batcher's event loop thread (a coroutine or
        callback); from other threads use :meth:`submit_threadsafe`.

        Raises:
            QueueFull: no room.
            BatcherClosed: the batcher is closed.
            RuntimeError: no running asyncio loop, or another loop than the
                bound one.
        """
        fut: asyncio.Future[R]
        if self._plain:  # _put, inlined for the common configuration (as in submit)
            if self._hot._thread_id != _get_ident():
                self._bind()
            batch = self._open.get(None)
            if batch is None:
                batch = self._open_batch(None)
            fut = self._loop.create_future()  # type: ignore[union-attr]
            batch.items.append(item)
            batch.futs.append(fut)
            self._pending += 1
            if len(batch.futs) >= batch.full_at:
                self._filled(batch)
            return fut
        loop = self._bind()
        if self._streaming:
            raise self._not_streaming("submit_nowait")
        fut = loop.create_future()
        if self._put(item, fut) is None:
            self._refused("rejected")
            raise QueueFull(self._full_message())
        return fut

    async def put(self, item: T) -> None:
        """Hand one item over without waiting for its result (fire-and-forget).

        Waits only for room, like ``asyncio.Queue.put``: with ``max_pending``
        reached, ``overflow="block"`` waits for room, ``"reject"`` raises
        :class:`QueueFull`, ``"drop_oldest"`` makes room. No future is made:
        the item's outcome is counted in :attr:`stats`, listed in
        ``BatchReport.failed_items`` if it fails, and a batch that fails as
        a whole is logged once (logger ``asyncbatch``, WARNING). Close the
        batcher (``aclose``/``async with``) to deliver what is still pending.

        Raises:
            QueueFull: no room and ``overflow="reject"``.
            BatcherClosed: the batcher is closed, or was closed while this
                call waited for room.
            RuntimeError: no running asyncio loop, or another loop than the
                bound one.

        Cancellation: cancelled while waiting for room, the item was never
        accepted; once accepted, it is the batcher's.
        """
        self._bind()
        if self._streaming:
            raise self._not_streaming("put")
        discard = self._discard
        assert discard is not None
        if self._put(item, discard) is None:
            own = self._own_batch()
            if own is None:
                await self._put_when_room(item, discard, None)
                return
            # From inside the sink: the room frees only when a batch goes, so
            # this sink's idle slot is lent (see _pump) while it waits.
            self._enter_reentrant(own)
            try:
                if self._put(item, discard) is None:  # the lent slot may have made room
                    await self._put_when_room(item, discard, None)
            finally:
                self._leave_reentrant(own)

    def put_nowait(self, item: T) -> None:
        """Hand one item over now, without waiting for anything (fire-and-forget).

        Like ``asyncio.Queue.put_nowait``: with no room under ``max_pending``
        it raises :class:`QueueFull` whatever ``overflow`` says, except
        ``"drop_oldest"``, which makes room. No future is made; outcomes are
        reported as in :meth:`put`. Cheaper per item than
        :meth:`submit_nowait`.

        Raises:
            QueueFull: no room.
            BatcherClosed: the batcher is closed.
            RuntimeError: no running asyncio loop, or another loop than the
                bound one.
        """
        if self._plain:  # _put, inlined (as in submit_nowait)
            if self._hot._thread_id != _get_ident():
                self._bind()
            batch = self._open.get(None)
            if batch is None:
                batch = self._open_batch(None)
            batch.items.append(item)
            batch.futs.append(self._discard)  # type: ignore[arg-type]
            self._pending += 1
            if len(batch.futs) >= batch.full_at:
                self._filled(batch)
            return
        self._bind()
        if self._streaming:
            raise self._not_streaming("put_nowait")
        discard = self._discard
        assert discard is not None
        if self._put(item, discard) is None:
            self._refused("rejected")
            raise QueueFull(self._full_message())

    async def submit_stream(self, item: T) -> AsyncGenerator[R, None]:
        """Submit one item to a streaming sink; iterate this caller's own results.

        The sink is an async generator function: each step yields one entry
        per item of the batch, in order. A value goes to this stream; an
        ``Exception`` entry ends it with that error (raised here); the marker
        :data:`asyncbatch.END` ends it early; the generator's end ends it.
        Use it as ``async for value in batcher.submit_stream(item)``; the
        item is submitted when the iteration starts.

        Leaving the iteration (``break``, cancellation, a timeout) drops this
        caller's later entries; before dispatch it withdraws the item (the
        generator never sees it). Once every caller of a batch has left, the
        generator is closed (``aclose``) and its dispatch slot freed.
        ``timeout`` (the batcher's) bounds each step of the generator;
        ``retry`` applies only until the first step was delivered.

        Raises:
            TypeError: the sink is not an async generator function.
            Exception: this stream's error (the generator raised, a step of
                the wrong length: ``ResultMismatch``, or an ``Exception``
                entry for this item).
            QueueFull, BatcherClosed, RuntimeError: as :meth:`submit`.
        """
        if not self._streaming:
            raise TypeError(
                f"the sink of {self!r} is not an async generator function: "
                "submit_stream() needs a streaming sink (use submit())"
            )
        loop = self._bind()
        own = self._own_batch()
        if own is not None:
            self._check_nesting("submit_stream()")
            self._enter_reentrant(own)
        try:
            stream = Stream(loop=loop)
            batch = self._put(item, stream)
            if batch is None:
                batch = await self._put_when_room(item, stream, None)
            try:
                async for value in stream.values():
                    yield value
            finally:
                if not stream.done():
                    stream.cancel()
                    self._count_cancelled(batch, stream)
                    self._withdraw(batch, stream, item)
                elif not stream.cancelled():
                    stream.exception()  # the caller left after its end: nothing unretrieved
        finally:
            if own is not None:
                self._leave_reentrant(own)

    @overload
    async def submit_many(
        self, items: Iterable[T], return_exceptions: Literal[False] = False
    ) -> list[R]: ...

    @overload
    async def submit_many(
        self, items: Iterable[T], return_exceptions: Literal[True]
    ) -> list[R | BaseException]: ...

    async def submit_many(
        self, items: Iterable[T], return_exceptions: bool = False
    ) -> list[R] | list[R | BaseException]:
        """Submit several items and wait for all of them.

        Results come back in input order. With ``return_exceptions=False``
        the first failure in input order is raised, after every item has
        been resolved (nothing is left running); with ``True`` failures are
        returned in place of results. Items wait for room like
        :meth:`submit`; if one is refused (``QueueFull``, ``BatcherClosed``)
        the items already accepted are withdrawn and the error is raised.
        Cancelling the call withdraws every item not yet dispatched.

        Raises:
            RuntimeError: as :meth:`submit` (checked before any item is taken).
        """
        loop = self._bind()
        own = self._own_batch()
        if own is not None:
            self._check_nesting("submit_many()")
            self._enter_reentrant(own)
        try:
            return await self._submit_many(loop, items, return_exceptions)
        finally:
            if own is not None:
                self._leave_reentrant(own)

    async def _submit_many(
        self, loop: asyncio.AbstractEventLoop, items: Iterable[T], return_exceptions: bool
    ) -> list[Any]:
        if self._streaming:
            raise self._not_streaming("submit_many")
        pairs: list[tuple[_Fut, _Batch, T]] = []
        try:
            for item in items:
                fut: _Fut = loop.create_future()
                batch = self._put(item, fut)
                if batch is None:
                    batch = await self._put_when_room(item, fut, None)
                pairs.append((fut, batch, item))
            futs = [p[0] for p in pairs]
            await asyncio.gather(*futs, return_exceptions=True)
        except BaseException:
            for fut, batch, item in pairs:
                if fut.cancel():
                    self._count_cancelled(batch, fut)
                    self._withdraw(batch, fut, item)
            raise
        # Read each future itself: a result may be a BaseException *value*
        # (only Exception entries fail an item), which gather cannot tell apart.
        results: list[Any] = []
        for fut in futs:
            error = fut.exception()
            if error is not None and not return_exceptions:
                raise error
            results.append(fut.result() if error is None else error)
        return results

    def submit_threadsafe(self, item: T) -> concurrent.futures.Future[R]:
        """Submit one item from any thread; returns a ``concurrent.futures.Future``.

        The batcher must be bound to a running loop (used once from it, or
        entered with ``async with``). Cancelling the returned future cancels
        the submission. Do not block on ``.result()`` from the loop's own
        thread: that deadlocks.

        Raises:
            BatcherClosed: the batcher is closed (also: the returned future
                fails with it if the close wins the race).
            RuntimeError: the batcher is not bound to a running event loop.
        """
        if self.closed:
            raise BatcherClosed(f"{self!r} is closed; it accepts no new items")
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            raise RuntimeError(
                f"{self!r} is not bound to a running event loop; use it once from "
                "that loop (or enter `async with`) before submit_threadsafe()"
            )
        return asyncio.run_coroutine_threadsafe(self._submit_threadsafe(item), loop)

    async def _submit_threadsafe(self, item: T) -> R:
        return await self.submit(item)

    async def flush(self) -> None:
        """Dispatch everything pending now and wait until it is resolved.

        Waits for every batch holding an item submitted before the call,
        including batches already in flight. ``max_concurrency`` still
        applies. Cancelling ``flush`` does not cancel the batches.

        Called from inside this batcher's own sink (or a task the sink
        started), it dispatches the same way but waits only for the other
        sink calls in flight that are not themselves waiting on this batcher:
        not for its own batch, which cannot finish before the sink returns,
        nor for due batches that may need the very slot the sink holds.

        Raises:
            RuntimeError: called from another loop than the bound one.
        """
        if self._loop is None or self._left_behind():
            return
        self._check_same_loop()
        for batch in list(self._open.values()):
            self._make_due(batch, "flush")
        own = self._own_batch()
        if own is None:
            await self._wait_for([*self._ready, *self._inflight])
        else:
            await self._wait_reentrant(own)

    async def aclose(self, cancel: bool = False) -> None:
        """Stop accepting items, then finish or cancel what is held.

        From the moment it is called, ``submit*`` and ``put*`` raise
        :class:`BatcherClosed`, and so do submitters still blocked waiting
        for room (they were never accepted).

        ``cancel=False`` (drain): every pending item is dispatched at once,
        still in batches of ``max_size``/``max_weight`` and with at most
        ``max_concurrency`` sink calls, and ``aclose`` waits for every batch
        in flight. ``cancel=True``: pending items fail with
        ``BatcherClosed`` and in-flight sink calls are cancelled (their items
        fail with ``BatcherClosed`` too).

        Idempotent: a second call waits for the first to finish (and turns a
        drain into a cancel if it passes ``cancel=True``). If the task
        running ``aclose`` is cancelled while draining, the close is turned
        into ``cancel=True``, finished, and the cancellation propagates.
        Called from inside this batcher's own sink (or a task it started),
        it closes the same way (``cancel=True`` spares that sink's own call)
        and waits as :meth:`flush` does there; the close completes when the
        last batch, the sink's own included, is done. Afterwards no task,
        timer or future of the batcher is left behind.

        Raises:
            RuntimeError: called from another loop than the bound one.
        """
        if self._state is _State.CLOSED:
            return
        if self._state is _State.IDLE or self._left_behind():
            self._state = _State.CLOSED
            self._stop_watch()
            return
        self._check_same_loop()
        loop = self._loop
        assert loop is not None
        own = self._own_batch()
        if self._state is _State.CLOSING:
            assert self._closing is not None
            if cancel:
                self._cancel_everything(own)
            if own is None:
                await asyncio.shield(self._closing)
            return
        if own is not None:
            await self._aclose_from_sink(own, cancel)
            return
        self._state = _State.CLOSING
        self._hot = _UNBOUND
        self._closing = loop.create_future()
        self._cancel_on_close = cancel
        while self._putters:
            putter, _ = self._putters.popitem(last=False)
            if not putter.done():
                putter.set_exception(BatcherClosed(f"{self!r} was closed"))
        try:
            if cancel:
                self._cancel_everything()
            else:
                for batch in list(self._open.values()):
                    self._make_due(batch, "close")
            try:
                await self._wait_for([*self._ready, *self._inflight])
            except asyncio.CancelledError:
                self._cancel_everything()
                tasks = list(self._inflight.values())
                if tasks:
                    await asyncio.wait(tasks)
                raise
            tasks = list(self._inflight.values())
            if tasks:  # cancelled ones finish their last step
                await asyncio.wait(tasks)
            # Done-callbacks of the items resolved last are already scheduled:
            # let them run before the caller goes on (e.g. to read its counts).
            await asyncio.sleep(0)
        finally:
            self._state = _State.CLOSED
            self._stop_watch()
            self._log_refusals()
            self._closing.set_result(None)

    def configure(
        self,
        *,
        max_size: int | _Unset = _UNSET,
        max_wait: float | _Unset | None = _UNSET,
        interval: float | _Unset | None = _UNSET,
        max_weight: float | _Unset | None = _UNSET,
        max_concurrency: int | Adaptive | Literal["auto"] | _Unset | None = _UNSET,
        max_pending: int | _Unset | None = _UNSET,
        timeout: float | _Unset | None = _UNSET,
    ) -> None:
        """Change settings at run time, safely, while items flow; any subset.

        Each value is checked as the constructor checks it, all of them
        before any is applied. The effects are immediate:

        - ``max_concurrency``: more slots start waiting due batches now;
          fewer let the calls in flight finish (no new one starts until the
          count is under the limit). An :class:`Adaptive` policy (or
          ``"auto"``) takes over from its own ``limit`` (its ``min`` for a
          new one); one that tunes another open batcher is refused.
        - ``max_size``/``max_weight``: open batches that are now full are
          sealed (reason ``"size"``/``"weight"``); a batch that holds more
          than the new limit is handed to the sink in consecutive calls
          within the limit, one after the other in its dispatch slot.
        - ``max_wait``/``interval``: the deadlines of open batches are
          recomputed from their first item's time; one already past makes
          its batch due now. The heartbeat grid keeps its origin.
        - ``max_pending``: more room (or ``None``) wakes blocked submitters;
          less room applies to the next submits (nothing accepted is dropped).
        - ``timeout``: applies to sink calls that start from now on.

        Threads: from another thread than the one running the batcher's
        loop, the values are checked here (errors raised here) and applied
        on the loop's thread, at its next iteration. On a batcher whose loop
        is closed only the settings change (they apply when it rebinds).

        Raises:
            TypeError, ValueError: a value the constructor would refuse;
                nothing is changed then.
            BatcherClosed: the batcher is closed (``aclose`` finished; while
                it drains, ``configure`` still works).
        """
        if self._state is _State.CLOSED:  # (while it drains, a sink may still tune it)
            raise BatcherClosed(f"{self!r} is closed; it cannot be reconfigured")
        new_size = self._max_size if isinstance(max_size, _Unset) else max_size
        _check_int("max_size", new_size, 1)
        policy, limit = self._policy, self._max_concurrency
        if not isinstance(max_concurrency, _Unset):
            policy, limit = _concurrency(max_concurrency)
        pending = self._max_pending
        if not isinstance(max_pending, _Unset):
            if max_pending is not None:
                _check_int("max_pending", max_pending, 1)
            pending = max_pending
        tick = self._deadlines.interval
        if not isinstance(interval, _Unset):
            if interval is not None:
                _check_number("interval", interval, positive=True, infinite=False)
            tick = interval
        wait_setting = self._max_wait_setting
        if not isinstance(max_wait, _Unset):
            if max_wait is not None:
                _check_number("max_wait", max_wait, positive=False, infinite=True)
            wait_setting = max_wait
        wait = _linger(wait_setting, tick)
        weight = self._max_weight
        if not isinstance(max_weight, _Unset):
            if max_weight is not None:
                _check_number("max_weight", max_weight, positive=True, infinite=True)
                if self._weigh is None:
                    raise ValueError("max_weight needs weigh=, given to the constructor")
            weight = math.inf if max_weight is None else max_weight
        call_timeout = self._timeout
        if not isinstance(timeout, _Unset):
            if timeout is not None:
                _check_number("timeout", timeout, positive=True, infinite=True)
            call_timeout = None if timeout is None or math.isinf(timeout) else timeout
        if (
            self._overflow == "drop_oldest"
            and pending is not None
            and pending < new_size
            and weight == math.inf
            and wait is None
            and tick is None
        ):
            raise ValueError(
                f"max_pending={pending} < max_size={new_size} with overflow='drop_oldest' "
                "and no max_wait or interval: a batch could never fill and has no deadline"
            )
        if not isinstance(max_concurrency, _Unset):
            _claim_policy(self, policy)

        # Everything checked: apply, on the loop's own thread.
        apply = functools.partial(
            self._apply_settings, new_size, wait_setting, wait, tick, weight, policy, limit
        )
        loop = self._loop
        thread = self._hot._thread_id
        if loop is not None and thread is not None and thread != _get_ident():
            loop.call_soon_threadsafe(apply, pending, call_timeout)
        else:
            apply(pending, call_timeout)

    def _apply_settings(
        self,
        new_size: int,
        wait_setting: float | None,
        wait: float | None,
        tick: float | None,
        weight: float,
        policy: Adaptive | None,
        limit: float,
        pending: int | None,
        call_timeout: float | None,
    ) -> None:
        """``configure``'s effects, its values checked (see there)."""
        if self._state is _State.CLOSED:
            return  # closed between the check and now (configure from another thread)
        self._max_wait_setting = wait_setting
        self._max_size = new_size
        self._max_weight = weight
        self._timeout = call_timeout
        self._policy, self._max_concurrency = policy, limit
        more_room = pending is None or (
            self._max_pending is not None and pending > self._max_pending
        )
        self._max_pending = pending
        self._choose_paths()
        self._recheck_open()
        timing = (wait, tick) != (self._deadlines.max_wait, self._deadlines.interval)
        self._deadlines.max_wait, self._deadlines.interval = wait, tick
        self._soon = wait == 0 and tick is None
        if self._loop is None or self._loop.is_closed():
            return  # nothing runs on it any more; a rebind starts afresh
        for batch in list(self._open.values()):
            if len(batch.items) >= new_size:
                self._seal(batch, "size")
            elif self._weigh is not None and batch.items and batch.weight >= weight:
                self._seal(batch, "weight")
            elif timing and batch.reason is None:
                self._rearm(batch)
        if more_room:
            if pending is None:
                while self._putters:  # no bound any more: everyone in line gets in
                    putter, _ = self._putters.popitem(last=False)
                    if not putter.done():
                        putter.set_result(None)
                        self._reserved += 1
            else:
                self._wake_putters()
        elif pending is not None and self._pending >= pending and self._overflow != "drop_oldest":
            self._room_ran_out()
        self._pump()

    async def _aclose_from_sink(self, own: _Batch, cancel: bool) -> None:
        loop = self._loop
        assert loop is not None
        self._state = _State.CLOSING
        self._hot = _UNBOUND
        self._closing = loop.create_future()
        self._cancel_on_close = cancel
        self._close_when_idle = True
        while self._putters:
            putter, _ = self._putters.popitem(last=False)
            if not putter.done():
                putter.set_exception(BatcherClosed(f"{self!r} was closed"))
        if cancel:
            self._cancel_everything(own)
        else:
            for batch in list(self._open.values()):
                self._make_due(batch, "close")
        await self._wait_reentrant(own)

    def _complete_close(self) -> None:
        """The last batch of a close started from inside a sink is done."""
        self._close_when_idle = False
        self._state = _State.CLOSED
        self._stop_watch()
        self._log_refusals()
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(None)

    async def _wait_reentrant(self, own: _Batch) -> None:
        """From inside a sink: wait for the other calls in flight that do not wait on us."""
        others = [b for b in self._inflight if b is not own and b not in self._reentrant]
        self._enter_reentrant(own)
        try:
            await self._wait_for(others)
        finally:
            self._leave_reentrant(own)

    async def __aenter__(self) -> Self:
        """Bind to the running loop; ``async with`` closes (drains) on exit."""
        self._bind()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = self._state.value
        loop = self._loop
        if self._state is _State.RUNNING and loop is not None and loop.is_closed():
            state = "loop closed"
        return (
            f"<Batcher {self._name!r} [{state}] "
            f"pending={self._pending} in_flight={self._in_flight}>"
        )

    def __del__(self) -> None:
        if getattr(self, "_state", None) is not _State.RUNNING:
            return
        self._stop_watch()
        if self._pending or self._in_flight:
            _log.warning(
                "batcher %r was garbage-collected with %d pending and %d in-flight items: "
                "they are lost (close it with `await batcher.aclose()` or `async with`)",
                self._name,
                self._pending,
                self._in_flight,
            )
            warnings.warn(
                f"{self!r} was garbage collected with {self._pending} pending and "
                f"{self._in_flight} in-flight items that will never be resolved; "
                "close it with `await batcher.aclose()` or `async with`",
                ResourceWarning,
                source=self,
                stacklevel=1,
            )

    # --------------------------------------------------------------- observers

    def _not_streaming(self, what: str) -> TypeError:
        return TypeError(
            f"the sink of {self!r} is an async generator (a streaming sink): use "
            f"`async for value in batcher.submit_stream(item)`, not {what}()"
        )

    def _choose_paths(self) -> None:
        """Pick the per-item path: the inlined one needs nothing computed per item."""
        simple = (
            not self._streaming
            and self._overflow != "drop_oldest"
            and self._partition is None
            and self._weigh is None
            and self._max_pending is None
        )
        # A capturing observer (a tracer) keeps the inlined path: _filled
        # captures for the first MAX_LINKS items of each batch (see full_at).
        self._plain = simple and not self._dedupe
        # The DataLoader's configuration: only the dedupe index to compute (_put_key).
        self._plain_keyed = simple and self._dedupe and not self._capture

    def _recheck_on_loop(self) -> None:
        """``_recheck_open`` on the loop's thread: integrations attach from any thread."""
        loop = self._loop
        thread = self._hot._thread_id
        if loop is not None and thread is not None and thread != _get_ident():
            loop.call_soon_threadsafe(self._recheck_open)
        else:
            self._recheck_open()

    def _recheck_open(self) -> None:
        """Settings changed: open batches take their next item through ``_filled``."""
        for batch in self._open.values():
            batch.full_at = min(batch.full_at, len(batch.futs) + 1)

    def _attach(self, observer: Observer) -> None:
        """Private, for integrations (see ``_observe``): tell ``observer`` about batches."""
        if observer in self._observers:
            return
        self._observers = (*self._observers, observer)
        self._capture = tuple(o.capture for o in self._observers if o.capture is not None)
        self._choose_paths()
        self._recheck_on_loop()

    def _detach(self, observer: Observer) -> None:
        self._observers = tuple(o for o in self._observers if o is not observer)
        self._capture = tuple(o.capture for o in self._observers if o.capture is not None)
        self._choose_paths()
        self._recheck_on_loop()

    def _notify(self, what: str, call: Callable[[], object]) -> object:
        """Run one observer hook; its failure goes to the loop's handler, not to callers."""
        try:
            return call()
        except Exception as exc:
            loop = self._loop
            assert loop is not None
            loop.call_exception_handler({"message": f"{what} of {self!r} raised", "exception": exc})
            return None

    # ------------------------------------------------------------ loop binding

    def _bind(self) -> asyncio.AbstractEventLoop:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                f"{self!r} needs a running asyncio event loop: use it from a coroutine or "
                "callback on the loop (under anyio: the asyncio backend; trio is not "
                "supported), or from another thread with submit_threadsafe()"
            ) from None
        if self._state is _State.CLOSING or self._state is _State.CLOSED:
            raise BatcherClosed(f"{self!r} is closed; it accepts no new items")
        bound = self._loop
        if bound is loop:
            if self._hot is _UNBOUND:  # the loop is ending (shutdown_asyncgens) but runs
                raise RuntimeError(
                    f"the event loop of {self!r} is shutting down (asyncio.run() is "
                    "ending): it accepts no new items, whose timers would die with it; "
                    "close the batcher before its loop ends"
                )
            return loop
        if bound is not None:
            if (
                not bound.is_closed()
                or self._lost
                or self._in_flight
                or self._putters
                or self._stranded()
            ):
                raise RuntimeError(
                    f"{self!r} is bound to another event loop ({bound!r}) that is "
                    "still open, or ended with items in it; a batcher serves one loop: "
                    "create one per loop (e.g. per asyncio.run() or per thread)"
                )
            for batch in self._undispatched():  # only callers that left: forget them
                self._retire(batch)
                self._release(len(batch.futs) - batch.released)
            self._open.clear()
            self._ready.clear()
            self._waiting.clear()
            self._undue.clear()
            self._heads.clear()
        self._stop_watch()
        self._loop = loop
        self._discard = _Discard(loop=loop)
        self._gone = loop.create_future()
        self._gone.set_result(None)
        self._hot = _hot_marker(loop)
        self._deadlines.t0 = loop.time()
        self._state = _State.RUNNING
        self._watch = LoopWatch(self)
        return loop

    def _stranded(self) -> bool:
        """Whether an undispatched item still has a caller (or is a ``put`` item)."""
        for batch in self._waiting:
            futs = batch.futs
            for slot in range(len(futs)):
                if _has_live(futs[slot], _extra_of(batch, slot)):
                    return True
        return False

    def _left_behind(self) -> bool:
        """Bound to a loop that is closed now, holding nothing: the next use may rebind.

        ``flush``/``aclose`` then have nothing to do on the running loop.
        """
        loop = self._loop
        return (
            loop is not None
            and loop.is_closed()
            and not self._in_flight
            and not self._putters
            and not self._stranded()
        )

    def _check_same_loop(self) -> None:
        """For ``flush``/``aclose``: the running loop must be the bound one."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            raise RuntimeError(
                f"{self!r} is bound to {self._loop!r}; flush() and aclose() must run on "
                f"that loop (running: {running!r})"
            )

    def _loop_ending(self) -> None:
        """The bound loop is shutting down (``asyncio.run`` ends): fail what is lost."""
        self._watch = None
        self._hot = _UNBOUND  # the next use goes through _bind, which checks the loop
        # (While it closes, the closer owns the items: a drain still runs, or its
        # cancellation failed them.)
        if self._state is _State.RUNNING and (self._pending or self._in_flight):
            # Nothing will run on this loop again: its callers and put items fail
            # now (counted), its sink calls are cancelled (their tasks take that
            # step before the loop stops); the batcher refuses another loop.
            failed, in_flight = self._failed, self._in_flight
            self._fail_undispatched(
                RuntimeError(f"the event loop of {self!r} ended before this item was dispatched")
            )
            for task in self._inflight.values():
                task.cancel()
            pending = self._failed - failed  # withdrawn callers' slots are not lost
            if pending or in_flight:
                self._lost = pending + in_flight
                _log.warning(
                    "the event loop of batcher %r is shutting down with %d pending and %d "
                    "in-flight items: they are lost (close the batcher before the loop ends)",
                    self._name,
                    pending,
                    in_flight,
                )

    def _stop_watch(self) -> None:
        watch = self._watch
        if watch is not None:
            self._watch = None
            watch.stop()

    def _own_batch(self) -> _Batch | None:
        """The batch whose sink call runs in this context (its task, or one it started)."""
        inside = _IN_SINK.get()
        if inside is None or inside[0] is not self or inside[1].finished:
            return None
        return inside[1]

    def _limit_text(self) -> str:
        limit = self._max_concurrency
        return "None" if math.isinf(limit) else str(int(limit))

    # ----------------------------------------------------------------- hot path

    def _put(self, item: T, fut: _Fut, waited: bool = False) -> _Batch | None:
        """Add ``item`` to its partition's open batch; ``None`` if no room.

        Everything computed from the item (partition, dedupe key, weight) is
        computed and checked first: an item refused for a bad value changes
        nothing (no room made, no batch opened).
        """
        pkey: Hashable = None
        if self._partition is not None:
            pkey = self._partition(item)
            try:
                batch = self._open.get(pkey)
            except TypeError:
                raise TypeError(
                    f"partition() of {self!r} returned the unhashable {pkey!r} for item "
                    f"{item!r}; a partition must be hashable (str, int, tuple, ...)"
                ) from None
        else:
            batch = self._open.get(None)
        index: Hashable = None
        if self._dedupe:
            index = item if self._key is None else self._key(item)
            try:
                hash(index)
            except TypeError:
                raise TypeError(
                    f"{self!r} has dedupe=True, which needs hashable items or a key= "
                    f"function; cannot hash {index!r}"
                ) from None
            if batch is not None and self._coalesce(batch, index, fut):
                return self._coalesced(batch)
        weight: float = 0
        if self._weigh is not None:
            weight = _checked_weight(self, self._weigh(item), item)
        if self._max_pending is not None and (
            self._pending + (0 if waited else self._reserved) >= self._max_pending
            or (self._putters and not waited)
        ):
            if not self._make_room(waited):
                return None
            batch = self._open.get(pkey)  # the room made may have sealed or emptied it
            if batch is not None and self._dedupe and self._coalesce(batch, index, fut):
                return self._coalesced(batch)
        if (
            batch is not None
            and self._weigh is not None
            and batch.items
            and batch.weight + weight > self._max_weight
        ):
            self._seal(batch, "weight")
            batch = None
        if batch is None:
            batch = self._open_batch(pkey)
        if batch.index is not None:
            batch.index[index] = len(batch.items)
        if batch.arrivals is not None:
            self._track_arrival(batch)
        batch.items.append(item)
        batch.futs.append(fut)
        self._pending += 1
        if self._capture and (batch.captured is None or len(batch.captured) < MAX_LINKS):
            self._capture_links(batch)
        if self._weigh is not None:
            batch.weight += weight
            if batch.weight >= self._max_weight:
                self._seal(batch, "weight")
                return batch
        if len(batch.items) >= self._max_size:
            self._seal(batch, "size")
        elif (
            self._max_pending is not None
            and self._pending + self._reserved >= self._max_pending
            and self._overflow != "drop_oldest"
        ):
            self._room_ran_out()
        return batch

    def _filled(self, batch: _Batch) -> None:
        """The inlined paths' one test per item came true (``len(futs) >= full_at``).

        Either the batch is full, or an observer captures for this item (the
        first :data:`MAX_LINKS` of a batch, while a tracer is attached): then
        ``full_at`` moves one item on, and past the captures back to
        ``max_size``, so nothing more runs per item without an observer.
        """
        n = len(batch.futs)
        size = self._max_size
        if n <= MAX_LINKS and self._capture:
            captured = batch.captured
            if captured is None:
                captured = batch.captured = []
            try:
                for capture in self._capture:
                    value = capture()
                    if value is not None:
                        captured.append(value)
            except Exception as exc:  # an observer's bug must not refuse the item
                self._notify("observer capture", functools.partial(_reraise, exc))
            if n < size:
                batch.full_at = n + 1 if n < MAX_LINKS else size
                return
        batch.full_at = size
        if n >= size:
            self._seal(batch, "size")

    def _coalesced(self, batch: _Batch) -> _Batch:
        """A caller joined an equal item's slot: its span is linked too (under the cap)."""
        if self._capture and (batch.captured is None or len(batch.captured) < MAX_LINKS):
            self._capture_links(batch)
        return batch

    def _capture_links(self, batch: _Batch) -> None:
        captured = batch.captured
        if captured is None:
            captured = batch.captured = []
        try:
            for capture in self._capture:
                value = capture()
                if value is not None:
                    captured.append(value)
        except Exception as exc:  # an observer's bug must not refuse the item
            self._notify("observer capture", functools.partial(_reraise, exc))

    def _coalesce(self, batch: _Batch, index: Hashable, fut: _Fut) -> bool:
        """With ``dedupe``: join ``fut`` to the slot of an equal item, if any."""
        assert batch.index is not None
        try:
            slot = batch.index.get(index)
        except TypeError:
            raise TypeError(
                f"dedupe=True needs hashable items or a key= function; cannot hash {index!r}"
            ) from None
        if slot is None:
            return False
        if batch.extra is None:
            batch.extra = {}
        batch.extra.setdefault(slot, []).append(fut)
        batch.coalesced += 1
        return True

    def _put_key(self, item: T, index: Hashable, fut: _Fut) -> None:
        """Private, for :class:`DataLoader`: ``submit_nowait`` with the caller's future.

        ``index`` is ``key(item)``, already computed by the caller (its cache
        key), and ``fut`` a pending future of the bound loop, which the batcher
        resolves like its own (the loader's futures resolve their waiters in
        ``set_result``, without a callback hop). With ``dedupe`` and no
        partition, weight or ``max_pending`` (the loader's defaults) it is
        ``_put`` without the per-item loop check (a thread-id compare, as in
        ``submit_nowait``) and without the options' branches; otherwise it is
        ``submit_nowait``. Raises like ``submit_nowait``.
        """
        if self._hot._thread_id != _get_ident():
            self._bind()
        if not self._plain_keyed:
            if self._put(item, fut) is None:
                self._rejected += 1
                raise QueueFull(self._full_message())
            return
        batch = self._open.get(None)
        if batch is None:
            batch = self._open_batch(None)
        if self._coalesce(batch, index, fut):
            return
        assert batch.index is not None
        batch.index[index] = len(batch.items)
        batch.items.append(item)
        batch.futs.append(fut)
        self._pending += 1
        if len(batch.items) >= self._max_size:
            self._seal(batch, "size")

    def _put_keys(self, items: list[T], indexes: list[Hashable], futs: list[_Fut]) -> None:
        """Private, for :class:`DataLoader`: :meth:`_put_key` for many items at once.

        ``indexes`` are distinct and hashable (``load_many`` dedupes its keys
        first). In the loader's configuration the items go into the open
        batch a slice at a time (list and dict updates done in C); a slice
        holding an index already in the open batch (a key cleared from the
        cache and loaded again) goes item by item, to coalesce it. If it
        raises, the items before the failing one may have been accepted: the
        caller withdraws them by cancelling their futures.
        """
        if self._hot._thread_id != _get_ident():
            self._bind()
        if not self._plain_keyed:
            for item, ix, fut in zip(items, indexes, futs, strict=True):
                self._put_key(item, ix, fut)
            return
        n = len(items)
        i = 0
        while i < n:
            batch = self._open.get(None)
            if batch is None:
                batch = self._open_batch(None)
            index = batch.index
            assert index is not None
            start = len(batch.items)
            j = min(n, i + self._max_size - start)
            chunk = indexes[i:j]
            if index and not index.keys().isdisjoint(chunk):
                for k in range(i, j):
                    self._put_key(items[k], indexes[k], futs[k])
            else:
                index.update(zip(chunk, range(start, start + j - i), strict=True))
                batch.items += items[i:j]
                batch.futs += futs[i:j]
                self._pending += j - i
                if len(batch.items) >= self._max_size:
                    self._seal(batch, "size")
            i = j

    def _answer_pending(self, index: Hashable, value: object) -> None:
        """Private, for :class:`DataLoader` ``prime``: answer an undispatched key now.

        Every caller of the slot keyed ``index`` (``key(item)``) in a batch not
        yet dispatched gets ``value`` (an ``Exception`` fails them), counted as
        usual; the slot gives its room back and leaves the batch's index, so
        a later load of the key takes a new slot. Needs ``dedupe``.
        """
        for batch in list(self._waiting):
            table = batch.index
            slot = None if table is None else table.get(index)
            if slot is None:
                continue
            assert table is not None
            del table[index]
            extra = _extra_of(batch, slot)
            futs = [batch.futs[slot]]
            items = [batch.items[slot]]
            values = [value]
            self._deliver(batch, items, futs, [extra] if extra else None, values, None)
            batch.futs[slot] = self._gone  # type: ignore[assignment]
            batch.items[slot] = None
            batch.released += 1
            self._release(1)
            self._wake_putters()

    # ------------------------------------------------ timeouts, waits, close

    async def _submit_with_timeout(
        self,
        loop: asyncio.AbstractEventLoop,
        item: T,
        fut: _Fut,
        timeout: float,  # noqa: ASYNC109 - the public per-item timeout
    ) -> R:
        deadline = loop.time() + timeout
        batch = self._put(item, fut)
        if batch is None:
            batch = await self._put_when_room(item, fut, deadline)
        handle = loop.call_at(deadline, self._expire, batch, fut, item, timeout)
        try:
            return await fut  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            self._caller_left(batch, fut, item)
            raise
        finally:
            handle.cancel()

    async def _wait_for(self, batches: list[_Batch]) -> None:
        loop = self._loop
        assert loop is not None
        waiters = []
        for batch in dict.fromkeys(batches):
            if batch.finished or (batch.running and batch not in self._inflight):
                continue  # retired, or done already
            waiter: _Fut = loop.create_future()
            if batch.on_done is None:
                batch.on_done = []
            batch.on_done.append(waiter)
            waiters.append(waiter)
        if waiters:
            await asyncio.gather(*waiters)

    def _cancel_everything(self, spare: _Batch | None = None) -> None:
        """``aclose(cancel=True)``: fail what is pending, cancel what runs (but ``spare``)."""
        self._cancel_on_close = True
        self._fail_undispatched(
            BatcherClosed(f"{self!r} was closed with cancel=True before dispatch")
        )
        for batch, task in self._inflight.items():
            if batch is not spare:
                task.cancel()

    def _fail_undispatched(self, closed: BaseException) -> None:
        """Fail every item not dispatched yet with ``closed``, and forget their batches.

        All of them leave the batcher first: the callbacks run while failing
        them (``on_batch``, observers, callers' done-callbacks) find none of
        them there to seal, start or count again.
        """
        batches = self._undispatched()
        for batch in batches:
            if batch.timer is not None:
                batch.timer.cancel()
                batch.timer = None
            batch.running = True
            self._release(len(batch.futs) - batch.released)
            self._submitted += len(batch.futs) + batch.coalesced
        self._open.clear()
        self._ready.clear()
        self._waiting.clear()
        self._undue.clear()
        self._heads.clear()
        for batch in batches:
            items, futs, extra = self._live(batch, batch.items, batch.futs, _extra_list(batch))
            reporting = bool(items) and (self._on_batch is not None or bool(self._observers))
            if reporting:
                batch.failed = []
            self._deliver(batch, items, futs, extra, None, closed)
            if reporting:
                # Never dispatched, but its items failed: put() users learn which.
                batch.reason = batch.reason or "close"
                loop = self._loop
                assert loop is not None
                self._report(batch, len(items), loop.time(), closed)
            self._signal_done(batch)

    def _undispatched(self) -> list[_Batch]:
        return list(self._waiting)


class _Unbound:
    """``Batcher._hot`` while no loop is bound (or the bound one is ending): no thread."""

    __slots__ = ()
    _thread_id = None


_UNBOUND = _Unbound()


class _RunningIn:
    """``Batcher._hot`` for a loop without asyncio's ``_thread_id`` (uvloop): the same
    answer, from ``is_running()``."""

    __slots__ = ("_ident", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ident = _get_ident()

    @property
    def _thread_id(self) -> int | None:
        return self._ident if self._loop.is_running() else None


def _hot_marker(loop: asyncio.AbstractEventLoop) -> object:
    return loop if hasattr(loop, "_thread_id") else _RunningIn(loop)


def _reraise(exc: BaseException) -> None:
    raise exc


# The batcher each Adaptive tunes, by the policy's id: a batcher holds its
# policy, so the id cannot be reused while the entry's batcher lives.
_TUNING: weakref.WeakValueDictionary[int, Batcher[Any, Any]] = weakref.WeakValueDictionary()


def _claim_policy(batcher: Batcher[Any, Any], policy: Adaptive | None) -> None:
    """Refuse an ``Adaptive`` that another open batcher is tuned by.

    An ``Adaptive`` keeps one batcher's measurements and search: shared, two
    batchers would move one limit from each other's samples.
    """
    if policy is None:
        return
    other = _TUNING.get(id(policy))
    if (
        other is not None
        and other is not batcher
        # (one whose constructor failed after this check has neither)
        and getattr(other, "_policy", None) is policy
        and getattr(other, "_state", _State.CLOSED) is not _State.CLOSED
    ):
        raise ValueError(
            f"this Adaptive already tunes {other!r}: give each batcher its own "
            "Adaptive(...) (copy.deepcopy(policy) copies one, state included)"
        )
    _TUNING[id(policy)] = batcher
