"""Mapping a sink's answer back onto the items of its batch.

The one rule, per answer type:

- ``Sequence`` (not ``str``/``bytes``): exactly one entry per item, in order;
- ``Mapping``: looked up by ``key(item)``, or by the item when there is no
  ``key``; a missing key fails only that item;
- ``None``: every item resolves to ``None`` (write-only sinks);
- an entry that is an ``Exception`` instance fails only its item.

Anything else (wrong length, wrong type, unhashable lookups) raises
:class:`ResultMismatch`, which the dispatcher hands to every item of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from ._exceptions import ResultMismatch

__all__ = ["answer_values", "describe"]

_MISSING: Any = object()
_SAMPLE = 3


def describe(values: Sequence[object], limit: int = _SAMPLE) -> str:
    """A short, bounded rendering of a few values for error messages."""
    shown = ", ".join(repr(v)[:60] for v in values[:limit])
    more = len(values) - limit
    return f"[{shown}, ... {more} more]" if more > 0 else f"[{shown}]"


def answer_values(
    sink_name: str,
    result: object,
    items: list[Any],
    key: Callable[[Any], Hashable] | None,
) -> Sequence[Any]:
    """Per-item values (results or ``Exception`` instances), aligned with ``items``.

    Raises:
        ResultMismatch: the answer as a whole does not fit the batch.
    """
    n = len(items)
    if result is None:
        return [None] * n
    if isinstance(result, Sequence) and not isinstance(result, str | bytes | bytearray):
        if type(result) is not list and type(result) is not tuple:
            # Take what iterating it gives: a Sequence whose len() and items
            # disagree must not leave callers without an answer.
            result = list(result)
        if len(result) != n:
            raise ResultMismatch(
                f"sink {sink_name!r} returned {len(result)} results for a batch of "
                f"{n} items; a sequence answer must have exactly one entry per item, "
                f"in order (items: {describe(items)}, results: {describe(result)})"
            )
        return result
    if isinstance(result, Mapping):
        return _from_mapping(sink_name, result, items, key)
    raise ResultMismatch(
        f"sink {sink_name!r} returned {type(result).__name__} for a batch of {n} items; "
        "expected a sequence with one result per item, a mapping keyed by item key, "
        "or None"
    )


def _from_mapping(
    sink_name: str,
    result: Mapping[Any, Any],
    items: list[Any],
    key: Callable[[Any], Hashable] | None,
) -> list[Any]:
    keys = items if key is None else [key(item) for item in items]
    get = result.get
    try:
        values = [get(k, _MISSING) for k in keys]
    except TypeError as exc:
        raise ResultMismatch(
            f"sink {sink_name!r} returned a mapping, but the batch's items cannot be "
            f"looked up in it ({exc}); pass key= to map items to hashable keys"
        ) from exc
    # Identity, not ``in``: results may define ``__eq__`` oddly (arrays).
    if any(v is _MISSING for v in values):
        missing = [k for k, v in zip(keys, values, strict=True) if v is _MISSING]
        for i, v in enumerate(values):
            if v is _MISSING:
                values[i] = ResultMismatch(
                    f"sink {sink_name!r} returned a mapping of {len(result)} entries "
                    f"without key {keys[i]!r} ({len(missing)} of {len(keys)} keys "
                    f"missing: {describe(missing)})"
                )
    return values
