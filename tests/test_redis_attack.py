"""asyncbatch.contrib.redis attacked: misuse, odd entries, hostile timing.

Each test here failed before the fix it names (see the git log) and guards it
since. Real server on 127.0.0.1 (see redis_server.py); times are real, with
margins for a loaded machine of two shared cores.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from asyncbatch.contrib.redis import StreamConsumer, StreamEntry, StreamWriter

from .redis_server import RedisServer, ReplyDropper, has_entries
from .test_redis import Recorder, consumer, eventually, pending, running

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(60)]


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


@pytest.fixture
async def raw(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client that does not decode (bytes in, bytes out)."""
    client = aioredis.Redis(port=server.port)
    try:
        yield client
    finally:
        await client.aclose()


# -- options refused at construction, not at run() (or never) ---------------------------


def test_misconfigurations_are_refused_at_construction(server: RedisServer) -> None:
    r = aioredis.Redis(port=server.port)

    async def sink(entries: list[StreamEntry]) -> None:
        return None

    def make(client: Any = r, **kw: Any) -> StreamConsumer:
        base: dict[str, Any] = {"stream": "s", "group": "g", "consumer": "c", "sink": sink}
        return StreamConsumer(client, **{**base, **kw})

    # A plain function: every entry failed with "can't be used in 'await'
    # expression" and was dead-lettered after max_deliveries.
    def plain(entries: list[StreamEntry]) -> None:
        return None

    with pytest.raises(TypeError, match="plain function"):
        make(sink=plain)

    async def streaming(entries: list[StreamEntry]) -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError, match="async generator"):
        make(sink=streaming)
    # Dead letters written to the stream itself were read again as new entries.
    with pytest.raises(ValueError, match="dead_letter must be another stream"):
        make(dead_letter="s")
    # run() failed with "Invalid stream ID" from XGROUP CREATE.
    with pytest.raises(ValueError, match='start must be "\\$"'):
        make(start="latest")
    for good in ("$", "0", "0-0", "1718000000000-5", "1718000000000"):
        make(start=good)
    # A synchronous client: run() failed with "object bool can't be used in 'await'".
    with pytest.raises(TypeError, match=r"redis\.asyncio\.Redis client, got the synchronous"):
        make(redis.Redis(port=server.port))
    with pytest.raises(TypeError, match=r"redis\.asyncio\.Redis client, got None"):
        make(None)
    cluster = aioredis.RedisCluster(host="127.0.0.1", port=server.port)  # never connected
    with pytest.raises(TypeError, match="got a RedisCluster"):
        make(cluster)
    with pytest.raises(TypeError, match=r"redis\.asyncio\.Redis client"):
        StreamWriter(redis.Redis(port=server.port), stream="s")  # type: ignore[arg-type]
    # A socket timeout not longer than the block: every idle read timed out,
    # reconnected and was resent (redis-py 8 sets socket_timeout=5 by default,
    # so block=5 or more was enough).
    with pytest.raises(ValueError, match="socket_timeout=5 is not longer than block=5"):
        make(block=5)
    with pytest.raises(ValueError, match=r"socket_timeout=0\.5 is not longer than block=1\.0"):
        make(aioredis.Redis(port=server.port, socket_timeout=0.5))
    make(aioredis.Redis(port=server.port, socket_timeout=None), block=30)
    make(block=4.5)


# -- entries the client cannot decode -----------------------------------------------------


async def test_an_entry_a_decoding_client_cannot_decode_fails_alone(
    r: aioredis.Redis, raw: aioredis.Redis
) -> None:
    # Another writer added binary data. A decode_responses=True client raised
    # UnicodeDecodeError parsing the whole XREADGROUP reply: run() stopped,
    # the reply's good entries stayed pending too, and every consumer that
    # claimed them later stopped the same way: the group was stuck.
    await r.xgroup_create("s", "g", id="0", mkstream=True)
    await raw.xadd("s", {"n": "0"})
    bad_id = await raw.xadd("s", {b"\xff\xfename": b"\x00\x80"})
    assert isinstance(bad_id, bytes)
    bad = bad_id.decode()
    await raw.xadd("s", {"n": "2"})
    sink = Recorder()
    c = consumer(r, sink, min_idle=1.0, max_deliveries=2, claim_interval=0.2)
    async with running(c):
        await eventually(lambda: _dead_count(r, 1), within=20)
        await eventually(lambda: _true(c.stats.acked == 2))
    assert sorted(e.fields["n"] for call in sink.calls for e in call) == ["0", "2"]
    assert all(isinstance(k, str) for call in sink.calls for e in call for k in e.fields)
    dead_letters: Any = await raw.xrange("s:dead")
    [(_, dead)] = dead_letters
    assert dead[b"source_id"].decode() == bad
    assert dead[b"\xff\xfename"] == b"\x00\x80"  # kept as it was
    assert dead[b"error_type"] == b"UnicodeDecodeError"
    assert dead[b"deliveries"] == b"2"
    assert await pending(r) == 0
    stats = c.stats
    assert (stats.read, stats.failed, stats.dead_lettered) == (4, 2, 1)


async def test_undecodable_entries_from_every_path_fail_alone(
    r: aioredis.Redis, raw: aioredis.Redis
) -> None:
    # Own pending entries at start (XREADGROUP 0), claims (XAUTOCLAIM).
    await r.xgroup_create("s", "g", id="0", mkstream=True)
    await raw.xadd("s", {b"\xff": b"1"})
    await raw.xadd("s", {"n": "1"})
    await raw.xreadgroup("g", "c", {"s": ">"}, count=2)  # c's own, before a restart
    await raw.xadd("s", {b"\xfe": b"2"})
    await raw.xadd("s", {"n": "3"})
    await raw.xreadgroup("g", "dead", {"s": ">"}, count=2)  # claimed from a dead one
    sink = Recorder()
    c = consumer(r, sink, min_idle=0.5, max_deliveries=3, claim_interval=0.2)
    async with running(c):
        await eventually(lambda: _dead_count(r, 2), within=20)
        await eventually(lambda: _true(c.stats.acked == 2))
    assert sorted(e.fields["n"] for call in sink.calls for e in call) == ["1", "3"]
    assert await pending(r) == 0


# -- replies that arrive late ---------------------------------------------------------------


async def test_a_claimed_entry_settled_before_the_claim_reply_is_not_processed_again(
    r: aioredis.Redis,
) -> None:
    # An XAUTOCLAIM reply can arrive after the consumer settled an entry in it
    # (a big reply: the consumer claimed its own held entry, or an earlier
    # claim's reply came late). The delivery counts are looked up then: an
    # entry no longer pending was handed to the sink again with a made-up
    # count of 2, processed twice, and (failing on its last delivery)
    # dead-lettered twice. Seen with 60 MB entries and min_idle=1 under load;
    # here the late reply is handed to the consumer directly.
    await r.xgroup_create("s", "g", id="0", mkstream=True)
    acked = await r.xadd("s", {"n": "acked"})
    other = await r.xadd("s", {"n": "other"})
    mine = await r.xadd("s", {"n": "mine"})
    await r.xreadgroup("g", "c1", {"s": ">"}, count=3)
    await r.xack("s", "g", acked)  # settled before the late reply is read
    await r.xclaim("s", "g", "c2", 0, [other])  # claimed by another consumer meanwhile
    sink = Recorder()
    c = consumer(r, sink, min_idle=30.0)
    reply = [(i, {"n": n}) for i, n in ((acked, "acked"), (other, "other"), (mine, "mine"))]
    loop = asyncio.get_running_loop()
    async with running(c):
        await eventually(lambda: _true(c.stats.acked == 1))  # its own pending entry at start
        await c._deliver_pending(reply, claimed=True, since=loop.time())
        await asyncio.sleep(0.3)
    assert [(e.fields["n"], e.deliveries) for call in sink.calls for e in call] == [("mine", 2)]
    assert (c.stats.read, c.stats.acked) == (1, 1)


async def test_entries_whose_read_reply_came_late_are_refreshed_at_once(
    server: RedisServer, r: aioredis.Redis
) -> None:
    # The server's idle time of an entry runs from when it ran the XREADGROUP,
    # not from when the consumer read the reply. The refresher counted from
    # the reply: entries whose reply took 60 % of min_idle to arrive were
    # refreshed only once min_idle / 2 later by the consumer's clock, past
    # min_idle by the server's, and another consumer claimed them from a
    # healthy, busy consumer (processed twice).
    await r.xgroup_create("s", "g", id="0", mkstream=True)
    for n in range(20):
        await r.xadd("s", {"n": n})
    slow = Recorder(delay=6.5)  # holds its batch past min_idle
    thief = Recorder()
    async with ReplyDropper(server.port) as proxy:
        proxy.delay(b"XREADGROUP", has_entries, 2.4, also=(b"$1\r\n>\r\n",))
        proxied = aioredis.Redis(port=proxy.port, decode_responses=True)
        c1 = consumer(proxied, slow, name="c1", min_idle=4.0, max_size=50)
        c2 = consumer(r, thief, name="c2", min_idle=4.0, claim_interval=0.1)
        try:
            async with running(c1):
                await eventually(lambda: _true(bool(slow.calls)), within=20)
                async with running(c2):
                    await eventually(lambda: _true(c1.stats.acked == 20), within=30)
        finally:
            await proxied.aclose()
        assert proxy.delayed == 1
    assert thief.calls == []
    assert sorted(d for _, d in slow.seen()) == [1] * 20
    assert await pending(r) == 0


async def _dead_count(r: aioredis.Redis, count: int) -> bool:
    return int(await r.xlen("s:dead")) >= count


async def _true(value: bool) -> bool:
    return value


# -- a CancelledError nobody asked for ----------------------------------------------------


class _StrayCancels(aioredis.Redis):
    """A client whose ``command`` raises ``CancelledError`` ``left[0]`` times, its task
    not cancelled: what a timeout or a future of the client's own gone wrong looks like."""

    def __init__(self, *args: Any, command: str, left: list[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stray_command, self.left = command, left  # shared with its client()s

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        command = self.stray_command
        mine = args[0] == command and (command != "XREADGROUP" or args[-1] == ">")
        if mine and self.left[0] > 0:
            self.left[0] -= 1
            raise asyncio.CancelledError
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def client(self) -> _StrayCancels:
        return _StrayCancels(
            connection_pool=self.connection_pool,
            single_connection_client=True,
            command=self.stray_command,
            left=self.left,
        )


@pytest.mark.parametrize("command", ["XREADGROUP", "XACK"])
async def test_a_stray_cancelled_error_in_a_command_is_retried(
    server: RedisServer, r: aioredis.Redis, command: str
) -> None:
    # The reader died quietly: run() went on running, reading nothing, with
    # read == acked and nothing in flight (the signature of the restart test
    # that once stopped at 600 of 3000 entries). An acker that died so left
    # every later entry unacknowledged.
    await r.xgroup_create("s", "g", id="$", mkstream=True)
    left = [2]
    client = _StrayCancels(port=server.port, command=command, left=left)
    sink = Recorder()
    c = consumer(client, sink, start="$")
    try:
        async with running(c):
            for n in range(30):
                await r.xadd("s", {"n": n})
                await asyncio.sleep(0.02)
            await eventually(lambda: _true(c.stats.acked == 30), within=20)
    finally:
        await client.aclose()
    assert left == [0]
    assert c.stats.connection_errors >= 2
    assert await pending(r) == 0


async def test_a_loop_task_cancelled_from_outside_stops_run_with_an_error(
    r: aioredis.Redis,
) -> None:
    # Something other than run() cancels one of the consumer's tasks (a
    # framework cancelling every task at shutdown but the main one, say).
    # run() went on without it: without its acker nothing was acknowledged
    # any more (without its reader nothing was read), and nothing said so.
    # (The acker, idle here, takes the cancellation at once; a task in the
    # middle of a Redis command may not: redis-py can swallow it.)
    c = consumer(r, Recorder())
    task = asyncio.create_task(c.run())
    await eventually(lambda: _true("[running]" in repr(c)))
    await asyncio.sleep(0.3)
    [acker] = [t for t in asyncio.all_tasks() if t.get_name().endswith(" acker")]
    acker.cancel()
    with pytest.raises(RuntimeError, match="was cancelled, not by run"):
        await asyncio.wait_for(task, 10)
