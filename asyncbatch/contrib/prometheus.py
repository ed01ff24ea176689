"""Prometheus metrics for batchers: a ``prometheus_client`` collector.

Needs the ``prometheus`` extra (``pip install 'asyncbatch[prometheus]'``).

::

    from prometheus_client import REGISTRY, start_http_server
    from asyncbatch.contrib.prometheus import instrument

    instrument(batcher)                      # a Batcher, an @batch function, a DataLoader
    instrument(load_users, registry=REGISTRY)
    instrument(Repo.get)                     # an @batch method: every instance's batchers
    start_http_server(9100, addr="127.0.0.1")

Every series has the label ``batcher`` (the batcher's ``name``, or ``name=``):

============================================  =========  ========================================
metric                                        type       what it answers
============================================  =========  ========================================
``asyncbatch_items_total{outcome}``           counter    items finished, by ``outcome``:
                                                         ``succeeded``, ``failed``,
                                                         ``cancelled``, ``expired``,
                                                         ``rejected``, ``dropped``
``asyncbatch_batches_total{reason}``          counter    batches dispatched, by ``reason``
``asyncbatch_pending_items``                  gauge      items accepted, not yet dispatched
``asyncbatch_in_flight_items``                gauge      items in sink calls now
``asyncbatch_batch_size``                     histogram  items per sink call
``asyncbatch_sink_duration_seconds``          histogram  seconds per sink call (each retry and
                                                         isolation half is one call)
``asyncbatch_batch_wait_seconds``             histogram  seconds from a batch's first item to
                                                         its dispatch
``asyncbatch_retries_total``                  counter    sink calls made again after a failure
``asyncbatch_concurrency_limit``              gauge      sink calls allowed at once
                                                         (``0``: no limit)
``asyncbatch_cache_hits_total``               counter    DataLoader only: loads served from the
                                                         cache or joined to a load under way
``asyncbatch_cache_misses_total``             counter    DataLoader only: loads sent to the
                                                         batch function
============================================  =========  ========================================

Nothing runs per item. Counters and gauges are read from the target's
``stats`` when the registry is collected (a scrape); the histograms are fed
once per sink call and once per batch by an observer the batcher calls (see
``asyncbatch._observe``); the user's ``on_batch`` is left alone.

An ``@batch`` function's figures are summed over every batcher it ever had
(one per event loop, a fresh one after ``aclose()``): the final counts of a
batcher it lets go (replaced, or its loop closed) are folded into a running
total when it goes, so its counters never go back and nothing is missed, even
a batcher made and let go between two scrapes (``asyncio.run`` called twice).

An ``@batch`` method on the class (``instrument(Repo.get)``) is summed the same
way over every instance's batchers, instances made later and instances
collected meanwhile included, under one ``batcher`` label (the method's name).
A bound method (``instrument(repo.get)``) is that instance's batchers only;
its default label is the method's name too, so a second instance (or the
class attribute) in the same registry is a ``ValueError`` until one of them
gets its own ``name=``. The instance is held weakly.

The target is held weakly: once it is garbage collected its series go and its
name is free. So is the name of a ``Batcher`` or ``DataLoader`` closed for good
(``closed``, nothing pending or in flight: its ``aclose()`` is over), even
while something still holds it (a reference cycle awaiting the garbage
collector, say): a job that runs ``async with Batcher(..., name="job") as b:
instrument(b)`` on every run instruments every run's batcher. The new one
takes the name over, the old one's series go, and the counters start again
from the new batcher's zero: a counter reset, which ``rate()`` and
``increase()`` handle.

An ``@batch`` wrapper's concurrency limit is the sum of its batchers'
limits, ``0`` (no limit) if one of them has none; with no batcher at the moment
(before its first call, after its loop closed) it is the limit a new batcher
would get: ``max_concurrency`` as decorated or ``configure()``d.

Durations and waits are measured with ``loop.time()``: on uvloop that is
libuv's loop time, in whole milliseconds, so a sink call or a wait under 1 ms
often reads ``0``; sums over many calls stay right on average.

A ``DataLoader`` made per request cannot be instrumented per request (each
would need a label of its own, and its series would go with it): instrument a
shared ``@batch`` function that the per-request loaders' batch function calls
(``await fetch.submit_many(keys)``); see the README.

Scraped from another thread (``start_http_server``), the figures of
one batcher are read without stopping its loop, so two of them may be a few
items apart; each one is exact.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

try:
    from prometheus_client.core import (
        REGISTRY,
        CollectorRegistry,
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the test extra installs prometheus_client
    raise ImportError(
        "asyncbatch.contrib.prometheus needs prometheus_client: install the prometheus "
        "extra, pip install 'asyncbatch[prometheus]'"
    ) from exc

from .._observe import SinkCall, attach, detach
from .._stats import BatchReport
from ._figures import (
    DURATION_BUCKETS,
    SIZE_BUCKETS,
    WAIT_BUCKETS,
    Source,
    buckets,
    clash_hint,
    gives_up_its_name,
    label,
    outcome_counts,
    reason_counts,
)

__all__ = ["DURATION_BUCKETS", "SIZE_BUCKETS", "WAIT_BUCKETS", "BatcherMetrics", "instrument"]

_LABEL = "batcher"


def instrument(
    target: Any,
    *,
    name: str | None = None,
    registry: CollectorRegistry = REGISTRY,
    size_buckets: Iterable[float] = SIZE_BUCKETS,
    duration_buckets: Iterable[float] = DURATION_BUCKETS,
    wait_buckets: Iterable[float] = WAIT_BUCKETS,
) -> BatcherMetrics:
    """Export ``target``'s figures through ``registry``, labelled ``batcher=<its name>``.

    Args:
        target: a ``Batcher``, a ``DataLoader``, an ``@batch`` function (all
            its batchers, those it creates later included), an ``@batch``
            method on the class (``Repo.get``: every instance's batchers,
            summed, instances made later included) or bound to one instance
            (``repo.get``: that instance's batchers; held weakly).
        name: the ``batcher`` label; default: the target's ``name`` (for a
            method, bound or not, its ``name=`` or qualified name, so two
            instances' bound methods need distinct ``name=`` here).
        registry: where the figures are collected; the default is
            ``prometheus_client``'s global registry. All batchers instrumented
            in one registry share one collector (one family per metric).
        size_buckets: upper bounds of ``asyncbatch_batch_size``, in items.
        duration_buckets: upper bounds of ``asyncbatch_sink_duration_seconds``,
            in seconds.
        wait_buckets: upper bounds of ``asyncbatch_batch_wait_seconds``, in seconds.
            (Each list: finite, strictly increasing; ``+Inf`` is added.)

    Returns:
        The attached :class:`BatcherMetrics`; ``remove()`` stops the export.

    Raises:
        ValueError: a target of the same label is already instrumented in
            ``registry``, neither garbage collected nor a Batcher or
            DataLoader closed for good (whose label is taken over): the
            message says how to tell them apart (``name=``
            here or on the batcher; for a bound method, the class attribute);
            an empty ``name``; bad bucket bounds; or another collector in
            ``registry`` already exports one of these metric names.
        TypeError: ``target`` is not a batcher, ``@batch`` function or
            method, or DataLoader; ``name`` is not a string.
    """
    if getattr(target, "_attach", None) is None:
        raise TypeError(
            "expected an asyncbatch Batcher, @batch function or method, or DataLoader, "
            f"got {type(target).__name__}: {target!r}"
        )
    metrics = BatcherMetrics(
        target,
        registry,
        buckets("size_buckets", size_buckets),
        buckets("duration_buckets", duration_buckets),
        buckets("wait_buckets", wait_buckets),
        label(target, name),
    )
    replaced = _Collector.of(registry).add(metrics, clash_hint(target))
    try:
        attach(target, metrics)
    except BaseException:
        metrics.remove()
        raise
    if replaced is not None:
        replaced._replaced()
    return metrics


class _Histogram:
    """Per-bucket counts and a sum, fed on the loop, read by a scrape from any thread."""

    __slots__ = ("bounds", "counts", "lock", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound counts in that bound's bucket (le).
        index = bisect_left(self.bounds, value)
        with self.lock:
            self.counts[index] += 1
            self.total += value

    def exposition(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf``, and the sum."""
        with self.lock:
            counts, total = list(self.counts), self.total
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            cumulative.append((_le(bound), running))
        return cumulative, total


def _le(bound: float) -> str:
    # prometheus_client's own spelling of bucket bounds ("0.005", "1.0", "+Inf").
    return "+Inf" if bound == float("inf") else repr(float(bound))


class BatcherMetrics:
    """The Prometheus export of one instrumented target (what :func:`instrument` returns).

    It is the target's observer: once per sink call it records the call's
    size and duration, once per batch the first item's wait before dispatch
    (batches whose callers all left before dispatch made no call and are not
    recorded). Its other figures are read from the target's ``stats`` at
    scrape time.

    Attributes:
        name: the ``batcher`` label.
        target: what was instrumented.
        registry: where it is exported.
    """

    capture = None
    """No per-item capture: Prometheus needs nothing from the submitters."""

    def __init__(
        self,
        target: Any,
        registry: CollectorRegistry,
        size_buckets: tuple[float, ...],
        duration_buckets: tuple[float, ...],
        wait_buckets: tuple[float, ...],
        name: str,
    ) -> None:
        self.name = name
        self._source = Source(target)
        self._registry = weakref.ref(registry)
        self._size = _Histogram(size_buckets)
        self._duration = _Histogram(duration_buckets)
        self._wait = _Histogram(wait_buckets)
        self._removed = False

    @property
    def target(self) -> Any:
        """The instrumented target (held weakly): ``None`` once it is gone."""
        return self._source.target()

    @property
    def registry(self) -> CollectorRegistry | None:
        """The registry (held weakly): ``None`` once it is gone."""
        return self._registry()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "exporting"
        return f"<BatcherMetrics batcher={self.name!r} [{state}]>"

    def remove(self) -> None:
        """Stop: detach from the target and drop its series from the registry. Idempotent.

        The series go and the name is free even if detaching raises (the
        error is raised after).
        """
        if self._removed:
            return
        self._removed = True
        try:
            target = self.target
            if target is not None:
                detach(target, self)
        finally:
            registry = self.registry
            if registry is not None:
                _Collector.of(registry).discard(self)

    def _replaced(self) -> None:
        """Its name was taken over (its target gone or closed for good): series already gone."""
        self._removed = True
        target = self.target
        if target is not None:
            # Closed for good: it makes no more sink calls, so an observer left
            # on it is inert; failing to detach must not fail the new instrument().
            with contextlib.suppress(Exception):
                detach(target, self)

    # Observer hooks (run on the batcher's loop).

    def call_started(self, call: SinkCall) -> None:
        """A sink call starts: nothing to do (its figures come when it ends)."""

    def call_finished(
        self, call: SinkCall, token: object, duration: float, error: BaseException | None
    ) -> None:
        """Record one sink call: ``call.size`` items, ``duration`` seconds."""
        self._size.observe(call.size)
        self._duration.observe(duration)

    def batch_finished(self, batcher: str, report: BatchReport) -> None:
        """Record the first item's wait (seconds) of a batch that reached the sink."""
        if report.attempts:
            self._wait.observe(report.wait)

    # Collection (any thread).

    def _histograms(self) -> tuple[_Histogram, _Histogram, _Histogram]:
        return self._size, self._duration, self._wait


class _Collector(Collector):
    """One per registry: every instrumented batcher of that registry, one family per metric."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, _Collector]] = (
        weakref.WeakKeyDictionary()
    )
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, registry: CollectorRegistry) -> None:
        # Weakly: the registry is the key of ``_by_registry``, whose value this is.
        self._registry = weakref.ref(registry)
        self._members: dict[str, BatcherMetrics] = {}
        self._registered = False

    @classmethod
    def of(cls, registry: CollectorRegistry) -> _Collector:
        with cls._lock:
            collector = cls._by_registry.get(registry)
            if collector is None:
                collector = cls._by_registry[registry] = cls(registry)
            return collector

    def add(self, metrics: BatcherMetrics, hint: str = "") -> BatcherMetrics | None:
        """Export ``metrics`` under its name; returns the member it took the name from.

        The name is free when its holder's target is gone (garbage collected)
        or closed for good (:func:`finished`); the holder's series go.
        """
        replaced = None
        with self._lock:
            existing = self._members.get(metrics.name)
            if existing is not None and gives_up_its_name(existing):
                del self._members[metrics.name]
                replaced, existing = existing, None
            if existing is not None:
                raise ValueError(
                    f"a batcher named {metrics.name!r} is already instrumented in this "
                    "registry and not closed; its series would be indistinguishable: give "
                    "each batcher its own name= (or instrument(..., name=...), or remove() "
                    f"the first one){hint}"
                )
            registry = self._registry()
            if not self._registered and registry is not None:
                # Raises ValueError if another collector exports one of our names.
                registry.register(self)
                self._registered = True
            self._members[metrics.name] = metrics
        return replaced

    def discard(self, metrics: BatcherMetrics) -> None:
        with self._lock:
            if self._members.get(metrics.name) is not metrics:
                return
            del self._members[metrics.name]
            registry = self._registry()
            if not self._members and self._registered and registry is not None:
                registry.unregister(self)
                self._registered = False

    def describe(self) -> Iterator[Metric]:
        """The metric families, without samples (lets the registry check names)."""
        return iter(_families())

    def collect(self) -> Iterator[Metric]:
        """Every member's figures: ``stats`` read now, histograms as recorded."""
        with self._lock:
            members = list(self._members.values())
        families = _families()
        (items, batches, pending, in_flight, size, duration, wait, retries, limit, hits, misses) = (
            families
        )
        for member in members:
            name = member.name
            stats = member._source.stats()
            if stats is None:  # the target is gone: so are its series, and its name
                with self._lock:
                    if self._members.get(name) is member:
                        del self._members[name]
                continue
            for outcome, count in outcome_counts(stats):
                items.add_metric([name, outcome], count)
            for reason, count in reason_counts(stats):
                batches.add_metric([name, reason], count)
            pending.add_metric([name], stats.pending)
            in_flight.add_metric([name], stats.in_flight)
            retries.add_metric([name], stats.retries)
            limit.add_metric([name], stats.concurrency_limit)
            if member._source.is_loader:
                hits.add_metric([name], stats.cache_hits)
                misses.add_metric([name], stats.cache_misses)
            for family, histogram in zip((size, duration, wait), member._histograms(), strict=True):
                cumulative, total = histogram.exposition()
                family.add_metric([name], cumulative, total)
        return iter(families)


def _families() -> Sequence[Any]:
    """Fresh, empty families, in exposition order."""
    one = [_LABEL]
    return (
        CounterMetricFamily(
            "asyncbatch_items",
            "Items finished, by outcome (succeeded, failed, cancelled, expired, rejected, "
            "dropped).",
            labels=[_LABEL, "outcome"],
        ),
        CounterMetricFamily(
            "asyncbatch_batches",
            "Batches dispatched to the sink, by the reason they became due.",
            labels=[_LABEL, "reason"],
        ),
        GaugeMetricFamily(
            "asyncbatch_pending_items", "Items accepted and not yet dispatched.", labels=one
        ),
        GaugeMetricFamily(
            "asyncbatch_in_flight_items", "Items in sink calls running now.", labels=one
        ),
        HistogramMetricFamily("asyncbatch_batch_size", "Items per sink call.", labels=one),
        HistogramMetricFamily(
            "asyncbatch_sink_duration_seconds",
            "Seconds per sink call (each retry and isolation half is one call).",
            labels=one,
            unit="seconds",
        ),
        HistogramMetricFamily(
            "asyncbatch_batch_wait_seconds",
            "Seconds from a batch's first item to its dispatch.",
            labels=one,
            unit="seconds",
        ),
        CounterMetricFamily(
            "asyncbatch_retries", "Sink calls made again after a failure.", labels=one
        ),
        GaugeMetricFamily(
            "asyncbatch_concurrency_limit",
            "Sink calls allowed at once (0: no limit).",
            labels=one,
        ),
        CounterMetricFamily(
            "asyncbatch_cache_hits",
            "DataLoader loads served from the cache or joined to a load under way.",
            labels=one,
        ),
        CounterMetricFamily(
            "asyncbatch_cache_misses",
            "DataLoader loads sent to the batch function.",
            labels=one,
        ),
    )
