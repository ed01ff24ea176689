"""Hooks for integrations that watch batchers (``contrib.prometheus``, ``contrib.otel``).

An :class:`Observer` is told about sink calls and finished batches: per
batch, never per item. Cumulative figures (items by outcome, batches by
reason, pending, in flight, retries, the concurrency limit, a DataLoader's
cache hits and misses) are not pushed: an integration reads them from
``stats`` when it is scraped.

The one per-item hook is :attr:`Observer.capture`: when an attached observer
sets it, the batcher calls it at submit for the first :data:`MAX_LINKS` items
of each batch (a tracer uses it to remember the submitter's span). With no
observer attached, or none that captures, nothing runs per item.

Attach with :func:`attach`; it accepts a ``Batcher``, an ``@batch`` function
or bound method (every batcher it has and will create), or a ``DataLoader``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._stats import BatcherStats, BatchReport

__all__ = ["MAX_LINKS", "Observer", "SinkCall", "attach", "detach", "name_of", "stats_of"]

MAX_LINKS = 128
"""Captured objects kept per batch (OpenTelemetry's default span link limit)."""


@dataclass(frozen=True, slots=True)
class SinkCall:
    """One sink call about to run.

    Attributes:
        batcher: the batcher's name.
        size: items handed to the sink in this call.
        attempt: the batch's try number, from 1 (retries and isolation
            halves count on).
        captured: what :attr:`Observer.capture` returned at submit for the
            first :data:`MAX_LINKS` items of the batch (empty when no
            observer captures).
        start: ``loop.time()`` when the call starts.
    """

    batcher: str
    size: int
    attempt: int
    captured: Sequence[object]
    start: float


class Observer(Protocol):
    """What a batcher tells an attached integration. All methods run on the loop.

    Exceptions raised by an observer go to the loop's exception handler; they
    never reach a caller or stop a batch.
    """

    @property
    def capture(self) -> Callable[[], object] | None:
        """Called at submit (first :data:`MAX_LINKS` items per batch), or ``None``."""
        ...

    def call_started(self, call: SinkCall) -> object:
        """A sink call starts; the return value is handed back to :meth:`call_finished`."""
        ...

    def call_finished(
        self, call: SinkCall, token: object, duration: float, error: BaseException | None
    ) -> None:
        """A sink call ended after ``duration`` seconds; ``error`` if it raised or timed out."""
        ...

    def batch_finished(self, batcher: str, report: BatchReport) -> None:
        """A batch is finished: the same report ``on_batch`` gets."""
        ...


def attach(target: Any, observer: Observer) -> None:
    """Attach ``observer`` to a Batcher, an ``@batch`` wrapper or a DataLoader.

    Raises:
        TypeError: ``target`` is none of those.
    """
    hook = getattr(target, "_attach", None)
    if hook is None:
        raise TypeError(
            "expected an asyncbatch Batcher, @batch function or method, or DataLoader, "
            f"got {type(target).__name__}: {target!r}"
        )
    hook(observer)


def detach(target: Any, observer: Observer) -> None:
    """Undo :func:`attach` (a no-op if ``observer`` is not attached)."""
    target._detach(observer)


def name_of(target: Any) -> str:
    """The name an integration labels ``target`` with."""
    return str(target.name)


def stats_of(target: Any) -> BatcherStats:
    """``target.stats``: the figures read at scrape time."""
    stats: BatcherStats = target.stats
    return stats
