"""Retry with backoff, server-directed delays, and poison-item isolation."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from asyncbatch import Batcher, BatchReport, ResultMismatch, Retry, Retryable

from .support import settle

pytestmark = pytest.mark.looptime


class Flaky:
    """Fails the first ``failures`` calls with ``exc``, then answers x * 10."""

    def __init__(self, failures: int, exc: BaseException | None = None) -> None:
        self.failures = failures
        self.exc = exc or ConnectionError("flaky")
        self.calls: list[list[Any]] = []
        self.times: list[float] = []

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.calls.append(list(items))
        self.times.append(asyncio.get_running_loop().time())
        if len(self.calls) <= self.failures:
            raise self.exc
        return [x * 10 for x in items]


async def test_retries_then_succeeds_with_exponential_backoff() -> None:
    sink = Flaky(2)
    reports: list[BatchReport] = []
    retry = Retry(attempts=3, backoff=0.1, jitter=False)
    async with Batcher(sink, retry=retry, on_batch=reports.append) as b:
        assert await b.submit_many([1, 2]) == [10, 20]
    t = sink.times
    assert [round(t[i + 1] - t[i], 6) for i in range(2)] == [0.1, 0.2]
    assert reports[0].attempts == 3
    assert reports[0].error is None


async def test_attempts_count_total_tries() -> None:
    sink = Flaky(10)
    reports: list[BatchReport] = []
    async with Batcher(sink, retry=Retry(attempts=3, backoff=0), on_batch=reports.append) as b:
        with pytest.raises(ConnectionError):
            await b.submit(1)
    assert len(sink.calls) == 3
    assert reports[0].attempts == 3
    assert isinstance(reports[0].error, ConnectionError)


async def test_only_retry_on_types_are_retried() -> None:
    sink = Flaky(1, ValueError("bad"))
    async with Batcher(sink, retry=Retry(retry_on=(ConnectionError,), backoff=0)) as b:
        with pytest.raises(ValueError, match="bad"):
            await b.submit(1)
    assert len(sink.calls) == 1


async def test_backoff_is_capped_and_jittered() -> None:
    retry = Retry(backoff=1.0, max_backoff=3.0, jitter=False)
    exc = Exception()
    assert [retry.delay(n, exc) for n in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 3.0]
    jittered = Retry(backoff=1.0, max_backoff=3.0)
    assert all(0 <= jittered.delay(3, exc) <= 3.0 for _ in range(100))


async def test_retry_after_attribute_sets_the_delay() -> None:
    class Throttled(Exception):
        retry_after = 2.5

    sink = Flaky(1, Throttled())
    async with Batcher(sink, retry=Retry(backoff=0.01)) as b:
        assert await b.submit(1) == 10
    assert sink.times[1] - sink.times[0] == pytest.approx(2.5)


async def test_sink_timeout_is_retried_and_reported() -> None:
    calls = 0

    async def slow_then_fast(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(10)
        return items

    async with Batcher(slow_then_fast, timeout=1.0, retry=Retry(backoff=0)) as b:
        assert await b.submit(5) == 5
    assert calls == 2


async def test_sink_timeout_without_retry_fails_with_timeout_error() -> None:
    loop = asyncio.get_running_loop()

    async def hang(items: list[int]) -> list[int]:
        await asyncio.sleep(100)
        return items

    async with Batcher(hang, timeout=2.0, name="slow") as b:
        t0 = loop.time()
        with pytest.raises(TimeoutError, match=r"'slow' did not answer within 2\.0 s"):
            await b.submit(1)
        assert loop.time() - t0 == pytest.approx(2.0)


async def test_sinks_own_timeout_error_passes_through() -> None:
    async def raises(items: list[int]) -> list[int]:
        raise TimeoutError("upstream said so")

    async with Batcher(raises, timeout=5.0) as b:
        with pytest.raises(TimeoutError, match="upstream said so"):
            await b.submit(1)


async def test_wrong_shape_is_a_failed_call_and_can_be_retried() -> None:
    answers = iter([[1], [10, 20]])

    async def sink(items: list[int]) -> list[int]:
        return next(answers)

    async with Batcher(sink, retry=Retry(backoff=0)) as b:
        assert await b.submit_many([1, 2]) == [10, 20]
    answers = iter([[1], [1]])
    async with Batcher(sink, retry=Retry(attempts=2, backoff=0)) as b:
        with pytest.raises(ResultMismatch):
            await b.submit_many([1, 2])


async def test_cancelled_callers_are_left_out_of_the_retry() -> None:
    sink = Flaky(1)
    b = Batcher(sink, retry=Retry(backoff=1.0, jitter=False))
    t1 = asyncio.create_task(b.submit(1))
    t2 = asyncio.create_task(b.submit(2))
    await asyncio.sleep(0.5)  # first call failed, waiting to retry
    t1.cancel()
    assert await t2 == 20
    assert sink.calls == [[1, 2], [2]]
    assert b.stats.cancelled == 1
    await b.aclose()


async def test_batch_whose_callers_all_left_is_not_retried() -> None:
    sink = Flaky(1)
    b = Batcher(sink, retry=Retry(backoff=1.0, jitter=False))
    task = asyncio.create_task(b.submit(1))
    await asyncio.sleep(0.5)
    task.cancel()
    await asyncio.sleep(2)
    assert sink.calls == [[1]]
    await b.aclose()


class Poison:
    """Raises when any poison item is in the batch; otherwise answers x * 10."""

    def __init__(self, poison: set[int]) -> None:
        self.poison = poison
        self.calls = 0

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls += 1
        bad = self.poison.intersection(items)
        if bad:
            raise ValueError(f"poison {sorted(bad)}")
        return [x * 10 for x in items]


async def test_isolate_gives_the_error_only_to_poison_items() -> None:
    sink = Poison({3, 11})
    reports: list[BatchReport] = []
    retry = Retry(attempts=2, backoff=0, isolate=True)
    async with Batcher(sink, max_size=16, retry=retry, on_batch=reports.append) as b:
        results = await b.submit_many(list(range(16)), return_exceptions=True)
    for i, r in enumerate(results):
        if i in (3, 11):
            assert isinstance(r, ValueError)
            assert str(r) == f"poison [{i}]"
        else:
            assert r == i * 10
    assert reports[0].attempts == sink.calls
    assert isinstance(reports[0].error, ValueError)


@pytest.mark.parametrize(("n", "k"), [(64, 1), (64, 2), (128, 3), (256, 4), (100, 5)])
async def test_isolation_costs_o_k_log_n_calls(n: int, k: int) -> None:
    poison = set(range(0, n, n // k))
    sink = Poison(poison)
    async with Batcher(sink, max_size=n, retry=Retry(attempts=1, isolate=True)) as b:
        results = await b.submit_many(list(range(n)), return_exceptions=True)
    assert sum(isinstance(r, ValueError) for r in results) == len(poison)
    extra = sink.calls - 1
    assert extra <= 2 * len(poison) * math.ceil(math.log2(n))


async def test_isolation_skips_callers_that_left() -> None:
    gate = asyncio.Event()
    seen: list[list[int]] = []

    async def sink(items: list[int]) -> list[int]:
        seen.append(list(items))
        if len(seen) == 1:
            await gate.wait()
            raise ValueError("whole batch")
        if 0 in items:
            raise ValueError("poison")
        return items

    b = Batcher(sink, max_size=4, retry=Retry(attempts=1, isolate=True))
    tasks = [asyncio.create_task(b.submit(i)) for i in range(4)]
    await settle()
    tasks[1].cancel()
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], ValueError)
    assert isinstance(results[1], asyncio.CancelledError)
    assert results[2:] == [2, 3]
    assert all(1 not in call for call in seen[1:])
    await b.aclose()


def test_non_finite_retry_after_falls_back_to_backoff() -> None:
    retry = Retry(backoff=0.5, jitter=False)
    for bad in (math.inf, math.nan, True):
        exc = Exception()
        exc.retry_after = bad  # type: ignore[attr-defined]
        assert retry.delay(1, exc) == 0.5
    exc = Exception()
    exc.retry_after = -3  # type: ignore[attr-defined]
    assert retry.delay(1, exc) == 0.0


def test_retry_validation() -> None:
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        Retry(attempts=0)
    with pytest.raises(ValueError, match="backoff"):
        Retry(backoff=-1)
    with pytest.raises(ValueError, match="max_backoff"):
        Retry(max_backoff=-1)
    with pytest.raises(TypeError, match="retry_on"):
        Retry(retry_on=("nope",))  # type: ignore[arg-type]
    assert Retry(retry_on=KeyError).retry_on == (KeyError,)


class PerItem:
    """Marks items Retryable until they were tried ``needs[item]`` times."""

    def __init__(self, needs: dict[int, int], retry_after: float | None = None) -> None:
        self.needs = needs
        self.tries: dict[int, int] = {}
        self.calls: list[list[int]] = []
        self.times: list[float] = []
        self.retry_after = retry_after

    async def __call__(self, items: list[int]) -> list[Any]:
        self.calls.append(list(items))
        self.times.append(asyncio.get_running_loop().time())
        out: list[Any] = []
        for x in items:
            self.tries[x] = self.tries.get(x, 0) + 1
            if self.tries[x] < self.needs.get(x, 1):
                out.append(Retryable(ConnectionError(f"busy {x}"), retry_after=self.retry_after))
            else:
                out.append(x * 10)
        return out


async def test_retryable_items_are_retried_alone_others_resolve_now() -> None:
    loop = asyncio.get_running_loop()
    sink = PerItem({2: 2, 4: 3})
    reports: list[BatchReport] = []
    done_at: dict[int, float] = {}
    retry = Retry(attempts=3, backoff=0.5, jitter=False)
    async with Batcher(sink, max_size=10, retry=retry, on_batch=reports.append) as b:

        async def call(x: int) -> int:
            r: int = await b.submit(x)
            done_at[x] = loop.time()
            return r

        t0 = loop.time()
        assert await asyncio.gather(*(call(x) for x in range(5))) == [0, 10, 20, 30, 40]
    assert sink.calls == [[0, 1, 2, 3, 4], [2, 4], [4]]
    assert done_at[0] == pytest.approx(t0)  # resolved with the first answer
    assert done_at[2] == pytest.approx(t0 + 0.5)
    assert done_at[4] == pytest.approx(t0 + 1.5)
    assert reports[0].attempts == 3
    assert b.stats.succeeded == 5


async def test_retryable_after_last_attempt_fails_with_the_wrapped_error() -> None:
    sink = PerItem({1: 99})
    async with Batcher(sink, retry=Retry(attempts=2, backoff=0)) as b:
        results = await b.submit_many([0, 1], return_exceptions=True)
    assert results[0] == 0
    assert isinstance(results[1], ConnectionError)
    assert str(results[1]) == "busy 1"
    assert sink.calls == [[0, 1], [1]]


async def test_retryable_without_retry_policy_fails_at_once() -> None:
    sink = PerItem({1: 2})
    async with Batcher(sink) as b:
        results = await b.submit_many([0, 1], return_exceptions=True)
    assert isinstance(results[1], ConnectionError)
    assert sink.calls == [[0, 1]]


async def test_retryable_honours_its_retry_after() -> None:
    sink = PerItem({1: 2}, retry_after=3.0)
    async with Batcher(sink, retry=Retry(backoff=0.01)) as b:
        assert await b.submit(1) == 10
    assert sink.times[1] - sink.times[0] == pytest.approx(3.0)


async def test_retryable_reaches_every_dedupe_waiter() -> None:
    sink = PerItem({7: 2})
    async with Batcher(sink, dedupe=True, retry=Retry(backoff=0)) as b:
        assert await b.submit_many([7, 7, 8]) == [70, 70, 80]
    assert sink.calls == [[7, 8], [7]]
    async with Batcher(PerItem({7: 5}), dedupe=True) as b:
        results = await b.submit_many([7, 7], return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


def test_retryable_wraps_messages() -> None:
    r = Retryable("try later", retry_after=2)
    assert isinstance(r.error, Exception)
    assert str(r.error) == "try later"
    assert repr(r) == "Retryable(Exception('try later'), retry_after=2)"
