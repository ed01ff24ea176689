"""Outbound HTTP: one call per item, against the same calls through asyncbatch.

The workload: ``--callers`` (500) coroutines each write ``--calls / --callers``
items (10) one after the other, 5,000 logical calls in all, against the bulk
API of :mod:`asyncbatch.contrib.bulkapi` on 127.0.0.1 answering after
``--latency`` (2 ms) per call. Two systems run in the same process, interleaved
(unbatched, asyncbatch, asyncbatch, unbatched, ...), each on a fresh
``httpx.AsyncClient`` with the same connection pool (``--connections``, 100):

``unbatched``
    each logical call is its own request, ``PUT /v1/items/{id}``: the code a
    service writes without batching.
``asyncbatch``
    each logical call is ``await batcher.submit(item)``; the sink sends one
    ``POST /v1/items:batch`` per batch and maps the 207 answer back per item
    (``Batcher(max_size=100, max_concurrency=4)``, ``max_wait=0``: batches
    form from whatever is pending when a slot is free).

Reported per system (medians over ``--repeat`` runs): HTTP calls the server
received (its own counters), logical calls per second (5,000 / wall time),
and p50/p99 of the latency each caller saw for one logical call. Every run is
checked: every call answered without error, and the server stored each item
exactly once; a wrong run is reported and not counted.

Why the server runs in a subprocess: it stands for a remote service, and in
the client's process its request handling (HTTP parsing, routing, JSON) would
run on the client's event loop and in its GIL, and be billed to the client's
latencies; one call per item costs the server 5,000 request handlings per run
against ~50 for the batched system, so that would inflate the unbatched
numbers and flatter asyncbatch. As a separate process it has its own core
(the machine has two) and its own GIL, as a remote API would. It serves on
127.0.0.1 on a free port and is stopped at the end.

Usage (from the repository root)::

    .venv/bin/python benchmarks/http_bulk.py                      # ~1 min
    .venv/bin/python benchmarks/http_bulk.py --quick              # smoke test
    .venv/bin/python benchmarks/http_bulk.py --loop uvloop --repeat 5
    .venv/bin/python benchmarks/http_bulk.py --json benchmarks/out/http.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias

import _common
from _common import LoopName, Summary, environment, markdown_table, new_loop, now

_common.use_checkout()

import httpx  # noqa: E402

from asyncbatch import Batcher  # noqa: E402

SYSTEMS = ("unbatched", "asyncbatch")
NAIVE = "unbatched-naive"
JSON: TypeAlias = dict[str, Any]
Call: TypeAlias = Callable[[str, int], Awaitable[JSON]]

#: A run that takes longer than this is a hang, not a measurement.
RUN_TIMEOUT = 120.0


@dataclass(frozen=True)
class Config:
    callers: int
    calls: int
    latency: float
    connections: int
    max_size: int
    max_concurrency: int
    max_wait: float


@dataclass(frozen=True)
class Run:
    """One measured run of one system."""

    calls: int
    http_calls: int
    seconds: float
    p50: float
    p99: float

    @property
    def rate(self) -> float:
        """Logical calls per second."""
        return _common.ratio(self.calls, self.seconds)


# -- the server -----------------------------------------------------------------------


@contextmanager
def bulk_api_process(latency: float, uvloop: bool) -> Iterator[str]:
    """``python -m asyncbatch.contrib.bulkapi`` on 127.0.0.1:<free port>; yields its URL."""
    args = [sys.executable, "-m", "asyncbatch.contrib.bulkapi", "--latency", str(latency)]
    if uvloop:
        args.append("--uvloop")
    env = {**os.environ, "PYTHONPATH": str(_common.REPO_ROOT)}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the bulk API did not start (said {url!r})")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# -- the two systems ----------------------------------------------------------------------


async def _workload(config: Config, call: Call) -> list[float]:
    """``callers`` coroutines, ``calls / callers`` logical calls each; per-call latencies."""
    per_caller = config.calls // config.callers
    latencies: list[float] = []

    async def caller(c: int) -> None:
        for k in range(per_caller):
            item_id = f"c{c}-{k}"
            started = now()
            item = await call(item_id, k)
            latencies.append(now() - started)
            if item["id"] != item_id or item["version"] != 1:
                raise AssertionError(f"caller {c} got {item!r} for {item_id!r}")

    async with asyncio.timeout(RUN_TIMEOUT):
        await asyncio.gather(*(caller(c) for c in range(config.callers)))
    return latencies


async def run_unbatched(http: httpx.AsyncClient, config: Config) -> list[float]:
    # At most `connections` requests at once; the others queue on the semaphore,
    # not in httpx's pool, whose queue handling costs O(queued) per release
    # (encode/httpx#3215): 3-4x the throughput of the naive loop here.
    gate = asyncio.Semaphore(config.connections)

    async def put(item_id: str, qty: int) -> JSON:
        async with gate:
            return await _put(http, item_id, qty)

    return await _workload(config, put)


async def run_naive(http: httpx.AsyncClient, config: Config) -> list[float]:
    return await _workload(config, lambda item_id, qty: _put(http, item_id, qty))


async def _put(http: httpx.AsyncClient, item_id: str, qty: int) -> JSON:
    response = await http.put(f"/v1/items/{item_id}", json={"qty": qty})
    response.raise_for_status()
    item: JSON = response.json()["item"]
    return item


async def run_asyncbatch(http: httpx.AsyncClient, config: Config) -> list[float]:
    async def post_batch(items: list[tuple[str, int]]) -> list[JSON | Exception]:
        response = await http.post(
            "/v1/items:batch", json=[{"id": item_id, "qty": qty} for item_id, qty in items]
        )
        response.raise_for_status()
        return [
            entry["item"] if entry["status"] < 300 else ValueError(entry["error"])
            for entry in response.json()["results"]
        ]

    batcher: Batcher[tuple[str, int], JSON] = Batcher(
        post_batch,
        max_size=config.max_size,
        max_wait=config.max_wait,
        max_concurrency=config.max_concurrency,
        name="bench.http",
    )
    async with batcher:

        async def put(item_id: str, qty: int) -> JSON:
            return await batcher.submit((item_id, qty))

        return await _workload(config, put)


RUNNERS: dict[str, Callable[[httpx.AsyncClient, Config], Awaitable[list[float]]]] = {
    "unbatched": run_unbatched,
    "asyncbatch": run_asyncbatch,
    NAIVE: run_naive,
}


def measure(system: str, loop_name: LoopName, url: str, config: Config) -> Run:
    """One run: reset the server, run the workload on a fresh loop and client, check it."""
    with httpx.Client(base_url=url) as admin:
        admin.post("/_admin/reset").raise_for_status()

    async def main() -> tuple[float, list[float]]:
        limits = httpx.Limits(
            max_connections=config.connections, max_keepalive_connections=config.connections
        )
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as http:
            started = now()
            latencies = await RUNNERS[system](http, config)
            return now() - started, latencies

    loop = new_loop(loop_name)
    try:
        seconds, latencies = loop.run_until_complete(main())
    finally:
        loop.close()

    with httpx.Client(base_url=url) as admin:
        counters = admin.get("/_admin/counters").json()
    if counters["items_written"] != config.calls or len(latencies) != config.calls:
        raise AssertionError(
            f"{system}: the server stored {counters['items_written']} items "
            f"for {config.calls} calls"
        )
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return Run(
        calls=config.calls,
        http_calls=counters["batch_calls"] + counters["put_calls"],
        seconds=seconds,
        p50=statistics.median(latencies),
        p99=cuts[98],
    )


def bench_loop(
    loop_name: LoopName, url: str, config: Config, systems: tuple[str, ...], repeat: int
) -> dict[str, list[Run]]:
    """The systems on one loop flavour: a short warm-up each, then ``repeat`` runs interleaved."""
    runs: dict[str, list[Run]] = {s: [] for s in systems}
    warmup = dataclasses.replace(config, calls=config.callers)  # one call per caller
    for system in systems:  # imports, code paths, server state: not counted
        measure(system, loop_name, url, warmup)

    def run(system: str) -> float:
        result = measure(system, loop_name, url, config)
        runs[system].append(result)
        return result.seconds

    def failed(system: str, why: str) -> None:
        print(f"  {system}: run failed: {why}", file=sys.stderr)

    _common.interleaved(systems, repeat, run, warmup=0, on_failure=failed)
    return runs


# -- reporting ----------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def report(
    loop_name: LoopName, runs: dict[str, list[Run]], config: Config
) -> tuple[str, dict[str, Any]]:
    med: dict[str, dict[str, float]] = {}
    for system, rs in runs.items():
        med[system] = {
            "http_calls": Summary.of([r.http_calls for r in rs]).median,
            "rate": Summary.of([r.rate for r in rs]).median,
            "p50": Summary.of([r.p50 for r in rs]).median,
            "p99": Summary.of([r.p99 for r in rs]).median,
            "seconds": Summary.of([r.seconds for r in rs]).median,
            "runs": len(rs),
        }
    rows = [
        [
            system,
            f"{m['http_calls']:,.0f}",
            f"{m['rate']:,.0f}",
            _ms(m["p50"]),
            _ms(m["p99"]),
        ]
        for system, m in med.items()
    ]
    u, a = med["unbatched"], med["asyncbatch"]
    fewer = _common.ratio(u["http_calls"], a["http_calls"])
    faster = _common.ratio(a["rate"], u["rate"])
    p99 = _common.ratio(a["p99"], u["p99"])
    rows.append(
        ["asyncbatch vs unbatched", f"{fewer:.0f}x fewer", f"{faster:.1f}x", "", f"{p99:.2f}x"]
    )
    table = markdown_table(
        ["system", "HTTP calls", "logical calls/s", "p50 ms", "p99 ms"],
        rows,
        right=[False, True, True, True, True],
    )
    verdict = (
        f"targets: >= 10x fewer calls: {'met' if fewer >= 10 else 'MISSED'} ({fewer:.0f}x); "
        f">= 5x throughput: {'met' if faster >= 5 else 'MISSED'} ({faster:.1f}x); "
        f"p99 no worse: {'met' if p99 <= 1 else 'MISSED'} ({p99:.2f}x)"
    )
    title = (
        f"loop {loop_name}: {config.calls:,} calls from {config.callers} coroutines, "
        f"{config.latency * 1000:g} ms per call, pool of {config.connections} connections, "
        f"asyncbatch max_size={config.max_size} max_concurrency={config.max_concurrency}, "
        f"medians of {min(int(m['runs']) for m in med.values())} runs"
    )
    return f"{title}\n\n{table}\n\n{verdict}", {"medians": med, "fewer": fewer, "faster": faster}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=500)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--latency", type=float, default=0.002, help="server seconds per call")
    parser.add_argument("--connections", type=int, default=20, help="client pool size")
    parser.add_argument("--max-size", type=int, default=100)
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--max-wait", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loop", choices=["asyncio", "uvloop", "all"], default="all")
    parser.add_argument("--server-loop", choices=["asyncio", "uvloop"], default="uvloop")
    parser.add_argument(
        "--naive", action="store_true", help=f"also run {NAIVE} (no semaphore; slow)"
    )
    parser.add_argument("--quick", action="store_true", help="500 calls, 1 run")
    parser.add_argument("--json", help="write the raw runs here")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.callers, args.repeat = 500, 50, 1
    if args.calls % args.callers:
        parser.error("--calls must be a multiple of --callers")
    loops = _common.available_loops() if args.loop == "all" else (args.loop,)
    server_uvloop = args.server_loop == "uvloop" and "uvloop" in _common.available_loops()
    systems = (*SYSTEMS, NAIVE) if args.naive else SYSTEMS
    config = Config(
        callers=args.callers,
        calls=args.calls,
        latency=args.latency,
        connections=args.connections,
        max_size=args.max_size,
        max_concurrency=args.max_concurrency,
        max_wait=args.max_wait,
    )

    env = environment(loops)
    print(f"# {__doc__.splitlines()[0]}\n")
    print(f"{env['python']} on {env['platform']}, {env['cpus']} CPUs, {', '.join(env['loops'])}")
    print(f"load average before: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"server: separate process, {'uvloop' if server_uvloop else 'asyncio'}, h11\n")
    out: dict[str, Any] = {"environment": env, "config": config, "runs": {}}
    with bulk_api_process(config.latency, server_uvloop) as url:
        for loop_name in loops:
            runs = bench_loop(loop_name, url, config, systems, args.repeat)
            text, summary = report(loop_name, runs, config)
            print(text + "\n", flush=True)
            out["runs"][loop_name] = {"runs": runs, **summary}
    if args.json:
        _common.write_json(args.json, out)


if __name__ == "__main__":
    main()
