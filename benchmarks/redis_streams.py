"""StreamConsumer vs a hand-written XREADGROUP/XACK loop: entries/s end to end.

    python benchmarks/redis_streams.py                 # 1, 2, 4 processes; writes RESULTS.md
    python benchmarks/redis_streams.py --quick --no-write

Starts its own ``redis-server`` on 127.0.0.1 (a free port, persistence off;
see ``tests/redis_server.py``). For each number of consumer processes (1, 2,
4) and each system, in interleaved rounds:

1. the stream is filled with ``--entries`` entries and a fresh group created;
2. N consumer processes of the system start, connect, and wait for "go";
3. the clock runs from "go" until the group has delivered every entry and
   its pending list is empty (every entry read, processed and acknowledged),
   polled every 5 ms.

Both systems do the same work per batch of ``--batch`` entries: parse each
entry's ``amount`` and write the batch's sum with one ``INCRBY`` (a result
written per batch), then acknowledge the batch.

- *hand-written*: ``XREADGROUP COUNT B BLOCK 100`` -> work -> ``XACK``, one
  batch at a time: the loop every consumer-group tutorial shows.
- *asyncbatch*: ``StreamConsumer(max_size=B, max_concurrency=1)`` with the
  same work as its sink (acks, claim refresh, claiming, stats included).

Reported: the median entries/s over the rounds, asyncbatch / hand-written,
entries/s per process, and the CPU share used by redis-server and by the
consumer processes (CPU seconds / wall seconds, from /proc): a server share
near 1.00 means its single core is the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

from asyncbatch.contrib.redis import StreamConsumer, StreamEntry  # noqa: E402
from tests.redis_server import RedisServer, redis_server_binary, server_version  # noqa: E402

BEGIN = "<!-- redis_streams.py: begin -->"
END = "<!-- redis_streams.py: end -->"
STREAM, GROUP = "bench", "bench-group"
SYSTEMS = ("hand-written", "asyncbatch")


# -- the consumer processes -----------------------------------------------------


async def work(r: Any, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
    """The per-batch work both systems do: parse, aggregate, one write."""
    total = 0
    for _, fields in entries:
        total += int(fields[b"amount"])
    await r.incrby("bench:total", total)


async def hand_written(port: int, name: str, batch: int, stop: asyncio.Event) -> None:
    r = aioredis.Redis(port=port)
    while not stop.is_set():
        reply: Any = await r.xreadgroup(GROUP, name, {STREAM: ">"}, count=batch, block=100)
        if not reply:
            continue
        entries = reply[0][1]
        await work(r, entries)
        await r.xack(STREAM, GROUP, *(entry_id for entry_id, _ in entries))
    await r.aclose()


async def with_asyncbatch(port: int, name: str, batch: int, stop: asyncio.Event) -> None:
    r = aioredis.Redis(port=port)

    async def sink(entries: list[StreamEntry]) -> None:
        total = 0
        for entry in entries:
            total += int(entry.fields[b"amount"])
        await r.incrby("bench:total", total)

    consumer = StreamConsumer(
        r,
        stream=STREAM,
        group=GROUP,
        consumer=name,
        sink=sink,
        max_size=batch,
        max_concurrency=1,
        min_idle=30.0,
        block=0.1,
    )
    run = asyncio.create_task(consumer.run())
    await stop.wait()
    await consumer.stop()
    await run
    await r.aclose()


def worker(system: str, port: int, name: str, batch: int) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        body = hand_written if system == "hand-written" else with_asyncbatch
        await body(port, name, batch, stop)

    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    asyncio.run(main())


# -- the parent ----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    entries_per_s: float
    server_cpu: float
    consumers_cpu: float
    cpu_per_entry: float  # consumer CPU seconds per entry, all processes


@dataclass
class Cell:
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(run, attr) for run in self.runs))


def fill(r: Any, entries: int) -> None:
    r.delete(STREAM, "bench:total")
    for start in range(0, entries, 2000):
        pipe = r.pipeline(transaction=False)
        for n in range(start, min(entries, start + 2000)):
            pipe.xadd(STREAM, {"n": n, "amount": n % 100, "payload": "x" * 40})
        pipe.execute()
    r.xgroup_create(STREAM, GROUP, id="0")


def one_run(r: Any, server_pid: int, port: int, system: str, procs: int, args: Any) -> Run:
    fill(r, args.entries)
    last_id = r.xinfo_stream(STREAM)["last-generated-id"]
    workers = [
        subprocess.Popen(
            [
                *(sys.executable, __file__, "--worker", system, "--port", str(port)),
                *("--name", f"c{i}", "--batch", str(args.batch)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(procs)
    ]
    try:
        for w in workers:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "ready"
        server_cpu0 = cpu_seconds(server_pid)
        workers_cpu0 = sum(cpu_seconds(w.pid) for w in workers)  # imports and setup
        started = time.perf_counter()
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        while True:
            info = next(g for g in r.xinfo_groups(STREAM) if g["name"] == GROUP)
            if info["last-delivered-id"] == last_id and info["pending"] == 0:
                break
            if time.perf_counter() - started > 300:
                raise RuntimeError(f"{system} x{procs}: not done after 300 s: {info}")
            time.sleep(0.005)
        wall = time.perf_counter() - started
        server_cpu = (cpu_seconds(server_pid) - server_cpu0) / wall
        consumers_cpu = (sum(cpu_seconds(w.pid) for w in workers) - workers_cpu0) / wall
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.communicate(timeout=30)
    expected = sum(n % 100 for n in range(args.entries))
    assert int(r.get("bench:total")) == expected, "the work was not done exactly once"
    r.xgroup_destroy(STREAM, GROUP)
    return Run(args.entries / wall, server_cpu, consumers_cpu, consumers_cpu * wall / args.entries)


def render(cells: dict[tuple[str, int], Cell], args: Any, seconds: float, command: str) -> str:
    version = ".".join(map(str, server_version(redis_server_binary())))
    lines = [
        BEGIN,
        "## Redis Streams: StreamConsumer vs a hand-written XREADGROUP/XACK loop",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M:%S %z')} in "
        f"{seconds / 60:.1f} min. Do not edit by hand; rerun instead (compare.py keeps "
        "this section when it rewrites the file).",
        "",
        f"Machine: {os.cpu_count()} CPUs, CPython {platform.python_version()}, redis-server "
        f"{version}, redis-py {redis.__version__} (pure-Python reply parser: hiredis is not "
        f"installed), asyncio loop. {args.entries:,} entries of 3 fields per run, batches of "
        f"{args.batch}; each batch: parse, one `INCRBY`, acknowledge. Median of {args.rounds} "
        'interleaved rounds. Entries/s from "go" until every entry is read, processed '
        "and acknowledged. CPU share = CPU seconds / wall seconds (1.00 = one core busy).",
        "",
        "| consumer processes | hand-written entries/s | asyncbatch entries/s | asyncbatch / "
        "hand-written | asyncbatch per process | consumer CPU µs per entry (hw / ab) | "
        "redis-server CPU (hw / ab) | consumers' CPU (hw / ab) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for procs in args.procs:
        hw, ab = cells["hand-written", procs], cells["asyncbatch", procs]
        rate_hw, rate_ab = hw.median("entries_per_s"), ab.median("entries_per_s")
        lines.append(
            f"| {procs} | {rate_hw:,.0f} | {rate_ab:,.0f} | {rate_ab / rate_hw:.2f}x | "
            f"{rate_ab / procs:,.0f} | {hw.median('cpu_per_entry') * 1e6:.0f} / "
            f"{ab.median('cpu_per_entry') * 1e6:.0f} | {hw.median('server_cpu'):.2f} / "
            f"{ab.median('server_cpu'):.2f} | {hw.median('consumers_cpu'):.2f} / "
            f"{ab.median('consumers_cpu'):.2f} |"
        )
    runs = [run for cell in cells.values() for run in cell.runs]
    server_max = max(run.server_cpu for run in runs)
    consumers_max = max(run.consumers_cpu for run in runs)
    limit = (
        "the server's core is the limit"
        if server_max >= 0.8
        else "the server's core is not the limit; the consumer processes are (redis-py parses "
        "each reply in Python, the same in both systems) and so is the CPU the machine "
        "leaves them"
    )
    lines += [
        "",
        f"Where the limit is: redis-server used at most {server_max:.2f} of its core in any "
        f"run, and all consumer processes together at most {consumers_max:.2f} of the "
        f"machine's {os.cpu_count()} cores: {limit}. Compare rows within one run; the "
        "consumer CPU per entry is the least noisy column on a shared machine.",
        "",
        END,
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Put ``section`` in place of the previous one in ``path`` (or append it)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--entries", type=int, default=60_000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--procs", default="1,2,4", help="consumer process counts (default 1,2,4)")
    p.add_argument("--quick", action="store_true", help="10,000 entries, 1 round")
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.port, args.name, args.batch)
        return 0
    if args.quick:
        args.entries, args.rounds = 10_000, 1
    args.procs = [int(x) for x in args.procs.split(",")]
    command = "python benchmarks/redis_streams.py " + " ".join(argv or sys.argv[1:])

    started = time.perf_counter()
    cells: dict[tuple[str, int], Cell] = {}
    with RedisServer() as server:
        assert server.proc is not None
        r = redis.Redis(port=server.port, decode_responses=True)
        for round_no in range(args.rounds):
            for procs in args.procs:
                order = SYSTEMS if round_no % 2 == 0 else SYSTEMS[::-1]
                for system in order:
                    run = one_run(r, server.proc.pid, server.port, system, procs, args)
                    cells.setdefault((system, procs), Cell()).runs.append(run)
                    print(
                        f"round {round_no + 1}/{args.rounds} {system:>12} x{procs}: "
                        f"{run.entries_per_s:9,.0f} entries/s  server CPU {run.server_cpu:.2f}  "
                        f"consumers CPU {run.consumers_cpu:.2f}  "
                        f"{run.cpu_per_entry * 1e6:.0f} µs/entry",
                        flush=True,
                    )
        r.close()
    section = render(cells, args, time.perf_counter() - started, command.strip())
    print(section)
    if not args.no_write:
        write_section(args.out, section)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
