"""Token streaming over HTTP: one batched decoder, many clients, server-sent events.

A language model decodes many prompts at once for about the price of one: a
step (one token for every prompt of the batch) costs ``a + b*n`` seconds for
``n`` prompts, with ``a`` (the fixed cost of a step: reading the weights) much
larger than ``b`` (the cost per prompt). Each client still wants *its own*
tokens, as they come. Here the decoder is simulated (:class:`Decoder`, an
async generator sink) and served by a Starlette app as server-sent events:

- ``POST /generate`` with ``{"prompt": "..."}`` streams the prompt's tokens
  through one :class:`~asyncbatch.Batcher` of the decoder: concurrent
  prompts share its steps (``batcher.submit_stream(prompt)``);
- ``POST /generate/unbatched`` streams them from one decoder call per
  client: the baseline.

The simulated model runs on one device: its steps never overlap (a lock), so
the unbatched route pays ``a + b`` per token per client, one client after
another, while the batched one pays ``a + b*n`` for a token of each of ``n``
clients. A prompt's completion is its words, upper-cased, one per step, then
:data:`asyncbatch.END` (the prompt ``"hello brave world"`` streams ``HELLO``,
``BRAVE``, ``WORLD``).

Events on the wire: ``data: "<token>"`` (JSON) per token, then ``event: end``,
or ``event: error`` with the message if that stream failed. A client that
disconnects stops its stream: the batcher drops its later tokens, the other
clients of the batch carry on, and once every client of a batch has left, the
decoder's generator is closed after the step in progress.

As in ``examples/web_service.py``, the batcher is made in the app's lifespan
(one per app, in the server's loop) and closed, drained, at shutdown.

Run it (needs the ``http`` extra)::

    python examples/token_streaming.py                 # 32 clients, 16 tokens each
    python examples/token_streaming.py --clients 64 --tokens 8

It serves on 127.0.0.1 on a free port, runs the clients over real HTTP
(httpx) against both routes, and prints time to first token (p50, p99) and
tokens/s for each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from asyncbatch import END, Batcher

Mode = Literal["batched", "unbatched"]
MODES: tuple[Mode, ...] = ("batched", "unbatched")


def completion(prompt: str) -> list[str]:
    """The tokens the simulated model answers ``prompt`` with, in order."""
    return [word.upper() for word in prompt.split()]


@dataclass
class Decoder:
    """A simulated batched decoder on one device.

    :meth:`generate` is an async generator sink: each step costs
    ``fixed + per_prompt * n`` seconds for the ``n`` prompts still generating
    and yields one entry per prompt of the call (a token, or ``END`` once that
    prompt's completion is done). Steps of concurrent calls take turns on the
    device (a lock): a device computes one step at a time.

    ``calls`` holds the prompts of each call; ``completed`` and ``abandoned``
    count the calls that ran to their end and the ones closed early (every
    client left), so the tests can tell them apart.
    """

    fixed: float = 0.02  # a: seconds per step, whatever the batch
    per_prompt: float = 0.001  # b: seconds per prompt in the step
    calls: list[list[str]] = field(default_factory=list)
    steps: int = 0
    completed: int = 0
    abandoned: int = 0
    _device: asyncio.Lock | None = field(default=None, repr=False)

    def step_cost(self, n: int) -> float:
        """Seconds of one step for ``n`` prompts."""
        return self.fixed + self.per_prompt * n

    async def generate(self, prompts: list[str]) -> AsyncGenerator[list[Any], None]:
        """One token per prompt per step; ``END`` for a prompt whose completion is done."""
        self.calls.append(list(prompts))
        if self._device is None:
            self._device = asyncio.Lock()  # made in the running loop
        tokens = [completion(p) for p in prompts]
        try:
            for k in range(max(map(len, tokens), default=0)):
                open_now = sum(1 for t in tokens if k < len(t))
                async with self._device:
                    await asyncio.sleep(self.step_cost(open_now))
                self.steps += 1
                yield [t[k] if k < len(t) else END for t in tokens]
        except GeneratorExit:
            self.abandoned += 1
            raise
        self.completed += 1


# -- the app ----------------------------------------------------------------------------


def sse(data: str, event: str | None = None) -> str:
    """One server-sent event (``data`` on one line)."""
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {data}\n\n"


class EventStream(StreamingResponse):
    """``text/event-stream`` from an async generator that is closed with the response.

    Starlette stops iterating a streaming body when the client disconnects
    but leaves the generator to the garbage collector; closing it here ends
    the client's batcher stream at once (its later tokens are dropped).
    """

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )
        self._events = events

    async def stream_response(self, send: Any) -> None:
        async with contextlib.aclosing(self._events):
            await super().stream_response(send)


async def events_of(tokens: AsyncIterator[str]) -> AsyncGenerator[str, None]:
    """The tokens as server-sent events; ``end`` or ``error`` last."""
    # submit_stream() is typed as an AsyncIterator, which aclosing() does not take.
    async with contextlib.aclosing(tokens):  # type: ignore[type-var]
        try:
            async for token in tokens:
                yield sse(json.dumps(token))
        except Exception as exc:  # this stream failed: tell the client, keep serving
            yield sse(json.dumps(f"{type(exc).__name__}: {exc}"), event="error")
            return
    yield sse("", event="end")


async def prompt_of(request: Request) -> str:
    body = await request.json()
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(prompt, str):
        raise ValueError('expected {"prompt": "..."}')
    return prompt


async def generate(request: Request) -> EventStream:
    """The prompt's tokens through the app's batcher: one decoder step serves many clients."""
    batcher: Batcher[str, str] = request.app.state.batcher
    prompt = await prompt_of(request)
    return EventStream(events_of(batcher.submit_stream(prompt)))


async def generate_unbatched(request: Request) -> EventStream:
    """The baseline: one decoder call for this client alone."""
    decoder: Decoder = request.app.state.decoder
    prompt = await prompt_of(request)

    async def tokens() -> AsyncGenerator[str, None]:
        async with contextlib.aclosing(decoder.generate([prompt])) as steps:
            async for (token,) in steps:
                if token is END:
                    return
                yield token

    return EventStream(events_of(tokens()))


ROUTES = [
    Route("/generate", generate, methods=["POST"]),
    Route("/generate/unbatched", generate_unbatched, methods=["POST"]),
]


def create_app(
    decoder: Decoder | None = None,
    *,
    max_size: int = 64,
    max_wait: float = 0.005,
    max_concurrency: int = 2,
) -> Starlette:
    """The service: ``ROUTES`` and a lifespan that owns the batcher of ``decoder``.

    ``max_size`` prompts per decoder call at most; the first prompt waits up
    to ``max_wait`` seconds for companions; up to ``max_concurrency`` decoder
    calls at once (their steps still take turns on the device: a second call
    lets newcomers start before the first call's longest completion ends).
    ``app.state.decoder`` is the decoder, ``app.state.batcher`` the running
    batcher (a fresh one at each startup).
    """
    decoder = Decoder() if decoder is None else decoder

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Made here, in the server's loop; closed (drained) at shutdown.
        async with Batcher[str, str](
            decoder.generate,  # an async generator function: a streaming sink
            max_size=max_size,
            max_wait=max_wait,
            max_concurrency=max_concurrency,
            name="decoder",
        ) as batcher:
            app.state.batcher = batcher
            yield

    app = Starlette(routes=list(ROUTES), lifespan=lifespan)
    app.state.decoder = decoder
    return app


def listening_socket(port: int = 0) -> socket.socket:
    """A socket bound to 127.0.0.1 (port 0: a free port chosen by the OS)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@contextlib.asynccontextmanager
async def running_server(asgi_app: Starlette) -> AsyncIterator[str]:
    """Serve ``asgi_app`` with uvicorn on 127.0.0.1 in this event loop; yields its URL.

    Leaving the block shuts the server down: it finishes the responses in
    progress, then runs the lifespan's shutdown (which closes the batcher).
    """
    sock = listening_socket()
    host, port = sock.getsockname()
    server = uvicorn.Server(uvicorn.Config(asgi_app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # startup failed: raise why
            await asyncio.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


# -- the clients ------------------------------------------------------------------------


async def read_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """``(event, data)`` pairs of a server-sent event stream (event ``message`` by default)."""
    event, data = "message", ""
    async for line in response.aiter_lines():
        if line == "":
            yield event, data
            event, data = "message", ""
        elif line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            data = line[len("data: ") :]


@dataclass
class Received:
    """What one client got: its tokens, how it ended, when its first token came."""

    tokens: list[str]
    ended: str  # "end", "error: <message>" or "left" (the client stopped reading)
    first_token: float | None  # seconds from the request to the first token


async def stream_tokens(
    client: httpx.AsyncClient,
    prompt: str,
    *,
    mode: Mode = "batched",
    stop_after: int | None = None,
) -> Received:
    """Stream ``prompt``'s completion; with ``stop_after``, disconnect after that many tokens."""
    path = "/generate" if mode == "batched" else "/generate/unbatched"
    tokens: list[str] = []
    first: float | None = None
    start = time.perf_counter()
    async with client.stream("POST", path, json={"prompt": prompt}) as response:
        response.raise_for_status()
        async for event, data in read_events(response):
            if event == "end":
                return Received(tokens, "end", first)
            if event == "error":
                return Received(tokens, f"error: {json.loads(data)}", first)
            if first is None:
                first = time.perf_counter() - start
            tokens.append(json.loads(data))
            if stop_after is not None and len(tokens) >= stop_after:
                return Received(tokens, "left", first)  # leaving the block disconnects
    return Received(tokens, "cut", first)  # the server closed without an end event


@dataclass(frozen=True)
class Figures:
    """One route's run: ``clients`` streams of ``tokens`` tokens each, all at once."""

    mode: Mode
    clients: int
    tokens: int  # tokens received, all clients
    seconds: float  # from the first request to the last stream's end
    ttft_p50: float  # seconds: time to first token, median over clients
    ttft_p99: float
    tokens_per_s: float
    decoder_calls: int
    decoder_steps: int


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank above) of ``values``."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, -(-len(ordered) * q // 100) - 1))
    return ordered[int(rank)]


async def run_clients(url: str, decoder: Decoder, mode: Mode, clients: int, tokens: int) -> Figures:
    """``clients`` concurrent streams of ``tokens`` tokens each against one route."""
    prompts = [" ".join(f"c{i}t{k}" for k in range(tokens)) for i in range(clients)]
    calls, steps = len(decoder.calls), decoder.steps
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_tokens(client, p, mode=mode) for p in prompts))
        seconds = time.perf_counter() - start
    for prompt, got in zip(prompts, results, strict=True):
        if (got.ended, got.tokens) != ("end", completion(prompt)):
            raise AssertionError(f"{mode}: {prompt!r} got {got}")
    ttft = [r.first_token for r in results if r.first_token is not None]
    received = sum(len(r.tokens) for r in results)
    return Figures(
        mode=mode,
        clients=clients,
        tokens=received,
        seconds=seconds,
        ttft_p50=statistics.median(ttft) if ttft else float("nan"),
        ttft_p99=percentile(ttft, 99) if ttft else float("nan"),
        tokens_per_s=received / seconds if seconds > 0 else float("nan"),
        decoder_calls=len(decoder.calls) - calls,
        decoder_steps=decoder.steps - steps,
    )


@dataclass(frozen=True)
class Report:
    """Both routes' figures from one run, and the decoder's cost model."""

    fixed: float
    per_prompt: float
    rows: tuple[Figures, ...]

    def of(self, mode: Mode) -> Figures:
        return next(row for row in self.rows if row.mode == mode)

    def table(self) -> str:
        lines = [
            f"decoder step: {self.fixed * 1000:g} ms + {self.per_prompt * 1000:g} ms per prompt",
            f"{'route':<10} {'clients':>7} {'tokens':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'tokens/s':>9} {'calls':>6} {'steps':>6}",
        ]
        for r in self.rows:
            lines.append(
                f"{r.mode:<10} {r.clients:>7} {r.tokens:>7} {r.ttft_p50 * 1000:>7.1f}ms "
                f"{r.ttft_p99 * 1000:>7.1f}ms {r.tokens_per_s:>9.1f} {r.decoder_calls:>6} "
                f"{r.decoder_steps:>6}"
            )
        batched, alone = self.of("batched"), self.of("unbatched")
        lines.append(
            f"batched: {batched.tokens_per_s / alone.tokens_per_s:.1f}x the tokens/s, "
            f"TTFT p50 {alone.ttft_p50 / batched.ttft_p50:.1f}x lower"
        )
        return "\n".join(lines)


async def run(
    clients: int = 32, tokens: int = 16, fixed: float = 0.02, per_prompt: float = 0.001
) -> Report:
    """Serve the app on 127.0.0.1, run ``clients`` clients against each route, report."""
    decoder = Decoder(fixed=fixed, per_prompt=per_prompt)
    app = create_app(decoder)
    async with running_server(app) as url:
        rows = tuple([await run_clients(url, decoder, mode, clients, tokens) for mode in MODES])
    return Report(fixed, per_prompt, rows)


def main(argv: Sequence[str] | None = None) -> Report:
    """Parse the arguments, run both routes, print the table; returns the report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (32)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per client (16)")
    parser.add_argument("--a", type=float, default=0.02, help="seconds per step (0.02)")
    parser.add_argument("--b", type=float, default=0.001, help="seconds per prompt (0.001)")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args.clients, args.tokens, args.a, args.b))
    print(report.table())
    return report


if __name__ == "__main__":
    main()
