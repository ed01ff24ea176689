"""Shared test fixtures: a recording sink and leak checks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, overload


class RecordingSink:
    """Records every batch; answers ``answer(items)`` after ``delay`` seconds."""

    __qualname__ = "RecordingSink"

    def __init__(
        self,
        answer: Callable[[list[Any]], Any] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.batches: list[list[Any]] = []
        self.times: list[float] = []
        self.answer = answer if answer is not None else (lambda items: [x * 10 for x in items])
        self.delay = delay
        self.active = 0
        self.max_active = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self, items: list[Any]) -> Any:
        self.batches.append(list(items))
        self.times.append(asyncio.get_running_loop().time())
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            return self.answer(items)
        finally:
            self.active -= 1

    @property
    def items(self) -> list[Any]:
        return [x for batch in self.batches for x in batch]


def live_timers(loop: asyncio.AbstractEventLoop) -> list[asyncio.TimerHandle]:
    """Timer handles still armed on an asyncio (not uvloop) loop."""
    scheduled: Sequence[asyncio.TimerHandle] = getattr(loop, "_scheduled", [])
    return [h for h in scheduled if not h.cancelled()]


def other_tasks() -> set[asyncio.Task[Any]]:
    current = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not current}


async def settle(n: int = 5) -> None:
    """Let ready callbacks run for a few loop iterations."""
    for _ in range(n):
        await asyncio.sleep(0)


class Rows(Sequence[object]):
    """A ``collections.abc.Sequence`` answer that is neither a list nor a tuple."""

    def __init__(self, values: list[object]) -> None:
        self._values = values

    def __len__(self) -> int:
        return len(self._values)

    @overload
    def __getitem__(self, index: int) -> object: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[object]: ...

    def __getitem__(self, index: int | slice) -> object:
        return self._values[index]
