"""Durable micro-batches on Redis Streams consumer groups.

Needs the ``redis`` extra (``pip install 'asyncbatch[redis]'``: redis-py's
asyncio client) and a Redis server >= 6.2.

- :class:`StreamWriter`: a :class:`~asyncbatch.Batcher` of ``XADD``\\ s. Each
  ``submit(fields)`` returns the new entry's id; one pipelined round trip per
  batch.
- :class:`StreamConsumer`: reads a stream through a consumer group
  (``XREADGROUP``) into batches for your sink, with the Batcher's semantics
  (per-entry answers, ``retry``, ``isolate``, ``timeout``), acknowledges
  (``XACK``) each entry only after the sink succeeded for it, lets failed
  entries be delivered again after ``min_idle`` (``XAUTOCLAIM``), and moves an
  entry that failed ``max_deliveries`` times to a dead-letter stream together
  with its error, atomically with its ``XACK`` (``MULTI``/``EXEC``).
- :class:`StreamEntry`: what the sink receives: ``id``, ``fields``,
  ``deliveries``.

Any number of consumers, in any number of processes on any number of
machines, share one group. Delivery is **at least once**: an entry whose sink
call succeeded may be delivered again if its consumer dies (or loses its
connection for longer than ``min_idle``) before the ``XACK`` lands. Make the
sink idempotent by keying its writes on :attr:`StreamEntry.id` (an ``INSERT
... ON CONFLICT DO NOTHING`` on the id, a ``SET NX``, an upsert whose key is
the id): a repeated delivery then changes nothing.

::

    from asyncbatch.contrib.redis import StreamConsumer, StreamEntry, StreamWriter

    async def handle(entries: list[StreamEntry]) -> list[object]:
        return [await charge(e.id, e.fields) for e in entries]   # or one bulk call

    consumer = StreamConsumer(redis, stream="events", group="billing", consumer="worker-1",
                              sink=handle, max_size=500, max_wait=0.2, min_idle=30.0,
                              max_deliveries=5, dead_letter="events:dead")
    await consumer.run()           # until consumer.stop() (or cancellation)

Layout of this module: :class:`StreamEntry` and :class:`ConsumerStats` (data),
:class:`StreamWriter` (a Batcher subclass), :class:`StreamConsumer` (four
loops: reading, claiming, acknowledging, refreshing claims) and the reply
parsers at the bottom.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import logging
import math
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias, TypeVar, cast

try:
    import redis as sync_redis
    import redis.asyncio as aioredis
    import redis.exceptions as redis_errors
    from redis.client import NEVER_DECODE
except ImportError as exc:  # pragma: no cover - the test extra installs redis
    raise ImportError(
        "asyncbatch.contrib.redis needs redis-py: install the redis extra, "
        "pip install 'asyncbatch[redis]'"
    ) from exc

from .._batcher import Batcher, Overflow, SinkResult
from .._exceptions import AsyncBatchError, BatcherClosed
from .._options import _check_sink
from .._retry import Retry
from .._stats import BatcherStats, BatchReport

__all__ = [
    "ConsumerStats",
    "DeliveryLimitExceeded",
    "StreamConsumer",
    "StreamEntry",
    "StreamWriter",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

Fields: TypeAlias = Mapping[Any, Any]
"""An entry's fields as given to ``XADD``: ``str``/``bytes`` names, ``str``/``bytes``/``int``/
``float`` values."""

#: What counts as "the connection broke": retried with backoff, never fatal.
#: (``BusyLoadingError``, a server still loading its data, is a ConnectionError.)
CONNECTION_ERRORS: Final = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    OSError,  # the builtin TimeoutError and socket errors included
)

#: Commands whose reply carries entries the server has just made this
#: consumer's: if the reply is lost they must be recovered (_recover_lost).
_DELIVERING: Final = frozenset({"XREADGROUP", "XAUTOCLAIM"})

_RECHECK = 0.1  # seconds before looking again at entries a read in flight may carry

_BACKOFF_FIRST = 0.1  # seconds before the first reconnection attempt
_BACKOFF_MAX = 5.0  # cap of the doubling backoff, seconds

_current_consumer: contextvars.ContextVar[StreamConsumer | None] = contextvars.ContextVar(
    "asyncbatch_redis_consumer", default=None
)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True, eq=False)
class StreamEntry:
    """One stream entry as handed to a :class:`StreamConsumer` sink.

    Attributes:
        id: the entry id (``"1718000000000-0"``), always a ``str``. Stable
            across deliveries: the natural idempotency key.
        fields: the entry's fields as the client returns them: ``bytes``
            names and values, or ``str`` with ``decode_responses=True`` (an
            entry that cannot be decoded fails without reaching the sink).
        deliveries: how many times the group has delivered this entry, this
            delivery included (``1`` the first time; more after a failure or
            a crashed consumer).
    """

    id: str
    fields: dict[Any, Any]
    deliveries: int = 1


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    """A snapshot of a :class:`StreamConsumer`'s counters (entries, not batches).

    Attributes:
        read: entries delivered to this consumer (new ones, its own pending
            ones at start, claimed ones, and ones whose delivery reply was
            lost, taken from its pending list).
        acked: entries acknowledged after the sink succeeded for them.
        failed: deliveries that failed (the sink's error for that entry,
            after ``retry``); each failed delivery counts once.
        redelivered: entries received with ``deliveries > 1``.
        claimed: entries taken over with ``XAUTOCLAIM`` (idle for ``min_idle``
            in the pending list of this or another consumer).
        dead_lettered: entries moved to the dead-letter stream.
        in_flight: entries held now: read or claimed, not yet acknowledged,
            dead-lettered or given back.
        connection_errors: commands that failed for a connection problem
            (each was retried after a backoff).
        batcher: the statistics of the Batcher feeding the sink.
    """

    read: int = 0
    acked: int = 0
    failed: int = 0
    redelivered: int = 0
    claimed: int = 0
    dead_lettered: int = 0
    in_flight: int = 0
    connection_errors: int = 0
    batcher: BatcherStats = field(default_factory=BatcherStats)


class _StrayCancellation(redis_errors.ConnectionError):
    """A Redis command ended with a ``CancelledError`` its task was not asked for."""


class DeliveryLimitExceeded(AsyncBatchError):
    """The error recorded for an entry claimed after ``max_deliveries`` deliveries
    that never got an answer (its consumers died while processing it: a
    poison entry that crashes its process, or repeated crashes)."""


# ------------------------------------------------------------------------- writer


class StreamWriter(Batcher[Fields, str]):
    """A :class:`~asyncbatch.Batcher` that appends its items to a stream.

    Each item is one entry's fields; its result is the new entry's id::

        async with StreamWriter(redis, stream="events", max_size=500) as writer:
            entry_id = await writer.submit({"user": "42", "amount": "9.50"})

    Every batch is one pipelined round trip of ``XADD``\\ s (no ``MULTI``: the
    entries of a batch are not atomic together). Every Batcher method, option
    and statistic applies (``submit_nowait`` for fire-and-forget,
    ``aclose()`` to drain, ``retry``, ...).

    Args:
        redis: a ``redis.asyncio.Redis`` client (the writer does not close it).
        stream: the stream's key; created by the first ``XADD``.
        maxlen: trim the stream to about this many entries on every ``XADD``
            (``MAXLEN ~``; exact with ``approximate=False``); ``None``: no
            trimming.
        approximate: see ``maxlen``.
        max_size, max_wait, interval, max_concurrency, max_pending, overflow,
            timeout, retry, on_batch, name: as for :class:`~asyncbatch.Batcher`.

    Errors, per item: fields that are empty, not a mapping, or hold a value
    that is not ``str``/``bytes``/``int``/``float`` fail only that item
    (``ValueError``/``TypeError``); an error reply for one ``XADD`` fails only
    that item; a connection error fails (or, with ``retry``, retries) the
    batch. A retried batch may append an entry twice if the connection broke
    after the server had applied it (at least once).
    """

    __slots__ = ("_approximate", "_maxlen", "_redis", "_stream")

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        stream: str,
        max_size: int = 500,
        max_wait: float | None = None,
        interval: float | None = None,
        maxlen: int | None = None,
        approximate: bool = True,
        max_concurrency: int = 1,
        max_pending: int | None = None,
        overflow: Overflow = "block",
        timeout: float | None = None,
        retry: Retry | None = None,
        on_batch: Callable[[BatchReport], object] | None = None,
        name: str | None = None,
    ) -> None:
        _check_client(redis)
        _check_name("stream", stream)
        if maxlen is not None:
            _check_count("maxlen", maxlen, 0)
        self._redis = redis
        self._stream = stream
        self._maxlen = maxlen
        self._approximate = approximate
        super().__init__(
            self._xadd,
            max_size=max_size,
            max_wait=max_wait,
            interval=interval,
            max_concurrency=max_concurrency,
            max_pending=max_pending,
            overflow=overflow,
            timeout=timeout,
            retry=retry,
            on_batch=on_batch,
            name=name or f"StreamWriter {stream!r}",
        )

    @property
    def stream(self) -> str:
        """The stream's key."""
        return self._stream

    async def _xadd(self, items: list[Fields]) -> list[str | Exception]:
        answers: list[str | Exception | None] = [None] * len(items)
        sent: list[int] = []
        async with self._redis.pipeline(transaction=False) as pipe:
            for i, fields in enumerate(items):
                problem = _fields_problem(fields)
                if problem is not None:
                    answers[i] = problem
                    continue
                pipe.xadd(
                    self._stream,
                    cast("dict[Any, Any]", fields),
                    maxlen=self._maxlen,
                    approximate=self._approximate,
                )
                sent.append(i)
            if sent:
                replies = await pipe.execute(raise_on_error=False)
                for i, reply in zip(sent, replies, strict=True):
                    answers[i] = reply if isinstance(reply, Exception) else _text(reply)
        return answers  # type: ignore[return-value]  # every slot is filled


def _fields_problem(fields: object) -> Exception | None:
    if not isinstance(fields, Mapping):
        return TypeError(f"a stream entry is a mapping of fields, got {fields!r}")
    if not fields:
        return ValueError("a stream entry needs at least one field, got {}")
    for name, value in fields.items():
        for what in (name, value):
            if isinstance(what, bool) or not isinstance(what, str | bytes | int | float):
                return TypeError(
                    "stream field names and values must be str, bytes, int or float; "
                    f"got {what!r} in {fields!r}"
                )
    return None


# ----------------------------------------------------------------------- consumer


class _State(enum.Enum):
    IDLE = "idle"  # run() not called yet
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class StreamConsumer:
    """One consumer of a Redis Streams consumer group, feeding a batch sink.

    ::

        consumer = StreamConsumer(redis, stream="events", group="billing",
                                  consumer="worker-1", sink=handle, max_size=500)
        task = asyncio.create_task(consumer.run())
        ...
        await consumer.stop()      # stop reading, finish and acknowledge, return

    The sink is ``async def sink(entries: list[StreamEntry])`` and answers as a
    :class:`~asyncbatch.Batcher` sink does: a sequence with one value per
    entry, a mapping keyed by entry id, or ``None`` (all succeeded). An
    ``Exception`` value fails only its entry; raising fails the whole batch;
    ``retry`` (with ``isolate``) and ``timeout`` apply as in the Batcher.

    What happens to an entry:

    - succeeded: acknowledged (``XACK``), batched with the other entries that
      succeeded in the same loop iteration.
    - failed, fewer than ``max_deliveries`` deliveries: left in the group's
      pending list (never acknowledged); once idle for ``min_idle`` seconds
      any consumer of the group (this one included) claims it
      (``XAUTOCLAIM``) and it is delivered again with ``deliveries + 1``.
    - failed on its ``max_deliveries``-th delivery: its fields plus ``error``
      (the message), ``error_type`` (the exception's qualified name),
      ``source_id`` and ``deliveries`` are added to ``dead_letter`` and the
      entry is acknowledged, in one ``MULTI``/``EXEC``: skip and report,
      never a silent drop. An entry claimed with more than ``max_deliveries``
      deliveries that never got an answer (its consumers kept dying on it)
      goes there too, with a :class:`DeliveryLimitExceeded` error.

    Entries held by this consumer (read, being processed, waiting for their
    ``XACK``) have their idle time reset (``XCLAIM ... JUSTID`` by their
    owner) once they are ``min_idle / 2`` seconds old, every ``min_idle / 4``
    seconds: a slow but healthy sink never has its entries claimed by others.
    A consumer that dies loses nothing: its pending entries are claimed by
    the others after ``min_idle``. A consumer restarted under the same name
    first takes back its own pending entries (``XREADGROUP`` from ``0``), then
    reads new ones: the group's last-delivered id and pending list are the
    checkpoint.

    Args:
        redis: a ``redis.asyncio.Redis`` client (not closed by the consumer).
            The reader holds one connection of its pool for itself. Its
            ``socket_timeout`` must be longer than ``block`` (redis-py 8 sets
            5 s by default; ``ValueError`` otherwise: every idle read would
            time out). With ``decode_responses=True`` the fields are decoded
            entry by entry: an entry that cannot be decoded (binary data from
            another writer) never reaches the sink; it fails with its
            ``UnicodeDecodeError`` like an entry the sink failed (delivered
            again, then dead-lettered with its fields as bytes).
        stream: the stream's key.
        group: the consumer group; created at ``start`` (with ``MKSTREAM``) if
            missing. An existing group is used as it is.
        consumer: this consumer's name, unique within the group (a process
            restarted under the same name resumes its own pending entries).
            Two consumers running at once under one name share one pending
            list and cannot tell each other's entries from entries whose
            delivery reply was lost: each takes the other's, so every entry
            is processed twice and a failing one dead-lettered twice.
        sink: ``async def sink(entries: list[StreamEntry]) -> ...``, see above.
        max_size: entries per sink call (and per ``XREADGROUP``), ``>= 1``.
        max_wait: seconds the first entry of a batch waits for companions
            (``0``: batches are what one read returns).
        max_concurrency: sink calls running at once, ``>= 1``. The consumer
            holds at most ``max_size * (max_concurrency + 1)`` entries.
        min_idle: seconds an entry must sit unacknowledged in a pending list
            before it is claimed and delivered again, ``> 0``. Longer than a
            normal sink call; the redelivery delay of a failed entry.
        max_deliveries: deliveries after which a failing entry goes to
            ``dead_letter``, ``>= 1``; ``None``: retried forever.
        dead_letter: the dead-letter stream's key; default
            ``"<stream>:dead"``.
        retry: a :class:`~asyncbatch.Retry` policy for sink calls within one
            delivery.
        timeout: seconds for one sink call (then its entries fail with
            ``TimeoutError``, or are retried).
        start: where a group created by this consumer starts: ``"$"`` (only
            entries added from now on) or ``"0"`` (the whole stream), or an id.
            The group is created when :meth:`run` begins: with ``"$"``, an
            entry a writer adds before that is not delivered. If writers may
            already be running, create the group first (``XGROUP CREATE ...
            MKSTREAM``) or use ``"0"``.
        block: longest ``XREADGROUP BLOCK``, seconds, ``> 0``. :meth:`stop`
            interrupts it (``CLIENT UNBLOCK``), so it mostly bounds how long an
            idle consumer waits between two reads.
        claim_interval: seconds between two ``XAUTOCLAIM`` scans; default
            ``min_idle / 2``.
        on_batch: called with a :class:`~asyncbatch.BatchReport` per sink batch.
        name: for ``repr``, logs and the Batcher; default
            ``"<stream>/<group>/<consumer>"``.

    Connection loss: every command that fails with a connection error is
    retried after a doubling backoff (0.1 s up to 5 s, full jitter); reading
    resumes where the group stands, acknowledgements are retried until they
    land (an entry is counted as ``acked`` only once its ``XACK`` succeeded).
    A reply lost with its connection after the server ran the command (an
    ``XREADGROUP`` or ``XAUTOCLAIM`` that gave entries to this consumer, even
    one redis-py resent by itself) loses nothing: after a failure, and every
    ``claim_interval``, the consumer compares its pending list on the server
    with what it holds and takes the entries it never received, with the
    delivery count the server has. If the group disappeared under a running
    consumer (a server restarted without its data) it is created again where
    this consumer last saw it (the group's last-delivered id when ``run()``
    began, or the last entry read since), not at ``start``: entries writers
    added to the new stream before the consumer noticed are delivered. Other
    errors (a wrong key type, no permission) stop the consumer: :meth:`run`
    raises them.
    """

    __slots__ = (
        "__weakref__",
        "_aborting",
        "_acked",
        "_acks",
        "_batcher",
        "_block_ms",
        "_blocked",
        "_capacity",
        "_claim_interval",
        "_claimed",
        "_connection_errors",
        "_consumer",
        "_dead",
        "_dead_letter",
        "_dead_lettered",
        "_done",
        "_drained",
        "_encoding",
        "_failed",
        "_fatal",
        "_finished",
        "_forget",
        "_given_back",
        "_group",
        "_held",
        "_kick_acker",
        "_max_deliveries",
        "_min_idle",
        "_name",
        "_own_done",
        "_pending",
        "_raw",
        "_read",
        "_reader",
        "_reader_id",
        "_reading_since",
        "_redelivered",
        "_redis",
        "_room",
        "_runner",
        "_seen",
        "_sink",
        "_start",
        "_state",
        "_stop",
        "_stream",
        "_suspect",
        "_wake_claimer",
        "_wake_refresher",
    )

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        stream: str,
        group: str,
        consumer: str,
        sink: Callable[[list[StreamEntry]], Awaitable[SinkResult[Any]]],
        max_size: int = 100,
        max_wait: float = 0.0,
        max_concurrency: int = 1,
        min_idle: float = 30.0,
        max_deliveries: int | None = 5,
        dead_letter: str | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        start: str = "$",
        block: float = 1.0,
        claim_interval: float | None = None,
        on_batch: Callable[[BatchReport], object] | None = None,
        name: str | None = None,
    ) -> None:
        _check_client(redis, cluster=False)
        for what, value in (("stream", stream), ("group", group), ("consumer", consumer)):
            _check_name(what, value)
        _check_start(start)
        if not callable(sink):
            raise TypeError(f"sink must be an async callable, got {sink!r}")
        if _check_sink(sink):
            raise TypeError(
                f"sink {sink!r} is an async generator (a streaming sink); a StreamConsumer "
                "sink returns its answers: `async def sink(entries): return [...]`"
            )
        _check_seconds("min_idle", min_idle)
        _check_seconds("block", block)
        _check_socket_timeout(redis, block)
        if claim_interval is not None:
            _check_seconds("claim_interval", claim_interval)
        if max_deliveries is not None:
            _check_count("max_deliveries", max_deliveries, 1)
        if dead_letter is not None:
            _check_name("dead_letter", dead_letter)
            if dead_letter == stream:
                raise ValueError(
                    f"dead_letter must be another stream than stream={stream!r}: its dead "
                    "letters would be read again as new entries, failing again for ever"
                )
        _check_count("max_size", max_size, 1)
        _check_count("max_concurrency", max_concurrency, 1)
        self._redis = redis
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self._sink = sink
        self._name = name or f"{stream}/{group}/{consumer}"
        self._min_idle = float(min_idle)
        self._max_deliveries = max_deliveries
        self._dead_letter = dead_letter if dead_letter is not None else f"{stream}:dead"
        self._start = start
        self._block_ms = max(1, round(block * 1000))
        # A client that decodes replies gets the entries' fields undecoded and
        # decodes them here, entry by entry: an entry it cannot decode (binary
        # data written by another client) fails alone instead of the whole reply.
        self._encoding = _decoding_of(redis)
        self._raw: Any = _Undecoded(redis) if self._encoding is not None else redis
        self._claim_interval = self._min_idle / 2 if claim_interval is None else claim_interval
        self._capacity = max_size * (max_concurrency + 1)
        # The Batcher validates the remaining options now, not at run().
        self._batcher: Batcher[StreamEntry, Any] = Batcher(
            self._call_sink,
            max_size=max_size,
            max_wait=max_wait,
            max_concurrency=max_concurrency,
            timeout=timeout,
            retry=retry,
            on_batch=on_batch,
            key=_entry_id,
            name=self._name,
        )
        self._state = _State.IDLE
        # Entry id -> loop time the command that delivered it, or last reset its
        # idle time, was sent (the server's idle time is never older: the
        # refresher counts from there).
        self._held: dict[str, float] = {}
        self._acks: list[str] = []  # succeeded, waiting for the acker
        self._dead: list[tuple[StreamEntry, BaseException]] = []  # for the dead-letter stream
        self._forget: list[str] = []  # deleted from the stream: acknowledged, not counted
        # Entry id -> (entry, its batcher future): submitted, not settled yet.
        self._pending: dict[str, tuple[StreamEntry, asyncio.Future[Any]]] = {}
        # Entry id -> loop time it failed and was left pending for a later claim,
        # kept for min_idle (see _recover_lost); oldest first.
        self._given_back: dict[str, float] = {}
        # The highest id the group delivered that this consumer knows of: where a
        # group that vanished under it is created again (see _recreate_group).
        self._seen: str | None = None
        self._suspect = False  # a command that delivers entries lost its reply
        self._reading_since: float | None = None  # loop time the read in flight was sent
        self._own_done = False  # the pending entries of a previous run are taken back
        self._stop = asyncio.Event()
        self._wake_claimer = asyncio.Event()
        self._room = asyncio.Event()
        self._kick_acker = asyncio.Event()
        self._finished = asyncio.Event()  # everything acked: the refresher may end
        self._wake_refresher = asyncio.Event()  # finished, or entries arrived already old
        self._done: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[Any] | None = None  # the task running run()
        self._fatal: BaseException | None = None
        self._aborting = False
        self._drained = False  # the batcher is closed: no entry will settle any more
        self._reader: aioredis.Redis | None = None
        self._reader_id: int | None = None
        self._blocked = False
        self._read = 0
        self._acked = 0
        self._failed = 0
        self._redelivered = 0
        self._claimed = 0
        self._dead_lettered = 0
        self._connection_errors = 0

    # -------------------------------------------------------------- public

    @property
    def name(self) -> str:
        """``"<stream>/<group>/<consumer>"`` or the ``name=`` given."""
        return self._name

    @property
    def stats(self) -> ConsumerStats:
        """A snapshot of the counters; see :class:`ConsumerStats`."""
        return ConsumerStats(
            read=self._read,
            acked=self._acked,
            failed=self._failed,
            redelivered=self._redelivered,
            claimed=self._claimed,
            dead_lettered=self._dead_lettered,
            in_flight=len(self._held),
            connection_errors=self._connection_errors,
            batcher=self._batcher.stats,
        )

    async def run(self) -> None:
        """Consume until :meth:`stop` is called (or the task is cancelled).

        Creates the group if it is missing, takes back this consumer's own
        pending entries, then reads new entries and claims idle ones, feeding
        them to the sink in batches and acknowledging the ones it succeeded
        for. After :meth:`stop` it stops reading, lets the batches already
        read finish, waits for their acknowledgements, and returns.

        Raises:
            RuntimeError: ``run()`` was called before (it runs once).
            redis.exceptions.RedisError: an error that is not a connection
                problem (those are retried): a wrong key type, a missing
                permission, ... The consumer has stopped; the entries it held
                stay pending and are claimed by the others after ``min_idle``.

        Cancellation: cancelling the task running ``run()`` stops reading at
        once, cancels the sink calls in flight and returns without further
        acknowledgements; every entry not yet acknowledged stays in the
        pending list and is delivered again (at least once). Its loops do not
        rely on cancelling a Redis command (redis-py's asyncio client can
        swallow a cancellation in the middle of one): each checks a stop flag
        and blocks at most ``block`` seconds, so the cancellation completes
        within about that time.
        """
        if self._state is not _State.IDLE:
            if self._state is _State.STOPPED and self._done is None:
                return  # stop() came first: nothing to run
            raise RuntimeError(f"{self!r}: run() may be called only once")
        loop = asyncio.get_running_loop()
        self._state = _State.RUNNING
        self._done = loop.create_future()
        self._runner = asyncio.current_task()
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._ensure_group()
            self._reader = self._redis.client()
            tasks = [
                loop.create_task(self._guard(self._read_loop()), name=f"{self._name} reader"),
                loop.create_task(self._guard(self._claim_loop()), name=f"{self._name} claimer"),
            ]
            acker = loop.create_task(self._guard(self._ack_loop()), name=f"{self._name} acker")
            refresher = loop.create_task(
                self._guard(self._refresh_loop()), name=f"{self._name} refresher"
            )
            tasks += [acker, refresher]
            await asyncio.wait(tasks[:2])  # the reader and the claimer end on stop()
            self._state = _State.STOPPING
            await self._batcher.aclose(cancel=self._fatal is not None)
            self._drained = True
            self._kick_acker.set()  # the acker flushes what is left and returns
            await asyncio.wait([acker])
            self._finished.set()
            self._wake_refresher.set()
            await asyncio.wait([refresher])
        except asyncio.CancelledError:
            self._abort()
            await self._batcher.aclose(cancel=True)
            for task in tasks:
                task.cancel()
            if tasks:  # each also ends by the stop flag if a cancellation was swallowed
                await asyncio.wait(tasks)
            raise
        finally:
            self._stop.set()
            self._state = _State.STOPPED
            if self._reader is not None:
                await _quietly(self._reader.aclose())
            if not self._done.done():
                self._done.set_result(None)
        if self._fatal is not None:
            raise self._fatal

    async def stop(self) -> None:
        """Stop reading, finish the batches already read, acknowledge them, return.

        Waits until :meth:`run` has returned. Idempotent; before ``run()`` it
        makes a later ``run()`` return at once. Called from inside this
        consumer's own sink it cannot wait for its own batch: it asks the
        consumer to stop and returns at once. So does a task the sink started
        (it inherits the sink's context): await the task running ``run()``
        there before closing the client.

        While the server is unreachable the acknowledgements are retried, so
        ``stop()`` waits for the connection to come back; bound it with
        ``asyncio.timeout`` if needed (unacknowledged entries are delivered
        again later). Cancelling ``stop()`` does not cancel the shutdown.
        """
        if self._state is _State.IDLE:
            self._state = _State.STOPPED
            self._stop.set()
            return
        self._request_stop()
        await self._unblock_reader()
        if self._done is None or _current_consumer.get() is self:
            return
        await asyncio.shield(self._done)

    def __repr__(self) -> str:
        return f"<StreamConsumer {self._name!r} [{self._state.value}] in_flight={len(self._held)}>"

    # ------------------------------------------------------------- stopping

    def _request_stop(self) -> None:
        self._stop.set()
        self._wake_claimer.set()
        self._room.set()
        self._kick_acker.set()

    def _abort(self) -> None:
        """Stop now: in-flight sink calls are about to be cancelled, not settled."""
        self._aborting = True
        self._request_stop()
        self._finished.set()
        self._wake_refresher.set()

    async def _unblock_reader(self) -> None:
        # Best effort: if the reader is parked in XREADGROUP BLOCK, make it
        # return now instead of after `block` (its loop then sees the flag).
        reader_id = self._reader_id
        if self._blocked and reader_id is not None:
            await _quietly(self._redis.client_unblock(reader_id))

    async def _guard(self, loop_body: Awaitable[None]) -> None:
        """Run one of the loops; an error it cannot retry stops the consumer.

        So does a cancellation that is not run()'s (run() aborts before it
        cancels its loops; the loop's end cancels run() too): a loop that
        ended quietly left run() waiting for ever (a dead reader: nothing read
        any more, and nothing said).
        """
        try:
            await loop_body
        except asyncio.CancelledError:
            runner = self._runner
            if self._aborting or runner is None or runner.done() or runner.cancelling():
                raise
            task = asyncio.current_task()
            if self._fatal is None:
                self._fatal = RuntimeError(
                    f"{self!r}: its task {task.get_name() if task else '?'!r} was cancelled, "
                    "not by run(): the consumer stops (cancel the task running run() to stop it)"
                )
                logger.error("%s", self._fatal)
            self._abort()
            if task is not None and task.cancelling():
                raise
        except BaseException as exc:
            if self._fatal is None:
                self._fatal = exc
                logger.error("%r stopped: %s: %s", self, type(exc).__name__, exc)
            self._abort()

    async def _nap(self, seconds: float, until: asyncio.Event) -> None:
        """Sleep ``seconds``, or less if ``until`` is set."""
        if until.is_set():
            return
        try:
            async with asyncio.timeout(seconds):
                await until.wait()
        except TimeoutError:
            pass

    async def _retrying(
        self, what: str, command: Callable[[], Awaitable[T]], until: asyncio.Event | None
    ) -> T | None:
        """Run ``command`` until it gets an answer; connection errors are retried.

        Returns ``None`` without an answer once ``until`` is set (checked
        after each failure). ``NOGROUP`` (the group vanished with the server's
        data) recreates the group and retries.
        """
        delay = _BACKOFF_FIRST
        failures = 0
        while True:
            try:
                result = await self._uncancelled(command())
            except CONNECTION_ERRORS as exc:
                self._connection_errors += 1
                failures += 1
                if failures == 1:
                    logger.warning(
                        "%r: %s failed (%s: %s); retrying with backoff",
                        self,
                        what,
                        type(exc).__name__,
                        exc,
                    )
                if what in _DELIVERING:
                    # The server may have delivered entries (moved them to this
                    # consumer's pending list) and the reply was lost with the
                    # connection: the claimer looks for them (_recover_lost).
                    self._suspect = True
                    self._wake_claimer.set()
                if what == "XREADGROUP":
                    self._reader_id = None  # a new connection has a new CLIENT ID
            except redis_errors.ResponseError as exc:
                if not str(exc).startswith("NOGROUP"):
                    raise
                await self._recreate_group(exc)
                continue
            else:
                if failures:
                    logger.warning("%r: %s works again after %d failures", self, what, failures)
                return result
            pause = random.uniform(0.0, delay)
            if until is None:
                await asyncio.sleep(pause)
            elif until.is_set():
                return None
            else:
                await self._nap(pause, until)
            delay = min(_BACKOFF_MAX, delay * 2)

    async def _uncancelled(self, command: Awaitable[T]) -> T:
        """Await a Redis command; a ``CancelledError`` nobody asked for is a connection error.

        A ``CancelledError`` while this task was not cancelled (``cancelling()``
        is 0) comes from inside the client (a timeout or a future of its own
        gone wrong mid-command): the connection's state is unknown (redis-py
        drops it), so it is retried like a broken connection. Let through, it
        ended the loop quietly: a reader that died so left ``run()`` running
        and reading nothing.
        """
        try:
            return await command
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if self._aborting or task is None or task.cancelling():
                raise
            raise _StrayCancellation(
                f"a CancelledError from inside the client, not a cancellation ({exc!r})"
            ) from exc

    async def _ensure_group(self) -> None:
        await self._retrying("XGROUP CREATE", self._create_group, self._stop)
        try:
            groups = await self._retrying(
                "XINFO GROUPS",
                functools.partial(self._redis.xinfo_groups, self._stream),
                self._stop,
            )
        except redis_errors.ResponseError:  # the stream was deleted meanwhile
            groups = None
        for group in groups or ():
            if _text(group["name"]) == self._group:
                self._seen = _text(group["last-delivered-id"])

    async def _create_group(self, at: str | None = None) -> None:
        try:
            await self._redis.xgroup_create(
                self._stream, self._group, id=at or self._start, mkstream=True
            )
        except redis_errors.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def _recreate_group(self, exc: Exception) -> None:
        """The group vanished under a running consumer: create it where it stood.

        Not at ``start``: after a server restarted without its data, writers
        may have added entries to the new stream before this consumer noticed;
        with ``"$"`` those would never be delivered. The group's position as
        this consumer last saw it (its last-delivered id when ``run()`` began,
        or the last entry read since) delivers every entry added after it (ids
        grow with the server's clock), and replays nothing older than what
        this consumer knows was delivered.
        """
        at = self._seen or self._start
        logger.warning("%r: the group is gone (%s); creating it again at %s", self, exc, at)
        await self._create_group(at)

    # -------------------------------------------------------------- reading

    async def _read_loop(self) -> None:
        await self._read_own_pending()
        self._own_done = True
        self._wake_claimer.set()  # a lost reply it saw meanwhile can be looked for now
        reader = self._reader
        assert reader is not None
        fetch: Any = reader if self._encoding is None else _Undecoded(reader)
        loop = asyncio.get_running_loop()

        sent = 0.0

        async def read_new(count: int) -> Any:
            nonlocal sent
            if self._reader_id is None:
                self._reader_id = await reader.client_id()
            if self._stop.is_set():
                return None
            self._blocked = True
            self._reading_since = sent = loop.time()
            try:
                return await fetch.xreadgroup(
                    self._group,
                    self._consumer,
                    {self._stream: ">"},
                    count=count,
                    block=self._block_ms,
                )
            finally:
                # The entries of the reply are held before the next await.
                self._blocked = False
                self._reading_since = None

        while not self._stop.is_set():
            count = self._free()
            if count <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            reply = await self._retrying(
                "XREADGROUP", functools.partial(read_new, count), self._stop
            )
            entries = _read_reply(reply)
            if entries:
                self._take_new(entries, sent)
                self._seen = _text(entries[-1][0])

    async def _read_own_pending(self) -> None:
        """Take back what this consumer name held before a restart (``XREADGROUP 0``)."""
        cursor = "0"
        while not self._stop.is_set():
            count = self._free()
            if count <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            sent = asyncio.get_running_loop().time()
            reply = await self._retrying(
                "XREADGROUP",
                functools.partial(
                    self._raw.xreadgroup,
                    self._group,
                    self._consumer,
                    {self._stream: cursor},
                    count=count,
                ),
                self._stop,
            )
            found = _read_reply(reply)
            if not found:
                return
            cursor = _text(found[-1][0])
            await self._deliver_pending(found, claimed=False, since=sent)

    async def _claim_loop(self) -> None:
        cursor = "0-0"
        min_idle_ms = max(1, round(self._min_idle * 1000))
        loop = asyncio.get_running_loop()
        wake = self._wake_claimer
        next_check = loop.time()
        while not self._stop.is_set():
            wake.clear()
            if self._own_done and (self._suspect or loop.time() >= next_check):
                self._suspect = False
                deferred = await self._retrying("XPENDING", self._recover_lost, self._stop)
                if deferred is None:
                    continue  # stopping
                # Deferred: entries that may be in the reply of the read in flight;
                # look again once it has landed.
                next_check = loop.time() + (_RECHECK if deferred else self._claim_interval)
            count = self._free()
            if count > 0:
                sent = loop.time()
                reply = await self._retrying(
                    "XAUTOCLAIM",
                    functools.partial(
                        self._raw.xautoclaim,
                        self._stream,
                        self._group,
                        self._consumer,
                        min_idle_ms,
                        cursor,
                        count=count,
                    ),
                    self._stop,
                )
                if reply is None:
                    continue
                cursor, claimed, deleted = _autoclaim_reply(reply)
                if deleted:
                    self._forget += deleted  # Redis < 7 keeps them pending
                    self._kick_acker.set()
                if claimed:
                    await self._deliver_pending(claimed, claimed=True, since=sent)
                if cursor != "0-0" and claimed:
                    continue  # more idle entries may follow at once
            pause = self._claim_interval
            if self._own_done:
                pause = min(pause, max(0.0, next_check - loop.time()))
            await self._nap(pause, wake)

    async def _recover_lost(self) -> bool:
        """Take the entries of this consumer's pending list that it never received.

        A command that delivers entries (``XREADGROUP``, ``XAUTOCLAIM``) moves
        them to this consumer's pending list when the server runs it; if the
        connection breaks before the reply arrives, the entries are ours on
        the server and unknown here. redis-py may even resend the command by
        itself (its own ``retry``) without telling us. Left alone they would
        wait for ``min_idle`` and come back through ``XAUTOCLAIM`` with one
        delivery too many (dead-lettered unprocessed on their last one).

        So after such a failure, and every ``claim_interval`` anyway, compare
        the pending list with what this consumer knows: an entry that is
        neither held (in the batcher or waiting for its ``XACK``) nor given
        back after a failure less than ``min_idle`` ago, and idle for less than
        ``min_idle`` (older ones are ``XAUTOCLAIM``'s, which counts the
        delivery), was delivered to us and lost on the way. Its idle time is
        reset (``XCLAIM ... JUSTID``, which counts no delivery and skips an
        entry someone else claimed meanwhile), its fields are read, and it
        goes to the sink with the delivery count the server has.

        An entry delivered since the reader sent the read now in flight may be
        on its way in that read's reply: it is left for a second look.
        Returns whether some were (the caller looks again shortly).
        """
        now = asyncio.get_running_loop().time()
        given_back = self._given_back
        horizon = now - self._min_idle - 1.0  # older: idle >= min_idle on the server too
        while given_back:
            oldest = next(iter(given_back))
            if given_back[oldest] > horizon:
                break
            del given_back[oldest]
        min_idle_ms = max(1, round(self._min_idle * 1000))
        since = self._reading_since
        # Idle times are whole milliseconds of the server's clock: a margin.
        in_flight_ms = -1.0 if since is None else (now - since) * 1000 + 5
        deferred = False
        held = self._held
        lost: dict[str, int] = {}  # id -> deliveries
        floor = min_idle_ms
        start = "-"
        while True:
            rows = await self._redis.xpending_range(
                self._stream, self._group, start, "+", 1000, consumername=self._consumer
            )
            for row in rows:
                entry_id = _text(row["message_id"])
                idle = int(row["time_since_delivered"])
                if entry_id in held or entry_id in given_back or idle >= min_idle_ms:
                    continue
                if idle <= in_flight_ms:
                    deferred = True
                    continue
                lost[entry_id] = int(row["times_delivered"])
                floor = min(floor, idle)
            if len(rows) < 1000:
                break
            start = "(" + _text(rows[-1]["message_id"])
        if not lost:
            return deferred
        ids: list[Any] = list(lost)
        sent = asyncio.get_running_loop().time()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xclaim(self._stream, self._group, self._consumer, floor, ids, justid=True)
            fetch: Any = pipe if self._encoding is None else _Undecoded(pipe)
            for entry_id in ids:
                fetch.xrange(self._stream, entry_id, entry_id, count=1)
            replies = await pipe.execute()
        ours = {_text(i) for i in replies[0]}
        entries: list[StreamEntry] = []
        for entry_id, found in zip(ids, replies[1:], strict=True):
            if entry_id not in ours:
                continue  # claimed by another consumer meanwhile
            if found:
                entries.append(StreamEntry(entry_id, found[0][1], lost[entry_id]))
            else:
                self._forget.append(entry_id)  # deleted from the stream meanwhile
                self._kick_acker.set()
        if entries:
            logger.warning(
                "%r: %d entries delivered to this consumer were never received "
                "(a reply lost with its connection); taken from its pending list",
                self,
                len(entries),
            )
            self._take(entries, claimed=False, since=sent)
        return deferred

    async def _deliver_pending(
        self, found: list[tuple[Any, Any]], *, claimed: bool, since: float
    ) -> None:
        """Entries taken from a pending list: look up their delivery counts, hand them on.

        Only those still pending for this consumer: the reply of an
        ``XAUTOCLAIM`` (or ``XREADGROUP 0``) can arrive after an entry in it
        was settled (a big reply, a loaded machine: this consumer held the
        entry and claimed it from itself, or a previous claim's reply came
        later) or claimed by another consumer. Fed to the sink again it was
        processed twice and, failing on its last delivery, dead-lettered
        twice (with a made-up delivery count).
        """
        live = [(_text(i), f) for i, f in found]
        gone = [i for i, f in live if not f]  # deleted from the stream meanwhile
        if gone:
            self._forget += gone
            self._kick_acker.set()
        live = [(i, f) for i, f in live if f]
        if not live:
            return
        ids = [i for i, _ in live]

        async def counts() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for entry_id in ids:
                    pipe.xpending_range(self._stream, self._group, entry_id, entry_id, 1)
                return await pipe.execute()

        replies = await self._retrying("XPENDING", counts, self._stop)
        if replies is None:
            return  # stopping: they stay pending (claimed by us) and come back later
        deliveries: dict[str, int] = {}
        for reply in replies:
            for row in reply:
                if _text(row["consumer"]) == self._consumer:
                    deliveries[_text(row["message_id"])] = int(row["times_delivered"])
        entries = [StreamEntry(i, f, deliveries[i]) for i, f in live if i in deliveries]
        if len(entries) < len(live):
            logger.debug(
                "%r: %d entries settled or claimed by another consumer meanwhile; skipped",
                self,
                len(live) - len(entries),
            )
        self._take(entries, claimed=claimed, since=since)

    def _free(self) -> int:
        """How many more entries this consumer may hold now."""
        return self._capacity - len(self._held)

    def _take(self, entries: list[StreamEntry], *, claimed: bool, since: float) -> None:
        """Hold the entries and submit them to the batcher (or dead-letter them).

        ``since``: the loop time the command that delivered them was sent. The
        server's idle time of an entry runs from when it ran that command, not
        from when the reply was read: a big reply (or a busy loop) can take a
        good part of ``min_idle`` to arrive, and the refresher must count
        from the earlier time to refresh the entries before others claim them.
        """
        now = since
        held = self._held
        pending = self._pending
        submit = self._batcher.submit_nowait
        limit = self._max_deliveries
        encoding = self._encoding
        submitted: list[StreamEntry] = []
        taken = redelivered = 0
        for entry in entries:
            if entry.id in held:
                # Ours already (an XAUTOCLAIM of our own entry whose refresh
                # came late): it is in the batcher; only its idle time changed.
                continue
            held[entry.id] = now
            taken += 1
            if entry.deliveries > 1:
                redelivered += 1
                if limit is not None and entry.deliveries > limit:
                    # Delivered max_deliveries times and never answered: whatever
                    # held it died on it. Do not feed it to the sink again.
                    self._dead.append(
                        (
                            entry,
                            DeliveryLimitExceeded(
                                f"entry {entry.id} was delivered {entry.deliveries - 1} "
                                f"times without an answer (max_deliveries={limit}); the "
                                "consumers holding it stopped while processing it"
                            ),
                        )
                    )
                    self._kick_acker.set()
                    continue
            if encoding is not None:
                try:
                    entry = StreamEntry(
                        entry.id, _decoded(entry.fields, encoding), entry.deliveries
                    )
                except UnicodeDecodeError as exc:
                    self._undecodable(entry, exc)
                    continue
            pending[entry.id] = (entry, submit(entry))
            submitted.append(entry)
        self._read += taken
        self._redelivered += redelivered
        self._refresh_soon(since)
        if claimed:
            self._claimed += taken
        self._watch(submitted)

    def _take_new(self, found: list[Any], since: float) -> None:
        """Entries of an ``XREADGROUP >`` reply (first deliveries): hold and submit them.

        The hot path, once per read: it builds the entries itself and counts
        in bulk. ``found`` is ``[(id, fields), ...]`` as the client parsed it;
        ``since``: when the read was sent (see _take).
        """
        now = since
        held = self._held
        pending = self._pending
        submit = self._batcher.submit_nowait
        encoding = self._encoding
        submitted: list[StreamEntry] = []
        append = submitted.append
        undecodable = 0
        for raw_id, fields in found:
            entry_id = raw_id.decode() if type(raw_id) is bytes else str(raw_id)
            if entry_id in held or not fields:
                continue  # see _take; no fields: deleted meanwhile (never for ">")
            held[entry_id] = now
            if encoding is not None:
                try:
                    fields = _decoded(fields, encoding)
                except UnicodeDecodeError as exc:
                    self._undecodable(StreamEntry(entry_id, fields), exc)
                    undecodable += 1
                    continue
            entry = _new_entry(StreamEntry)
            _set_id(entry, entry_id)
            _set_fields(entry, fields)
            _set_deliveries(entry, 1)
            pending[entry_id] = (entry, submit(entry))
            append(entry)
        self._read += len(submitted) + undecodable
        self._watch(submitted)
        self._refresh_soon(since)

    def _refresh_soon(self, since: float) -> None:
        """Entries delivered at ``since`` arrived: wake the refresher if they are old already."""
        if asyncio.get_running_loop().time() - since >= self._min_idle / 2:
            self._wake_refresher.set()

    def _undecodable(self, entry: StreamEntry, exc: UnicodeDecodeError) -> None:
        """A held entry whose fields the client cannot decode fails without the sink."""
        encoding = self._encoding
        logger.warning(
            "%r: entry %s cannot be decoded as %s (%s); it fails without reaching the "
            "sink (its fields are kept as bytes if it is dead-lettered)",
            self,
            entry.id,
            encoding[0] if encoding is not None else "text",
            exc,
        )
        self._settle(entry, exc)

    # Settling: an entry's outcome is its batcher future's. Rather than one
    # callback per entry (a Handle and a call each, the largest per-entry cost),
    # entries are settled in bulk: when a sink call's last future is done (the
    # batcher resolves a call's futures together), and, as the guarantee, when
    # the last future of what one read submitted is done (entries not done by
    # then are watched again). Every future is resolved in the end (closing the
    # batcher resolves the rest), so every entry is settled, exactly once: the
    # first _collect that finds it done takes it out of _pending.

    def _watch(self, entries: list[StreamEntry], *, again: bool = True) -> None:
        """Collect ``entries`` once the future of the last one is done."""
        if entries:
            pair = self._pending.get(entries[-1].id)
            if pair is not None and pair[0] is entries[-1]:
                pair[1].add_done_callback(functools.partial(self._collect, entries, again))

    def _collect(self, entries: list[StreamEntry], again: bool, _: object = None) -> None:
        """Settle those of ``entries`` whose results are in; with ``again`` watch the rest."""
        pending = self._pending
        acks = self._acks
        before = len(acks)
        waiting: list[StreamEntry] = []
        for entry in entries:
            pair = pending.get(entry.id)
            if pair is None or pair[0] is not entry:
                continue  # settled already (and maybe delivered again since)
            fut = pair[1]
            if not fut.done():
                waiting.append(entry)
                continue
            del pending[entry.id]
            if fut.cancelled():
                self._settle(entry, None)
                continue
            exc = fut.exception()
            if exc is None:
                acks.append(entry.id)
            else:
                self._settle(entry, exc)
        if len(acks) != before:
            self._kick_acker.set()
        if again:
            self._watch(waiting)

    def _settle(self, entry: StreamEntry, exc: BaseException | None) -> None:
        """A failed entry (``exc``) or one cut off (``None``): dead-letter or give back."""
        if self._aborting and (exc is None or isinstance(exc, BatcherClosed)):
            self._release(entry.id)  # cut off by cancellation, not failed: stays pending
            return
        if exc is None:  # pragma: no cover - only an aborting consumer's batcher cancels
            exc = asyncio.CancelledError()
        self._failed += 1
        limit = self._max_deliveries
        if limit is None or entry.deliveries < limit:
            # Stays in the pending list, unrefreshed: claimed again once idle.
            self._release(entry.id)
            return
        self._dead.append((entry, exc))
        self._kick_acker.set()

    async def _call_sink(self, entries: list[StreamEntry]) -> SinkResult[Any]:
        mine = entries.copy()  # the sink owns its list (it may drain it)
        token = _current_consumer.set(self)
        try:
            return await self._sink(entries)
        finally:
            _current_consumer.reset(token)
            self._watch(mine, again=False)  # settled as soon as this call's results are in

    def _release(self, entry_id: str) -> None:
        """Let go of an entry that stays pending (failed, or cut off by cancellation)."""
        if self._held.pop(entry_id, None) is not None:
            given_back = self._given_back
            given_back.pop(entry_id, None)  # re-inserted: oldest first
            given_back[entry_id] = asyncio.get_running_loop().time()
        self._room.set()

    # -------------------------------------------------------- acknowledging

    async def _ack_loop(self) -> None:
        while True:
            if not (self._acks or self._dead or self._forget):
                if self._drained:
                    return  # stopping: the batcher is drained and all is acknowledged
                self._kick_acker.clear()
                await self._kick_acker.wait()
                continue
            acks, self._acks = self._acks, []
            dead, self._dead = self._dead, []
            forget, self._forget = self._forget, []
            await self._acknowledge(acks, dead, forget)
            for entry_id in acks:
                self._held.pop(entry_id, None)
            for entry, _ in dead:
                self._held.pop(entry.id, None)
            self._acked += len(acks)
            self._dead_lettered += len(dead)
            self._room.set()

    async def _acknowledge(
        self, acks: list[str], dead: list[tuple[StreamEntry, BaseException]], forget: list[str]
    ) -> None:
        """One round trip: ``XACK``; with dead letters ``MULTI XADD... XACK EXEC``."""
        if dead:
            logger.warning(
                "%r: %d entries moved to %r after their last delivery failed (first: %s: %s)",
                self,
                len(dead),
                self._dead_letter,
                type(dead[0][1]).__name__,
                dead[0][1],
            )
        interrupted = False
        while True:
            if interrupted and dead:
                # The EXEC may have been applied before the connection broke:
                # an entry no longer pending was moved already (or acked by
                # another consumer); adding it again would duplicate it.
                still = await self._still_pending([e.id for e, _ in dead])
                dead = [(e, x) for e, x in dead if e.id in still]
            ids = [*acks, *forget, *(e.id for e, _ in dead)]
            if not ids:
                return
            try:
                if dead:
                    await self._uncancelled(self._dead_letter_and_ack(dead, ids))
                else:
                    # bytes: the client's encoder takes them as they are (per id)
                    await self._uncancelled(
                        self._redis.xack(self._stream, self._group, *[i.encode() for i in ids])
                    )
                return
            except CONNECTION_ERRORS as exc:
                self._connection_errors += 1
                logger.warning("%r: acknowledging failed (%s: %s)", self, type(exc).__name__, exc)
                interrupted = True
                # _retrying does the waiting and the counting; the command it
                # retries is a probe so that the pending check above runs first.
                await self._retrying("XACK", self._redis.ping, None)
            except redis_errors.WatchError:
                continue  # the dead-letter key changed under the check: check again
            except redis_errors.ResponseError as exc:
                if not str(exc).startswith("NOGROUP"):
                    raise
                await self._recreate_group(exc)

    async def _dead_letter_and_ack(
        self, dead: list[tuple[StreamEntry, BaseException]], ids: list[str]
    ) -> None:
        # A transaction does not roll back: an XADD failing inside EXEC (the
        # key holds a string, say) would not stop the XACK after it, and the
        # entry would be gone without its report. So WATCH the key, check its
        # type, and only then MULTI/EXEC (EXEC aborts if the key changed).
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(self._dead_letter)
            kind = _text(await pipe.type(self._dead_letter))
            if kind not in ("stream", "none"):
                raise redis_errors.ResponseError(
                    f"WRONGTYPE the dead-letter key {self._dead_letter!r} holds a {kind}, "
                    f"not a stream; {len(dead)} failed entries stay pending"
                )
            cast(Any, pipe).multi()  # untyped in redis-py
            for entry, error in dead:
                pipe.xadd(self._dead_letter, _dead_fields(entry, error))
            pipe.xack(self._stream, self._group, *ids)
            await pipe.execute()

    async def _still_pending(self, ids: list[str]) -> set[str]:
        async def query() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for entry_id in ids:
                    pipe.xpending_range(self._stream, self._group, entry_id, entry_id, 1)
                return await pipe.execute()

        replies = await self._retrying("XPENDING", query, None) or []
        return {_text(row["message_id"]) for reply in replies for row in reply}

    # ----------------------------------------------------------- refreshing

    async def _refresh_loop(self) -> None:
        """Keep held entries claimed: reset their idle time once min_idle/2 old."""
        loop = asyncio.get_running_loop()
        period = self._min_idle / 4
        age = self._min_idle / 2
        wake = self._wake_refresher
        while not self._finished.is_set():
            await self._nap(period, wake)
            wake.clear()
            now = loop.time()
            # Not in time order (a claim's entries can be older than the
            # read's before them): every held entry is looked at.
            stale = [i for i, since in self._held.items() if now - since >= age]
            for i in range(0, len(stale), 1000):
                chunk: list[Any] = stale[i : i + 1000]
                # XCLAIM with min-idle 0 and JUSTID: resets the idle time and
                # does not count a delivery.
                done = await self._retrying(
                    "XCLAIM",
                    functools.partial(
                        self._redis.xclaim,
                        self._stream,
                        self._group,
                        self._consumer,
                        0,
                        chunk,
                        justid=True,
                    ),
                    self._finished,
                )
                if done is None:
                    return
                held = self._held
                for entry_id in chunk:
                    if entry_id in held:
                        held[entry_id] = now


# ------------------------------------------------------------------------ helpers


def _entry_id(entry: StreamEntry) -> str:
    return entry.id


def _decoding_of(redis: object) -> tuple[str, str] | None:
    """``(encoding, errors)`` of a client that decodes replies; ``None`` if it does not."""
    pool = getattr(redis, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict) or not kwargs.get("decode_responses"):
        return None
    return str(kwargs.get("encoding", "utf-8")), str(kwargs.get("encoding_errors", "strict"))


def _decoded(fields: Mapping[Any, Any], encoding: tuple[str, str]) -> dict[Any, Any]:
    """Fields read undecoded, decoded as the client would have (may raise UnicodeDecodeError)."""
    return {
        (k.decode(*encoding) if isinstance(k, bytes) else k): (
            v.decode(*encoding) if isinstance(v, bytes) else v
        )
        for k, v in fields.items()
    }


class _Undecoded:
    """A client or pipeline whose entry-reading commands return bytes (``NEVER_DECODE``).

    redis-py's command methods only build the arguments and call
    ``execute_command``; this one adds the option that skips decoding.
    """

    __slots__ = ("_client",)

    xreadgroup: Any = cast(Any, aioredis.Redis).xreadgroup
    xautoclaim: Any = cast(Any, aioredis.Redis).xautoclaim
    xrange: Any = cast(Any, aioredis.Redis).xrange

    def __init__(self, client: Any) -> None:
        self._client = client

    def execute_command(self, *args: Any, **options: Any) -> Any:
        options[NEVER_DECODE] = True
        return self._client.execute_command(*args, **options)


# A StreamEntry without its dataclass __init__ (which sets each field of a frozen
# dataclass through object.__setattr__): a third of the cost, on the hot path.
_new_entry = object.__new__
_set_id = cast(Any, StreamEntry).id.__set__
_set_fields = cast(Any, StreamEntry).fields.__set__
_set_deliveries = cast(Any, StreamEntry).deliveries.__set__


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _qualname(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _dead_fields(entry: StreamEntry, error: BaseException) -> dict[Any, Any]:
    fields: dict[Any, Any] = dict(entry.fields)
    for name in ("error", "error_type", "source_id", "deliveries"):  # ours win
        fields.pop(name, None)
        fields.pop(name.encode(), None)
    fields["error"] = str(error) or repr(error)
    fields["error_type"] = _qualname(error)
    fields["source_id"] = entry.id
    fields["deliveries"] = str(entry.deliveries)
    return fields


def _read_reply(reply: Any) -> list[Any]:
    """``XREADGROUP``'s entries, ``[(id, fields), ...]``, in every shape redis-py gives.

    ``[[stream, entries]]`` (RESP2, and RESP3 with ``legacy_responses``, the
    default), ``{stream: [entries]}`` (``protocol=3`` asked for explicitly) and
    ``{stream: entries}`` (``legacy_responses=False``). With one stream (ours)
    the client's own list is returned, not a copy.
    """
    if not reply:
        return []
    if isinstance(reply, dict):
        streams = [_unwrap(entries) for entries in reply.values()]
    else:
        streams = [stream[1] for stream in reply]
    if len(streams) == 1:
        return cast("list[Any]", streams[0] or [])
    return [entry for entries in streams for entry in entries or ()]


def _unwrap(entries: Any) -> Any:
    """``[[(id, fields), ...]]`` -> ``[(id, fields), ...]``; anything else as it is."""
    if (
        isinstance(entries, list)
        and len(entries) == 1
        and isinstance(entries[0], list)
        and (not entries[0] or isinstance(entries[0][0], list | tuple))
    ):
        return entries[0]
    return entries


def _autoclaim_reply(reply: Any) -> tuple[str, list[tuple[Any, Any]], list[str]]:
    """``XAUTOCLAIM``: cursor, claimed entries, and (Redis >= 7) ids deleted meanwhile."""
    cursor = _text(reply[0])
    claimed = [(e[0], e[1]) for e in reply[1]]
    deleted = [_text(i) for i in reply[2]] if len(reply) > 2 else []
    return cursor, claimed, deleted


async def _quietly(awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception:
        logger.debug("ignored", exc_info=True)


def _check_name(what: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{what} must be a non-empty str, got {value!r}")


def _check_client(redis: object, *, cluster: bool = True) -> None:
    if redis is None or isinstance(redis, sync_redis.Redis | sync_redis.RedisCluster):
        what = "None" if redis is None else f"the synchronous {type(redis).__qualname__}"
        raise TypeError(f"redis must be a redis.asyncio.Redis client, got {what}")
    if not cluster and isinstance(redis, aioredis.RedisCluster):
        raise TypeError(
            "redis must be a redis.asyncio.Redis client, got a RedisCluster (not supported: "
            "pass a redis.asyncio.Redis connected to the node that holds the stream)"
        )


def _check_socket_timeout(redis: object, block: float) -> None:
    """The reader blocks ``block`` seconds in XREADGROUP: the socket must wait longer."""
    pool = getattr(redis, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    timeout = kwargs.get("socket_timeout") if isinstance(kwargs, dict) else None
    if isinstance(timeout, int | float) and timeout <= block:
        raise ValueError(
            f"the client's socket_timeout={timeout!r} is not longer than block={block!r}: "
            "every idle XREADGROUP BLOCK would time out and reconnect; pass a smaller "
            "block (or a longer socket_timeout, or none)"
        )


_STREAM_ID = re.compile(r"\d+(-\d+)?")


def _check_start(start: object) -> None:
    _check_name("start", start)
    if start != "$" and not _STREAM_ID.fullmatch(cast(str, start)):
        raise ValueError(
            f'start must be "$" (new entries only), "0" (the whole stream) or an entry id '
            f'such as "1718000000000-0", got {start!r}'
        )


def _check_count(what: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value!r}")


def _check_seconds(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number of seconds > 0, got {value!r}")
