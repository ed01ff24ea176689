"""The dispatch rule: when a batch is due, and when its sink call starts.

A batch is *due* when it is full (size or weight), when ``max_wait`` has
passed since its first item (``_open_batch`` arms that timer, or a
``call_soon`` pair for ``max_wait=0``), at a heartbeat tick, or on
``flush``/``aclose``: ``_make_due`` puts it in the FIFO of due batches,
named by its first trigger. ``_pump`` starts due batches, oldest first,
while fewer than ``max_concurrency`` sink calls run (one slot is lent to
sinks that wait on their own batcher). ``_start`` seals the batch, gives its
room back, drops callers that left and starts one task for its sink calls
(``_runner``). A due batch keeps accepting items until it starts: batches
grow by themselves under load.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Coroutine, Hashable
from typing import Any

from ._batch import _Batch, _done, _extra_list, _Fut
from ._core import R, T, _Core, _log
from ._stats import DispatchReason
from ._timers import next_tick


class _Dispatch(_Core[T, R]):
    """The dispatch rule (a part of :class:`~asyncbatch.Batcher`)."""

    __slots__ = ()

    def _open_batch(self, pkey: Hashable) -> _Batch:
        loop = self._bind()
        batch = _Batch(pkey, next(self._seq), self._dedupe)
        batch.full_at = 1 if self._capture else self._max_size
        self._open[pkey] = batch
        self._waiting[batch] = None
        self._undue[batch] = None
        if self._overflow == "drop_oldest":  # numbered even before max_pending is set
            batch.arrivals = []
        batch.opened = now = loop.time()
        if self._soon:
            # Due once the tasks created in this iteration have taken their first
            # step (two hops of the ready queue, as DataLoaders do): a resolver
            # that loads from a task started now still joins this batch.
            batch.timer = loop.call_soon(self._on_soon, batch)
            return batch
        deadline = self._deadlines.first(now)
        if deadline is not None:
            when, tick = deadline
            reason: DispatchReason = "interval" if tick else "wait"
            batch.timer = loop.call_at(when, self._on_timer, batch, reason)
        return batch

    def _on_timer(self, batch: _Batch, reason: DispatchReason) -> None:
        batch.timer = None
        self._make_due(batch, reason)

    def _on_soon(self, batch: _Batch) -> None:
        loop = self._loop
        assert loop is not None
        batch.timer = loop.call_soon(self._on_timer, batch, "wait")

    def _seal(self, batch: _Batch, reason: DispatchReason) -> None:
        """The batch is full: it takes no more items and becomes due."""
        if self._open.get(batch.partition) is batch:
            del self._open[batch.partition]
        self._make_due(batch, reason)

    def _make_due(self, batch: _Batch, reason: DispatchReason) -> None:
        # The first trigger names the batch; later ones (it fills up while it
        # waits for a slot) do not move it in the FIFO of due batches.
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        if batch.reason is None:
            batch.reason = reason
            if self._policy is not None:
                loop = self._loop
                assert loop is not None
                batch.due_at = loop.time()
            self._undue.pop(batch, None)
            self._ready.append(batch)
            self._pump()

    def _pump(self) -> None:
        ready = self._ready
        limit = self._max_concurrency
        if self._reentrant:
            # Sinks waiting on this batcher hold their slots idle: if the limit
            # dropped under them (configure, Adaptive), one slot is still lent
            # so that what they wait for can run.
            limit = max(limit, len(self._reentrant) + 1)
        while ready and self._busy < limit:
            batch = ready.popleft()
            if not batch.running:  # else retired while it waited (every item dropped)
                self._start(batch)

    def _start(self, batch: _Batch) -> None:
        """Seal ``batch``, drop withdrawn callers, and start its sink call."""
        if self._open.get(batch.partition) is batch:
            del self._open[batch.partition]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        batch.running = True
        del self._waiting[batch]
        self._undue.pop(batch, None)
        self._release(len(batch.futs) - batch.released)
        self._submitted += len(batch.futs) + batch.coalesced
        self._wake_putters()
        items, futs, extra = self._live(batch, batch.items, batch.futs, _extra_list(batch))
        if not items:
            self._signal_done(batch)
            return
        assert batch.reason is not None
        self._batches += 1
        self._dispatched_slots += len(items)
        self._reasons[batch.reason] = self._reasons.get(batch.reason, 0) + 1
        self._busy += 1
        self._in_flight += len(items)
        _log.debug(
            "batcher %r: dispatching %d items (reason %r)", self._name, len(items), batch.reason
        )
        if self._on_batch is not None or self._observers:
            batch.failed = []
        loop = self._loop
        assert loop is not None
        # A context of its own: the batch serves many callers, so none of their
        # contextvars (request ids, tenants, trace baggage) may reach the sink.
        run = self._run(batch, items, futs, extra)
        try:
            task = _new_task(loop, run)
        except Exception as exc:  # a task factory that fails: these callers fail, not hang
            run.close()
            self._deliver(batch, items, futs, extra, None, exc)
            self._finish(batch, len(items), loop.time(), exc)
            return
        if not task.done():  # an eager task factory may have finished it already
            self._inflight[batch] = task
            task.add_done_callback(functools.partial(self._reap, batch, items, futs, extra))

    def _reap(
        self,
        batch: _Batch,
        items: list[Any],
        futs: list[_Fut],
        extra: list[list[_Fut]] | None,
        task: asyncio.Task[None],
    ) -> None:
        # A task cancelled before its first step never runs a line of _run, so
        # its callers would wait forever: resolve them here instead.
        if not task.cancelled():
            task.exception()  # delivered to the callers already: not "never retrieved"
        if batch.finished:
            return
        closed = self._call_cancelled()
        self._deliver(batch, items, futs, extra, None, closed)
        loop = self._loop
        assert loop is not None
        self._finish(batch, len(futs), loop.time(), closed)

    def _live(
        self,
        batch: _Batch,
        items: list[Any],
        futs: list[_Fut],
        extra: list[list[_Fut]] | None,
    ) -> tuple[list[Any], list[_Fut], list[list[_Fut]] | None]:
        """Keep only the slots that still have a caller waiting."""
        if extra is None and not any(map(_done, futs)):
            return items, futs, None
        keep_items: list[Any] = []
        keep_futs: list[_Fut] = []
        keep_extra: list[list[_Fut]] = []
        for i, item in enumerate(items):
            waiters = [futs[i], *extra[i]] if extra is not None else [futs[i]]
            live = []
            for fut in waiters:
                if fut.done():
                    self._count_cancelled(batch, fut)
                else:
                    live.append(fut)
            if live:
                keep_items.append(item)
                keep_futs.append(live[0])
                keep_extra.append(live[1:])
        has_extra = any(keep_extra)
        return keep_items, keep_futs, keep_extra if has_extra else None

    def _rearm(self, batch: _Batch) -> None:
        """Arm an open batch's timer again under new timing settings."""
        loop = self._loop
        assert loop is not None
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        if self._soon:
            batch.timer = loop.call_soon(self._on_timer, batch, "wait")
            return
        deadline = self._deadlines.first(batch.opened)
        if deadline is None:
            return
        when, tick = deadline
        reason: DispatchReason = "interval" if tick else "wait"
        if tick and when <= loop.time():
            # The grid point after the first item passed: the next one to come.
            when = next_tick(self._deadlines.t0, self._deadlines.interval or 1.0, loop.time())
        batch.timer = loop.call_at(when, self._on_timer, batch, reason)


def _new_task(
    loop: asyncio.AbstractEventLoop, run: Coroutine[Any, Any, None]
) -> asyncio.Task[None]:
    """The sink task, in a fresh context (no caller's contextvars reach the sink).

    A task factory written before Python 3.11 takes no ``context``: then the
    task is made without one (the sink sees the context it was started from).
    """
    try:
        return loop.create_task(run, context=contextvars.Context())
    except TypeError as exc:
        if "context" not in str(exc):
            raise
        return loop.create_task(run)
