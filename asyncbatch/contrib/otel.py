"""OpenTelemetry metrics and traces for batchers.

Needs the ``otel`` extra (``pip install 'asyncbatch[otel]'``): the OpenTelemetry
*API* only. Which SDK, exporter and reader to run is the application's choice;
without an SDK every call here is a no-op.

::

    from asyncbatch.contrib.otel import instrument

    instrument(batcher)                                   # the global providers
    instrument(load_users, meter_provider=mp, tracer_provider=tp)
    instrument(Repo.get)                                  # an @batch method: every instance

Metrics (meter ``asyncbatch``; attribute ``asyncbatch.batcher`` = the batcher's
``name``, or ``name=``, on every point):

================================  ==================  =======  ====================================
instrument                        kind                unit     what
================================  ==================  =======  ====================================
``asyncbatch.items``              observable counter  {item}   items finished, attribute
                                                               ``asyncbatch.outcome`` (succeeded,
                                                               failed, cancelled, expired,
                                                               rejected, dropped)
``asyncbatch.batches``            observable counter  {batch}  batches, attribute
                                                               ``asyncbatch.reason``
``asyncbatch.pending``            observable gauge    {item}   items accepted, not dispatched
``asyncbatch.in_flight``          observable gauge    {item}   items in sink calls now
``asyncbatch.batch.size``         histogram           {item}   items per sink call
``asyncbatch.sink.duration``      histogram           s        seconds per sink call
``asyncbatch.batch.wait``         histogram           s        first item's wait for dispatch
``asyncbatch.retries``            observable counter  {call}   sink calls made again
``asyncbatch.concurrency.limit``  observable gauge    {call}   sink calls allowed at once
                                                               (``0``: no limit)
``asyncbatch.cache.hits``         observable counter  {load}   DataLoader only
``asyncbatch.cache.misses``       observable counter  {load}   DataLoader only
================================  ==================  =======  ====================================

Counters and gauges are read from ``stats`` when the SDK collects (observable
instruments: callbacks, nothing on the hot path); the histograms are recorded
once per sink call (size, duration) and once per batch (wait), with the
bucket bounds :data:`SIZE_BUCKETS`, :data:`DURATION_BUCKETS` and
:data:`WAIT_BUCKETS` given as advice (views may override them).

An ``@batch`` function is summed over every batcher it ever had (one per
event loop, a fresh one after ``aclose()``); an ``@batch`` method on the class
(``instrument(Repo.get)``) over every instance's batchers, instances made later
and instances collected meanwhile included, under one ``asyncbatch.batcher``
value. The final counts of a batcher let go are folded in when it goes, so the
counters are monotonic and miss nothing, even a batcher made and let go
between two collections. A bound method (``instrument(repo.get)``) is that
instance's batchers (the instance is held weakly); its default name is the
method's, so a second instance, or the class attribute, with the same meter
provider is a ``ValueError`` until one gets its own ``name=``.

The target is held weakly: once it is garbage collected its points go and
its name is free. So is the name of a ``Batcher`` or ``DataLoader`` closed for
good (``closed``, nothing pending or in flight: its ``aclose()`` is over), even
while something still holds it: a job that runs ``async with Batcher(...,
name="job") as b: instrument(b)`` on every run instruments every run's
batcher, the new one taking the name over. Its counters start again from the
new batcher's zero, and OpenTelemetry cannot say so: the SDK keeps the start
time of the first point of an attribute set for as long as the meter lives,
and the API has no way to move it, so a cumulative reader sees the counter
go down under the same start time (Prometheus, through an exporter, takes it
for a counter reset; a delta exporter sends one negative delta). Where that
matters, instrument an ``@batch`` function instead: its counters never go
back.

An ``@batch`` wrapper's concurrency limit is the sum of its batchers'
limits, ``0`` (no limit) if one of them has none; with no batcher at the moment
(before its first call, after its loop closed) it is the limit a new batcher
would get: ``max_concurrency`` as decorated or ``configure()``d.

Durations and waits are measured with ``loop.time()``: on uvloop that is
libuv's loop time, in whole milliseconds, so a sink call or a wait under 1 ms
often reads ``0``; sums over many calls stay right on average.

A ``DataLoader`` made per request cannot be instrumented per request (each
would need a label of its own, and its points would go with it): instrument a
shared ``@batch`` function that the per-request loaders' batch function calls
(``await fetch.submit_many(keys)``); see the README.

Traces: one span per sink call (each retry and isolation half is a call),
named ``asyncbatch.sink <batcher name>``, with attributes
``asyncbatch.batcher``, ``messaging.batch.message_count`` (items in the call)
and ``asyncbatch.attempt`` (from 1). A call that raises (or times out, or
whose answer has the wrong shape) ends its span with status ``ERROR`` and the
exception recorded as an event. The span is a root span linked to the spans
that were current when the items were submitted: one link per distinct span,
from the first 128 items of the batch (OpenTelemetry's default link limit).
While the sink runs the span is current, so the sink's own spans (an HTTP
client's, a database driver's) are its children; that context is built on an
empty one (nothing of a submitter's context, baggage included, reaches the
sink), and once the call ends whatever was current before it is current again,
whatever order several tracing observers end in.

Capturing the submitter's span costs a context lookup per item (first 128 of
each batch) and is switched on only when a tracer provider is attached: one
given as ``tracer_provider=``, or a global one set (``trace.set_tracer_provider``)
before :func:`instrument` is called. Otherwise no span is made and nothing
runs per item.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
    from opentelemetry.trace import Link, Span, SpanContext, Status, StatusCode, TracerProvider
except ImportError as exc:  # pragma: no cover - the test extra installs opentelemetry-api
    raise ImportError(
        "asyncbatch.contrib.otel needs the OpenTelemetry API: install the otel extra, "
        "pip install 'asyncbatch[otel]'"
    ) from exc

from .. import __version__
from .._observe import MAX_LINKS, SinkCall, attach, detach
from .._stats import BatcherStats, BatchReport
from ._figures import (
    DURATION_BUCKETS,
    SIZE_BUCKETS,
    WAIT_BUCKETS,
    Source,
    clash_hint,
    gives_up_its_name,
    label,
    outcome_counts,
    reason_counts,
)

__all__ = [
    "DURATION_BUCKETS",
    "METER_NAME",
    "SIZE_BUCKETS",
    "SPAN_PREFIX",
    "WAIT_BUCKETS",
    "BatcherTelemetry",
    "instrument",
]

METER_NAME = "asyncbatch"
"""The name of the meter (and of the tracer)."""

SPAN_PREFIX = "asyncbatch.sink "
"""Sink call spans are named ``SPAN_PREFIX + batcher name``."""

BATCHER = "asyncbatch.batcher"
OUTCOME = "asyncbatch.outcome"
REASON = "asyncbatch.reason"
ATTEMPT = "asyncbatch.attempt"
MESSAGE_COUNT = "messaging.batch.message_count"

_ROOT = otel_context.Context()


def instrument(
    target: Any,
    *,
    name: str | None = None,
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
) -> BatcherTelemetry:
    """Export ``target``'s figures as OpenTelemetry metrics, and trace its sink calls.

    Args:
        target: a ``Batcher``, a ``DataLoader``, an ``@batch`` function (all
            its batchers, those it creates later included), an ``@batch``
            method on the class (``Repo.get``: every instance's batchers,
            summed, instances made later included) or bound to one instance
            (``repo.get``: that instance's batchers; held weakly).
        name: the ``asyncbatch.batcher`` attribute and the span name's suffix;
            default: the target's ``name`` (for a method, bound or not, its
            ``name=`` or qualified name, so two instances' bound methods need
            distinct ``name=`` here).
        meter_provider: where the metrics go; ``None``: the global one
            (``metrics.get_meter_provider()``, which may be set later).
        tracer_provider: where the spans go; ``None``: the global one if it
            is set now. With no tracer provider (or a no-op one) no span is
            made and nothing is captured per item.

    Returns:
        The attached :class:`BatcherTelemetry`; ``remove()`` stops it.

    Raises:
        ValueError: a target of the same name is already instrumented with
            this meter provider, neither garbage collected nor a Batcher or
            DataLoader closed for good (whose name is taken over): the
            message says how to tell them apart (``name=`` here or on the
            batcher; for a bound method, the class attribute); an empty
            ``name``.
        TypeError: ``target`` is not a batcher, ``@batch`` function or
            method, or DataLoader; ``name`` is not a string.
    """
    if getattr(target, "_attach", None) is None:
        raise TypeError(
            "expected an asyncbatch Batcher, @batch function or method, or DataLoader, "
            f"got {type(target).__name__}: {target!r}"
        )
    if meter_provider is None:
        meter_provider = metrics.get_meter_provider()
    if tracer_provider is None:
        tracer_provider = trace.get_tracer_provider()
    tracing = not isinstance(tracer_provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    instruments = _Instruments.of(meter_provider)
    telemetry = BatcherTelemetry(
        target, instruments, tracer_provider if tracing else None, label(target, name)
    )
    replaced = instruments.add(telemetry, clash_hint(target))
    try:
        attach(target, telemetry)
    except BaseException:
        telemetry.remove()
        raise
    if replaced is not None:
        replaced._replaced()
    return telemetry


def _context_getter() -> Callable[[], object]:
    """The cheapest way to read the current OpenTelemetry context.

    With the default runtime context (contextvars) that is the ContextVar's own
    ``get``: about 25 ns a call against 130 ns for ``context.get_current()``
    and 750 ns for ``trace.get_current_span()``, and it runs for up to 128
    items of every batch. The span is looked up in the context later, once
    per sink call. Another runtime context gets the public call.
    """
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    get = getattr(var, "get", None)
    if callable(get):
        try:
            if isinstance(get(), otel_context.Context):
                return get  # type: ignore[no-any-return]
        except LookupError:  # no default: a runtime context we do not know
            pass
    return otel_context.get_current


class _Frame:
    """What was current when a sink call's context was attached, and whether the call is over."""

    __slots__ = ("done", "previous")

    def __init__(self, previous: otel_context.Context) -> None:
        self.previous = previous
        self.done = False


_FRAME = otel_context.create_key("asyncbatch.sink-call")


def _unwind() -> None:
    """Leave no finished sink call's context current.

    Two tracing observers on one batcher attach two contexts per call. Were
    they detached in the order they were attached (not the reverse), the
    second detach would bring back the first one's context, whose span has
    ended. Each context keeps, under a private key, the context it was
    attached over: step back past those whose call is over.
    """
    current = otel_context.get_current()
    frame = otel_context.get_value(_FRAME, current)
    if not isinstance(frame, _Frame) or not frame.done:
        return  # the usual case: what was current before the call
    while isinstance(frame, _Frame) and frame.done:
        current = frame.previous
        frame = otel_context.get_value(_FRAME, current)
    otel_context.attach(current)


def _links(captured: Sequence[object]) -> list[Link]:
    """One link per distinct valid span among the captured contexts, in first-seen order."""
    seen: dict[tuple[int, int], SpanContext] = {}
    last: object = None
    for ctx in captured:
        # Items submitted together under one span share one Context object:
        # skip repeats cheaply before looking the span up.
        if ctx is last or not isinstance(ctx, otel_context.Context):
            continue
        last = ctx
        span_context = trace.get_current_span(ctx).get_span_context()
        if span_context.is_valid:
            seen.setdefault((span_context.trace_id, span_context.span_id), span_context)
    return [Link(span_context) for span_context in list(seen.values())[:MAX_LINKS]]


class BatcherTelemetry:
    """The OpenTelemetry export of one target (what :func:`instrument` returns).

    It is the target's observer: per sink call it records the call's size
    and duration and, when tracing, makes the call's span; per batch it
    records the first item's wait before dispatch (batches whose callers all
    left before dispatch made no call and are not recorded).

    Attributes:
        name: the ``asyncbatch.batcher`` attribute.
        target: what was instrumented.
        tracing: whether sink calls get spans (a tracer provider was attached).
    """

    def __init__(
        self,
        target: Any,
        instruments: _Instruments,
        tracer_provider: TracerProvider | None,
        name: str,
    ) -> None:
        self.name = name
        self._source = Source(target)
        self.tracing = tracer_provider is not None
        self._instruments = instruments
        self._attributes: Mapping[str, str] = {BATCHER: self.name}
        self._span_name = SPAN_PREFIX + self.name
        self._tracer = (
            None
            if tracer_provider is None
            else trace.get_tracer(METER_NAME, __version__, tracer_provider=tracer_provider)
        )
        self._capture = None if tracer_provider is None else _context_getter()
        self._removed = False

    @property
    def target(self) -> Any:
        """The instrumented target (held weakly): ``None`` once it is gone."""
        return self._source.target()

    def __repr__(self) -> str:
        state = "removed" if self._removed else ("tracing" if self.tracing else "metrics")
        return f"<BatcherTelemetry batcher={self.name!r} [{state}]>"

    @property
    def capture(self) -> Callable[[], object] | None:
        """Reads the submitter's context at submit; ``None`` (nothing per item) when not tracing."""
        return self._capture

    def remove(self) -> None:
        """Stop: detach from the target; its figures are no longer observed. Idempotent.

        (OpenTelemetry instruments cannot be deleted: they stay, without this
        batcher's points.) Its points go and the name is free even if
        detaching raises (the error is raised after).
        """
        if self._removed:
            return
        self._removed = True
        try:
            target = self.target
            if target is not None:
                detach(target, self)
        finally:
            self._instruments.discard(self)

    def _replaced(self) -> None:
        """Its name was taken over (its target gone or closed for good): points already gone."""
        self._removed = True
        target = self.target
        if target is not None:
            # Closed for good: it makes no more sink calls, so an observer left
            # on it is inert; failing to detach must not fail the new instrument().
            with contextlib.suppress(Exception):
                detach(target, self)

    # Observer hooks (run on the batcher's loop).

    def call_started(self, call: SinkCall) -> tuple[Span, object, _Frame] | None:
        """Start the call's span, current while the sink runs; ``None`` when not tracing."""
        if self._tracer is None:
            return None
        span = self._tracer.start_span(
            self._span_name,
            context=_ROOT,
            attributes={BATCHER: self.name, MESSAGE_COUNT: call.size, ATTEMPT: call.attempt},
            links=_links(call.captured),
        )
        # Built on the empty context, not the current one: nothing of the
        # dispatching task's context (a submitter's baggage, say) reaches the
        # sink. The frame remembers what was current, for _unwind.
        frame = _Frame(otel_context.get_current())
        context = otel_context.set_value(_FRAME, frame, trace.set_span_in_context(span, _ROOT))
        return span, otel_context.attach(context), frame

    def call_finished(
        self, call: SinkCall, token: object, duration: float, error: BaseException | None
    ) -> None:
        """Record the call (``call.size`` items, ``duration`` seconds); end its span."""
        instruments = self._instruments
        instruments.size.record(call.size, self._attributes)
        instruments.duration.record(duration, self._attributes)
        if not isinstance(token, tuple):
            return
        span, context_token, frame = token
        frame.done = True
        otel_context.detach(context_token)
        _unwind()
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()

    def batch_finished(self, batcher: str, report: BatchReport) -> None:
        """Record the first item's wait (seconds) of a batch that reached the sink."""
        if report.attempts:
            self._instruments.wait.record(report.wait, self._attributes)


_Read = Callable[[BatcherStats], Iterable[tuple[int, Mapping[str, str]]]]


class _Instruments:
    """One per meter: the instruments, shared by every batcher instrumented there.

    Every set is listed in ``_all``, weakly: a set lives as long as its
    meter (whose instruments hold the set's callbacks) or a
    :class:`BatcherTelemetry` using it, so a meter provider dropped takes
    its meter, readers and points with it. The tuple is replaced, never
    changed in place, so a collection may read it without the lock.
    """

    _all: ClassVar[tuple[weakref.ref[_Instruments], ...]] = ()
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, meter: Meter) -> None:
        self._meter = meter
        self._members: dict[str, BatcherTelemetry] = {}
        self.size = meter.create_histogram(
            "asyncbatch.batch.size",
            unit="{item}",
            description="Items per sink call.",
            explicit_bucket_boundaries_advisory=SIZE_BUCKETS,
        )
        self.duration = meter.create_histogram(
            "asyncbatch.sink.duration",
            unit="s",
            description="Seconds per sink call (each retry and isolation half is one call).",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.wait = meter.create_histogram(
            "asyncbatch.batch.wait",
            unit="s",
            description="Seconds from a batch's first item to its dispatch.",
            explicit_bucket_boundaries_advisory=WAIT_BUCKETS,
        )
        meter.create_observable_counter(
            "asyncbatch.items",
            [self._observe(lambda s: [(n, {OUTCOME: o}) for o, n in outcome_counts(s)])],
            unit="{item}",
            description="Items finished, by outcome.",
        )
        meter.create_observable_counter(
            "asyncbatch.batches",
            [self._observe(lambda s: [(n, {REASON: r}) for r, n in reason_counts(s)])],
            unit="{batch}",
            description="Batches dispatched to the sink, by the reason they became due.",
        )
        meter.create_observable_gauge(
            "asyncbatch.pending",
            [self._observe(lambda s: [(s.pending, {})])],
            unit="{item}",
            description="Items accepted and not yet dispatched.",
        )
        meter.create_observable_gauge(
            "asyncbatch.in_flight",
            [self._observe(lambda s: [(s.in_flight, {})])],
            unit="{item}",
            description="Items in sink calls running now.",
        )
        meter.create_observable_counter(
            "asyncbatch.retries",
            [self._observe(lambda s: [(s.retries, {})])],
            unit="{call}",
            description="Sink calls made again after a failure.",
        )
        meter.create_observable_gauge(
            "asyncbatch.concurrency.limit",
            [self._observe(lambda s: [(s.concurrency_limit, {})])],
            unit="{call}",
            description="Sink calls allowed at once (0: no limit).",
        )
        meter.create_observable_counter(
            "asyncbatch.cache.hits",
            [self._observe(lambda s: [(s.cache_hits, {})], loaders_only=True)],
            unit="{load}",
            description="DataLoader loads served from the cache or joined to a load under way.",
        )
        meter.create_observable_counter(
            "asyncbatch.cache.misses",
            [self._observe(lambda s: [(s.cache_misses, {})], loaders_only=True)],
            unit="{load}",
            description="DataLoader loads sent to the batch function.",
        )

    @classmethod
    def of(cls, provider: MeterProvider) -> _Instruments:
        with cls._lock:
            # Keyed by the meter actually returned (an SDK provider returns one
            # meter per name, whichever provider object asked for it).
            meter = metrics.get_meter(METER_NAME, __version__, meter_provider=provider)
            live = cls._live()
            for instruments in live:
                if instruments._meter is meter:
                    return instruments
            instruments = cls(meter)
            cls._all = tuple(weakref.ref(i, cls._prune) for i in (*live, instruments))
            return instruments

    @classmethod
    def _prune(cls, _: object = None) -> None:
        """A set is gone: drop its reference (a weak reference's callback).

        It may run in a garbage collection started anywhere, even in a thread
        that holds ``_lock`` or in a collection holding the SDK's locks: so it
        never waits for ``_lock``. If the lock is taken it does nothing; the
        next :meth:`of` drops every dead reference anyway.
        """
        if cls._lock.acquire(blocking=False):
            try:
                cls._all = tuple(ref for ref in cls._all if ref() is not None)
            finally:
                cls._lock.release()

    @classmethod
    def _live(cls) -> list[_Instruments]:
        """The sets of instruments still alive."""
        return [i for i in (ref() for ref in cls._all) if i is not None]

    def _resolved(self) -> object:
        """The meter that holds the instruments: a proxy meter's real one once it has it."""
        real = getattr(self._meter, "_real_meter", None)
        return self._meter if real is None else real

    def _group(self) -> list[_Instruments]:
        """Every set of instruments ending on the same meter as this one (this one first).

        That meter keeps the callbacks of whichever set registered first and
        returns the existing instruments to the others: the callbacks of each
        set report the members of all of them (only one set's callbacks run).
        """
        resolved = self._resolved()
        return [self, *(i for i in self._live() if i is not self and i._resolved() is resolved)]

    def add(self, telemetry: BatcherTelemetry, hint: str = "") -> BatcherTelemetry | None:
        """Observe ``telemetry`` under its name; returns the member it took the name from.

        The name is free when its holder's target is gone (garbage collected)
        or closed for good (:func:`finished`); the holder's points go.
        """
        replaced = None
        with self._lock:
            for group in self._group():
                existing = group._members.get(telemetry.name)
                if existing is not None and gives_up_its_name(existing):
                    del group._members[telemetry.name]
                    replaced = existing
            if any(telemetry.name in i._members for i in self._group()):
                raise ValueError(
                    f"a batcher named {telemetry.name!r} is already instrumented with this "
                    "meter provider and not closed; its points would be indistinguishable: "
                    "give each batcher its own name= (or instrument(..., name=...), or "
                    f"remove() the first one){hint}"
                )
            self._members[telemetry.name] = telemetry
        return replaced

    def discard(self, telemetry: BatcherTelemetry) -> None:
        with self._lock:
            if self._members.get(telemetry.name) is telemetry:
                del self._members[telemetry.name]

    def _observe(
        self, read: _Read, loaders_only: bool = False
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """A callback: ``read(stats)`` for every member, with its batcher attribute."""

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            # No lock: the SDK may collect while holding its own locks, and
            # list() copies the dict atomically.
            members = [m for group in self._group() for m in list(group._members.values())]
            observations = []
            for member in members:
                if loaders_only and not member._source.is_loader:
                    continue
                stats = member._source.stats()
                if stats is None:  # the target is gone: so are its points, and its name
                    member._instruments.discard(member)
                    continue
                for value, attributes in read(stats):
                    observations.append(Observation(value, {BATCHER: member.name, **attributes}))
            return observations

        return callback
