"""What both metrics integrations export, in one place (``prometheus`` and ``otel``).

Needs no extra. The figures are read from a target's ``stats`` when a scrape
or a collection asks (cumulative counts and current gauges), or recorded per
sink call and per batch by an observer (the three histograms): nothing here
runs per item.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

from .._stats import BatcherStats

__all__ = [
    "DURATION_BUCKETS",
    "OUTCOMES",
    "REASONS",
    "SIZE_BUCKETS",
    "WAIT_BUCKETS",
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
