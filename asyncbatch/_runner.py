"""The sink-call runner: one task per dispatched batch.

``_run`` calls the sink for a batch (split by ``max_size``/``max_weight``
when ``configure`` shrank them after the batch filled), under ``timeout``,
with ``retry`` (backoff; ``Retryable`` items alone), ``isolate`` bisection,
and, for a streaming sink, step by step (``_run_stream``). ``_deliver`` puts
each item's answer (read by ``_results.answer_values``) on its callers'
futures; ``_finish`` reports the batch (``on_batch``, observers, an
``Adaptive`` policy's sample) and frees its slot.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Sequence
from typing import Any, TypeAlias

from ._batch import _Batch, _done, _fail, _Fut, _has_live
from ._concurrency import BatchSample
from ._core import _IN_SINK, R, T, _Core, _log
from ._exceptions import BatcherClosed
from ._observe import Observer, SinkCall
from ._results import answer_values
from ._retry import Retryable
from ._stats import BatchReport
from ._streaming import END

# A started sink call: what it was, the observers told, their tokens.
_Started: TypeAlias = tuple[SinkCall, tuple[Observer, ...], list[object]]


class _Runner(_Core[T, R]):
    """Sink calls and result delivery (a part of :class:`~asyncbatch.Batcher`)."""

    __slots__ = ()

    async def _run(
        self,
        batch: _Batch,
        items: list[Any],
        futs: list[_Fut],
        extra: list[list[_Fut]] | None,
    ) -> None:
        _IN_SINK.set((self, batch))  # this task's context: re-entrant calls know their sink
        loop = self._loop
        assert loop is not None
        start = loop.time()
        size = len(items)
        error: BaseException | None = None
        try:
            error = await self._run_parts(batch, items, futs, extra)
        except asyncio.CancelledError:
            closed = self._call_cancelled()
            error = closed
            failed = self._failed
            self._deliver(batch, items, futs, extra, None, closed)
            if not self._cancel_on_close and self._watch is not None:
                self._cancelled_from_outside(self._failed - failed)
            raise
        except BaseException as exc:
            error = exc
            self._deliver(batch, items, futs, extra, None, exc)
            raise
        finally:
            self._finish(batch, size, start, error)

    def _cancelled_from_outside(self, lost: int) -> None:
        """A sink task was cancelled by someone else than this batcher: most often
        ``asyncio.run`` ending (it cancels every task before the loop-end hook).
        Its items failed; like items lost at loop end they are logged, and the
        batcher will not move to another loop."""
        if not lost:
            return
        self._lost += lost
        _log.warning(
            "batcher %r: a sink call with %d items was cancelled from outside (is the "
            "event loop ending?): they fail (close the batcher before the loop ends)",
            self._name,
            lost,
        )

    async def _run_parts(
        self,
        batch: _Batch,
        items: list[Any],
        futs: list[_Fut],
        extra: list[list[_Fut]] | None,
        tried: int = 0,
    ) -> BaseException | None:
        """The sink calls of a batch: one, unless ``configure`` lowered ``max_size``
        or ``max_weight`` after it filled; then consecutive parts, each within
        the limits in force when it starts, one after the other in this slot."""
        error: BaseException | None = None
        while items:
            n = self._fits(batch, items)
            part_extra = extra[:n] if extra is not None else None
            error = await self._run_part(batch, items[:n], futs[:n], part_extra, tried) or error
            items, futs = items[n:], futs[n:]
            extra = extra[n:] if extra is not None else None
        return error

    def _fits(self, batch: _Batch, items: list[Any]) -> int:
        """How many of ``items`` (at least one) one sink call may take now."""
        n = min(len(items), self._max_size)
        weigh = self._weigh
        if weigh is None or batch.weight <= self._max_weight:
            return n
        total: float = 0
        for i in range(n):
            total += weigh(items[i])
            if i and total > self._max_weight:
                return i
        return n

    async def _run_part(
        self,
        batch: _Batch,
        items: list[Any],
        futs: list[_Fut],
        extra: list[list[_Fut]] | None,
        tried: int = 0,
    ) -> BaseException | None:
        """One sink call and its retries (and isolation); the error it ends with, if any.

        ``tried``: tries these items already had (a retry that ``configure``
        made go in parts goes on counting).
        """
        if self._streaming:
            return await self._run_stream(batch, items, futs, extra, tried)
        retry = self._retry
        attempts = tried
        error: BaseException | None = None
        while True:
            attempts += 1
            try:
                values = await self._call(batch, items, attempts)
            except Exception as exc:
                if _overload(exc):
                    batch.overloaded = True
                final = isinstance(exc, _SinkMisuse)
                if not final and self._may_retry(attempts, exc):
                    items, futs, extra = await self._back_off(
                        batch, attempts, exc, items, futs, extra
                    )
                    if self._fits(batch, items) < len(items):
                        # configure() lowered a limit meanwhile: the retry goes in parts.
                        return await self._run_parts(batch, items, futs, extra, attempts)
                    if items:
                        continue
                    break
                if not final and retry is not None and retry.isolate and len(items) > 1:
                    error = await self._isolate(batch, items, futs, extra, exc, attempts)
                else:
                    error = exc
                    self._deliver(batch, items, futs, extra, None, exc)
            else:
                if self._policy is not None and any(map(_overload, values)):
                    batch.overloaded = True
                again: list[int] | None = None
                if retry is not None and attempts < retry.attempts:
                    again = []
                self._deliver(batch, items, futs, extra, values, None, again)
                if again:
                    assert retry is not None
                    if any(_overload(values[i]) for i in again):
                        batch.overloaded = True
                    # Items the sink marked Retryable go again, on their own,
                    # after the backoff (or the longest retry_after among them).
                    delay = max(retry.delay(attempts, values[i]) for i in again)
                    self._retried(attempts, delay, values[again[0]])
                    await asyncio.sleep(delay)
                    items, futs, extra = self._live(
                        batch,
                        [items[i] for i in again],
                        [futs[i] for i in again],
                        [extra[i] for i in again] if extra is not None else None,
                    )
                    if self._fits(batch, items) < len(items):
                        return await self._run_parts(batch, items, futs, extra, attempts)
                    if items:
                        continue
            return error
        return error  # every caller left while the batch waited for a retry

    async def _run_stream(
        self,
        batch: _Batch,
        items: list[Any],
        futs: list[_Fut],
        extra: list[list[_Fut]] | None,
        tried: int = 0,
    ) -> BaseException | None:
        """Feed the callers' streams from one async generator call per batch.

        Retries (``retry``) only until a first step was delivered; ``timeout``
        bounds each step. When every caller has left, the generator is closed.
        """
        attempts = tried
        while True:
            attempts += 1
            batch.calls += 1
            agen = self._sink(list(items))
            if not hasattr(agen, "__anext__"):
                error: BaseException = _SinkMisuse(
                    f"sink {self._name!r} returned {type(agen).__name__}, not an async iterator"
                )
                self._deliver(batch, items, futs, extra, None, error)
                return error
            delivered = False
            started = self._call_started(batch, len(items), attempts) if self._observers else None
            failure: BaseException | None = None
            try:
                while self._still_wanted(futs, extra):
                    try:
                        step = await self._next_step(agen, len(items))
                    except StopAsyncIteration:
                        self._deliver(batch, items, futs, extra, [None] * len(items), None)
                        return None
                    values = answer_values(self._name, step, items, self._key)
                    delivered = True
                    self._feed(batch, items, futs, extra, values)
                return None  # every caller left: the generator is closed below
            except BaseException as exc:
                failure = exc
                if not isinstance(exc, Exception):
                    raise
                if _overload(exc):
                    batch.overloaded = True
                if not delivered and self._may_retry(attempts, exc):
                    items, futs, extra = await self._back_off(
                        batch, attempts, exc, items, futs, extra
                    )
                    if self._fits(batch, items) < len(items):
                        return await self._run_parts(batch, items, futs, extra, attempts)
                    if items:
                        continue
                    return None
                self._deliver(batch, items, futs, extra, None, exc)
                return exc
            finally:
                await _close_quietly(agen)
                self._call_finished(started, failure)

    async def _next_step(self, agen: Any, size: int) -> object:
        try:
            timeout = self._timeout
            if timeout is None:
                return await agen.__anext__()
            return await self._await_in_time(agen.__anext__(), size, timeout)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise
            raise RuntimeError(
                f"sink {self._name!r} raised CancelledError without being cancelled"
            ) from exc

    @staticmethod
    def _still_wanted(futs: list[_Fut], extra: list[list[_Fut]] | None) -> bool:
        if not all(map(_done, futs)):
            return True
        return extra is not None and any(not all(map(_done, w)) for w in extra)

    def _feed(
        self,
        batch: _Batch,
        items: list[Any],
        futs: list[_Fut],
        extra: list[list[_Fut]] | None,
        values: Sequence[Any],
    ) -> None:
        """One generator step: each entry to its callers' streams."""
        for i, value in enumerate(values):
            waiters = futs[i : i + 1] if extra is None else [futs[i], *extra[i]]
            if value is END or isinstance(value, Exception):
                if isinstance(value, Retryable):
                    value = value.error
                self._deliver(
                    batch,
                    [items[i]],
                    [futs[i]],
                    [extra[i]] if extra is not None else None,
                    [None if value is END else value],
                    None,
                )
                continue
            for stream in waiters:
                if not stream.done():
                    stream.push(value)  # type: ignore[attr-defined]

    def _may_retry(self, attempts: int, exc: BaseException) -> bool:
        retry = self._retry
        return retry is not None and attempts < retry.attempts and retry.retries(exc)

    async def _back_off(
        self,
        batch: _Batch,
        attempts: int,
        exc: BaseException,
        items: list[Any],
        futs: list[_Fut],
        extra: list[list[_Fut]] | None,
    ) -> tuple[list[Any], list[_Fut], list[list[_Fut]] | None]:
        """Wait before try ``attempts + 1``; the callers still there after it."""
        assert self._retry is not None
        delay = self._retry.delay(attempts, exc)
        self._retried(attempts, delay, exc)
        await asyncio.sleep(delay)
        return self._live(batch, items, futs, extra)

    def _retried(self, attempt: int, delay: float, exc: BaseException) -> None:
        self._retries += 1
        _log.info(
            "batcher %r: sink call failed (attempt %d, %s: %s); retrying in %.3f s",
            self._name,
            attempt,
            type(exc).__name__,
            exc,
            delay,
        )

    def _call_cancelled(self) -> BatcherClosed:
        if self._cancel_on_close:
            return BatcherClosed(
                f"{self!r} was closed with cancel=True while this item's batch was in flight"
            )
        return BatcherClosed(f"the sink call of {self!r} was cancelled")

    async def _call(self, batch: _Batch, items: list[Any], attempt: int) -> Sequence[Any]:
        """One sink call under ``timeout``, its answer mapped onto ``items``.

        The sink gets a list of its own: it may sort, drain or keep it; the
        answer is mapped back onto ``items``, which the batcher alone holds.
        ``attempt`` is these items' try number (1, then 2... for retries and
        isolation halves; each part of a batch split by ``configure`` is 1).
        """
        batch.calls += 1
        if not self._observers:
            return answer_values(self._name, await self._await_sink(items), items, self._key)
        started = self._call_started(batch, len(items), attempt)
        error: BaseException | None = None
        try:
            return answer_values(self._name, await self._await_sink(items), items, self._key)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._call_finished(started, error)

    def _call_started(self, batch: _Batch, size: int, attempt: int) -> _Started:
        """Tell the observers a sink call starts (a streaming one: its generator)."""
        loop = self._loop
        assert loop is not None
        call = SinkCall(self._name, size, attempt, batch.captured or (), loop.time())
        # The observers of this call are those attached when it started: one
        # detached meanwhile still gets its call_finished, with its own token.
        observers = self._observers
        tokens = [
            self._notify("observer call_started", functools.partial(o.call_started, call))
            for o in observers
        ]
        return call, observers, tokens

    def _call_finished(self, started: _Started | None, error: BaseException | None) -> None:
        """Tell the observers the call ended, last started first (their contexts nest)."""
        if started is None:
            return
        call, observers, tokens = started
        loop = self._loop
        assert loop is not None
        duration = loop.time() - call.start
        for observer, token in reversed(list(zip(observers, tokens, strict=True))):
            self._notify(
                "observer call_finished",
                functools.partial(observer.call_finished, call, token, duration, error),
            )

    async def _await_sink(self, items: list[Any]) -> object:
        awaitable = self._sink(list(items))
        if not inspect.isawaitable(awaitable):
            raise _SinkMisuse(
                f"sink {self._name!r} returned {type(awaitable).__name__}, not an awaitable; "
                "a sink must be an async function (async def sink(items): ...)"
            )
        try:
            timeout = self._timeout  # the one in force when the call starts
            if timeout is None:
                return await awaitable
            return await self._await_in_time(awaitable, len(items), timeout)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this call was cancelled (aclose(cancel=True), the loop ending)
            # Nobody cancelled this call: the sink raised CancelledError itself.
            raise RuntimeError(
                f"sink {self._name!r} raised CancelledError without being cancelled"
            ) from exc

    async def _await_in_time(
        self, awaitable: Awaitable[object], size: int, seconds: float
    ) -> object:
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                return await awaitable
        except TimeoutError:
            if not deadline.expired():
                raise  # the sink's own TimeoutError
            raise TimeoutError(
                f"sink {self._name!r} did not answer within {seconds} s (batch of {size} items)"
            ) from None

    async def _isolate(
        self,
        batch: _Batch,
        items: list[Any],
        futs: list[_Fut],
        extra: list[list[_Fut]] | None,
        exc: Exception,
        attempt: int,
    ) -> BaseException | None:
        """Bisect a failed batch so that only items failing alone get an error.

        Halves run one after the other, left first, one try each. Returns the
        error of the last item that failed alone (``None`` if in the end
        every item got a result).
        """
        if len(items) == 1:
            self._deliver(batch, items, futs, extra, None, exc)
            return exc
        error: BaseException | None = None
        mid = len(items) // 2
        for lo, hi in ((0, mid), (mid, len(items))):
            part_extra = extra[lo:hi] if extra is not None else None
            h_items, h_futs, h_extra = self._live(batch, items[lo:hi], futs[lo:hi], part_extra)
            if not h_items:
                continue
            if len(h_items) > 1 and self._fits(batch, h_items) < len(h_items):
                # configure() lowered a limit meanwhile: bisect on, without a call.
                error = await self._isolate(batch, h_items, h_futs, h_extra, exc, attempt) or error
                continue
            try:
                values = await self._call(batch, h_items, attempt + 1)
            except Exception as half_exc:
                error = (
                    await self._isolate(batch, h_items, h_futs, h_extra, half_exc, attempt + 1)
                    or error
                )
            else:
                self._deliver(batch, h_items, h_futs, h_extra, values, None)
        return error

    def _deliver(
        self,
        batch: _Batch,
        items: list[Any],
        futs: list[_Fut],
        extra: list[list[_Fut]] | None,
        values: Sequence[Any] | None,
        error: BaseException | None,
        again: list[int] | None = None,
    ) -> None:
        """Resolve callers: ``values[i]`` for slot ``i``, or ``error`` for all.

        Callers that already left (cancelled, expired, dropped) are skipped:
        a finished future is never touched again. With ``again`` (a list), the
        slots whose value is :class:`Retryable` and that still have a caller
        are left unresolved and listed there; without it their callers get
        the wrapped error. Nothing here raises before every caller is served.
        """
        resolved = failed = 0
        report = batch.failed
        if values is None:
            assert error is not None
            for i, fut in enumerate(futs):
                if fut.done():
                    self._count_cancelled(batch, fut)
                    continue
                _fail(fut, error)
                resolved += 1
                if report is not None:
                    report.append((items[i], error))
            failed = resolved
        else:
            for i, value in enumerate(values):
                fut = futs[i]
                if isinstance(value, Exception):
                    if isinstance(value, Retryable):
                        if again is not None and _has_live(fut, extra[i] if extra else None):
                            again.append(i)
                            continue
                        value = value.error
                    if fut.done():
                        self._count_cancelled(batch, fut)
                        continue
                    _fail(fut, value)
                    failed += 1
                    if report is not None:
                        report.append((items[i], value))
                elif fut.done():
                    self._count_cancelled(batch, fut)
                    continue
                else:
                    fut.set_result(value)
                resolved += 1
        if extra is not None:
            retrying = set(again) if again else ()
            for i, waiters in enumerate(extra):
                if not waiters or i in retrying:
                    continue
                value = error if values is None else values[i]
                if isinstance(value, Retryable):
                    value = value.error
                is_error = values is None or isinstance(value, Exception)
                hit = False
                for fut in waiters:
                    if fut.done():
                        self._count_cancelled(batch, fut)
                        continue
                    resolved += 1
                    if is_error:
                        _fail(fut, value)
                        failed += 1
                        hit = True
                    else:
                        fut.set_result(value)
                if hit and report is not None and futs[i].cancelled():
                    report.append((items[i], value))  # its first caller had left
        self._succeeded += resolved - failed
        self._failed += failed

    def _count_cancelled(self, batch: _Batch, fut: _Fut) -> None:
        """Count a cancelled caller in ``stats.cancelled``, once."""
        if not fut.cancelled():
            return  # expired or dropped: counted when that happened
        counted = batch.counted
        if counted is None:
            counted = batch.counted = set()
        elif fut in counted:
            return
        counted.add(fut)
        self._cancelled += 1

    def _finish(
        self,
        batch: _Batch,
        size: int,
        start: float,
        error: BaseException | None,
    ) -> None:
        loop = self._loop
        assert loop is not None
        batch.finished = True
        policy = self._policy
        if policy is not None:
            now = loop.time()
            # Items arrived between the batch's first item and its dispatch: on
            # average they waited half that, then the sink time.
            sample = BatchSample(
                now=now,
                size=size,
                latency=(start - batch.opened) / 2 + (now - start),
                queued=start - (batch.due_at or start),
                duration=now - start,
                in_flight=self._busy,
                overloaded=batch.overloaded,
                backlog=self._pending,
                waiting=len(self._ready),
                running=self._in_flight,
            )
            limit = self._notify("concurrency policy", functools.partial(policy.on_batch, sample))
            if isinstance(limit, int) and not isinstance(limit, bool):
                self._max_concurrency = min(max(policy.min, limit), policy.max)
        self._busy -= 1
        self._in_flight -= size
        self._inflight.pop(batch, None)
        if error is not None and not isinstance(error, BatcherClosed):
            _log.warning(
                "batcher %r: batch of %d items (partition %r) failed: %s: %s",
                self._name,
                size,
                batch.partition,
                type(error).__name__,
                error,
            )
        self._report(batch, size, start, error)
        self._signal_done(batch)
        self._pump()
        if self._close_when_idle and not self._inflight and not self._waiting:
            self._complete_close()

    def _report(self, batch: _Batch, size: int, start: float, error: BaseException | None) -> None:
        """``on_batch`` and the observers' ``batch_finished``, once per batch."""
        loop = self._loop
        assert loop is not None
        if self._on_batch is not None or self._observers:
            assert batch.reason is not None
            report = BatchReport(
                size=size,
                weight=batch.weight,
                partition=batch.partition,
                reason=batch.reason,
                attempts=batch.calls,
                start=start,
                duration=loop.time() - start,
                error=error,
                wait=start - batch.opened,
                failed_items=tuple(batch.failed or ()),
            )
            if self._on_batch is not None:
                self._notify("on_batch callback", functools.partial(self._on_batch, report))
            for observer in self._observers:
                self._notify(
                    "observer batch_finished",
                    functools.partial(observer.batch_finished, self._name, report),
                )

    def _signal_done(self, batch: _Batch) -> None:
        if batch.on_done:
            for waiter in batch.on_done:
                if not waiter.done():
                    waiter.set_result(None)
            batch.on_done = None


async def _close_quietly(agen: Any) -> None:
    """Close a sink's async generator; what it raises while closing is its own business."""
    try:
        await agen.aclose()
    except Exception:
        pass


def _overload(exc: object) -> bool:
    """An overload signal: a timeout, or an error that says when to come back."""
    return isinstance(exc, TimeoutError) or getattr(exc, "retry_after", None) is not None


class _SinkMisuse(TypeError):
    """The sink is not usable as called (not awaitable): failing again would not help."""
