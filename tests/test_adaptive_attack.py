"""Adaptive, attacked: load with idle gaps (the system empties between bursts)."""

from __future__ import annotations

from asyncbatch import Adaptive
from asyncbatch._concurrency import BatchSample


def _bursts(policy: Adaptive, gaps: list[float], bursts: int) -> list[int]:
    """Bursts of two calls of 10 items (0.01 s each, one after the other); the
    system is empty after each, for ``gaps[i % len(gaps)]`` seconds."""
    now = 0.0
    limits = [policy.limit]
    for i in range(bursts):
        for backlog, waiting in ((10, 1), (0, 0)):
            now += 0.01
            limit = policy.on_batch(
                BatchSample(
                    now=now,
                    size=10,
                    latency=0.015,
                    duration=0.01,
                    in_flight=1,
                    overloaded=False,
                    backlog=backlog,
                    waiting=waiting,
                    running=10,
                )
            )
            assert policy.min <= limit <= policy.max
            if limit != limits[-1]:
                limits.append(limit)
        now += gaps[i % len(gaps)]
    return limits


def test_idle_time_between_bursts_is_not_latency() -> None:
    # The same bursts, back to back or with idle gaps of 0.1 s and 5 s between
    # them: nothing waits in a gap, so the latency (and every decision) is
    # the same. Counted over a span that included the gaps, the rate fell
    # with each gap, and a held limit was cut for a gap in its window.
    steady = Adaptive(min=2, max=8)
    expected = _bursts(steady, [0.0], 400)
    for gaps in ([0.1, 5.0], [5.0], [0.0, 0.0, 0.0, 30.0]):
        policy = Adaptive(min=2, max=8)
        assert _bursts(policy, gaps, 400) == expected
        assert abs(policy._reference - steady._reference) <= 1e-9 * steady._reference
