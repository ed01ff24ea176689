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

from dataclasses import dataclass

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


class Adaptive:
    """Tune the number of sink calls in flight from measured latency, within ``[min, max]``.

    Placeholder: the algorithm is being written (issue 13). It keeps the
    limit at ``min``.
    """

    __slots__ = ("limit", "max", "min")

    def __init__(self, min: int = 1, max: int = 64) -> None:
        for name, value in (("min", min), ("max", max)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Adaptive.{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"Adaptive.{name} must be >= 1, got {value!r}")
        if max < min:
            raise ValueError(f"Adaptive.max must be >= min, got min={min}, max={max}")
        self.min = min
        self.max = max
        self.limit = min

    def on_batch(self, sample: BatchSample) -> int:
        """Take one batch's sample; return the limit now in force."""
        return self.limit

    def __repr__(self) -> str:
        return f"Adaptive(min={self.min}, max={self.max}, limit={self.limit})"
