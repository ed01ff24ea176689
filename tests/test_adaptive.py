"""Adaptive, the concurrency policy: fed with samples (exact), and through a Batcher.

The unit tests drive the policy with a latency that is a function of the
limit (a made-up backend), one sample per batch, on made-up times; every
decision is deterministic, so the limits it goes through are asserted exactly.
The Batcher tests run on virtual time (looptime).
"""

from __future__ import annotations

import asyncio
import copy
import math
from collections.abc import Callable

import pytest

from asyncbatch import Adaptive, Batcher, Retry
from asyncbatch._concurrency import BatchSample

Latency = Callable[[int], float]


class Feed:
    """Feeds a policy one sample per batch from a made-up closed system.

    ``items`` items are always in the system (backlog plus in flight), and
    one batch of 10 is answered every ``10 * latency / items`` seconds, each
    call lasting ``in_flight`` such steps: the rate whose Little's-law
    latency is ``latency``, so the policy sees exactly the latency it is fed.
    A due batch waits for a slot (``waiting``) unless told otherwise.
    """

    def __init__(self, policy: Adaptive, items: int = 1000) -> None:
        self.policy = policy
        self.now = 0.0
        self.items = items
        self.limits: list[int] = [policy.limit]  # every distinct limit in turn

    def batch(
        self,
        latency: float,
        *,
        in_flight: int | None = None,
        overloaded: bool = False,
        started: float | None = None,
        waiting: int = 1,
    ) -> int:
        step = 10 * latency / self.items
        self.now += step
        calls = self.policy.limit if in_flight is None else in_flight
        # With ``calls`` calls in flight and one batch answered per step,
        # each call lasts ``calls`` steps.
        start = self.now - calls * step if started is None else started
        limit = self.policy.on_batch(
            BatchSample(
                now=self.now,
                size=10,
                latency=latency,
                duration=self.now - start,
                in_flight=calls,
                overloaded=overloaded,
                backlog=self.items - calls * 10,
                waiting=waiting,
            )
        )
        assert self.policy.min <= limit <= self.policy.max
        if limit != self.limits[-1]:
            self.limits.append(limit)
        return limit

    def run(self, latency: Latency, batches: int) -> None:
        for _ in range(batches):
            self.batch(latency(self.policy.limit))


def scales(limit: int) -> float:
    """A backend that serves every call at once: latency falls with the limit."""
    return 1.0 / limit


def knee(capacity: int) -> Latency:
    """Better up to ``capacity`` calls at once, then 10 % worse per call beyond it."""

    def latency(limit: int) -> float:
        return 0.1 * capacity / min(limit, capacity) * (1 + 0.1 * max(0, limit - capacity))

    return latency


# -- construction ------------------------------------------------------------------


def test_defaults() -> None:
    a = Adaptive()
    assert (a.min, a.max, a.limit) == (1, 64, 1)
    assert (a.tolerance, a.window, a.backoff, a.cooldown, a.probe_every) == (
        0.05,
        2,
        0.9,
        0.1,
        8,
    )
    assert repr(a) == "Adaptive(min=1, max=64, limit=1)"
    assert Adaptive(min=3, max=5).limit == 3


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"min": 0}, ValueError, "Adaptive.min must be >= 1, got 0"),
        ({"max": 1.5}, TypeError, "Adaptive.max must be an int, got 1.5"),
        ({"min": True}, TypeError, "Adaptive.min must be an int, got True"),
        ({"min": 4, "max": 2}, ValueError, "Adaptive.max must be >= min, got min=4, max=2"),
        ({"window": 0}, ValueError, "Adaptive.window must be >= 1, got 0"),
        ({"probe_every": 0}, ValueError, "Adaptive.probe_every must be >= 1, got 0"),
        ({"tolerance": 1.0}, ValueError, "Adaptive.tolerance must be >= 0.0 and < 1.0"),
        ({"tolerance": "x"}, TypeError, "Adaptive.tolerance must be a number, got 'x'"),
        ({"backoff": 0}, ValueError, "Adaptive.backoff must be > 0 and < 1, got 0"),
        ({"backoff": 1}, ValueError, "Adaptive.backoff must be > 0 and < 1, got 1"),
        ({"cooldown": -1}, ValueError, "Adaptive.cooldown must be >= 0.0 and < inf"),
        ({"cooldown": math.inf}, ValueError, "Adaptive.cooldown must be >= 0.0 and < inf"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(").replace(".", r"\.")):
        Adaptive(**kwargs)  # type: ignore[arg-type]


# -- the rule, on samples ------------------------------------------------------------


def test_climbs_with_a_doubling_step_while_latency_improves_up_to_max() -> None:
    feed = Feed(Adaptive())
    feed.run(scales, 2000)
    # A window is 2 * max(limit, 4) batches; the step doubles from the third
    # improvement; at max it checks the untested limits below: 1/limit is
    # within the 5 % tolerance of 1/64 down to 61, and on a plateau the
    # smaller limit wins, so it settles around 61, probing upwards.
    assert feed.limits == [1, 2, 3, 5, 9, 17, 33, 64, 63, 62, 60, 61, 60, 61]
    assert 60 <= feed.policy.limit <= 64


def test_first_window_decides_after_eight_batches_at_limit_one() -> None:
    feed = Feed(Adaptive())
    feed.run(scales, 7)
    assert feed.policy.limit == 1
    feed.run(scales, 1)
    assert feed.policy.limit == 2


def test_finds_the_knee_and_holds_there_probing_one_slot_up() -> None:
    feed = Feed(Adaptive())
    while len(feed.limits) < 10:
        feed.batch(knee(8)(feed.policy.limit))
    # 9 beat 5, 17 overshot, 10 was worse, so the skipped 6..8 side was tried.
    assert feed.limits == [1, 2, 3, 5, 9, 17, 10, 8, 7, 8]
    feed.limits = [8]
    feed.run(knee(8), 5000)
    assert set(feed.limits) == {8, 9}  # held, with one-slot probes that lose
    probes = feed.limits.count(9)
    # A hold window (16 batches) * probe_every (8) + a probe (18): ~34 probes.
    assert 30 <= probes <= 40


def test_flat_latency_keeps_the_smaller_limit() -> None:
    feed = Feed(Adaptive())
    feed.run(lambda limit: 1.0 / min(limit, 4), 300)
    # 9 is no better than 5 (flat beyond 4), nor is 6; 4, below, is equal, so
    # it wins (the smaller on a plateau); 3 is worse: it holds at 4.
    assert feed.limits[:9] == [1, 2, 3, 5, 9, 6, 4, 3, 4]
    assert set(feed.limits[8:]) == {4, 5}  # held at 4, one-slot probes to 5


def test_capacity_halving_then_recovering() -> None:
    feed = Feed(Adaptive())
    feed.run(knee(16), 450)
    assert feed.limits == [1, 2, 3, 5, 9, 17, 33, 18, 16, 15, 16]
    feed.limits = [16]
    feed.run(knee(8), 200)
    # Worse at the held limit (0.1 -> 0.18 s): cut in proportion, to
    # floor(16 * 0.1 / 0.18) = 8, then a search upwards: 9 is worse, so 8 holds.
    assert feed.limits == [16, 8, 9, 8]
    feed.limits = [8]
    feed.run(knee(16), 600)
    # (knee() scales latency with the capacity: at 8 it doubled too, so the
    # hold cuts to 4.) Then up, the step doubling, to the new knee: 20
    # overshoots, back to 12 one at a time, doubling again; 17 is worse and
    # 15 (jumped over) too: 16 holds.
    assert feed.limits == [8, 4, 5, 6, 8, 12, 20, 13, 14, 16, 20, 17, 15, 16]
    assert feed.policy.limit == 16


def test_overload_cuts_by_backoff_once_per_round_trip() -> None:
    feed = Feed(Adaptive())
    feed.run(knee(8), 400)
    assert feed.policy.limit == 8
    assert feed.batch(0.1, overloaded=True, started=feed.now) == 7  # floor(8 * 0.9)
    t_cut = feed.now
    # A batch that started before the cut cannot cut again (nor can one of
    # the Feed's own, which last as many steps as there are calls in flight).
    assert feed.batch(0.1, overloaded=True, started=t_cut - 0.001) == 7
    assert feed.batch(0.1, overloaded=True) == 7
    # One that started after it can.
    assert feed.batch(0.1, overloaded=True, started=feed.now) == 6
    assert feed.batch(0.1, overloaded=True, started=feed.now) == 5
    for _ in range(10):
        feed.batch(0.1, overloaded=True, started=feed.now)
    assert feed.policy.limit == 1  # at least one less each time, never below min


def test_overload_never_goes_below_min() -> None:
    feed = Feed(Adaptive(min=3, max=10))
    for _ in range(20):
        assert feed.batch(0.1, overloaded=True, started=feed.now) == 3


def test_the_limit_that_overloaded_is_a_ceiling_for_cooldown_seconds() -> None:
    feed = Feed(Adaptive(cooldown=1.0))
    while feed.policy.limit != 9:
        feed.batch(scales(feed.policy.limit))
    feed.batch(0.1, overloaded=True, started=feed.now)
    cut_at = feed.now
    assert feed.policy.limit == 8
    feed.limits = [8]
    # Latency says "more" all along, but 9 overloaded: the search stays at 8.
    while feed.now < cut_at + 0.99:
        feed.batch(scales(feed.policy.limit))
    assert feed.limits == [8]
    # After the cooldown, the hold's next probe goes up, then one slot more
    # per clean window.
    feed.run(scales, 400)
    assert feed.limits[:3] == [8, 9, 10]


def test_samples_of_batches_started_under_an_earlier_limit_are_ignored() -> None:
    feed = Feed(Adaptive())
    feed.run(scales, 8)
    assert feed.policy.limit == 2
    changed = feed.now
    # Stale samples (started before the change): however many, no decision.
    for _ in range(100):
        feed.batch(10.0, started=changed - 0.005)
    assert feed.policy.limit == 2
    # The first window at 2 counts the items the stale batches answered over
    # its time (the rate is every batch's): its halves differ, it is measured
    # again, and the second window rises.
    feed.run(scales, 15)
    assert feed.policy.limit == 2
    feed.run(scales, 1)
    assert feed.policy.limit == 3


def test_does_not_rise_when_the_limit_is_not_used() -> None:
    feed = Feed(Adaptive())
    # At most 2 calls are ever in flight (light load), though latency would
    # say "more": a limit the load does not reach tells nothing.
    for _ in range(2000):
        limit = feed.policy.limit
        feed.batch(scales(limit), in_flight=min(limit, 2))
    assert feed.limits == [1, 2, 3]  # 3 was not reached: no further


def test_does_not_rise_when_no_due_batch_waited_for_a_slot() -> None:
    feed = Feed(Adaptive())
    # The limit is reached (in_flight == limit) but no due batch ever waited
    # for a slot: the limit holds nothing back, so more would go unused.
    for _ in range(500):
        feed.batch(scales(feed.policy.limit), waiting=0)
    assert feed.limits == [1]


def _sample(now: float, latency: float, in_flight: int, backlog: int) -> BatchSample:
    return BatchSample(
        now=now,
        size=10,
        latency=latency,
        duration=0.01,  # as long as the gap between answers at limit 1
        in_flight=in_flight,
        overloaded=False,
        backlog=backlog,
        waiting=1,
    )


def test_window_latency_is_items_in_system_over_the_answer_rate() -> None:
    policy = Adaptive()
    now = 0.0
    # Limit 1: 1000 items in the system (990 waiting, 10 in the sink), 10
    # answered every 0.01 s: 1.0 s by Little's law (the measured 5.0 is not used).
    for _ in range(8):
        now += 0.01
        assert policy.on_batch(_sample(now, 5.0, 1, 990)) in (1, 2)
    assert policy.limit == 2
    # Limit 2: the measured latency says far better, but 10 items every
    # 0.02 s with 1000 in the system is 2.0 s: worse, so back to 1, held.
    for _ in range(8):
        now += 0.02
        policy.on_batch(_sample(now, 0.1, 2, 980))
    assert policy.limit == 1


def test_backlog_drop_at_a_higher_limit_is_an_improvement() -> None:
    policy = Adaptive()
    now = 0.0
    for _ in range(8):  # limit 1: 100 items in the system, 10 per 0.01 s: 0.1 s
        now += 0.01
        policy.on_batch(_sample(now, 0.1, 1, 90))
    assert policy.limit == 2
    # Limit 2: the same rate, half the backlog (the queue drained into the
    # second slot): 0.05 s, better by more than the tolerance: it goes on.
    for _ in range(8):
        now += 0.01
        policy.on_batch(_sample(now, 0.1, 2, 30))
    assert policy.limit == 3


def test_items_in_system_count_the_items_in_running_calls() -> None:
    def sample(now: float, duration: float, calls: int, backlog: int, running: int) -> BatchSample:
        return BatchSample(
            now=now,
            size=10,
            latency=0.1,
            duration=duration,
            in_flight=calls,
            overloaded=False,
            backlog=backlog,
            waiting=1,
            running=running,
        )

    policy = Adaptive()
    now = 0.0
    for _ in range(8):  # limit 1: 1000 items in the system, 10 per 0.01 s
        now += 0.01
        policy.on_batch(sample(now, 0.01, 1, 990, 10))
    assert policy.limit == 2
    # Limit 2: the same rate (two calls of 10 items, 0.02 s each); the calls
    # hold 510 items (other batches are larger), so 1000 are still in the
    # system: no better, so back to 1 (taken as 2 calls of this batch's 10
    # items, it would look twice as good and rise to 3). The first two calls
    # that end at 2 started under 1: the window is the 8 after them.
    for _ in range(10):
        now += 0.01
        policy.on_batch(sample(now, 0.02, 2, 490, 510))
    assert policy.limit == 1


def test_latency_still_rising_within_a_window_is_measured_again() -> None:
    feed = Feed(Adaptive())
    # A queue filling up at limit 1: latency climbs through the window.
    for i in range(8):
        feed.batch(0.1 * (i + 1))
    assert feed.policy.limit == 1  # measured again, not compared
    for i in range(8):
        feed.batch(1.0 + 0.1 * i)
    assert feed.policy.limit == 1
    for _ in range(8):
        feed.batch(2.0)  # settled: now it decides (the third window at most)
    assert feed.policy.limit == 2


def test_min_equals_max_never_moves() -> None:
    feed = Feed(Adaptive(min=4, max=4))
    feed.run(scales, 500)
    feed.batch(1.0, overloaded=True)
    feed.run(knee(2), 500)
    assert feed.limits == [4]


# -- through a Batcher, on virtual time --------------------------------------------


async def _closed_loop(
    batcher: Batcher[int, int], callers: int, seconds: float, limits: list[int]
) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def caller(i: int) -> None:
        while loop.time() < end:
            await asyncio.sleep(0.001 * (i % 10))  # think time: callers out of step
            await batcher.submit(i)

    async def watch() -> None:
        while loop.time() < end:
            limits.append(batcher.stats.concurrency_limit)
            await asyncio.sleep(0.05)

    await asyncio.gather(watch(), *(caller(i) for i in range(callers)))


@pytest.mark.looptime
async def test_batcher_limit_rises_under_a_backend_that_scales() -> None:
    async def sink(items: list[int]) -> list[int]:
        await asyncio.sleep(0.01)  # any number of calls at once, same time each
        return items

    policy = Adaptive(max=16)
    limits: list[int] = []
    async with Batcher(sink, max_size=8, max_concurrency=policy) as b:
        await _closed_loop(b, 200, 5.0, limits)
    assert limits[0] == 1
    assert all(1 <= x <= 16 for x in limits)
    assert limits[-1] >= 12  # 200 callers fill 25 batches of 8: every slot helps


class TooManyRequests(Exception):
    def __init__(self) -> None:
        super().__init__("429")
        self.retry_after = 0.02


@pytest.mark.looptime
async def test_batcher_limit_falls_on_overload_signals() -> None:
    active = 0

    async def sink(items: list[int]) -> list[int]:
        nonlocal active
        if active >= 3:  # a backend that takes 3 calls at once and sends the rest away
            await asyncio.sleep(0.001)
            raise TooManyRequests
        active += 1
        try:
            await asyncio.sleep(0.01)
        finally:
            active -= 1
        return items

    # Calls retried after a 429 run long and end rarely; the windows' short
    # calls alone would say each slot added answers more: the rate counted
    # over the window bounds that (without it, the limit averaged 5.7).
    policy = Adaptive(max=32)
    limits: list[int] = []
    retry = Retry(attempts=math.inf, backoff=0.01)
    async with Batcher(sink, max_size=8, max_concurrency=policy, retry=retry) as b:
        await _closed_loop(b, 60, 10.0, limits)
    assert max(limits) > 3  # it did go up, into the overload
    assert all(1 <= x <= 32 for x in limits)
    late = limits[len(limits) // 2 :]
    assert sum(late) / len(late) <= 4  # and came back under it


@pytest.mark.looptime
async def test_batcher_limit_stays_within_min_and_max() -> None:
    async def sink(items: list[int]) -> list[int]:
        await asyncio.sleep(0.01 * len(items))
        return items

    limits: list[int] = []
    async with Batcher(sink, max_size=4, max_concurrency=Adaptive(min=2, max=5)) as b:
        assert b.stats.concurrency_limit == 2
        await _closed_loop(b, 100, 5.0, limits)
    assert set(limits) <= {2, 3, 4, 5}
    assert limits[-1] == 5, limits


def test_one_adaptive_tunes_one_open_batcher() -> None:
    async def sink(items: list[int]) -> list[int]:
        return items

    policy = Adaptive(max=8)
    first = Batcher(sink, max_concurrency=policy, name="first")
    with pytest.raises(ValueError, match="already tunes <Batcher 'first'"):
        Batcher(sink, max_concurrency=policy)
    second = Batcher(sink, max_concurrency=2)
    with pytest.raises(ValueError, match="already tunes"):
        second.configure(max_concurrency=policy)
    assert second.stats.concurrency_limit == 2  # nothing changed
    first.configure(max_concurrency=policy)  # its own again: fine
    first.configure(max_size=4)  # other settings do not touch it
    # Once the first lets it go (another limit), the second may take it.
    first.configure(max_concurrency=3)
    second.configure(max_concurrency=policy)
    assert second.stats.concurrency_limit == policy.limit
    # A copy is another policy; a closed batcher's policy is free.
    Batcher(sink, max_concurrency=copy.deepcopy(policy))


async def test_a_closed_batchers_adaptive_can_be_reused() -> None:
    async def sink(items: list[int]) -> list[int]:
        return items

    policy = Adaptive()
    async with Batcher(sink, max_concurrency=policy) as b:
        assert await b.submit(1) == 1
    async with Batcher(sink, max_concurrency=policy) as again:
        assert await again.submit(2) == 2


def test_a_held_latency_of_zero_is_no_reference_for_a_cut() -> None:
    # A coarse clock (Windows' 15.6 ms, a virtual one): calls that take no
    # measurable time give a window latency of 0. Held there (after a cut),
    # the next positive latency has nothing to be compared with: no cut.
    feed = Feed(Adaptive())
    while feed.policy.limit < 5:
        feed.batch(scales(feed.policy.limit))
    feed.batch(0.1, overloaded=True, started=feed.now)
    cut = feed.policy.limit
    assert cut == 4
    for _ in range(100):
        feed.batch(0.0)  # calls that took no time: latency 0
    assert (feed.policy.limit, feed.policy._phase) == (cut, "hold")
    for _ in range(100):
        feed.batch(0.001)
    assert feed.policy.limit == cut
