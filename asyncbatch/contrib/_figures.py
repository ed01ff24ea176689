"""What both metrics integrations export, in one place (``prometheus`` and ``otel``).

Needs no extra. The figures are read from a target's ``stats`` when a scrape
or a collection asks (cumulative counts and current gauges), or recorded per
sink call and per batch by an observer (the three histograms): nothing here
runs per item.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .._observe import figures_of, name_of
from .._stats import BatcherStats

__all__ = [
    "DURATION_BUCKETS",
    "OUTCOMES",
    "REASONS",
    "SIZE_BUCKETS",
    "WAIT_BUCKETS",
    "Source",
    "buckets",
    "clash_hint",
    "finished",
    "gives_up_its_name",
    "is_loader",
    "label",
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


def finished(target: Any) -> bool:
    """Whether ``target`` is a Batcher or a DataLoader closed for good.

    That is: ``closed``, with nothing pending or in flight (its ``aclose()``
    is over). Its figures can no longer change, so the name it is exported
    under is free: a new target instrumented under that name takes it over.
    An ``@batch`` wrapper is never finished (it makes a fresh batcher on the
    next call).
    """
    from .._batcher import Batcher
    from .._loader import DataLoader

    if not isinstance(target, Batcher | DataLoader) or not target.closed:
        return False
    stats = target.stats
    return not (stats.pending or stats.in_flight)


def gives_up_its_name(holder: Any) -> bool:
    """Whether the name ``holder`` (a ``BatcherMetrics`` or ``BatcherTelemetry``) is
    exported under is free: its target garbage collected, or :func:`finished`.

    A function of its own so that no frame raising a clash error (whose
    traceback the caller may keep) holds the target in a local.
    """
    target = holder.target
    return target is None or finished(target)


def label(target: Any, name: str | None) -> str:
    """The name ``target`` is exported under: ``name``, or the target's own.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is empty.
    """
    if name is None:
        return name_of(target)
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}: {name!r}")
    if not name:
        raise ValueError("name must not be empty")
    return name


def clash_hint(target: Any) -> str:
    """More advice for a name clash when ``target`` is one instance's bound ``@batch`` method."""
    from .._decorator import BoundBatchedMethod

    if not isinstance(target, BoundBatchedMethod):
        return ""
    method = target.__func__
    return (
        f". The batchers of every instance of {method.__qualname__!r} share its name: "
        f"instrument the method on the class ({method.__qualname__}) to export all its "
        "instances summed under that name, or give each instance its own label with "
        "instrument(obj.method, name=...)"
    )


class Source:
    """What an integration reads a target's figures from, holding the target weakly.

    A target that cannot be weakly referenced is held strongly. A bound
    ``@batch`` method (``obj.m``, made afresh on each attribute access) is
    held as its instance, weakly, and its method: it is gone when the
    instance is.

    For an ``@batch`` wrapper (a function, a bound method, or a method on
    the class: every instance), the figures are those of every batcher it
    ever had (one per event loop and instance, a fresh one after
    ``aclose()``): the wrapper folds the final counts of each batcher it
    lets go into a running total, which is added to the figures of those it
    has (``asyncbatch._observe.figures_of``). So counters never go back and
    nothing is missed, even a batcher made and let go between two reads.
    """

    __slots__ = ("_method", "_ref", "_strong", "is_loader")

    def __init__(self, target: Any) -> None:
        from .._decorator import BoundBatchedMethod

        self._ref: Callable[[], Any] | None
        self._strong: Any = None
        self._method: Any = None
        if isinstance(target, BoundBatchedMethod):
            self._ref, self._method = weakref.ref(target.__self__), target.__func__
        else:
            try:
                self._ref = weakref.ref(target)
            except TypeError:
                self._ref, self._strong = None, target
        self.is_loader = is_loader(target)

    def target(self) -> Any:
        """The target, or ``None`` once it has been garbage collected."""
        if self._ref is None:
            return self._strong
        target = self._ref()
        if target is None or self._method is None:
            return target
        return self._method.__get__(target)  # the instance: bound again

    def stats(self) -> BatcherStats | None:
        """The target's figures now, ``None`` once it is gone."""
        target = self.target()
        if target is None:
            return None
        figures = figures_of(target)
        if figures is None:  # a Batcher or a DataLoader
            stats: BatcherStats = target.stats
            return stats
        return figures.total()
