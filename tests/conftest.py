"""Shared test harness.

Every async test runs once per loop flavour: the default asyncio loop, asyncio
with the eager task factory (Python 3.12+), and uvloop. Tests marked
``looptime`` run on virtual time, which the looptime plugin only provides for
loops derived from ``asyncio.BaseEventLoop``; they skip uvloop.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Callable, Mapping

import pytest

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _eager_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
    return loop


def _flavours() -> dict[str, LoopFactory]:
    flavours: dict[str, LoopFactory] = {"asyncio": asyncio.new_event_loop}
    if sys.version_info >= (3, 12):
        flavours["eager"] = _eager_loop
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a test dependency
        pass
    else:
        flavours["uvloop"] = uvloop.new_event_loop
    return flavours


FLAVOURS = _flavours()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, LoopFactory]:
    if item.get_closest_marker("looptime") is not None:
        return {name: f for name, f in FLAVOURS.items() if name != "uvloop"}
    return FLAVOURS


@pytest.fixture(autouse=True)
def _no_implicit_event_loop(request: pytest.FixtureRequest) -> None:
    # The looptime plugin asks the policy for the current loop before every
    # test; in a sync test on Python < 3.12 that creates a loop nobody closes,
    # whose ResourceWarning later fails an unrelated test. With the loop unset
    # the policy raises instead, which looptime takes as "not mine".
    if not inspect.iscoroutinefunction(request.function):
        asyncio.set_event_loop(None)
