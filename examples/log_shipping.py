"""Fire-and-forget log shipping with a bounded buffer.

Producers hand each record to the batcher with ``put_nowait`` and carry on
without awaiting; a collector receives the records in batches (one network
round trip per batch). The pieces that make this safe:

- ``max_size`` + ``max_wait``: a batch leaves when it holds 200 records or when
  its first record has waited 50 ms, whichever comes first.
- ``max_pending`` + ``overflow="drop_oldest"``: at most that many records wait
  in memory. When the collector falls behind, the *oldest* buffered record is
  dropped (counted in ``stats.dropped``, and the ``asyncbatch`` logger says so
  at most once a second) instead of blocking producers or letting memory grow
  without bound.
- ``put_nowait`` makes no future per record, so there is nothing to retrieve and
  nothing asyncio could report as "never retrieved". Outcomes are counted in
  ``stats``; ``on_batch`` gets each batch's ``failed_items`` (the records the
  collector refused, with their errors): skip and report.
- ``await batcher.aclose()`` at shutdown stops intake and ships everything still
  buffered, so nothing accepted is lost.

Run it: ``python examples/log_shipping.py``
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from asyncbatch import Batcher, BatchReport

log = logging.getLogger("log_shipping")

#: The collector refuses records larger than this (a per-record failure).
MAX_RECORD_BYTES = 1_000


@dataclass(frozen=True, slots=True)
class LogRecord:
    source: str
    seq: int
    level: str
    message: str


class Collector:
    """Stands in for a log collector's bulk endpoint."""

    def __init__(self, latency: float = 0.02) -> None:
        self.latency = latency
        self.received: list[LogRecord] = []
        self.batches = 0

    async def ship(self, records: list[LogRecord]) -> list[Exception | None]:
        await asyncio.sleep(self.latency)  # one network round trip per batch
        self.batches += 1
        # One entry per record: None for stored, an exception for refused.
        # Only the refused record's future fails; the rest of the batch is fine.
        verdicts: list[Exception | None] = []
        for record in records:
            if len(record.message) > MAX_RECORD_BYTES:
                verdicts.append(ValueError(f"record {record.seq} of {record.source} too large"))
            else:
                self.received.append(record)
                verdicts.append(None)
        return verdicts


class Refusals:
    """``on_batch``: the skip-and-report list of every batch, once per batch."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, report: BatchReport) -> None:
        for record, error in report.failed_items:
            self.count += 1
            log.warning("log record %s/%d not shipped: %s", record.source, record.seq, error)


async def produce(batcher: Batcher[LogRecord, None], source: str, count: int) -> None:
    """An application task that logs as it works and never waits for shipping."""
    for seq in range(count):
        message = f"{source} handled request {seq}"
        if seq % 500 == 499:
            message += " " + "x" * MAX_RECORD_BYTES  # now and then, an oversized record
        batcher.put_nowait(LogRecord(source, seq, "INFO", message))
        if seq % 50 == 49:
            await asyncio.sleep(0.001)  # the application's own work


@dataclass(frozen=True, slots=True)
class ShippingReport:
    produced: int
    shipped: int
    batches: int
    refused: int
    dropped: int
    peak_pending: int

    @property
    def lost(self) -> int:
        """Records neither shipped nor reported as refused or dropped."""
        return self.produced - self.shipped - self.refused - self.dropped


async def main(
    producers: int = 4,
    records_per_producer: int = 1_000,
    max_pending: int = 10_000,
    latency: float = 0.02,
) -> ShippingReport:
    collector = Collector(latency)
    refusals = Refusals()
    batcher: Batcher[LogRecord, None] = Batcher(
        collector.ship,
        max_size=200,
        max_wait=0.05,
        max_concurrency=2,
        max_pending=max_pending,
        overflow="drop_oldest",
        on_batch=refusals,
        name="log-shipper",
    )
    try:
        async with asyncio.TaskGroup() as tg:
            for p in range(producers):
                tg.create_task(produce(batcher, f"worker-{p}", records_per_producer))
    finally:
        # Shutdown: no new records; everything buffered is shipped before we go on.
        await batcher.aclose()

    report = ShippingReport(
        produced=producers * records_per_producer,
        shipped=len(collector.received),
        batches=collector.batches,
        refused=refusals.count,
        dropped=batcher.stats.dropped,
        peak_pending=batcher.stats.peak_pending,
    )
    print(
        f"produced {report.produced:,} records; shipped {report.shipped:,}"
        f" in {report.batches:,} batches; refused by the collector {report.refused:,};"
        f" dropped by the full buffer {report.dropped:,}; lost {report.lost:,}\n"
        f"at most {report.peak_pending:,} records were buffered (max_pending={max_pending:,})"
    )
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(main())
