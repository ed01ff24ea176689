"""StreamConsumer vs a hand-written XREADGROUP/XACK loop: entries/s end to end.

    python benchmarks/redis_streams.py                 # 1, 2, 4 processes; writes RESULTS.md
    python benchmarks/redis_streams.py --quick --no-write
    python benchmarks/redis_streams.py --profile asyncbatch   # cProfile of one consumer

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

Fair by construction: both use the same client (``redis.asyncio.Redis`` with
its defaults: bytes, redis-py's reply parser), the same batch size for the
work, the same work, one process per consumer, and each round runs both
systems back to back (their order alternating) on the same freshly filled
stream. The consumer's reader asks for up to its free room per
``XREADGROUP`` (``max_size * (max_concurrency + 1)``); the commands counted
on the server are the same for both (one ``XREADGROUP``, ``INCRBY`` and
``XACK`` per batch of B).

Reported: the median entries/s over the rounds, asyncbatch / hand-written
as the median of the ratios of each round (the two runs of a round are
seconds apart: on a shared machine this is the least noisy comparison),
entries/s per process, the consumer CPU per entry, and the CPU share used by
redis-server and by the consumer processes (CPU seconds / wall seconds, from
/proc): a server share near 1.00 means its single core is the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import platform
import pstats
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
OWN_ENTRIES = 100_000  # entries per run of the instant-client measurement


# -- the consumer processes -----------------------------------------------------


async def work(r: Any, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
    """The per-batch work both systems do: parse, aggregate, one write."""
    total = 0
    for _, fields in entries:
        total += int(fields[b"amount"])
    await r.incrby("bench:total", total)


async def hand_written(r: Any, name: str, batch: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        reply: Any = await r.xreadgroup(GROUP, name, {STREAM: ">"}, count=batch, block=100)
        if not reply:
            continue
        entries = reply[0][1]
        await work(r, entries)
        await r.xack(STREAM, GROUP, *(entry_id for entry_id, _ in entries))


async def with_asyncbatch(r: Any, name: str, batch: int, stop: asyncio.Event) -> None:
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


BODIES = {"hand-written": hand_written, "asyncbatch": with_asyncbatch}


def worker(system: str, port: int, name: str, batch: int) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        r = aioredis.Redis(port=port)
        await BODIES[system](r, name, batch, stop)
        await r.aclose()

    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    asyncio.run(main())


# -- the consumer's own cost: a client that answers at once ---------------------------


class InstantRedis:
    """Just enough of ``redis.asyncio.Redis`` for both systems, answering from memory.

    Replies have redis-py's shapes (already parsed, bytes), so what is left to
    measure is each system's own work per entry: no parsing, no network. Every
    command yields to the loop once, as a real round trip would.
    """

    def __init__(self, entries: int, batch: int, stop: asyncio.Event) -> None:
        self.entries, self.batch, self.stop = entries, batch, stop
        self.next = self.acked = self.total = 0

    def client(self) -> InstantRedis:
        return self

    async def xreadgroup(self, group: str, name: str, streams: Any, **kw: Any) -> Any:
        await asyncio.sleep(0)
        if next(iter(streams.values())) != ">":
            return [[STREAM.encode(), []]]
        if self.next >= self.entries:  # all read: block as asked (no CPU spent)
            await asyncio.sleep(kw.get("block", 0) / 1000)
            return []
        first, self.next = self.next, min(self.entries, self.next + kw["count"])
        return [
            [
                STREAM.encode(),
                [
                    (b"%d-0" % n, {b"n": b"%d" % n, b"amount": b"%d" % (n % 100), b"p": b"x" * 40})
                    for n in range(first, self.next)
                ],
            ]
        ]

    async def xack(self, stream: str, group: str, *ids: Any) -> int:
        await asyncio.sleep(0)
        self.acked += len(ids)
        if self.acked >= self.entries:
            self.stop.set()
        return len(ids)

    async def incrby(self, key: str, amount: int) -> int:
        await asyncio.sleep(0)
        self.total += amount
        return self.total

    async def xgroup_create(self, *args: Any, **kw: Any) -> bool:
        return True

    async def xinfo_groups(self, stream: str) -> list[dict[str, Any]]:
        return [{"name": GROUP.encode(), "last-delivered-id": b"0-0"}]

    async def client_id(self) -> int:
        return 1

    async def client_unblock(self, client_id: int) -> int:
        return 0

    async def xautoclaim(self, *args: Any, **kw: Any) -> list[Any]:
        return [b"0-0", [], []]

    async def xpending_range(self, *args: Any, **kw: Any) -> list[Any]:
        return []

    async def aclose(self) -> None:
        pass


def own_cost(system: str, entries: int, batch: int) -> float:
    """CPU seconds per entry of one consumer of ``system`` against :class:`InstantRedis`."""

    async def main() -> float:
        stop = asyncio.Event()
        r = InstantRedis(entries, batch, stop)
        cpu = time.process_time()
        await BODIES[system](r, "c0", batch, stop)
        cpu = time.process_time() - cpu
        assert r.total == sum(n % 100 for n in range(entries)), "the work was not done once"
        return cpu / entries

    return asyncio.run(main())


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
    commands: dict[str, int]  # calls of each command the consumers sent, as the server counted


@dataclass
class Cell:
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(run, attr) for run in self.runs))


def round_ratios(hw: Cell, ab: Cell) -> list[float]:
    """asyncbatch / hand-written entries/s of each round.

    A round runs each system twice, ABBA (hand-written, asyncbatch, asyncbatch,
    hand-written, or the reverse), so a load that drifts during the round
    weighs on both alike.
    """
    rates_hw = [run.entries_per_s for run in hw.runs]
    rates_ab = [run.entries_per_s for run in ab.runs]
    return [
        (rates_ab[i] + rates_ab[i + 1]) / (rates_hw[i] + rates_hw[i + 1])
        for i in range(0, len(rates_hw) - 1, 2)
    ]


def cells_of(cells: dict[tuple[str, int], Cell], system: str) -> list[Run]:
    return [run for (name, _), cell in cells.items() if name == system for run in cell.runs]


def round_trips(cell: Cell, entries: int) -> float:
    """Median ``XREADGROUP`` + ``XACK`` calls per 1,000 entries (the reads that came back
    empty at the end included)."""
    return float(
        statistics.median(
            (run.commands.get("xreadgroup", 0) + run.commands.get("xack", 0)) * 1000 / entries
            for run in cell.runs
        )
    )


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


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
        r.config_resetstat()
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
        commands = {
            name.removeprefix("cmdstat_"): int(stat["calls"])
            for name, stat in r.info("commandstats").items()
        }
        consumers_cpu = (sum(cpu_seconds(w.pid) for w in workers) - workers_cpu0) / wall
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.communicate(timeout=30)
    expected = sum(n % 100 for n in range(args.entries))
    assert int(r.get("bench:total")) == expected, "the work was not done exactly once"
    r.xgroup_destroy(STREAM, GROUP)
    return Run(
        args.entries / wall,
        server_cpu,
        consumers_cpu,
        consumers_cpu * wall / args.entries,
        commands,
    )


def render(
    cells: dict[tuple[str, int], Cell],
    own: dict[str, float],
    args: Any,
    seconds: float,
    command: str,
    loads: list[str],
) -> str:
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
        f"{args.batch}; each batch: parse, one `INCRBY`, acknowledge. {args.rounds} rounds, "
        "each running both systems twice in ABBA order (hand-written, asyncbatch, "
        "asyncbatch, hand-written, or the reverse); medians over the runs. Entries/s from "
        '"go" until every entry is read, processed and acknowledged. '
        "CPU share = CPU seconds / wall seconds (1.00 = one core busy). "
        f"Load average (1, 5, 15 min) {loads[0]} at the start, {loads[-1]} at the end: the "
        "machine is shared with other jobs, so absolute rates move from run to run; the "
        "ratio is taken within each round.",
        "",
        "| consumer processes | hand-written entries/s | asyncbatch entries/s | asyncbatch / "
        "hand-written (median of rounds; min-max) | asyncbatch per process | consumer CPU "
        "µs per entry (hw / ab) | redis-server CPU (hw / ab) | consumers' CPU (hw / ab) | "
        "XREADGROUP + XACK per 1,000 entries (hw / ab) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for procs in args.procs:
        hw, ab = cells["hand-written", procs], cells["asyncbatch", procs]
        rate_hw, rate_ab = hw.median("entries_per_s"), ab.median("entries_per_s")
        ratios = round_ratios(hw, ab)
        lines.append(
            f"| {procs} | {rate_hw:,.0f} | {rate_ab:,.0f} | "
            f"**{statistics.median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{rate_ab / procs:,.0f} | {hw.median('cpu_per_entry') * 1e6:.0f} / "
            f"{ab.median('cpu_per_entry') * 1e6:.0f} | {hw.median('server_cpu'):.2f} / "
            f"{ab.median('server_cpu'):.2f} | {hw.median('consumers_cpu'):.2f} / "
            f"{ab.median('consumers_cpu'):.2f} | {round_trips(hw, args.entries):.1f} / "
            f"{round_trips(ab, args.entries):.1f} |"
        )
    runs = [run for cell in cells.values() for run in cell.runs]
    server_max = max(run.server_cpu for run in runs)
    consumers_max = max(run.consumers_cpu for run in runs)
    # What one entry costs each side, in CPU seconds: where each would saturate.
    server_per_entry = statistics.median(run.server_cpu / run.entries_per_s for run in runs)
    consumer_per_entry = statistics.median(run.cpu_per_entry for run in runs)
    cores = os.cpu_count() or 1
    hw_per_entry = statistics.median(run.cpu_per_entry for run in cells_of(cells, "hand-written"))
    limit = (
        "the server's core is the limit"
        if server_max >= 0.8
        else "the server's core is far from the limit; the consumer processes are (redis-py "
        "parses each reply in Python, the same in both systems), and with more processes "
        "than free cores, the CPU the machine leaves them"
    )
    lines += [
        "",
        f"Where the limit is: redis-server used at most {server_max:.2f} of its core in any "
        f"run, and all consumer processes together at most {consumers_max:.2f} of the "
        f"machine's {cores} cores: {limit}. redis-server spends about "
        f"{server_per_entry * 1e6:.1f} µs of CPU per entry (read, pending list, ack, the "
        f"`INCRBY` share): its one core would saturate near {1 / server_per_entry:,.0f} "
        f"entries/s. A consumer process spends about {consumer_per_entry * 1e6:.0f} µs per "
        f"entry, most of it in redis-py: {cores} cores can feed at most about "
        f"{cores / consumer_per_entry:,.0f} entries/s, with nothing left for the server, "
        "this script or other jobs. So scaling stops at the cores of this machine, long "
        f"before the server's core: more than {cores} processes cannot add throughput here.",
        "",
        "Where a consumer's time goes: against a client that answers from memory (redis-py "
        "shapes, no parsing, no network; the best of 5 runs of "
        f"{OWN_ENTRIES:,} entries) the hand-written loop costs "
        f"{own['hand-written'] * 1e6:.1f} µs of CPU per entry and the StreamConsumer "
        f"{own['asyncbatch'] * 1e6:.1f} µs: its own work (a `StreamEntry`, a batcher future "
        "and its answer, holding, settling and acknowledging each entry, the batcher's "
        f"task per batch) adds {(own['asyncbatch'] - own['hand-written']) * 1e6:.1f} µs "
        f"per entry. The rest of the {hw_per_entry * 1e6:.0f} µs per entry measured above "
        "(hand-written, median) is redis-py, the same in "
        "both: reading and parsing each reply in Python, line by line.",
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


def profile(system: str, args: Any) -> None:
    """One consumer of ``system`` in this process, under cProfile, over ``--entries``."""
    with RedisServer() as server:
        r = redis.Redis(port=server.port, decode_responses=True)
        fill(r, args.entries)
        last_id = r.xinfo_stream(STREAM)["last-generated-id"]

        async def consume() -> None:
            stop = asyncio.Event()
            watcher = aioredis.Redis(port=server.port, decode_responses=True)

            async def watch() -> None:
                while True:
                    groups = await watcher.xinfo_groups(STREAM)
                    info = next(g for g in groups if g["name"] == GROUP)
                    if info["last-delivered-id"] == last_id and info["pending"] == 0:
                        stop.set()
                        return
                    await asyncio.sleep(0.05)

            watching = asyncio.create_task(watch())
            client = aioredis.Redis(port=server.port)
            await BODIES[system](client, "c0", args.batch, stop)
            await client.aclose()
            await watching
            await watcher.aclose()

        profiler = cProfile.Profile()
        cpu = time.process_time()
        profiler.enable()
        asyncio.run(consume())
        profiler.disable()
        cpu = time.process_time() - cpu
        r.close()
    print(f"{system}: {cpu / args.entries * 1e6:.1f} µs CPU per entry under cProfile")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--entries", type=int, default=60_000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--procs", default="1,2,4", help="consumer process counts (default 1,2,4)")
    p.add_argument("--quick", action="store_true", help="10,000 entries, 1 round")
    p.add_argument(
        "--profile",
        choices=SYSTEMS,
        help="run one consumer of this system in this process under cProfile and print "
        "the top functions (no RESULTS.md)",
    )
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
    if args.profile:
        profile(args.profile, args)
        return 0
    args.procs = [int(x) for x in args.procs.split(",")]
    command = "python benchmarks/redis_streams.py " + " ".join(argv or sys.argv[1:])

    started = time.perf_counter()
    loads = [load_average()]
    own = {
        system: min(own_cost(system, OWN_ENTRIES, args.batch) for _ in range(5))
        for system in SYSTEMS
    }
    print("own CPU per entry (instant client):", {k: f"{v * 1e6:.2f} µs" for k, v in own.items()})
    cells: dict[tuple[str, int], Cell] = {}
    with RedisServer() as server:
        assert server.proc is not None
        r = redis.Redis(port=server.port, decode_responses=True)
        for round_no in range(args.rounds):
            for procs in args.procs:
                ab = SYSTEMS if round_no % 2 == 0 else SYSTEMS[::-1]
                for system in (*ab, *ab[::-1]):
                    run = one_run(r, server.proc.pid, server.port, system, procs, args)
                    cells.setdefault((system, procs), Cell()).runs.append(run)
                    print(
                        f"round {round_no + 1}/{args.rounds} {system:>12} x{procs}: "
                        f"{run.entries_per_s:9,.0f} entries/s  server CPU {run.server_cpu:.2f}  "
                        f"consumers CPU {run.consumers_cpu:.2f}  "
                        f"{run.cpu_per_entry * 1e6:.0f} µs/entry  "
                        f"XREADGROUP {run.commands.get('xreadgroup', 0)} "
                        f"XACK {run.commands.get('xack', 0)}",
                        flush=True,
                    )
        r.close()
    loads.append(load_average())
    section = render(cells, own, args, time.perf_counter() - started, command.strip(), loads)
    print(section)
    if not args.no_write:
        write_section(args.out, section)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
