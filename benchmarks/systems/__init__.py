"""The systems ``benchmarks/compare.py`` puts side by side, one adapter each.

Every adapter turns one library into the same two callables, opened inside the
running event loop of one measured run and closed at its end:

- ``submit(x) -> Awaitable[int]``: hand one item to the library and wait for
  its own result (the sink's ``2 * x``);
- ``close() -> Awaitable[None]``: stop whatever the library left running.

Every library gets the same sink (a coroutine function ``list[int] ->
list[int]``), the same largest batch (:attr:`Settings.max_size`) and the
smallest linger it accepts, so that what differs is the library. What each
one is and how it is configured is in its :attr:`System.config` text, which
``RESULTS.md`` prints next to the numbers.

Layout: ``_floor`` (the hand-written floor and naive per-item calls),
``_asyncbatch`` (this project, two configurations), ``_dataloaders``
(aiodataloader and strawberry's ``DataLoader``), ``_ray_serve``
(``@serve.batch``), ``_batched`` (``batched.aio``), ``_async_batcher``
(``async-batcher``). The third-party libraries are imported when a system is
first opened, so a missing one is reported (:meth:`System.problem`) rather
than breaking the whole run.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata

__all__ = [
    "SYSTEMS",
    "Handle",
    "Opener",
    "Settings",
    "Sink",
    "Submit",
    "System",
    "by_key",
]

Sink = Callable[[list[int]], Awaitable[list[int]]]
"""The batch function every system calls: ``items -> [2 * x for x in items]``."""

Submit = Callable[[int], Awaitable[int]]


@dataclass(frozen=True)
class Settings:
    """What every system is configured with, for one workload."""

    #: Largest batch handed to the sink.
    max_size: int
    #: Sink calls the backend serves at once; used where a library has the knob.
    concurrency: int = 1


@dataclass(frozen=True)
class Handle:
    """One opened system: its ``submit`` and how to close it."""

    submit: Submit
    close: Callable[[], Awaitable[None]]


Opener = Callable[[Sink, Settings], Awaitable[Handle]]


@dataclass(frozen=True)
class System:
    """One contender: how to open it, and what to say about it."""

    #: Short id for ``--systems`` and JSON.
    key: str
    #: Name in tables and plot legends.
    label: str
    #: ``"module:function"`` of the opener, imported on first use.
    opener: str
    #: How it is configured (shown in RESULTS.md).
    config: str
    #: Distribution whose version is reported (None: part of this repository).
    distribution: str | None = None
    #: Module that must import for the system to run.
    requires: str | None = None
    #: A reference point rather than a library (drawn dashed in plots).
    reference: bool = False
    #: Workload name -> why this system does not take part in it.
    cannot: dict[str, str] = field(default_factory=dict)

    def problem(self) -> str | None:
        """Why this system cannot run here (not installed, ...), or None."""
        if self.requires is None:
            return None
        try:
            importlib.import_module(self.requires)
        except Exception as exc:  # ImportError, or a library failing at import
            return f"cannot import {self.requires}: {type(exc).__name__}: {exc}"
        return None

    def version(self) -> str:
        if self.distribution is None:
            return "this checkout"
        try:
            return metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            return "not installed"

    async def open(self, sink: Sink, settings: Settings) -> Handle:
        module_name, _, function = self.opener.partition(":")
        module = importlib.import_module(f"{__name__}.{module_name}")
        opener: Opener = getattr(module, function)
        return await opener(sink, settings)


_WORKLOAD_1_ONLY = "a reference point for workload 1 only"
_NAIVE_ALLOC = "no batching: with a no-op sink each call completes at once, nothing is pending"

SYSTEMS: tuple[System, ...] = (
    System(
        key="floor",
        label="floor",
        opener="_floor:open_floor",
        config="benchmarks/overhead.py `Floor`: one `loop.create_future()` per item, "
        "one sink task per batch (at `max_size` or `call_soon` at the end of the "
        "iteration), no limits, timers, stats or cancellation handling; `submit` "
        "returns the future itself",
        reference=True,
    ),
    System(
        key="floor-coro",
        label="floor behind async def",
        opener="_floor:open_floor_coro",
        config="benchmarks/overhead.py `CoroFloor`: the floor behind "
        "`async def submit(item, *, timeout=None)`, i.e. one coroutine frame per item on "
        "top of the floor: the least a `submit` that is a coroutine function (as "
        "`Batcher.submit` must be) can cost",
        reference=True,
        cannot=dict.fromkeys(
            ("low-load", "mid-load", "sweep"), "a reference point for workload 1 only"
        ),
    ),
    System(
        key="asyncbatch",
        label="asyncbatch",
        opener="_asyncbatch:open_tuned",
        config="`Batcher(sink, max_size=M, max_wait=0, max_concurrency=C)`: "
        "configured like the others (same M, end-of-iteration linger, C = the "
        "backend's capacity)",
    ),
    System(
        key="asyncbatch-defaults",
        label="asyncbatch (defaults)",
        opener="_asyncbatch:open_defaults",
        config="`Batcher(sink)`: every option at its default "
        "(max_size=128, max_wait=0, max_concurrency=1)",
    ),
    System(
        key="asyncbatch-nowait",
        label="asyncbatch submit_nowait",
        opener="_asyncbatch:open_nowait",
        config="the `asyncbatch` configuration, called through `submit_nowait(x)`, which "
        "returns the item's future (no coroutine per item), as a DataLoader's `load` does",
        cannot=dict.fromkeys(("low-load", "mid-load", "sweep"), _WORKLOAD_1_ONLY),
    ),
    System(
        key="aiodataloader",
        label="aiodataloader",
        opener="_dataloaders:open_aiodataloader",
        config="`DataLoader(sink, max_batch_size=M, cache=False)`; `submit = loader.load` "
        "(returns a future); batches dispatched at the end of the iteration, "
        "no concurrency limit",
        distribution="aiodataloader",
        requires="aiodataloader",
    ),
    System(
        key="strawberry",
        label="strawberry DataLoader",
        opener="_dataloaders:open_strawberry",
        config="`strawberry.dataloader.DataLoader(sink, max_batch_size=M, cache=False)`; "
        "`submit = loader.load`; end-of-iteration dispatch, no concurrency limit",
        distribution="strawberry-graphql",
        requires="strawberry.dataloader",
    ),
    System(
        key="ray-serve",
        label="Ray Serve @serve.batch",
        opener="_ray_serve:open_ray_serve",
        config="`@serve.batch(max_batch_size=M, batch_wait_timeout_s=0, "
        "max_concurrent_batches=C)` on a plain async function, no cluster; its "
        "construction-time check of the replica's `max_ongoing_requests` is "
        "switched off (there is no replica), the batching code runs unmodified",
        distribution="ray",
        requires="ray.serve.batching",
    ),
    System(
        key="batched",
        label="batched",
        opener="_batched:open_batched",
        config="`batched.aio.AsyncBatchProcessor(sink, batch_size=M, timeout_ms=0)`: "
        "one background task polls an `asyncio.Queue` (with timeout 0 it polls every "
        "iteration) and runs one sink call at a time",
        distribution="batched",
        requires="batched.aio",
    ),
    System(
        key="async-batcher",
        label="async-batcher",
        opener="_async_batcher:open_async_batcher",
        config="`AsyncBatcher` subclass, `max_batch_size=M, max_queue_time=0, "
        "concurrency=C`: a background task fills batches from an `asyncio.Queue`",
        distribution="async-batcher",
        requires="async_batcher.batcher",
    ),
    System(
        key="naive",
        label="naive (no batching)",
        opener="_floor:open_naive",
        config="`await sink([x])` per item: one sink call per item, no batching",
        reference=True,
        cannot={"alloc": _NAIVE_ALLOC},
    ),
)


def by_key(keys: str) -> list[System]:
    """The systems named in a comma-separated list (``all``: every one), in table order."""
    if keys == "all":
        return list(SYSTEMS)
    wanted = {k.strip() for k in keys.split(",") if k.strip()}
    unknown = wanted - {s.key for s in SYSTEMS}
    if unknown:
        known = ", ".join(s.key for s in SYSTEMS)
        raise ValueError(f"unknown system(s) {sorted(unknown)}; known: {known}")
    if "floor" not in wanted:
        wanted.add("floor")  # every cost is reported against it
    return [s for s in SYSTEMS if s.key in wanted]
