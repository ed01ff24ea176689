"""Randomized schedules for streaming sinks: every caller's stream is exactly its own.

Hypothesis draws a generator (steps, per-item END / Exception entries, a
raise after some step, a wrong-length step), batcher options (size, wait,
concurrency, partitions, per-step timeout, retry) and callers that read to
the end, leave after k entries (with ``aclosing``), get cancelled before or
after dispatch, or run under an ``asyncio.timeout``; a close (drain or
cancel) may come in the middle. After each run, on virtual time:

- each stream got a prefix of exactly its own entries, in order, and ended
  as the model says (end, its error, or the caller left);
- no generator step went to an item twice unless retried before its first
  step; every generator whose callers all left was closed;
- stats add up (submitted == succeeded + failed + cancelled + expired +
  dropped), nothing is pending or in flight, no task is left, and nothing
  reached the loop's exception handler.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from asyncbatch import END, Batcher, BatcherClosed, ResultMismatch, Retry

pytestmark = pytest.mark.looptime


@dataclass
class Plan:
    steps: int
    ends: dict[int, int]  # item -> step at which END is answered
    fails: dict[int, int]  # item -> step at which an Exception entry is answered
    raise_after: int | None  # the generator raises after this many steps
    short_step: int | None  # this step has one entry too few
    step_cost: float


@dataclass
class Caller:
    key: int
    mode: str  # all, leave, cancel_early, cancel_late, timeout
    leave_after: int = 1
    got: list[str] = field(default_factory=list)
    outcome: str = ""


class Gen:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.calls: list[list[int]] = []
        self.closed_early = 0

    async def __call__(self, items: list[int]) -> AsyncIterator[list[object]]:
        plan = self.plan
        self.calls.append(list(items))
        finished = False
        try:
            for k in range(plan.steps):
                await asyncio.sleep(plan.step_cost)
                if plan.raise_after is not None and k == plan.raise_after:
                    raise ConnectionError(f"generator broke at step {k}")
                step: list[object] = []
                for x in items:
                    if plan.ends.get(x) == k:
                        step.append(END)
                    elif plan.fails.get(x) == k:
                        step.append(ValueError(f"item {x} failed at step {k}"))
                    else:
                        step.append(f"{x}:{k}")
                if plan.short_step == k:
                    step = step[:-1]
                yield step
            finished = True
        finally:
            if not finished:
                self.closed_early += 1


def expected_entries(plan: Plan, x: int) -> tuple[list[str], str]:
    """What the stream of item ``x`` gets if its caller reads to the end."""
    got: list[str] = []
    for k in range(plan.steps):
        if plan.raise_after is not None and k == plan.raise_after:
            return got, "error"
        if plan.short_step == k:
            return got, "mismatch"
        if plan.ends.get(x) == k:
            return got, "end"
        if plan.fails.get(x) == k:
            return got, "error"
        got.append(f"{x}:{k}")
    return got, "end"


plans = st.builds(
    Plan,
    steps=st.integers(1, 5),
    ends=st.dictionaries(st.integers(0, 11), st.integers(0, 4), max_size=3),
    fails=st.dictionaries(st.integers(0, 11), st.integers(0, 4), max_size=3),
    raise_after=st.none() | st.integers(0, 4),
    short_step=st.none() | st.integers(0, 4),
    step_cost=st.sampled_from([0.0, 0.01, 0.5]),
)
callers = st.lists(
    st.builds(
        Caller,
        key=st.just(0),
        mode=st.sampled_from(["all", "all", "leave", "cancel_early", "cancel_late", "timeout"]),
        leave_after=st.integers(1, 3),
    ),
    min_size=1,
    max_size=12,
)
options = st.fixed_dictionaries(
    {
        "max_size": st.integers(1, 6),
        "max_wait": st.sampled_from([0.0, 0.05]),
        "max_concurrency": st.sampled_from([1, 2, None]),
        "partitions": st.integers(1, 3),
        "timeout": st.sampled_from([None, 0.3, 5.0]),
        "retry": st.booleans(),
    }
)


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(plan=plans, people=callers, opts=options, close=st.sampled_from([None, "drain", "cancel"]))
async def test_streams_get_exactly_their_own_entries(
    plan: Plan, people: list[Caller], opts: dict[str, Any], close: str | None
) -> None:
    loop = asyncio.get_running_loop()
    handler_calls: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, ctx: handler_calls.append(ctx))
    gen = Gen(plan)
    parts = opts["partitions"]
    b: Batcher[int, Any] = Batcher(
        gen,
        max_size=opts["max_size"],
        max_wait=opts["max_wait"],
        max_concurrency=opts["max_concurrency"],
        partition=(lambda x: x % parts) if parts > 1 else None,
        timeout=opts["timeout"],
        retry=Retry(attempts=2, backoff=0.0) if opts["retry"] else None,
    )
    for i, c in enumerate(people):
        c.key = i

    async def run(c: Caller) -> None:
        try:
            async with contextlib.aclosing(b.submit_stream(c.key)) as stream:
                if c.mode == "timeout":
                    async with asyncio.timeout(0.2):
                        async for value in stream:
                            c.got.append(value)
                else:
                    async for value in stream:
                        c.got.append(value)
                        if c.mode == "leave" and len(c.got) >= c.leave_after:
                            c.outcome = "left"
                            return
            c.outcome = "end"
        except TimeoutError as exc:
            c.outcome = "timeout" if "did not answer" not in str(exc) else "error"
        except ResultMismatch:
            c.outcome = "mismatch"
        except BatcherClosed:
            c.outcome = "closed"
        except (ConnectionError, ValueError, RuntimeError):
            c.outcome = "error"
        except asyncio.CancelledError:
            c.outcome = "cancelled"
            raise

    tasks = {c.key: asyncio.create_task(run(c)) for c in people}
    await asyncio.sleep(0)
    for c in people:
        if c.mode == "cancel_early":
            tasks[c.key].cancel()
    await asyncio.sleep(0.6)
    for c in people:
        if c.mode == "cancel_late":
            tasks[c.key].cancel()
    if close is not None:
        await asyncio.wait_for(b.aclose(cancel=close == "cancel"), 60)
    await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), 60)
    await asyncio.wait_for(b.aclose(), 60)

    for c in people:
        event(f"outcome {c.outcome}")
        full, ending = expected_entries(plan, c.key)
        # A prefix of exactly its own entries, in order (retries happen only
        # before a first step, so nothing is repeated).
        assert c.got == full[: len(c.got)], (c, full)
        if c.outcome == "end":
            assert (c.got, ending) == (full, "end"), (c, full, ending)
        elif c.outcome == "mismatch":
            assert ending == "mismatch" or plan.short_step is not None, c
    for call in gen.calls:
        assert len(call) == len(set(call)), call
    s = b.stats
    assert s.submitted == s.succeeded + s.failed + s.cancelled + s.expired + s.dropped, s
    assert (s.pending, s.in_flight) == (0, 0), s
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current] == []
    assert handler_calls == [], handler_calls
