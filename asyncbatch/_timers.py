"""When an open batch becomes due by time: the linger deadline and the
heartbeat grid.

A batch gets exactly one timer, armed when its first item arrives, at the
earlier of two deadlines:

- linger: ``max_wait`` seconds after the first item (``0`` means the end of
  the current loop iteration, armed with ``loop.call_soon``);
- heartbeat: the next point of the absolute grid ``t0 + k * interval``
  strictly after now, armed with ``loop.call_at``.

Arming the next grid point *in the future* is what makes ticks skip rather
than bunch when the loop or a sink lagged: a tick is armed only while items
wait, and never in the past.
"""

from __future__ import annotations

import math

__all__ = ["Deadlines", "next_tick"]


def next_tick(t0: float, interval: float, now: float) -> float:
    """The first grid point ``t0 + k * interval`` (integer ``k``) after ``now``."""
    k = math.floor((now - t0) / interval) + 1
    tick = t0 + k * interval
    # Float rounding can land the product on or just before ``now``.
    for _ in range(4):
        if tick > now:
            return tick
        k += 1
        tick = t0 + k * interval
    return math.nextafter(now, math.inf)  # an interval below the clock's resolution


class Deadlines:
    """The time triggers of one batcher, bound to its grid origin ``t0``."""

    __slots__ = ("interval", "max_wait", "t0")

    def __init__(self, max_wait: float | None, interval: float | None) -> None:
        self.max_wait = max_wait
        self.interval = interval
        self.t0 = 0.0

    def first(self, now: float) -> tuple[float, bool] | None:
        """Deadline for a batch opened at ``now``.

        Returns ``(when, is_tick)``, or ``None`` when no time trigger applies.
        ``when == now`` with ``max_wait == 0`` means "end of this iteration".
        """
        wait = self.max_wait
        interval = self.interval
        if interval is None:
            return None if wait is None else (now + wait, False)
        tick = next_tick(self.t0, interval, now)
        if wait is not None and now + wait < tick:
            return (now + wait, False)
        return (tick, True)
