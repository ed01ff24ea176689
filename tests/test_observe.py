"""The core's observer hooks (``_observe``): what a capturing observer sees.

A tracer's ``capture`` runs at submit, in the submitter's context, for the
first ``MAX_LINKS`` items of each batch, on every submit path (the inlined
ones included), and stops when it is detached; the batch sizes are what they
are without an observer.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Any

import pytest

from asyncbatch import Batcher, BatchReport
from asyncbatch._observe import MAX_LINKS, SinkCall, attach, detach

pytestmark = pytest.mark.asyncio

WHO: contextvars.ContextVar[object] = contextvars.ContextVar("who", default=None)


class Recorder:
    """An observer whose capture reads ``WHO`` (a tracer reads its span the same way)."""

    def __init__(self, capture: Callable[[], object] | None = None) -> None:
        self.calls: list[SinkCall] = []
        self.reports: list[BatchReport] = []
        self._capture = WHO.get if capture is None else capture

    @property
    def capture(self) -> Callable[[], object] | None:
        return self._capture

    def call_started(self, call: SinkCall) -> object:
        self.calls.append(call)
        return None

    def call_finished(
        self, call: SinkCall, token: object, duration: float, error: BaseException | None
    ) -> None:
        pass

    def batch_finished(self, batcher: str, report: BatchReport) -> None:
        self.reports.append(report)


async def echo(items: list[int]) -> list[int]:
    return items


async def as_submitter(who: object, fn: Callable[[int], Any], item: int) -> Any:
    """``fn(item)`` with ``WHO`` set, as a submitter inside its own span would."""
    WHO.set(who)
    result = fn(item)
    if asyncio.iscoroutine(result):
        return await result
    return result


@pytest.mark.parametrize("path", ["submit", "submit_nowait", "put_nowait"])
async def test_first_max_links_items_of_each_batch_are_captured_in_order(path: str) -> None:
    size = MAX_LINKS + 72
    batcher = Batcher(echo, max_size=size, max_wait=0.01)
    recorder = Recorder()
    attach(batcher, recorder)
    n = 2 * size + 10  # two full batches and a partial one
    tasks = [asyncio.ensure_future(as_submitter(i, getattr(batcher, path), i)) for i in range(n)]
    results = await asyncio.gather(*tasks)
    if path == "submit_nowait":
        results = await asyncio.gather(*results)
    await batcher.flush()
    assert [c.size for c in recorder.calls] == [size, size, 10]
    assert [list(c.captured) for c in recorder.calls] == [
        list(range(MAX_LINKS)),
        list(range(size, size + MAX_LINKS)),
        list(range(2 * size, 2 * size + 10)),
    ]
    if path != "put_nowait":
        assert results == list(range(n))
    await batcher.aclose()


async def test_small_batches_keep_their_size_while_capturing() -> None:
    batcher = Batcher(echo, max_size=3, max_wait=0.01)
    recorder = Recorder()
    attach(batcher, recorder)
    futs = [await as_submitter(f"s{i}", batcher.submit_nowait, i) for i in range(8)]
    assert await asyncio.gather(*futs) == list(range(8))
    assert [c.size for c in recorder.calls] == [3, 3, 2]
    assert [list(c.captured) for c in recorder.calls] == [
        ["s0", "s1", "s2"],
        ["s3", "s4", "s5"],
        ["s6", "s7"],
    ]
    await batcher.aclose()


async def test_attach_and_detach_in_the_middle_of_a_batch() -> None:
    batcher = Batcher(echo, max_size=100, max_wait=0.01)
    recorder = Recorder()
    futs = [await as_submitter(i, batcher.submit_nowait, i) for i in range(3)]
    attach(batcher, recorder)  # the open batch captures from its next item on
    futs += [await as_submitter(i, batcher.submit_nowait, i) for i in range(3, 6)]
    detach(batcher, recorder)
    attach(batcher, recorder)
    futs += [await as_submitter(i, batcher.submit_nowait, i) for i in range(6, 8)]
    detach(batcher, recorder)  # nothing more is captured: not even for this batch
    futs += [await as_submitter(i, batcher.submit_nowait, i) for i in range(8, 10)]
    attach(batcher, recorder)  # told about the call, with what was captured before
    await asyncio.gather(*futs)
    assert [c.size for c in recorder.calls] == [10]
    assert list(recorder.calls[0].captured) == [3, 4, 5, 6, 7]
    await batcher.aclose()


async def test_configure_a_smaller_size_while_capturing() -> None:
    batcher = Batcher(echo, max_size=10, max_wait=0.01)
    recorder = Recorder()
    attach(batcher, recorder)
    futs = [await as_submitter(i, batcher.submit_nowait, i) for i in range(2)]
    batcher.configure(max_size=3)
    futs += [await as_submitter(i, batcher.submit_nowait, i) for i in range(2, 7)]
    batcher.configure(max_size=5)
    futs += [await as_submitter(i, batcher.submit_nowait, i) for i in range(7, 12)]
    assert await asyncio.gather(*futs) == list(range(12))
    assert [c.size for c in recorder.calls] == [3, 3, 5, 1]
    assert [list(c.captured) for c in recorder.calls] == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8, 9, 10],
        [11],
    ]
    await batcher.aclose()


async def test_a_larger_size_after_the_captures_still_fills_batches() -> None:
    WHO.set("test")  # (a capture that answers None captures nothing)
    batcher = Batcher(echo, max_size=MAX_LINKS + 2, max_wait=0.01)
    recorder = Recorder()
    attach(batcher, recorder)
    futs = [batcher.submit_nowait(i) for i in range(MAX_LINKS + 1)]
    batcher.configure(max_size=MAX_LINKS + 5)
    futs += [batcher.submit_nowait(i) for i in range(MAX_LINKS + 1, MAX_LINKS + 6)]
    await asyncio.gather(*futs)
    assert [c.size for c in recorder.calls] == [MAX_LINKS + 5, 1]
    assert [len(c.captured) for c in recorder.calls] == [MAX_LINKS, 1]
    await batcher.aclose()


async def test_a_capture_that_raises_refuses_nothing() -> None:
    def broken() -> object:
        raise ValueError("capture bug")

    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    batcher = Batcher(echo, max_size=4, max_wait=0.01)
    recorder = Recorder(broken)
    attach(batcher, recorder)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(6))) == list(range(6))
    assert [c.size for c in recorder.calls] == [4, 2]
    assert [list(c.captured) for c in recorder.calls] == [[], []]
    assert len(seen) == 6
    assert all(isinstance(c["exception"], ValueError) for c in seen)
    assert all("observer capture" in c["message"] for c in seen)
    await batcher.aclose()
    loop.set_exception_handler(None)


async def test_no_capture_without_a_capturing_observer() -> None:
    calls = 0

    def counting() -> object:
        nonlocal calls
        calls += 1
        return None

    batcher = Batcher(echo, max_size=8, max_wait=0.01)
    recorder = Recorder(counting)
    attach(batcher, recorder)
    detach(batcher, recorder)
    await asyncio.gather(*(batcher.submit(i) for i in range(20)))
    assert calls == 0
    await batcher.aclose()


class Ordered(Recorder):
    """Records the order of its hooks in a shared log."""

    def __init__(self, tag: str, log: list[str]) -> None:
        super().__init__()
        self.tag = tag
        self.log = log
        self.finished: list[tuple[int, int, BaseException | None]] = []

    def call_started(self, call: SinkCall) -> object:
        self.log.append(f"start {self.tag}")
        return super().call_started(call)

    def call_finished(
        self, call: SinkCall, token: object, duration: float, error: BaseException | None
    ) -> None:
        self.log.append(f"end {self.tag}")
        self.finished.append((call.size, call.attempt, error))


async def test_observers_end_a_call_in_the_reverse_order_they_started_it() -> None:
    log: list[str] = []
    batcher = Batcher(echo, max_size=2, max_wait=0.01)
    attach(batcher, Ordered("a", log))
    attach(batcher, Ordered("b", log))
    await asyncio.gather(batcher.submit(1), batcher.submit(2))
    assert log == ["start a", "start b", "end b", "end a"]
    await batcher.aclose()


async def test_a_streaming_sink_call_is_observed_from_first_step_to_close() -> None:
    from asyncbatch import Retry

    tries = 0

    async def tokens(items: list[int]) -> Any:
        nonlocal tries
        tries += 1
        if tries == 1:
            raise ConnectionError("first try fails before any step")
        for step in range(3):
            yield [f"{x}:{step}" for x in items]
        if items[0] == 99:
            raise ValueError("late")

    log: list[str] = []
    recorder = Ordered("s", log)
    batcher = Batcher(tokens, max_size=2, max_wait=0.01, retry=Retry(attempts=2, backoff=0))
    attach(batcher, recorder)

    async def read(x: int) -> list[str]:
        return [v async for v in batcher.submit_stream(x)]

    assert list(await asyncio.gather(read(1), read(2))) == [
        ["1:0", "1:1", "1:2"],
        ["2:0", "2:1", "2:2"],
    ]
    with pytest.raises(ValueError, match="late"):
        await read(99)
    sizes_attempts = [(size, attempt) for size, attempt, _ in recorder.finished]
    assert sizes_attempts == [(2, 1), (2, 2), (1, 1)]
    errors = [error for _, _, error in recorder.finished]
    assert isinstance(errors[0], ConnectionError)
    assert errors[1] is None
    assert isinstance(errors[2], ValueError)
    assert [r.attempts for r in recorder.reports] == [2, 1]
    await batcher.aclose()


async def test_attempt_numbers_count_tries_of_the_same_items() -> None:
    from asyncbatch import Retry

    calls: list[list[int]] = []

    async def sink(items: list[int]) -> list[int]:
        calls.append(list(items))
        if 3 in items and len(items) > 1:
            raise RuntimeError("3 poisons its batch")
        return items

    recorder = Recorder()
    batcher = Batcher(
        sink, max_size=4, max_wait=0.01, retry=Retry(attempts=2, backoff=0, isolate=True)
    )
    attach(batcher, recorder)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
    assert results == [0, 1, 2, 3]
    # Try 1 and its retry (2) fail; isolation halves are try 3, quarters try 4.
    assert [(c.size, c.attempt) for c in recorder.calls] == [
        (4, 1),
        (4, 2),
        (2, 3),
        (2, 3),
        (1, 4),
        (1, 4),
    ]
    await batcher.aclose()


async def test_parts_of_a_batch_split_by_configure_are_each_a_first_try() -> None:
    release = asyncio.Event()

    async def sink(items: list[int]) -> list[int]:
        await release.wait()
        return items

    recorder = Recorder()
    batcher = Batcher(sink, max_size=10, max_wait=0.01)
    attach(batcher, recorder)
    first = batcher.submit_nowait(-1)
    await asyncio.sleep(0.05)  # the first batch holds the only slot
    futs = [batcher.submit_nowait(i) for i in range(10)]  # full: due, waiting for the slot
    batcher.configure(max_size=4)
    release.set()
    await asyncio.gather(first, *futs)
    assert [(c.size, c.attempt) for c in recorder.calls] == [(1, 1), (4, 1), (4, 1), (2, 1)]
    await batcher.aclose()


async def test_attach_and_detach_from_another_thread_while_items_flow() -> None:
    import threading

    batcher = Batcher(echo, max_size=7, max_wait=0.001)
    recorder = Recorder()
    stop = threading.Event()
    errors: list[BaseException] = []

    def toggle() -> None:
        try:
            while not stop.is_set():
                attach(batcher, recorder)
                detach(batcher, recorder)
        except BaseException as exc:  # pragma: no cover - the failure being tested
            errors.append(exc)

    assert await batcher.submit(-1) == -1  # bound
    thread = threading.Thread(target=toggle)
    thread.start()
    try:
        for round_ in range(200):
            futs = [batcher.submit_nowait(round_ * 10 + i) for i in range(10)]
            assert await asyncio.gather(*futs) == [round_ * 10 + i for i in range(10)]
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
    assert errors == []
    assert batcher.stats.succeeded == 2001
    await batcher.aclose()


async def test_callers_coalesced_by_dedupe_are_captured_too() -> None:
    batcher = Batcher(echo, max_size=10, max_wait=0.01, dedupe=True)
    recorder = Recorder()
    attach(batcher, recorder)
    keys = [1, 2, 1, 1, 3]
    results = await asyncio.gather(
        *(as_submitter(f"caller{n}", batcher.submit, key) for n, key in enumerate(keys))
    )
    assert results == keys
    assert [c.size for c in recorder.calls] == [3]
    assert list(recorder.calls[0].captured) == [f"caller{n}" for n in range(5)]
    await batcher.aclose()
