"""What both metrics integrations export, in one place (``prometheus`` and ``otel``).

Needs no extra. The figures are read from a target's ``stats`` when a scrape
or a collection asks (cumulative counts and current gauges), or recorded per
sink call and per batch by an observer (the three histograms): nothing here
runs per item.
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .._stats import BatcherStats

__all__ = [
    "DURATION_BUCKETS",
    "OUTCOMES",
    "REASONS",
    "SIZE_BUCKETS",
    "WAIT_BUCKETS",
    "Source",
    "buckets",
    "is_loader",
    "outcome_counts",
    "reason_counts",
]

OUTCOMES: tuple[str, ...] = ("succeeded", "failed", "cancelled", "expired", "rejected", "dropped")
"""The ``outcome`` label values: the ``BatcherStats`` fields of the same names."""

REASONS: tuple[str, ...] = ("size", "weight", "wait", "interval", "flush", "close")
"""The dispatch reasons, always exported (at 0 until one occurs)."""

SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Upper bounds of the items-per-sink-call histogram (``+Inf`` is added)."""

DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
"""Upper bounds, in seconds, of the sink call duration histogram: 1 ms to 1 min."""

WAIT_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
"""Upper bounds, in seconds, of the first item's wait: 100 µs (``max_wait=0``) to 10 s."""


def buckets(what: str, bounds: Iterable[float]) -> tuple[float, ...]:
    """``bounds`` checked: finite numbers, strictly increasing, at least one.

    Raises:
        ValueError: an empty, unsorted, repeated or non-finite bound.
        TypeError: a bound that is not a number.
    """
    checked = tuple(bounds)
    if not checked:
        raise ValueError(f"{what} needs at least one bucket bound, got none")
    for bound in checked:
        if isinstance(bound, bool) or not isinstance(bound, int | float):
            raise TypeError(f"{what} bounds must be numbers, got {bound!r}")
        if not math.isfinite(bound):
            raise ValueError(f"{what} bounds must be finite (+Inf is implied), got {bound!r}")
    for low, high in itertools.pairwise(checked):
        if not low < high:
            raise ValueError(f"{what} bounds must be strictly increasing, got {list(checked)}")
    return tuple(float(b) for b in checked)


def outcome_counts(stats: BatcherStats) -> Sequence[tuple[str, int]]:
    """``(outcome, count)`` for every outcome in :data:`OUTCOMES`, in that order."""
    return [(outcome, getattr(stats, outcome)) for outcome in OUTCOMES]


def reason_counts(stats: BatcherStats) -> Sequence[tuple[str, int]]:
    """``(reason, batches)``: every reason in :data:`REASONS`, then any other one seen."""
    seen = stats.reasons
    counts = [(reason, seen.get(reason, 0)) for reason in REASONS]
    counts.extend((reason, n) for reason, n in seen.items() if reason not in REASONS)
    return counts


def is_loader(target: Any) -> bool:
    """Whether ``target`` is a DataLoader (the only kind with cache hits and misses)."""
    from .._loader import DataLoader

    return isinstance(target, DataLoader)


_COUNTERS: tuple[str, ...] = (
    "submitted", *OUTCOMES, "batches", "retries", "cache_hits", "cache_misses",
)  # fmt: skip
"""The cumulative ``BatcherStats`` fields (summed over gone batchers too)."""


class Source:
    """What an integration reads a target's figures from, holding the target weakly.

    A target that cannot be weakly referenced is held strongly. For an
    ``@batch`` function or bound method, the figures are summed over every
    batcher it has (one per event loop, a closed one until it is replaced),
    and the counts of batchers that went away (replaced after ``aclose()``,
    or forgotten once their loop closed) are kept, so counters never go back.
    A batcher that started and went away entirely between two reads is not
    counted.
    """

    __slots__ = ("_gone", "_gone_reasons", "_lock", "_ref", "_seen", "_strong", "is_loader")

    def __init__(self, target: Any) -> None:
        self._ref: Callable[[], Any] | None
        self._strong: Any
        try:
            self._ref, self._strong = weakref.ref(target), None
        except TypeError:
            self._ref, self._strong = None, target
        self.is_loader = is_loader(target)
        self._seen: dict[int, Any] = {}  # id -> batcher of a wrapper, held until seen gone
        self._gone: Counter[str] = Counter()
        self._gone_reasons: Counter[str] = Counter()
        self._lock = threading.Lock()

    def target(self) -> Any:
        """The target, or ``None`` once it has been garbage collected."""
        return self._strong if self._ref is None else self._ref()

    def stats(self) -> BatcherStats | None:
        """The target's figures now, ``None`` once it is gone."""
        target = self.target()
        if target is None:
            return None
        from .._decorator import _Batchers

        state = getattr(target, "_state", None)
        if not isinstance(state, _Batchers):
            stats: BatcherStats = target.stats
            return stats
        with self._lock:
            # list() copies a dict atomically: another thread may run its loop.
            current = {
                id(b): b for b in [*list(state._live.values()), *list(state._closed.values())]
            }
            for key, batcher in self._seen.items():
                if key not in current:  # gone: closed, its figures are final
                    final = batcher.stats
                    for name in _COUNTERS:
                        self._gone[name] += getattr(final, name)
                    self._gone_reasons.update(final.reasons)
            self._seen = current
            totals = Counter(self._gone)
            reasons = Counter(self._gone_reasons)
        pending = in_flight = limit = 0
        for batcher in current.values():
            each = batcher.stats
            for name in _COUNTERS:
                totals[name] += getattr(each, name)
            reasons.update(each.reasons)
            pending += each.pending
            in_flight += each.in_flight
            limit += each.concurrency_limit
        return BatcherStats(
            **{name: totals[name] for name in _COUNTERS},
            pending=pending,
            in_flight=in_flight,
            reasons=dict(reasons),
            concurrency_limit=limit if current else BatcherStats().concurrency_limit,
        )
