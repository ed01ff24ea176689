"""A producer or consumer process for tests/test_redis_processes.py.

    python tests/redis_worker.py produce --port P --count 20000 --poison-every 1000
    python tests/redis_worker.py consume --port P --name w1 [--loop uvloop]

The consumer's sink is idempotent in the way the docs recommend: it records
each entry under its id (``HINCRBY processed <id> 1``), so a repeated delivery
is visible (a count of 2) but changes nothing else. An entry with
``poison=1`` makes the whole sink call raise; ``Retry(isolate=True)`` bisects
the batch so that only the poison entry fails, and after ``max_deliveries``
it lands in the dead-letter stream. While a batch is between its write and
its return, ``busy:<name>`` is above zero: the test kills a consumer then, in
the middle of a batch. On SIGTERM the consumer stops cleanly and prints its
stats as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from typing import Any

import redis.asyncio as aioredis

from asyncbatch import Retry
from asyncbatch.contrib.redis import StreamConsumer, StreamEntry, StreamWriter

STREAM = "jobs"
GROUP = "workers"
DEAD = "jobs:dead"


class PoisonError(Exception):
    pass


async def produce(port: int, count: int, poison_every: int) -> None:
    r = aioredis.Redis(port=port)
    async with StreamWriter(r, stream=STREAM, max_size=500, max_concurrency=2) as writer:
        await writer.submit_many(
            [
                {"n": i, "poison": int(poison_every > 0 and i % poison_every == poison_every // 2)}
                for i in range(count)
            ]
        )
    await r.aclose()


async def consume(port: int, name: str, min_idle: float) -> dict[str, Any]:
    r = aioredis.Redis(port=port)
    busy = f"busy:{name}"

    async def sink(entries: list[StreamEntry]) -> None:
        bad = [e.id for e in entries if e.fields[b"poison"] == b"1"]
        if bad:
            raise PoisonError(f"poison entry {bad[0]}")
        async with r.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.hincrby("processed", entry.id, 1)
            pipe.incr(busy)
            await pipe.execute()
        await asyncio.sleep(0.01)  # "in the middle of a batch": written, not yet answered
        await r.decr(busy)

    consumer = StreamConsumer(
        r,
        stream=STREAM,
        group=GROUP,
        consumer=name,
        sink=sink,
        max_size=100,
        max_concurrency=2,
        min_idle=min_idle,
        claim_interval=min_idle / 4,
        max_deliveries=3,
        dead_letter=DEAD,
        retry=Retry(attempts=1, isolate=True),
        start="0",
        block=0.2,
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(consumer.stop()))
    print("ready", flush=True)
    await consumer.run()
    await r.aclose()
    stats = dataclasses.asdict(consumer.stats)
    stats.pop("batcher")
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["produce", "consume"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="w1")
    p.add_argument("--count", type=int, default=20_000)
    p.add_argument("--poison-every", type=int, default=1000)
    p.add_argument("--min-idle", type=float, default=1.0)
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = p.parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.role == "produce":
        asyncio.run(produce(args.port, args.count, args.poison_every))
    else:
        stats = asyncio.run(consume(args.port, args.name, args.min_idle))
        print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
