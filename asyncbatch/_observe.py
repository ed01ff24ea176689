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

Attach with :func:`attach`; it accepts a ``Batcher``, an ``@batch`` function,
method (on the class: every instance's batchers) or bound method (every
batcher it has and will create), or a ``DataLoader``.

An ``@batch`` wrapper has many batchers over its life (one per event loop, per
instance, a fresh one after ``aclose()``) and lets them go (their loop closed,
their instance was collected, they were replaced). :func:`figures_of` reads
what a wrapper's batchers add up to: the final counts of those it let go,
folded in when it let them go (:class:`Totals`), and the batchers it still
has, whose ``stats`` the integration reads itself. So its counters never go
back, even for a batcher that came and went between two scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ._stats import BatcherStats

if TYPE_CHECKING:
    from ._stats import BatchReport

__all__ = [
    "CUMULATIVE",
    "MAX_LINKS",
    "Figures",
    "Observer",
    "SinkCall",
    "Totals",
    "attach",
    "detach",
    "figures_of",
    "name_of",
    "stats_of",
]

MAX_LINKS = 128
"""Captured objects kept per batch (OpenTelemetry's default span link limit)."""


@dataclass(frozen=True, slots=True)
class SinkCall:
    """One sink call about to run.

    Attributes:
        batcher: the batcher's name.
        size: items handed to the sink in this call.
        attempt: the try number of these items, from 1 (retries and
            isolation halves count on; each part of a batch split by
            ``configure`` is a first try). A streaming sink's call is one
            call, from its first step to its close.
        captured: what :attr:`Observer.capture` returned at submit for the
            first :data:`MAX_LINKS` items of the batch, whichever part,
            retry or half this call is (items withdrawn before dispatch
            included; callers coalesced by ``dedupe`` into a slot count as
            items).
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


CUMULATIVE: tuple[str, ...] = (
    "submitted", "succeeded", "failed", "cancelled", "expired", "rejected", "dropped",
    "batches", "retries", "cache_hits", "cache_misses",
)  # fmt: skip
"""The ``BatcherStats`` fields that only grow (with ``reasons``): they add up over batchers."""


class Totals:
    """Running sums of the cumulative figures (:data:`CUMULATIVE`, ``reasons``) of batchers.

    Not thread-safe by itself: its owner guards it.
    """

    __slots__ = ("counts", "reasons")

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(CUMULATIVE, 0)
        self.reasons: dict[str, int] = {}

    def add(self, stats: BatcherStats) -> None:
        """Add one batcher's snapshot."""
        counts = self.counts
        for name in CUMULATIVE:
            counts[name] += getattr(stats, name)
        reasons = self.reasons
        for reason, n in stats.reasons.items():
            reasons[reason] = reasons.get(reason, 0) + n

    def absorb(self, other: Totals) -> None:
        """Add another running sum."""
        for name, n in other.counts.items():
            self.counts[name] += n
        for reason, n in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + n

    def copy(self) -> Totals:
        """An independent copy."""
        copy = Totals()
        copy.absorb(self)
        return copy

    def stats(self, *, pending: int, in_flight: int, concurrency_limit: int) -> BatcherStats:
        """These sums as a ``BatcherStats``, with the gauges given."""
        return BatcherStats(
            **self.counts,
            pending=pending,
            in_flight=in_flight,
            reasons=dict(self.reasons),
            concurrency_limit=concurrency_limit,
        )


@dataclass(frozen=True, slots=True)
class Figures:
    """What an ``@batch`` wrapper's batchers add up to, as of one read.

    Every batcher the wrapper ever made is in exactly one of the three, so
    summing ``retired`` and the ``stats`` of ``kept`` and ``draining`` (read
    after this snapshot) never counts one twice or misses one, and two reads
    in a row never go back.

    Attributes:
        retired: the final counts of the batchers it let go (a copy).
        kept: the batchers it has (one per event loop and instance; a
            closed one until the next call replaces it).
        draining: batchers it let go whose loop still runs with items
            pending or in flight (replaced while their ``aclose()`` drains;
            an instance's, collected with ``put`` items left): read like kept
            ones until they are done, then folded into ``retired``.
        default_limit: the concurrency limit a new batcher of the wrapper
            gets (``max_concurrency`` as decorated, or ``configure()``d;
            ``0``: none): the limit reported while it has no batcher.
    """

    retired: Totals
    kept: Sequence[Any]
    draining: Sequence[Any]
    default_limit: int

    def total(self) -> BatcherStats:
        """The sum: cumulative counts of all, ``pending`` and ``in_flight`` of the
        kept and draining ones, ``concurrency_limit`` of the kept ones.

        The limits add up, except that one kept batcher without a limit
        (``0``) makes the sum ``0``: no limit. With no kept batcher it is
        :attr:`default_limit`.
        """
        totals = self.retired.copy()
        pending = in_flight = limit = 0
        unlimited = False
        for batcher in self.draining:
            stats = batcher.stats
            totals.add(stats)
            pending += stats.pending
            in_flight += stats.in_flight
        for batcher in self.kept:
            stats = batcher.stats
            totals.add(stats)
            pending += stats.pending
            in_flight += stats.in_flight
            limit += stats.concurrency_limit
            unlimited = unlimited or not stats.concurrency_limit
        if not self.kept:
            limit = self.default_limit
        elif unlimited:
            limit = 0
        return totals.stats(pending=pending, in_flight=in_flight, concurrency_limit=limit)


def figures_of(target: Any) -> Figures | None:
    """``target``'s :class:`Figures` if it is an ``@batch`` wrapper, else ``None``
    (a ``Batcher`` or ``DataLoader``: read its ``stats``)."""
    read: Callable[[], Figures] | None = getattr(target, "_figures", None)
    return None if read is None else read()
