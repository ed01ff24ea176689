"""What every part of the Batcher shares: its state, declared once.

:class:`Batcher` is assembled from parts that each own one concern, so a
reader finds each rule in one file:

- ``_batcher``: the public surface, the per-item hot path (``_put``),
  loop binding, ``configure``, re-entrancy, ``flush``/``aclose``.
- ``_dispatch``: the dispatch rule (when a batch is due, when it starts).
- ``_runner``: one batch's sink calls (timeout, retry, isolation, streaming)
  and the delivery of results onto callers' futures.
- ``_overflow``: room under ``max_pending`` (block, reject, drop_oldest)
  and callers leaving before dispatch.

Each part is a mixin over :class:`_Core`, which declares the slots (the
attribute lookups stay what they were in one class: the type's method cache
resolves them). The methods one part calls on another are declared here for
the type checker only.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import itertools
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeAlias, TypeVar

from ._batch import _Batch, _Discard, _Fut
from ._concurrency import Adaptive
from ._exceptions import BatcherClosed
from ._loopwatch import LoopWatch
from ._observe import Observer
from ._retry import Retry
from ._stats import BatchReport, DispatchReason
from ._timers import Deadlines

T = TypeVar("T")
R = TypeVar("R")

SinkResult: TypeAlias = Sequence[R | Exception] | Mapping[Any, R | Exception] | None
"""What a sink may return for a batch; see :class:`Batcher`."""

Overflow = Literal["block", "reject", "drop_oldest"]

_log = logging.getLogger("asyncbatch")
# Set inside each sink task (and so in the tasks it starts): whose sink, which batch.
_IN_SINK: contextvars.ContextVar[tuple[_Core[Any, Any], _Batch] | None] = contextvars.ContextVar(
    "asyncbatch_in_sink", default=None
)
_get_ident = threading.get_ident


class _State(enum.Enum):
    IDLE = "idle"  # not bound to a loop yet
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class _Core(Generic[T, R]):
    """The Batcher's state (set in ``Batcher.__init__``, which documents it)."""

    _sink: (
        Callable[[list[T]], Awaitable[SinkResult[R]]]
        | Callable[[list[T]], AsyncIterator[Sequence[R]]]
    )
    _name: str
    _streaming: bool
    _max_size: int
    _max_weight: float
    _weigh: Callable[[T], float] | None
    _max_concurrency: float
    _policy: Adaptive | None
    _max_pending: int | None
    _overflow: Overflow
    _key: Callable[[T], Hashable] | None
    _dedupe: bool
    _partition: Callable[[T], Hashable] | None
    _timeout: float | None
    _retry: Retry | None
    _on_batch: Callable[[BatchReport], object] | None
    _max_wait_setting: float | None
    _deadlines: Deadlines
    _soon: bool
    _observers: tuple[Observer, ...]
    _capture: tuple[Callable[[], object], ...]
    _plain: bool
    _plain_keyed: bool
    _state: _State
    _loop: asyncio.AbstractEventLoop | None
    _hot: Any
    _open: dict[Hashable, _Batch]
    _waiting: dict[_Batch, None]
    _ready: deque[_Batch]
    _inflight: dict[_Batch, asyncio.Task[None]]
    _putters: OrderedDict[_Fut, None]
    _reserved: int
    _busy: int
    _seq: itertools.count[int]
    _closing: asyncio.Future[None] | None
    _cancel_on_close: bool
    _undue: dict[_Batch, None]
    _heads: list[tuple[int, int, _Batch]]
    _arrival: itertools.count[int]
    _reentrant: dict[_Batch, int]
    _close_when_idle: bool
    _discard: _Discard | None
    _gone: _Fut | None
    _watch: LoopWatch | None
    _refusals_logged: float
    _reclaimed: bool
    _refusals_seen: tuple[int, int]
    _lost: int
    _pending: int
    _peak_pending: int
    _in_flight: int
    _submitted: int
    _succeeded: int
    _failed: int
    _cancelled: int
    _expired: int
    _rejected: int
    _dropped: int
    _batches: int
    _dispatched_slots: int
    _retries: int
    _reasons: dict[str, int]

    __slots__ = tuple(__annotations__)

    if TYPE_CHECKING:
        # Defined by the other parts; declared here for the type checker.

        def _bind(self) -> asyncio.AbstractEventLoop: ...

        def _call_cancelled(self) -> BatcherClosed: ...

        def _complete_close(self) -> None: ...

        def _count_cancelled(self, batch: _Batch, fut: _Fut) -> None: ...

        def _deliver(
            self,
            batch: _Batch,
            items: list[Any],
            futs: list[_Fut],
            extra: list[list[_Fut]] | None,
            values: Sequence[Any] | None,
            error: BaseException | None,
            again: list[int] | None = None,
        ) -> None: ...

        def _finish(
            self,
            batch: _Batch,
            size: int,
            start: float,
            error: BaseException | None,
        ) -> None: ...

        def _live(
            self,
            batch: _Batch,
            items: list[Any],
            futs: list[_Fut],
            extra: list[list[_Fut]] | None,
        ) -> tuple[list[Any], list[_Fut], list[list[_Fut]] | None]: ...

        def _make_due(self, batch: _Batch, reason: DispatchReason) -> None: ...

        def _notify(self, what: str, call: Callable[[], object]) -> object: ...

        def _pump(self) -> None: ...

        def _put(self, item: T, fut: _Fut, waited: bool = False) -> _Batch | None: ...

        def _release(self, n: int) -> None: ...

        async def _run(
            self,
            batch: _Batch,
            items: list[Any],
            futs: list[_Fut],
            extra: list[list[_Fut]] | None,
        ) -> None: ...

        def _signal_done(self, batch: _Batch) -> None: ...

        def _wake_putters(self) -> None: ...
