"""A durable micro-batch pipeline on Redis Streams: produce, aggregate, report.

One command, against any local Redis >= 6.2 (``REDIS_URL``, default
``redis://127.0.0.1:6379/0``)::

    python examples/stream_pipeline.py                  # demo: all of the below
    python examples/stream_pipeline.py produce --count 5000
    python examples/stream_pipeline.py consume --name worker-2   # one more process
    python examples/stream_pipeline.py report

- **producer**: a ``StreamWriter`` appends orders ``{customer, amount}`` to the
  ``orders`` stream, 500 per round trip; every 97th order is malformed
  (``amount="n/a"``).
- **consumers**: ``StreamConsumer``\\ s of the group ``aggregator`` (the demo
  runs three in one process; ``consume`` runs one per process, on any
  machine). Each batch goes to a sink that adds the amounts to per-customer
  totals in SQLite.
- **idempotent sink**: in one SQLite transaction per batch, each entry id is
  inserted into ``applied`` (``INSERT OR IGNORE``) and only an entry inserted
  now adds its amount. An entry delivered twice (a consumer died after the
  commit and before its ``XACK``) changes nothing the second time.
- **dead letters**: a malformed order fails on its own (the sink answers a
  ``ValueError`` for that entry; the batch's other entries are applied); it is
  delivered again after ``min_idle``, and after ``max_deliveries`` it moves to
  ``orders:dead`` with its error. ``report`` lists them.

The demo starts from scratch (it deletes the three keys and the database),
checks that the totals equal what the producer wrote minus the dead letters,
and prints the report.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import tempfile
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis

from asyncbatch.contrib.redis import StreamConsumer, StreamEntry, StreamWriter

STREAM, GROUP, DEAD = "orders", "aggregator", "orders:dead"
CUSTOMERS = ("acme", "globex", "initech", "umbrella", "hooli")
DEFAULT_DB = Path(tempfile.gettempdir()) / "asyncbatch-stream-pipeline.sqlite3"


# -- the sink: per-customer totals in SQLite, idempotent by entry id ----------------


def open_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS applied (entry_id TEXT PRIMARY KEY)")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS totals "
        "(customer TEXT PRIMARY KEY, cents INTEGER NOT NULL, orders INTEGER NOT NULL)"
    )
    return conn


def apply(path: Path, rows: list[tuple[str, str, int]]) -> int:
    """Add ``(entry_id, customer, cents)`` rows not applied before; one transaction."""
    conn = open_db(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        added = 0
        for entry_id, customer, cents in rows:
            if conn.execute("INSERT OR IGNORE INTO applied VALUES (?)", (entry_id,)).rowcount:
                conn.execute(
                    "INSERT INTO totals VALUES (?, ?, 1) ON CONFLICT(customer) DO UPDATE "
                    "SET cents = cents + excluded.cents, orders = orders + 1",
                    (customer, cents),
                )
                added += 1
        conn.execute("COMMIT")
        return added
    finally:
        conn.close()


def cents_of(entry: StreamEntry) -> int:
    raw = entry.fields.get("amount")
    try:
        return int(Decimal(str(raw)) * 100)
    except (InvalidOperation, TypeError):
        raise ValueError(f"order {entry.id}: amount {raw!r} is not a number") from None


def make_sink(db: Path) -> Any:
    async def aggregate(entries: list[StreamEntry]) -> list[object]:
        answers: list[object] = []
        rows = []
        for entry in entries:
            try:
                rows.append((entry.id, entry.fields["customer"], cents_of(entry)))
                answers.append(None)  # applied (or already applied before)
            except ValueError as exc:
                answers.append(exc)  # fails only this entry
        await asyncio.to_thread(apply, db, rows)
        return answers

    return aggregate


# -- roles -------------------------------------------------------------------------------


async def produce(r: aioredis.Redis, count: int) -> int:
    """Append ``count`` orders; returns the expected total in cents of the good ones."""
    expected = 0
    orders = []
    for i in range(count):
        if i % 97 == 96:
            orders.append({"customer": CUSTOMERS[i % 5], "amount": "n/a"})
            continue
        cents = 100 + (i * 37) % 9900
        expected += cents
        orders.append({"customer": CUSTOMERS[i % 5], "amount": f"{cents // 100}.{cents % 100:02d}"})
    async with StreamWriter(r, stream=STREAM, max_size=500) as writer:
        await writer.submit_many(orders)
    return expected


def consumer(r: aioredis.Redis, name: str, db: Path, min_idle: float) -> StreamConsumer:
    return StreamConsumer(
        r,
        stream=STREAM,
        group=GROUP,
        consumer=name,
        sink=make_sink(db),
        max_size=200,
        max_wait=0.05,
        min_idle=min_idle,
        max_deliveries=3,
        dead_letter=DEAD,
        start="0",  # a new group starts at the beginning of the stream
    )


@dataclass
class Report:
    applied: int
    totals: dict[str, tuple[int, int]]  # customer -> (cents, orders)
    dead: list[dict[str, str]]
    pending: int


async def report(r: aioredis.Redis, db: Path) -> Report:
    conn = open_db(db)
    try:
        applied = conn.execute("SELECT count(*) FROM applied").fetchone()[0]
        totals = {c: (cents, n) for c, cents, n in conn.execute("SELECT * FROM totals")}
    finally:
        conn.close()
    dead = cast("list[tuple[str, dict[str, str]]]", await r.xrange(DEAD))
    try:
        pending = int((await r.xpending(STREAM, GROUP))["pending"])
    except aioredis.ResponseError:
        pending = 0
    return Report(applied, totals, [fields for _, fields in dead], pending)


def print_report(rep: Report) -> None:
    print(f"applied entries: {rep.applied:,}   pending: {rep.pending}")
    for customer, (cents, orders) in sorted(rep.totals.items()):
        print(f"  {customer:<10} {orders:>6,} orders  {cents / 100:>12,.2f}")
    print(f"dead letters ({DEAD}): {len(rep.dead)}")
    for fields in rep.dead[:5]:
        print(
            f"  {fields['source_id']}  after {fields['deliveries']} deliveries  "
            f"{fields['error_type']}: {fields['error']}"
        )
    if len(rep.dead) > 5:
        print(f"  ... and {len(rep.dead) - 5} more")


async def demo(r: aioredis.Redis, db: Path, count: int, consumers: int, min_idle: float) -> Report:
    await r.delete(STREAM, DEAD)
    await asyncio.to_thread(db.unlink, missing_ok=True)
    open_db(db).close()
    workers = [consumer(r, f"worker-{i + 1}", db, min_idle) for i in range(consumers)]
    runs = [asyncio.create_task(w.run()) for w in workers]
    expected = await produce(r, count)
    print(f"produced {count:,} orders ({count // 97} malformed); {consumers} consumers")
    malformed = count // 97
    while True:  # until every order is applied or dead-lettered
        rep = await report(r, db)
        if rep.applied + len(rep.dead) >= count and rep.pending == 0:
            break
        await asyncio.sleep(0.1)
    for w in workers:
        await w.stop()
    await asyncio.gather(*runs)
    for w in workers:
        s = w.stats
        print(
            f"{w.name}: read {s.read}, acked {s.acked}, failed {s.failed}, "
            f"redelivered {s.redelivered}, dead-lettered {s.dead_lettered}"
        )
    print_report(rep)
    total = sum(cents for cents, _ in rep.totals.values())
    assert len(rep.dead) == malformed, (len(rep.dead), malformed)
    assert total == expected, (total, expected)
    print(f"totals check: {total / 100:,.2f} == {expected / 100:,.2f} produced (good orders)")
    return rep


async def main(argv: list[str] | None = None) -> Report | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "role", nargs="?", default="demo", choices=["demo", "produce", "consume", "report"]
    )
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"SQLite file ({DEFAULT_DB})")
    p.add_argument("--count", type=int, default=5000, help="orders to produce")
    p.add_argument("--consumers", type=int, default=3, help="consumers in the demo")
    p.add_argument("--name", default="worker-1", help="consumer name (consume)")
    p.add_argument("--min-idle", type=float, default=1.0, help="seconds before redelivery")
    args = p.parse_args(argv)
    r = aioredis.Redis.from_url(args.redis_url, decode_responses=True)
    try:
        if args.role == "demo":
            return await demo(r, args.db, args.count, args.consumers, args.min_idle)
        if args.role == "produce":
            await produce(r, args.count)
            print(f"produced {args.count:,} orders")
        elif args.role == "consume":
            open_db(args.db).close()
            c = consumer(r, args.name, args.db, args.min_idle)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, lambda: loop.create_task(c.stop()))
            print(f"{c.name}: consuming; Ctrl-C stops after acknowledging what it read")
            await c.run()
            print(c.stats)
        else:
            rep = await report(r, args.db)
            print_report(rep)
            return rep
        return None
    finally:
        await r.aclose()


if __name__ == "__main__":
    asyncio.run(main())
