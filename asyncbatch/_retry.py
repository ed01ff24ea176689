"""Retry policy for failed sink calls: :class:`Retry`.

The dispatcher owns the loop that retries (``_batcher``); this module only
decides *whether* a failure is retried and *how long* to wait first.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["Retry", "Retryable"]


@dataclass(frozen=True, slots=True)
class Retry:
    """Retry a failed sink call with exponential backoff.

    A sink call fails when the sink raises, when it runs past the batcher's
    ``timeout`` (``TimeoutError``), or when its answer does not fit the batch
    (``ResultMismatch``). Such a failure is retried when its type is listed in
    ``retry_on``; other failures are not retried (but ``isolate=True`` still
    bisects the batch, whatever the type: a poison item's error is rarely
    worth retrying but always worth isolating).

    Attributes:
        attempts: total tries, the first included (``3``: up to 3 sink calls);
            an ``int >= 1``, or ``math.inf`` to retry until the sink succeeds
            (or the caller gives up: cancel it or use ``submit(timeout=...)``).
        backoff: delay before the second try, in seconds (finite, ``>= 0``);
            it doubles on every further try, up to ``max_backoff``.
        max_backoff: the cap of that delay, in seconds (finite, ``>= 0``).
        jitter: "full jitter": wait a uniform random time between 0 and the
            computed delay, so that many batchers do not retry in lockstep.
        retry_on: exception types that are retried.
        isolate: when the tries are used up, split the batch in halves,
            recursively, one try per half, so that only the items that fail
            on their own get the error (poison-item isolation). With ``k``
            poison items in a batch of ``n`` this costs ``O(k log n)`` extra
            sink calls; if every item fails it costs ``2n - 2``.

    Server-directed delays: an exception with a numeric ``retry_after``
    attribute (seconds, e.g. parsed from HTTP ``Retry-After``) makes the next
    try wait exactly that long instead of the computed backoff (a negative
    value counts as 0; ``inf`` or ``nan`` is ignored).

    Callers cancelled or expired while their batch waits to be retried are
    left out of the next try.
    """

    attempts: int | float = 3
    backoff: float = 0.05
    max_backoff: float = 2.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] | type[BaseException] = (Exception,)
    isolate: bool = False

    def __post_init__(self) -> None:
        attempts = self.attempts
        if isinstance(attempts, float) and attempts == math.inf:
            pass  # documented: no limit
        elif isinstance(attempts, bool) or not isinstance(attempts, int):
            raise TypeError(
                f"Retry.attempts must be an int (or math.inf: no limit), got {attempts!r}"
            )
        elif attempts < 1:
            raise ValueError(f"Retry.attempts must be >= 1, got {attempts!r}")
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"Retry.{name} must be a number of seconds, got {value!r}")
            if not 0 <= value < math.inf:
                raise ValueError(f"Retry.{name} must be finite and >= 0, got {value!r}")
        for name in ("jitter", "isolate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Retry.{name} must be a bool, got {getattr(self, name)!r}")
        retry_on = self.retry_on
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
            object.__setattr__(self, "retry_on", retry_on)
        if not isinstance(retry_on, tuple) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in retry_on
        ):
            raise TypeError(f"Retry.retry_on must be exception types, got {retry_on!r}")

    def retries(self, exc: BaseException) -> bool:
        """Whether a failure with ``exc`` may be retried at all."""
        return isinstance(exc, self.retry_on)

    def delay(self, attempt: int, exc: BaseException) -> float:
        """Seconds to wait before try number ``attempt + 1`` (``attempt >= 1``)."""
        retry_after = getattr(exc, "retry_after", None)
        if (
            isinstance(retry_after, int | float)
            and not isinstance(retry_after, bool)
            and math.isfinite(retry_after)
        ):
            return max(0.0, float(retry_after))
        # 2.0 ** 1024 overflows; by then any finite cap has long been reached.
        delay = min(self.max_backoff, self.backoff * (2.0 ** min(attempt - 1, 1000)))
        return random.uniform(0.0, delay) if self.jitter else delay


class Retryable(Exception):
    """A sink's per-item answer: "this item failed, but try it again".

    Return it in place of an item's result (``[r1, Retryable(err), r3]``, or
    as a mapping value) to retry just that item while the others resolve now::

        async def sink(items):
            answers = await backend.bulk(items)
            return [Retryable(Busy()) if a.status == 503 else a.value for a in answers]

    With a :class:`Retry` policy, the marked items go to the sink again, on
    their own, after the backoff (or the longest ``retry_after`` among them),
    as long as ``Retry.attempts`` allows; the whole batch's attempts count.
    Items still marked after the last attempt, or with no ``retry`` at all,
    fail with ``error``.

    Args:
        error: what the caller gets if no retry is left (an exception, or a
            message for a plain ``Exception``).
        retry_after: seconds to wait before the retry, overriding the backoff
            (for example from a per-item ``Retry-After``).
    """

    def __init__(self, error: BaseException | str, *, retry_after: float | None = None) -> None:
        self.error: BaseException = error if isinstance(error, BaseException) else Exception(error)
        self.retry_after = retry_after
        super().__init__(self.error)

    def __repr__(self) -> str:
        return f"Retryable({self.error!r}, retry_after={self.retry_after!r})"
