"""How many sink calls may run at once: the concurrency policy the Batcher asks.

The dispatch rule (``Batcher._pump``) only compares the number of sink calls
in flight with a limit. Where that limit comes from is decided here:

- a fixed ``int`` (``max_concurrency=4``), or ``None`` for no limit: no policy
  object at all, nothing runs per batch;
- :class:`Adaptive` (``max_concurrency=Adaptive(min=1, max=64)`` or
  ``"auto"``): a policy object with one input, a per-batch sample, and one
  output, the limit (as Netflix's concurrency-limits ``Limit`` and TensorFlow
  Serving's adaptive batch scheduler keep it).

The Batcher calls :meth:`Adaptive.on_batch` once per finished batch, never per
item, and applies the limit it returns.
"""

from __future__ import annotations

import builtins
import math
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Adaptive", "BatchSample"]


@dataclass(frozen=True, slots=True)
class BatchSample:
    """What the Batcher measured for one finished batch.

    Attributes:
        now: ``loop.time()`` when the batch finished (seconds).
        size: items handed to the sink.
        latency: estimated mean per-item latency, submit to result, in
            seconds: from the batch's first item to its dispatch counts half
            (items arrived over that time), plus the sink time.
        duration: seconds from dispatch to the last item resolved.
        in_flight: sink calls running when it finished (itself included).
        queued: seconds the batch, once due, waited for a free slot.
        backlog: items accepted and not yet dispatched when it finished.
        waiting: due batches waiting for a free slot when it finished (a
            queue of work the limit holds back).
        running: items in the sink calls running when it finished (this
            batch's included); ``0``: not measured, taken as ``in_flight *
            size``.
        overloaded: the backend signalled overload during this batch: a sink
            call timed out (``timeout``), or raised (or answered, per item)
            an exception whose ``retry_after`` is set (e.g. HTTP 429/503).
    """

    now: float
    size: int
    latency: float
    duration: float
    in_flight: int
    overloaded: bool
    queued: float = 0.0
    backlog: int = 0
    waiting: int = 0
    running: int = 0


class Adaptive:
    """Tune the number of sink calls in flight from measured latency, within ``[min, max]``.

    The rule: hill climbing on the mean per-item latency (submit to result),
    with a multiplicative cut on overload signals. Latency is measured in
    *windows*: the batches dispatched under the limit now in force (a batch
    that started under an earlier limit says nothing about this one), at
    least ``window`` rounds of ``limit`` batches each (``window * max(limit,
    4)`` batches). A window's latency is taken by Little's law: the items in
    the system (``backlog`` plus the items in running sink calls,
    ``running``, averaged over the window's batches) divided by the rate
    items are answered at. That rate is taken per call, not by counting items
    between two instants: each of the calls in flight answers its items once
    per call duration, so the rate is the mean ``in_flight`` times the
    window's items per second of call (``sum(size) / sum(duration)``; the
    renewal-reward theorem). Counted between two instants, the rate moves
    with where the window's edges fall among the batches' answers, by about
    one batch in a window of a few dozen; per call it moves only with the
    calls' own durations. Every call that ends in the window counts for the
    rate, including those started under an earlier limit; calls still
    running count in neither way, so when the calls that ended are the
    short ones (after an overload, retried calls run long) the per-call rate
    is too high: the rate counted over the window's span, plus
    ``tolerance``, bounds it (the span leaves out the time the system was
    empty, no call running and nothing accepted: between bursts no item
    waits and none is answered). The latency so taken is the one the queue in front
    of the sink gives an item now, so it follows a change of limit within a
    window, where the measured ``latency`` of the items answered lags by the
    time the queue takes to fill or drain. (Samples whose calls took no
    time fall back to the measured ``latency``, weighted by ``size``.) A
    window whose second half
    differs from its first by more than ``tolerance`` is measured again (at
    most twice in a row): the queue is still moving. After each window:

    - **search**: from the best limit known so far, try the next one in the
      search's direction; a try whose mean latency is lower by more than
      ``tolerance`` (a fraction: ``0.05`` = 5 %) becomes the best and the
      step doubles (1, 2, 4, ...: slow start); a try that is not better sends
      the search back to the best with a step of 1, and a step of 1 that is
      not better ends the search at the best: the limit *holds* there. On a
      plateau the smaller limit wins: a larger limit with equal latency
      (within ``tolerance``) is not better, a smaller one is (it becomes the
      best, the lower of the two latencies staying the one to beat).
    - **hold**: keep the limit and watch the latency at it. If it moves by
      more than twice ``tolerance`` from its reference (an average of the
      windows held), the backend or the load changed. Worse: the backend
      now serves less; the limit is cut in proportion, to ``floor(limit *
      reference / latency)`` (at least one less, never below ``min``: the
      calls it still serves in the time it served ``limit``, as Netflix's
      Gradient limit scales by the ratio of the long-term to the recent
      latency), and a search starts upwards from the cut. Better: a search
      starts upwards from the limit. Every ``probe_every`` windows the hold
      tries one more slot (a capacity that grew shows no other sign: latency at
      a limit the backend serves anyway does not change).
    - **overload**: a batch that started under the limit now in force and
      reports ``overloaded`` (a sink timeout, or an error carrying
      ``retry_after``) cuts the limit to ``floor(limit * backoff)`` (at least
      one less, never below ``min``); the limit that overloaded becomes a
      ceiling that the search stays under for ``cooldown`` seconds (then it
      rises one slot per clean window), and a new search starts upwards from
      the cut. Samples from batches started before
      the cut cannot cut again (one cut per round trip, as TCP does).
    - the limit only rises when the window's load was held back by it: the
      most calls in flight equalled it and a due batch waited for a slot
      (``waiting`` or ``queued`` above zero). A limit the load does not use
      tells nothing.

    Sources: TensorFlow Serving's ``AdaptiveSharedBatchScheduler`` (hill
    climbing on batch latency averaged over a number of batches, the step
    doubling while latency keeps improving and reversing when it does not),
    Netflix's concurrency-limits (``AIMDLimit``: a multiplicative cut on a
    drop, no increase while the limit is not used; ``Gradient2Limit``: the
    limit scaled by the ratio of the long-term to the recent latency),
    Little's law (items in a system = the rate they leave at x the time each
    spends in it; J. D. C. Little, 1961) and the renewal-reward theorem (a
    slot that answers ``size`` items per ``duration`` seconds answers
    ``sum(size) / sum(duration)`` items per second in the long run). The
    hold with periodic
    one-slot probes and the ceiling after an overload are ours: they keep the
    probing (whose latency the callers pay) to a small share of the time.

    What resets it: an overload restarts the search from the cut; a latency
    change at a held limit restarts it from there; the ceiling lapses after
    ``cooldown`` seconds. Nothing else is remembered: a new ``Adaptive``
    starts at ``min`` with an upward search.

    Units: ``latency``, ``queued``, ``duration``, ``now`` and ``cooldown``
    are seconds (``loop.time()``); ``size`` and ``backlog`` are items.
    One ``Adaptive`` serves one Batcher: it keeps that Batcher's state (a
    second open Batcher given it raises ``ValueError``; ``@batch`` gives each
    of its batchers a copy).

    Args:
        min: the lowest limit, and the first one (``>= 1``).
        max: the highest limit (``>= min``).
        tolerance: the relative latency change that counts as a change
            (``0 <= tolerance < 1``); smaller reacts to finer differences and
            to more noise.
        window: rounds per window (``>= 1``): a window ends after
            ``window * max(limit, 4)`` measured batches.
        backoff: the factor of the cut on overload (``0 < backoff < 1``).
        cooldown: seconds the limit that overloaded stays out of reach
            (``>= 0``).
        probe_every: held windows between one-slot probes upwards (``>= 1``).

    Attributes:
        limit: the limit now in force (sink calls at once).
        min, max: the bounds.
    """

    __slots__ = (
        "_base",
        "_ceiling",
        "_ceiling_until",
        "_direction",
        "_empty_since",
        "_fresh",
        "_gap",
        "_held",
        "_idle",
        "_improved",
        "_peak",
        "_phase",
        "_reference",
        "_samples",
        "_since",
        "_start",
        "_starved",
        "_step",
        "_unsettled",
        "backoff",
        "cooldown",
        "limit",
        "max",
        "min",
        "probe_every",
        "tolerance",
        "window",
    )

    def __init__(
        self,
        min: int = 1,  # DESIGN.md names them so
        max: int = 64,
        *,
        tolerance: float = 0.05,
        window: int = 2,
        backoff: float = 0.9,
        cooldown: float = 0.1,
        probe_every: int = 8,
    ) -> None:
        for name, value in (
            ("min", min),
            ("max", max),
            ("window", window),
            ("probe_every", probe_every),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Adaptive.{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"Adaptive.{name} must be >= 1, got {value!r}")
        if max < min:
            raise ValueError(f"Adaptive.max must be >= min, got min={min}, max={max}")
        for name, number, low, high in (
            ("tolerance", tolerance, 0.0, 1.0),
            ("backoff", backoff, 0.0, 1.0),
            ("cooldown", cooldown, 0.0, math.inf),
        ):
            if isinstance(number, bool) or not isinstance(number, int | float):
                raise TypeError(f"Adaptive.{name} must be a number, got {number!r}")
            if not low <= number < high or (name == "backoff" and number == 0):
                bounds = "> 0 and < 1" if name == "backoff" else f">= {low} and < {high}"
                raise ValueError(f"Adaptive.{name} must be {bounds}, got {number!r}")
        self.min = min
        self.max = max
        self.tolerance = float(tolerance)
        self.window = window
        self.backoff = float(backoff)
        self.cooldown = float(cooldown)
        self.probe_every = probe_every
        self.limit = min
        self._since = -math.inf  # loop time of the last change: older batches are stale
        self._ceiling = max + 1  # limits >= it are out of reach until _ceiling_until
        self._ceiling_until = -math.inf
        # The window: one _Sample per call ended; _fresh: those started
        # under the limit in force, its batches.
        self._samples: list[_Sample] = []
        # The system was empty (no call running, nothing accepted) from
        # _empty_since until the next call started: idle time, in which no
        # item waits and none is answered, is left out of the span the rate
        # is counted over (_idle: such time not yet given to a sample).
        self._empty_since: float | None = None
        self._idle = 0.0
        self._fresh = 0
        self._start: float | None = None
        self._peak = 0  # most calls in flight seen in the window
        self._starved = False  # a due batch waited for a slot in the window
        self._unsettled = 0  # windows measured again in a row because latency still rose
        # search: the best (limit, latency) so far, direction, step; hold: reference
        self._phase = _SEARCH
        self._base: tuple[int, float] | None = None
        self._direction = 1
        self._step = 1
        self._improved = False
        self._gap = False
        self._reference = 0.0
        self._held = 0

    def on_batch(self, sample: BatchSample) -> int:
        """Take one batch's sample; return the limit now in force."""
        start = sample.now - sample.duration
        stale = start < self._since  # started under an earlier limit
        if self._empty_since is not None:
            self._idle += builtins.max(0.0, start - self._empty_since)
            self._empty_since = None
        if sample.in_flight <= 1 and not sample.backlog and not sample.waiting:
            self._empty_since = sample.now  # nothing left in the system
        if sample.overloaded and not stale:
            self._overloaded(sample.now)
            return self.limit
        # Every call that ends in the window counts for the rate items are
        # answered at (a stale one too: leaving it out would leave out the
        # slow calls, retried after an overload, that the limit now in force
        # still waits for); only those started under it are counted as the
        # window's batches and for what is in the system.
        in_system = None
        if not stale:
            # Accepted and not dispatched, plus those in the sink calls running.
            in_system = sample.backlog + (sample.running or sample.in_flight * sample.size)
            self._fresh += 1
        if self._start is None:
            self._start = start
        self._samples.append(
            _Sample(
                in_system,
                sample.latency,
                sample.size,
                sample.duration,
                sample.in_flight,
                sample.now,
                self._idle,
            )
        )
        self._idle = 0.0
        if stale:
            return self.limit
        self._peak = builtins.max(self._peak, sample.in_flight)
        if sample.waiting or sample.queued > 0:
            self._starved = True
        if self._fresh >= self._window_batches():
            self._decide(sample.now)
        return self.limit

    # ------------------------------------------------------------------ rules

    def _window_batches(self) -> int:
        return self.window * builtins.max(self.limit, 4)

    def _overloaded(self, now: float) -> None:
        limit = self.limit
        self._ceiling, self._ceiling_until = limit, now + self.cooldown
        cut = builtins.max(self.min, builtins.min(limit - 1, math.floor(limit * self.backoff)))
        self._search(now, cut, None)

    def _decide(self, now: float) -> None:
        samples = self._samples
        # The halves split after half the window's batches.
        split = [i for i, sample in enumerate(samples, 1) if sample.in_system is not None][
            self._fresh // 2 - 1
        ]
        start = self._start
        assert start is not None
        tolerance = self.tolerance
        early = _latency(samples[:split], start, tolerance)
        late = _latency(samples[split:], samples[split - 1].end, tolerance)
        latency = _latency(samples, start, tolerance)
        used = self._peak >= self.limit and self._starved
        limit = self.limit
        self._clear()
        moving = late > early * (1 + tolerance) or late < early * (1 - tolerance)
        if moving and self._unsettled < _REMEASURE:
            # Latency still moving within the window (a queue filling up or
            # draining after a change): measure again before comparing.
            self._unsettled += 1
            return
        self._unsettled = 0
        if limit >= self._ceiling and now >= self._ceiling_until:
            self._ceiling = limit + 1  # served it without overload: one more next
        if self._phase == _HOLD:
            # A held limit moves only on twice the tolerance: a search costs
            # windows at worse limits, so noise must not start one.
            if self._reference <= 0:
                # Held where calls took no measurable time (a coarse clock):
                # no scale to compare with, so the first latency measured is.
                self._reference = latency
            elif latency > self._reference * (1 + 2 * tolerance):
                cut = math.floor(limit * self._reference / latency)
                cut = builtins.max(self.min, builtins.min(limit - 1, cut))
                self._search(now, cut, None)
            elif latency < self._reference * (1 - 2 * tolerance) and used:
                self._search(now, limit, latency)
            else:
                self._reference = (self._reference + latency) / 2
                self._held += 1
                if self._held >= self.probe_every and used:
                    self._held = 0
                    self._search(now, limit, self._reference)
            return
        base = self._base
        if base is None:  # this window measured the starting point
            self._base = (limit, latency)
            self._try(now, used)
            return
        best, best_latency = base
        # Lower by more than the tolerance is better; so is, below the best,
        # no worse by more than it (on a plateau the smaller limit wins).
        smaller = limit < best and latency <= best_latency * (1 + tolerance)
        if latency < best_latency * (1 - tolerance) or smaller:
            self._base = (limit, builtins.min(latency, best_latency))
            self._gap = self._step > 1  # the limits jumped over are untested
            if self._improved:
                self._step *= 2
            self._improved = True
            self._try(now, used)
        elif self._step > 1:  # overshot: back to the best, then one at a time
            self._step = 1
            self._improved = False
            self._try(now, True)
        else:
            self._turn_or_hold(now, best, best_latency)

    def _turn_or_hold(self, now: float, best: int, best_latency: float) -> None:
        """One step the other way from the best if that side is untested, else hold."""
        if self._gap:
            self._gap = self._improved = False
            self._direction = -self._direction
            self._step = 1
            self._try(now, True)
        else:
            self._hold(now, best, best_latency)

    def _try(self, now: float, used: bool) -> None:
        """Move to the next limit of the search, or turn or hold if there is none."""
        assert self._base is not None
        best, best_latency = self._base
        upper = self._upper(now)
        target = best + self._direction * self._step
        if self._direction < 0:
            target = builtins.max(target, (best + 1) // 2)  # at most halve per try
        if self._direction > 0 and not used and best == self.limit:
            target = best  # the limit was not reached: more would go unused
        target = builtins.max(self.min, builtins.min(upper, target))
        if target == best:
            if self._direction > 0 and not used:
                self._hold(now, best, best_latency)
            else:
                self._turn_or_hold(now, best, best_latency)
            return
        self._set(now, target)

    def _upper(self, now: float) -> int:
        """The highest limit a search may try now: under the ceiling, then up to it."""
        ceiling = self._ceiling if now >= self._ceiling_until else self._ceiling - 1
        return builtins.max(self.min, builtins.min(self.max, ceiling))

    def _search(self, now: float, limit: int, latency: float | None) -> None:
        """Search upwards from ``limit``: measure it first when ``latency`` is None."""
        self._phase = _SEARCH
        self._direction = 1
        # Steps in proportion to the limit (an eighth of it), as TensorFlow's.
        self._step = builtins.max(1, limit // 8)
        self._improved = self._gap = False
        self._held = 0
        self._clear()
        if latency is None:
            self._base = None
            self._set(now, limit)
        else:
            self._base = (limit, latency)
            self._try(now, True)

    def _hold(self, now: float, limit: int, latency: float) -> None:
        self._phase = _HOLD
        self._base = None
        self._reference = latency
        self._held = 0
        self._set(now, limit)

    def _set(self, now: float, limit: int) -> None:
        self._clear()
        if limit != self.limit:
            self.limit = limit
            self._since = now
            self._unsettled = 0

    def _clear(self) -> None:
        if self._samples:
            self._start = self._samples[-1].end  # windows tile the time
        self._samples = []
        self._fresh = 0
        self._peak = 0
        self._starved = False

    def __repr__(self) -> str:
        return f"Adaptive(min={self.min}, max={self.max}, limit={self.limit})"


class _Sample(NamedTuple):
    """One ended call as the window keeps it (seconds are loop time)."""

    in_system: float | None  # items in the system; None: started under an earlier limit
    latency: float  # the measured mean latency of its items
    size: int
    duration: float
    calls: int  # calls in flight when it ended, itself included
    end: float
    idle: float  # seconds the system was empty just before it started


def _latency(samples: list[_Sample], start: float, tolerance: float) -> float:
    """Mean per-item latency over a run of samples, in seconds, by Little's law.

    Items in the system (the mean over the window's batches) divided by the
    rate items are answered at: the mean calls in flight times items per
    second of call, at most the items counted over the span since ``start``
    (loop time) plus ``tolerance``. Without call time to take a rate over,
    the mean measured latency, weighted by size.
    """
    fresh = [sample for sample in samples if sample.in_system is not None]
    items = sum(sample.size for sample in samples)
    seconds = sum(sample.duration for sample in samples)
    if seconds > 0 and items > 0 and fresh:
        in_system = sum(s.in_system for s in fresh if s.in_system is not None) / len(fresh)
        calls = sum(sample.calls for sample in samples) / len(samples)
        rate = items * calls / seconds
        # The span leaves out the time the system was empty (between bursts).
        span = samples[-1].end - start - sum(sample.idle for sample in samples)
        if span > 0:
            # Calls still running are in neither sum: when the ones that
            # ended are the short ones (a call retried after an overload
            # runs long), the count over the span bounds the rate.
            rate = builtins.min(rate, items / span * (1 + tolerance))
        return in_system / rate
    answered = sum(sample.size for sample in fresh)
    return sum(s.latency * s.size for s in fresh) / answered if answered else 0.0


_REMEASURE = 2  # windows measured again at most, while latency still rises
_SEARCH = "search"
_HOLD = "hold"
