"""What a batcher reports: the per-batch :class:`BatchReport` and the
:class:`BatcherStats` snapshot.

Both are immutable snapshots; the batcher keeps plain integer counters and
builds these only when asked (``stats``) or once per finished batch
(``on_batch``), never per item.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["BatchReport", "BatcherStats", "DispatchReason"]

DispatchReason = Literal["size", "weight", "wait", "interval", "flush", "close"]
"""Why a batch was dispatched: the trigger that first made it due.

``"size"``/``"weight"``: it filled up; ``"wait"``: ``max_wait`` passed since its
first item; ``"interval"``: a heartbeat tick; ``"flush"``: :meth:`Batcher.flush`;
``"close"``: :meth:`Batcher.aclose` drained it.
"""


@dataclass(frozen=True, slots=True)
class BatchReport:
    """One finished batch, as handed to ``on_batch``.

    Attributes:
        size: items handed to the sink (callers withdrawn before dispatch are
            not counted; with ``dedupe`` one slot may serve several callers).
        weight: summed ``weigh(item)`` of the batch as it was sealed
            (``0`` without ``weigh``).
        partition: the ``partition(item)`` value, or ``None``.
        reason: the trigger that first made the batch due.
        wait: seconds from the batch's first item to its dispatch.
        attempts: sink calls made for this batch, retries and isolation
            halves included (``0`` if every caller withdrew before dispatch).
        start: ``loop.time()`` when the batch was dispatched.
        duration: seconds from dispatch to the last item resolved.
        error: the exception that failed the batch as a whole (after retries),
            or ``None`` if the sink answered; per-item errors are not here.
        failed_items: ``(item, exception)`` for every item of this batch that
            failed, whole-batch failures included (empty when none did): the
            skip-and-report list. Callers that left before their result are
            not in it.
    """

    size: int
    weight: float
    partition: Hashable
    reason: DispatchReason
    attempts: int
    start: float
    duration: float
    error: BaseException | None
    wait: float = 0.0
    failed_items: Sequence[tuple[Any, BaseException]] = ()


@dataclass(frozen=True, slots=True)
class BatcherStats:
    """A snapshot of a batcher's counters, taken by ``Batcher.stats``.

    Callers are counted, not sink slots: a caller coalesced by ``dedupe`` is
    one ``submitted`` and one ``succeeded``/``failed``. Every accepted caller
    ends as exactly one of ``succeeded``, ``failed``, ``cancelled``,
    ``expired`` or ``dropped``.

    Attributes:
        submitted: callers whose item was accepted.
        succeeded: callers resolved with a result.
        failed: callers resolved with an error (sink error, per-item error,
            ``ResultMismatch``, sink ``TimeoutError``, ``BatcherClosed``).
        cancelled: callers cancelled before their result arrived.
        expired: callers whose own ``submit(timeout=...)`` ran out.
        rejected: submits refused for lack of room (``overflow="reject"``, or
            ``submit_nowait`` with no room); never accepted.
        dropped: pending items failed with ``QueueFull`` by
            ``overflow="drop_oldest"``.
        batches: batches handed to the sink.
        pending: sink slots accepted but not yet dispatched.
        in_flight: sink slots in batches being processed now.
        peak_pending: the highest ``pending`` seen.
        mean_batch_size: sink slots per dispatched batch.
        reasons: dispatch reason -> number of batches.
        retries: sink calls made again after a failure (whole-batch retries
            and retries of items the sink marked :class:`Retryable`).
        concurrency_limit: sink calls allowed at once now
            (``max_concurrency``; ``0`` means no limit).
        cache_hits: a DataLoader's loads answered from its cache or joined
            to a load of the same key already under way (``0`` for a Batcher).
        cache_misses: a DataLoader's loads that sent their key to the batch
            function (``0`` for a Batcher).
    """

    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    rejected: int = 0
    dropped: int = 0
    batches: int = 0
    pending: int = 0
    in_flight: int = 0
    peak_pending: int = 0
    mean_batch_size: float = 0.0
    reasons: Mapping[str, int] = field(default_factory=dict)
    retries: int = 0
    concurrency_limit: int = 1
    cache_hits: int = 0
    cache_misses: int = 0
