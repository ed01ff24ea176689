"""asyncbatch.contrib.redis against a real redis-server on 127.0.0.1 (see redis_server.py).

One server per module; every test uses its own keys (the test's name) and a
fresh client. Times are real: min_idle is a fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from asyncbatch import Batcher, BatchReport, Retry, Retryable
from asyncbatch.contrib.redis import (
    ConsumerStats,
    DeliveryLimitExceeded,
    StreamConsumer,
    StreamEntry,
    StreamWriter,
)

from .redis_server import RedisServer

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(30)]


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture
async def r(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=server.port, decode_responses=True)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


Sink = Callable[[list[StreamEntry]], Awaitable[Any]]


class Recorder:
    """A sink that records every call and answers with ``answer(entry)`` per entry."""

    def __init__(self, answer: Callable[[StreamEntry], object] | None = None, delay: float = 0):
        self.calls: list[list[StreamEntry]] = []
        self.answer = answer or (lambda e: e.id)
        self.delay = delay

    async def __call__(self, entries: list[StreamEntry]) -> list[object]:
        self.calls.append(list(entries))
        if self.delay:
            await asyncio.sleep(self.delay)
        return [self.answer(e) for e in entries]

    def seen(self) -> list[tuple[str, int]]:
        return [(e.id, e.deliveries) for call in self.calls for e in call]


def consumer(r: aioredis.Redis, sink: Sink, name: str = "c1", **options: Any) -> StreamConsumer:
    options.setdefault("min_idle", 0.3)
    options.setdefault("block", 0.1)
    options.setdefault("start", "0")
    return StreamConsumer(r, stream="s", group="g", consumer=name, sink=sink, **options)


@contextlib.asynccontextmanager
async def running(*consumers: StreamConsumer) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    try:
        yield tasks
    finally:
        for c in consumers:
            await c.stop()
        for task in tasks:
            await task  # raises what run() raised


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def add(r: aioredis.Redis, n: int, stream: str = "s", **extra: str) -> list[str]:
    async with r.pipeline(transaction=False) as pipe:
        for i in range(n):
            fields: dict[Any, Any] = {"n": str(i), **extra}
            pipe.xadd(stream, fields)
        ids: list[str] = await pipe.execute()
    return ids


async def xrange(r: aioredis.Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    return cast("list[tuple[str, dict[str, str]]]", await r.xrange(stream))


async def pending(r: aioredis.Redis, group: str = "g") -> int:
    summary = await r.xpending("s", group)
    return int(summary["pending"])


# -- StreamWriter ---------------------------------------------------------------------


async def test_writer_is_a_batcher_answering_entry_ids(r: aioredis.Redis) -> None:
    reports: list[BatchReport] = []
    async with StreamWriter(r, stream="w", max_size=50, on_batch=reports.append) as writer:
        assert isinstance(writer, Batcher)
        ids = await asyncio.gather(*(writer.submit({"i": i, "x": b"y"}) for i in range(120)))
    assert [rep.size for rep in reports] == [50, 50, 20]
    assert writer.stats.succeeded == 120
    assert writer.stream == "w"
    entries = await xrange(r, "w")
    assert [e[0] for e in entries] == ids
    assert all(isinstance(i, str) for i in ids)
    assert [e[1]["i"] for e in entries] == [str(i) for i in range(120)]
    assert "StreamWriter 'w'" in repr(writer)


async def test_writer_fails_only_bad_items(r: aioredis.Redis) -> None:
    await r.set("not-a-stream", "x")
    async with StreamWriter(r, stream="w") as writer:
        good, empty, bad_value, not_mapping, flag = await asyncio.gather(
            writer.submit({"a": "1"}),
            writer.submit({}),
            writer.submit({"a": None}),
            writer.submit(["a", "b"]),  # type: ignore[arg-type]
            writer.submit({"a": True}),
            return_exceptions=True,
        )
    assert isinstance(good, str)
    assert isinstance(empty, ValueError)
    assert isinstance(bad_value, TypeError)
    assert isinstance(not_mapping, TypeError)
    assert isinstance(flag, TypeError)
    assert await r.xlen("w") == 1
    async with StreamWriter(r, stream="not-a-stream") as wrong:
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            await wrong.submit({"a": "1"})


async def test_writer_trims_with_maxlen(r: aioredis.Redis) -> None:
    async with StreamWriter(r, stream="w", maxlen=10, approximate=False) as writer:
        await writer.submit_many([{"i": i} for i in range(30)])
    assert await r.xlen("w") == 10
    with pytest.raises(ValueError, match="maxlen must be >= 0"):
        StreamWriter(r, stream="w", maxlen=-1)
    with pytest.raises(TypeError, match="stream must be a non-empty str"):
        StreamWriter(r, stream="")


# -- acknowledging ----------------------------------------------------------------------


async def test_acks_only_entries_the_sink_succeeded_for(r: aioredis.Redis) -> None:
    ids = await add(r, 10)
    bad = {ids[3], ids[7]}
    sink = Recorder(lambda e: ValueError(f"bad {e.id}") if e.id in bad else e.fields["n"])
    c = consumer(r, sink, min_idle=30.0)
    async with running(c):
        await eventually(lambda: _true(c.stats.acked == 8 and c.stats.failed == 2))
        rows = await r.xpending_range("s", "g", "-", "+", 100)
        assert {row["message_id"] for row in rows} == bad
    stats = c.stats
    assert (stats.read, stats.acked, stats.failed, stats.in_flight) == (10, 8, 2, 0)
    assert stats.dead_lettered == 0
    assert isinstance(stats, ConsumerStats)
    assert stats.batcher.batches == 1
    assert sink.seen() == [(i, 1) for i in ids]


async def test_a_mapping_answer_is_keyed_by_entry_id(r: aioredis.Redis) -> None:
    ids = await add(r, 4)

    async def sink(entries: list[StreamEntry]) -> dict[str, object]:
        return {e.id: (KeyError(e.id) if e.id == ids[0] else "ok") for e in entries}

    c = consumer(r, sink, min_idle=30.0)
    async with running(c):
        await eventually(lambda: _true(c.stats.acked == 3))
    assert await pending(r) == 1


async def test_failed_entries_come_back_then_go_to_dead_letter(r: aioredis.Redis) -> None:
    ids = await add(r, 6)
    poison = ids[2]
    sink = Recorder(lambda e: RuntimeError("cannot parse") if e.id == poison else None)
    c = consumer(r, sink, min_idle=0.2, max_deliveries=3, claim_interval=0.05)
    async with running(c):
        await eventually(lambda: _true(c.stats.dead_lettered == 1))
        await eventually(lambda: _zero(pending(r)))
    deliveries = [d for i, d in sink.seen() if i == poison]
    assert deliveries == [1, 2, 3]
    dead = await xrange(r, "s:dead")
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields == {
        "n": "2",
        "error": "cannot parse",
        "error_type": "RuntimeError",
        "source_id": poison,
        "deliveries": "3",
    }
    stats = c.stats
    assert (stats.acked, stats.failed, stats.dead_lettered) == (5, 3, 1)
    assert stats.redelivered == 2
    assert stats.claimed == 2


async def test_isolate_and_retry_from_the_core_apply(r: aioredis.Redis) -> None:
    ids = await add(r, 16)
    poison = ids[9]
    calls: list[int] = []

    async def sink(entries: list[StreamEntry]) -> None:
        calls.append(len(entries))
        if any(e.id == poison for e in entries):
            raise ValueError("poison in batch")

    c = consumer(
        r,
        sink,
        min_idle=30.0,
        max_deliveries=1,
        dead_letter="dead",
        retry=Retry(attempts=2, backoff=0, isolate=True),
    )
    async with running(c):
        await eventually(lambda: _true(c.stats.dead_lettered == 1 and c.stats.acked == 15))
    assert calls[:2] == [16, 16]  # two tries, then halves
    dead = await xrange(r, "dead")
    assert [d[1]["source_id"] for d in dead] == [poison]
    assert dead[0][1]["error"] == "poison in batch"
    assert await pending(r) == 0


async def test_entries_retried_within_one_delivery_are_acked_once(r: aioredis.Redis) -> None:
    await add(r, 5)
    tries: list[int] = []

    async def flaky(entries: list[StreamEntry]) -> None:
        tries.append(len(entries))
        if len(tries) == 1:
            raise ConnectionResetError("backend hiccup")

    c = consumer(r, flaky, retry=Retry(attempts=3, backoff=0.01))
    async with running(c):
        await eventually(lambda: _true(c.stats.acked == 5))
    assert tries == [5, 5]
    assert c.stats.failed == 0


async def test_every_entry_is_settled_once_whatever_order_batches_end_in(
    r: aioredis.Redis,
) -> None:
    # Entries are settled in bulk, per sink call and per read (not one callback
    # each): batches that end out of order, retried items, an isolated poison
    # batch and timed-out calls must still settle each entry exactly once.
    ids = await add(r, 240)
    slow = set(ids[::7])
    timed_out = ids[100]
    poison = ids[150]
    seen: list[str] = []
    once = {timed_out}
    again = {ids[3], ids[200]}  # answered Retryable once: retried alone

    async def sink(entries: list[StreamEntry]) -> list[object]:
        await asyncio.sleep(0.05 if slow & {e.id for e in entries} else 0.001)
        if timed_out in once and any(e.id == timed_out for e in entries):
            once.clear()
            await asyncio.sleep(2)  # past the timeout: the call is cancelled, then retried
        if any(e.id == poison for e in entries):
            raise ValueError("poison in batch")
        answers: list[object] = []
        for e in entries:
            if e.id in again:
                again.discard(e.id)
                answers.append(Retryable(ValueError("again")))
            else:
                seen.append(e.id)
                answers.append(e.id)
        return answers

    c = consumer(
        r,
        sink,
        max_size=7,
        max_concurrency=4,
        min_idle=30.0,
        max_deliveries=1,
        dead_letter="dead",
        timeout=0.5,
        retry=Retry(attempts=3, backoff=0, isolate=True),
    )
    async with running(c):
        await eventually(lambda: _true(c.stats.acked + c.stats.dead_lettered == 240))
    assert c.stats.acked == 239
    assert c.stats.dead_lettered == 1
    assert c.stats.in_flight == 0
    assert sorted(seen) == sorted(set(ids) - {poison})  # each once
    assert not again
    assert not once
    assert [f["source_id"] for _, f in await xrange(r, "dead")] == [poison]
    assert await pending(r) == 0


# -- claims -------------------------------------------------------------------------------


async def test_a_slow_healthy_consumer_keeps_its_claims(r: aioredis.Redis) -> None:
    await add(r, 20)
    slow = Recorder(delay=1.2)  # four times min_idle
    other = Recorder()
    a = consumer(r, slow, "slow", min_idle=0.3, max_size=20)
    b = consumer(r, other, "thief", min_idle=0.3, claim_interval=0.02)
    async with running(a):
        await eventually(lambda: _true(len(slow.calls) == 1))
        async with running(b):
            await eventually(lambda: _true(a.stats.acked == 20), within=5)
    assert other.calls == []
    assert b.stats.claimed == 0
    assert [d for _, d in slow.seen()] == [1] * 20


async def test_a_dead_consumers_entries_are_claimed(r: aioredis.Redis) -> None:
    ids = await add(r, 7)
    await r.xgroup_create("s", "g", id="0")
    # "dead" reads them and dies without acknowledging.
    await r.xreadgroup("g", "dead", {"s": ">"}, count=100)
    sink = Recorder()
    c = consumer(r, sink, "alive", min_idle=0.2, claim_interval=0.05)
    started = time.monotonic()
    async with running(c):
        await eventually(lambda: _true(c.stats.acked == 7))
    assert time.monotonic() - started >= 0.2  # not before min_idle
    assert sink.seen() == [(i, 2) for i in ids]
    assert (c.stats.claimed, c.stats.redelivered) == (7, 7)
    assert await pending(r) == 0


async def test_entries_over_the_delivery_limit_skip_the_sink(r: aioredis.Redis) -> None:
    ids = await add(r, 2)
    await r.xgroup_create("s", "g", id="0")
    await r.xreadgroup("g", "crashy", {"s": ">"}, count=1)  # ids[0], delivery 1
    await r.xclaim("s", "g", "crashy", 0, [ids[0]])  # delivery 2: it crashed twice
    sink = Recorder()
    c = consumer(r, sink, "next", min_idle=0.05, max_deliveries=2, claim_interval=0.05)
    async with running(c):
        await eventually(lambda: _true(c.stats.dead_lettered == 1 and c.stats.acked == 1))
    assert sink.seen() == [(ids[1], 1)]
    (dead,) = await xrange(r, "s:dead")
    assert dead[1]["source_id"] == ids[0]
    assert dead[1]["error_type"] == "asyncbatch.contrib.redis.DeliveryLimitExceeded"
    assert dead[1]["deliveries"] == "3"
    assert DeliveryLimitExceeded.__name__ in dead[1]["error_type"]


async def test_a_restarted_consumer_resumes_where_the_group_stands(r: aioredis.Redis) -> None:
    ids = await add(r, 6)
    first = Recorder(lambda e: None)
    c1 = consumer(r, first, "w1", min_idle=30.0)
    async with running(c1):
        await eventually(lambda: _true(c1.stats.acked == 6))
    # It died holding two more entries (read, never acknowledged).
    more = await add(r, 4)
    await r.xreadgroup("g", "w1", {"s": ">"}, count=2)
    second = Recorder()
    c2 = consumer(r, second, "w1", min_idle=30.0)  # same name, min_idle far away
    async with running(c2):
        await eventually(lambda: _true(c2.stats.acked == 4))
    assert second.seen() == [(more[0], 2), (more[1], 2), (more[2], 1), (more[3], 1)]
    assert not set(ids) & {i for i, _ in second.seen()}
    assert c2.stats.redelivered == 2


@pytest.mark.parametrize(
    "options",
    [
        {"protocol": 2},
        {"protocol": 3},  # XREADGROUP: {stream: [[entries]]}
        {"protocol": 3, "legacy_responses": False},  # {stream: entries}
        {"protocol": 2, "legacy_responses": False},
        {"protocol": 3, "decode_responses": True},
    ],
    ids=["resp2", "resp3", "resp3-unified", "resp2-unified", "resp3-str"],
)
async def test_every_reply_shape_of_redis_py(
    server: RedisServer, r: aioredis.Redis, options: dict[str, Any]
) -> None:
    # Each way of reading: its own pending entries (XREADGROUP 0), a dead
    # consumer's (XAUTOCLAIM), new ones (XREADGROUP >), a lost reply's
    # (XPENDING, XCLAIM, XRANGE). RESP3 shapes XREADGROUP's reply differently.
    client = aioredis.Redis(port=server.port, **options)
    ids = await add(r, 9)
    await r.xgroup_create("s", "g", id="0")
    await r.xreadgroup("g", "c1", {"s": ">"}, count=2)  # its own, from a previous run
    await r.xreadgroup("g", "dead", {"s": ">"}, count=2)  # claimed after min_idle
    sink = Recorder()
    # min_idle well above block: the lost entry is recovered (1st delivery), not claimed.
    c = consumer(client, sink, "c1", min_idle=1.0, claim_interval=0.05)
    try:
        async with running(c):
            await eventually(lambda: _true(c.stats.acked == 9))
            # One more, delivered to c1 by a read whose reply c1 never sees (one
            # transaction: its own reader cannot take it first).
            async with r.pipeline(transaction=True) as pipe:
                pipe.xadd("s", {"n": "lost"})
                pipe.xreadgroup("g", "c1", {"s": ">"}, count=1)
                lost = (await pipe.execute())[0]
            await eventually(lambda: _true(c.stats.acked == 10))
    finally:
        await client.aclose()
    seen = dict(sink.seen())
    assert sorted(seen) == sorted([*ids, lost])
    assert all(isinstance(i, str) for i in seen)
    assert [seen[i] for i in [*ids, lost]] == [2, 2, 2, 2, 1, 1, 1, 1, 1, 1]
    assert all(isinstance(e.fields, dict) and e.fields for call in sink.calls for e in call)
    assert await pending(r) == 0


async def test_deleted_pending_entries_are_dropped_from_the_pending_list(
    r: aioredis.Redis,
) -> None:
    ids = await add(r, 3)
    await r.xgroup_create("s", "g", id="0")
    await r.xreadgroup("g", "w1", {"s": ">"}, count=3)
    await r.xdel("s", ids[1])
    sink = Recorder()
    c = consumer(r, sink, "w1", min_idle=30.0)
    async with running(c):
        await eventually(lambda: _zero(pending(r)))
    assert [i for i, _ in sink.seen()] == [ids[0], ids[2]]
    assert c.stats.acked == 2


# -- the group ----------------------------------------------------------------------------


async def test_group_start_dollar_reads_only_new_entries(r: aioredis.Redis) -> None:
    await add(r, 3)
    sink = Recorder()
    c = consumer(r, sink, start="$")
    async with running(c):
        await eventually(lambda: _exists_group(r))
        new = await add(r, 2, tag="new")
        await eventually(lambda: _true(c.stats.acked == 2))
    assert [i for i, _ in sink.seen()] == new


async def test_an_existing_group_is_used_as_it_is(r: aioredis.Redis) -> None:
    ids = await add(r, 5)
    await r.xgroup_create("s", "g", id=ids[2])
    sink = Recorder()
    c = consumer(r, sink, start="0")  # ignored: the group exists
    async with running(c):
        await eventually(lambda: _true(c.stats.acked == 2))
    assert [i for i, _ in sink.seen()] == ids[3:]


async def test_a_destroyed_group_is_created_again(r: aioredis.Redis) -> None:
    sink = Recorder()
    c = consumer(r, sink, start="$", block=0.05)
    async with running(c):
        await eventually(lambda: _exists_group(r))
        await r.xgroup_destroy("s", "g")
        await eventually(lambda: _exists_group(r))
        await add(r, 3)
        await eventually(lambda: _true(c.stats.acked == 3))


async def test_a_group_lost_with_the_data_is_created_where_it_stood(r: aioredis.Redis) -> None:
    # A server restarted without its data: the stream and the group are gone,
    # and writers add entries to a new stream before the consumer notices. One
    # transaction, so the consumer cannot create the group in between. Created
    # again at "$" (start), the group would never deliver those entries.
    sink = Recorder()
    c = consumer(r, sink, start="$", block=0.05)
    async with running(c):
        await eventually(lambda: _exists_group(r))
        before = await add(r, 2)
        await eventually(lambda: _true(c.stats.acked == 2))
        async with r.pipeline(transaction=True) as pipe:
            pipe.delete("s")
            for n in range(3):
                pipe.xadd("s", {"n": str(n), "after": "wipe"})
            after = (await pipe.execute())[1:]
        await eventually(lambda: _true(c.stats.acked == 5))
    assert [i for i, _ in sink.seen()] == before + after
    assert c.stats.read == 5


async def test_an_error_that_is_not_a_connection_problem_stops_run(r: aioredis.Redis) -> None:
    await r.set("s", "not a stream")
    c = consumer(r, Recorder())
    with pytest.raises(redis.exceptions.ResponseError, match=r"WRONGTYPE|requires the key"):
        await c.run()


async def test_a_dead_letter_key_of_the_wrong_type_stops_run(r: aioredis.Redis) -> None:
    await add(r, 2)
    await r.set("s:dead", "oops")
    c = consumer(r, Recorder(lambda e: ValueError("x")), max_deliveries=1)
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        await asyncio.wait_for(c.run(), 10)
    assert c.stats.dead_lettered == 0
    assert await pending(r) == 2  # nothing acknowledged without its dead letter


# -- lifecycle ----------------------------------------------------------------------------


async def test_stop_interrupts_a_blocked_read(r: aioredis.Redis) -> None:
    # A socket timeout longer than the block (redis-py 8's default is 5 s).
    slow = aioredis.Redis(port=r.connection_pool.connection_kwargs["port"], socket_timeout=30)
    c = consumer(slow, Recorder(), block=20.0)
    task = asyncio.create_task(c.run())
    await eventually(lambda: _exists_group(r))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await c.stop()
    assert time.monotonic() - started < 2.0
    await task
    await slow.aclose()
    await c.stop()  # idempotent
    assert "[stopped]" in repr(c)
    with pytest.raises(RuntimeError, match="only once"):
        await c.run()


async def test_stop_before_run_makes_run_return(r: aioredis.Redis) -> None:
    c = consumer(r, Recorder())
    await c.stop()
    await asyncio.wait_for(c.run(), 5)
    assert not await r.exists("s")


async def test_stop_finishes_and_acks_what_was_read(r: aioredis.Redis) -> None:
    await add(r, 30)
    sink = Recorder(delay=0.3)
    c = consumer(r, sink, max_size=10, max_concurrency=2)
    task = asyncio.create_task(c.run())
    await eventually(lambda: _true(len(sink.calls) >= 1))
    await c.stop()
    await task
    read = c.stats.read
    assert read >= 10
    assert c.stats.acked == read
    assert await pending(r) == 0


async def test_stop_from_inside_the_sink(r: aioredis.Redis) -> None:
    await add(r, 3)
    holder: list[StreamConsumer] = []

    async def sink(entries: list[StreamEntry]) -> None:
        await holder[0].stop()  # cannot wait for its own batch: returns at once

    c = consumer(r, sink)
    holder.append(c)
    await asyncio.wait_for(c.run(), 10)
    assert c.stats.acked == 3


async def test_cancelling_run_leaves_unfinished_entries_pending(r: aioredis.Redis) -> None:
    await add(r, 5)
    gate = asyncio.Event()

    async def stuck(entries: list[StreamEntry]) -> None:
        gate.set()
        await asyncio.sleep(60)

    c = consumer(r, stuck, block=0.2)
    task = asyncio.create_task(c.run())
    await gate.wait()
    task.cancel()
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 2.0
    assert await pending(r) == 5
    assert (c.stats.acked, c.stats.failed, c.stats.in_flight) == (0, 0, 0)


def test_options_are_checked() -> None:
    r = aioredis.Redis()

    async def sink(entries: list[StreamEntry]) -> None:
        return None

    def make(**kw: Any) -> StreamConsumer:
        base: dict[str, Any] = {"stream": "s", "group": "g", "consumer": "c", "sink": sink}
        return StreamConsumer(r, **{**base, **kw})

    with pytest.raises(TypeError, match="group must be a non-empty str"):
        make(group="")
    with pytest.raises(TypeError, match="sink must be an async callable"):
        make(sink=None)
    with pytest.raises(ValueError, match="min_idle must be a finite"):
        make(min_idle=0)
    with pytest.raises(ValueError, match="block must be a finite"):
        make(block=float("inf"))
    with pytest.raises(TypeError, match="claim_interval must be a number"):
        make(claim_interval="1")
    with pytest.raises(TypeError, match="max_deliveries must be an int"):
        make(max_deliveries=2.0)
    with pytest.raises(ValueError, match="max_size must be >= 1"):
        make(max_size=0)
    with pytest.raises(TypeError, match="dead_letter must be"):
        make(dead_letter=b"x")
    with pytest.raises(ValueError, match="max_wait"):
        make(max_wait=-1)
    assert make().name == "s/g/c"
    assert "[idle]" in repr(make(name="billing"))


# -- dead letters are written once --------------------------------------------------------


async def test_a_dead_letter_interrupted_after_exec_is_not_written_twice(
    r: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await add(r, 1)
    c = consumer(r, Recorder(lambda e: ValueError("x")), max_deliveries=1)
    real_pipeline = r.pipeline
    broken = [True]

    def pipeline(transaction: bool = True, **kw: Any) -> Any:
        pipe = real_pipeline(transaction=transaction, **kw)
        if not transaction:
            return pipe
        execute = pipe.execute

        async def execute_then_break(*a: Any, **k: Any) -> Any:
            result = await execute(*a, **k)
            if broken and broken.pop():
                raise redis.exceptions.ConnectionError("reply lost")
            return result

        pipe.execute = execute_then_break  # type: ignore[method-assign]
        return pipe

    monkeypatch.setattr(r, "pipeline", pipeline)
    async with running(c):
        await eventually(lambda: _true(c.stats.dead_lettered == 1))
    assert await r.xlen("s:dead") == 1
    assert c.stats.connection_errors == 1
    assert await pending(r) == 0


# -- helpers ------------------------------------------------------------------------------


async def _true(value: bool) -> bool:
    return value


async def _zero(count: Awaitable[int]) -> bool:
    return await count == 0


async def _exists_group(r: aioredis.Redis) -> bool:
    try:
        groups = await r.xinfo_groups("s")
    except redis.exceptions.ResponseError:
        return False
    return any(g["name"] == "g" for g in groups)
