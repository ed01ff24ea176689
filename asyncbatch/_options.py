"""Checks of the Batcher's options, shared by the constructor and ``configure``.

Each raises ``TypeError`` for a wrong type and ``ValueError`` for a value out
of range, naming the option.
"""

from __future__ import annotations

import enum
import functools
import inspect
import math
from typing import Any

from ._concurrency import Adaptive


class _Unset(enum.Enum):
    """``configure``'s "not given" (``None`` means something for several options)."""

    UNSET = "unset"


def _linger(max_wait: float | None, interval: float | None) -> float | None:
    """The linger deadline in force: ``None`` (not given) is 0, or none with a heartbeat;
    ``math.inf`` is none."""
    if max_wait is None:
        return None if interval is not None else 0.0
    return None if math.isinf(max_wait) else max_wait


def _concurrency(value: object) -> tuple[Adaptive | None, float]:
    """``max_concurrency`` as (policy, limit now): an int, ``None``, ``Adaptive`` or "auto"."""
    if value is None:
        return None, math.inf
    if value == "auto":
        value = Adaptive()
    if isinstance(value, Adaptive):
        return value, value.limit
    if isinstance(value, str):
        raise TypeError(
            f"max_concurrency must be an int, None, Adaptive(...) or 'auto', got {value!r}"
        )
    _check_int("max_concurrency", value, 1)
    assert isinstance(value, int)
    return None, value


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _check_number(name: str, value: object, *, positive: bool, infinite: bool) -> None:
    """A real number in range; ``math.inf`` only where ``infinite`` (documented "no limit")."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if math.isnan(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    if not infinite and math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_sink(sink: object) -> bool:
    """Refuse, at construction, a sink that is plainly not async; say if it streams.

    A plain function or method (``def``, a lambda, or a partial of one) is
    refused: awaiting its answer would fail only after it ran, and ran again
    under ``retry``. Other callables cannot be told apart before they are
    called; a non-awaitable answer then fails its batch with ``TypeError``,
    never retried.
    """
    if not callable(sink):
        raise TypeError(f"sink must be an async function, got {sink!r}")
    fn: Any = sink
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = inspect.unwrap(fn)
    if inspect.isasyncgenfunction(fn) or inspect.isasyncgenfunction(type(fn).__call__):
        return True  # a streaming sink: callers use submit_stream()
    if (inspect.isfunction(fn) or inspect.ismethod(fn)) and not inspect.iscoroutinefunction(fn):
        raise TypeError(
            f"sink {_callable_name(sink)} is a plain function; a Batcher sink must be an "
            "async function (`async def sink(items): ...`): wrap it, e.g. "
            "`async def sink(items): return await to_awaitable(items)`, or run blocking "
            "code with `await asyncio.to_thread(fn, items)`"
        )
    return False


def _callable_name(fn: object) -> str:
    return repr(getattr(fn, "__qualname__", None) or fn)


def _checked_weight(batcher: object, weight: object, item: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise TypeError(
            f"weigh() of {batcher!r} returned {weight!r} for item {item!r}; "
            "a weight must be an int or float >= 0"
        )
    if not 0 <= weight < math.inf:
        raise ValueError(
            f"weigh() of {batcher!r} returned {weight!r} for item {item!r}; "
            "a weight must be a finite number >= 0"
        )
    return weight
