"""A throwaway ``redis-server`` on 127.0.0.1 for the Redis Streams tests and benchmark.

``make test`` installs the server when it is missing (``redis-server`` from the
system packages, see the Makefile). Here we only find it: without one, tests
are skipped on a developer machine and fail in CI (``CI=true``), never
silently skipped there.

Each server listens on a free port of 127.0.0.1 only, keeps its data in a
temporary directory and has persistence off (no snapshots, no append-only
file). :meth:`RedisServer.restart` saves once on purpose (``SHUTDOWN SAVE``)
and starts again on the same port from that snapshot: a restart that keeps
the data, as a production server with persistence would.

:class:`ReplyDropper` is a TCP proxy in front of a server that loses the reply
to a chosen command after the server ran it: a connection broken at the worst
moment, on purpose. It can also hold such a reply back for a while (a big
reply on a slow network, a client too busy to read it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

MIN_VERSION = (6, 2)


def redis_server_binary() -> str:
    """The ``redis-server`` to use: skip the test (fail it in CI) if there is none."""
    found = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    problem = None
    if found is None:
        problem = "redis-server is not installed (`make test` installs it with apt-get)"
    else:
        version = server_version(found)
        if version < MIN_VERSION:
            problem = f"{found} is Redis {version}, the tests need >= {MIN_VERSION}"
    if problem is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{problem}; in CI a missing server is a failure", pytrace=False)
        pytest.skip(problem)
    assert found is not None
    return found


def server_version(binary: str) -> tuple[int, int]:
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    # "Redis server v=7.0.15 sha=..."
    digits = out.split("v=", 1)[1].split()[0].split(".")
    return int(digits[0]), int(digits[1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """``redis-server`` on ``127.0.0.1:<free port>``; use as a context manager."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or redis_server_binary()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="asyncbatch-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",  # persistence off: no snapshots ...
            "appendonly": "no",  # ... and no append-only file
            "dir": str(self.dir),
            "dbfilename": "dump.rdb",
            "loglevel": "warning",
            "logfile": str(self.dir / "redis.log"),
        }
        self.proc = subprocess.Popen(
            [self.binary, *(arg for k, v in options.items() for arg in (f"--{k}", v))],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while self.command("PING") != "+PONG":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server did not start on {self.port}:\n{log}")
            time.sleep(0.02)

    def command(self, *args: str) -> str | None:
        """Send one inline command; the first reply line, or None if unreachable."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall((" ".join(args) + "\r\n").encode())
                return sock.recv(4096).split(b"\r\n", 1)[0].decode()
        except OSError:
            return None

    def restart(self, downtime: float = 0.0) -> None:
        """Save, stop, wait ``downtime`` seconds, start again on the same port and data."""
        assert self.proc is not None
        keys = self.command("DBSIZE")
        self.command("SHUTDOWN", "SAVE")
        self.proc.wait(timeout=30)
        time.sleep(downtime)
        self.start()
        # The point is a restart that keeps the data: check it did.
        after = self.command("DBSIZE")
        if keys is not None and after is not None and after != keys:
            log = (self.dir / "redis.log").read_text(errors="replace")
            raise RuntimeError(f"restart lost data: DBSIZE {keys} before, {after} after\n{log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a stuck server
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# command, parts of the request, reply predicate, delay (None: lose the reply)
_Rule = tuple[bytes, tuple[bytes, ...], Callable[[bytes], bool], float | None]


class ReplyDropper:
    """A TCP proxy on ``127.0.0.1:<port>`` in front of ``target_port`` that loses replies.

    :meth:`lose` arms it: the next reply the server sends on a connection
    whose last request contained ``command`` (and, if given, every byte
    string of ``also``), and for which ``reply(first_bytes)`` is true, is not
    forwarded: the proxy closes both sides instead. The server has run the
    command (its effects are there); the client sees its connection break
    with the answer lost. ``lost`` counts the replies dropped.

    :meth:`delay` holds such a reply back ``seconds`` instead, then forwards
    it (and what follows it on that connection).

    It looks at raw chunks, not parsed RESP: fine for one command at a time per
    connection, which is what the consumer's reader and claimer send.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.lost = 0
        self.delayed = 0
        self._rules: list[_Rule] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def lose(
        self,
        command: bytes,
        reply: Callable[[bytes], bool],
        also: tuple[bytes, ...] = (),
    ) -> None:
        """Lose the next reply to ``command`` (a request containing ``also``) matching ``reply``."""
        self._rules.append((command, also, reply, None))

    def delay(
        self,
        command: bytes,
        reply: Callable[[bytes], bool],
        seconds: float,
        also: tuple[bytes, ...] = (),
    ) -> None:
        """Hold back the next reply to ``command`` matching ``reply`` for ``seconds``."""
        self._rules.append((command, also, reply, seconds))

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        self._writers |= {client_w, server_w}
        armed: list[_Rule] = []

        def cut() -> None:
            for writer in (client_w, server_w):
                writer.close()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                armed[:] = [
                    rule
                    for rule in self._rules
                    if f"${len(rule[0])}\r\n".encode() + rule[0] in data.upper()
                    and all(part in data for part in rule[1])
                ]
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                for rule in armed:
                    if rule in self._rules and rule[2](data):
                        self._rules.remove(rule)
                        if rule[3] is not None:
                            self.delayed += 1
                            await asyncio.sleep(rule[3])
                            break
                        self.lost += 1
                        cut()
                        return
                armed.clear()
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut()
            for task in tasks:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
            self._writers -= {client_w, server_w}


def has_entries(reply: bytes) -> bool:
    """An ``XREADGROUP`` reply with at least one stream (RESP2 or RESP3), not a timeout."""
    return reply.startswith((b"*1", b"%1"))


def claimed_some(reply: bytes) -> bool:
    """An ``XAUTOCLAIM`` reply that claimed at least one entry (RESP2 or RESP3)."""
    parts = reply.split(b"\r\n")
    # *3, $<n>, <cursor>, *<claimed>, ...
    return len(parts) > 3 and parts[0] == b"*3" and parts[3] not in (b"*0", b"*-1")
