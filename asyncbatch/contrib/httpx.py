"""httpx glue for HTTP sinks: throttling answers as retryable errors.

Needs the ``httpx`` extra (``pip install 'asyncbatch[httpx]'``).

A batch sink that posts to a bulk endpoint is a few lines of your own code
(see ``examples/http_batching.py``); what every such sink needs and is easy
to get wrong is how a throttled answer meets :class:`asyncbatch.Retry`:

- :func:`raise_for_throttling` turns ``429 Too Many Requests`` and ``503
  Service Unavailable`` into :class:`Throttled`, whose ``retry_after``
  attribute carries the server's requested delay. ``Retry`` waits exactly
  that long before the next try, instead of its own backoff.
- :func:`retry_after` reads that delay from the headers: ``Retry-After-Ms``
  (milliseconds), then ``Retry-After`` as seconds or as an HTTP date.
- :data:`SAFE_TO_RETRY` lists the failures after which the server did no
  work: retrying them cannot apply a write twice.

::

    from asyncbatch import Batcher, Retry
    from asyncbatch.contrib.httpx import SAFE_TO_RETRY, raise_for_throttling

    async def write(items: list[dict]) -> list[dict]:
        response = await client.post("/v1/items:batch", json=items)
        raise_for_throttling(response)
        response.raise_for_status()
        return response.json()["results"]

    writes = Batcher(write, max_size=100, retry=Retry(attempts=5, retry_on=SAFE_TO_RETRY))
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

try:
    import httpx
except ImportError as exc:  # pragma: no cover - the test extra installs httpx
    raise ImportError(
        "asyncbatch.contrib.httpx needs httpx: install the httpx extra, "
        "pip install 'asyncbatch[httpx]'"
    ) from exc

__all__ = [
    "SAFE_TO_RETRY",
    "THROTTLING_STATUSES",
    "Throttled",
    "raise_for_throttling",
    "retry_after",
]

THROTTLING_STATUSES: frozenset[int] = frozenset({429, 503})
"""Statuses :func:`raise_for_throttling` treats as "slow down, then try again"."""


class Throttled(httpx.HTTPStatusError):
    """The server refused the call for now (429 or 503) and did no work.

    A subclass of :class:`httpx.HTTPStatusError`, so existing ``except``
    clauses still catch it.

    Attributes:
        retry_after: seconds the server asked to wait before the next call,
            or ``None`` when it did not say (or asked for more than the
            ``max_retry_after`` given to :func:`raise_for_throttling`):
            ``Retry`` then applies its own backoff.
        response: the :class:`httpx.Response`; ``response.status_code`` is
            429 or 503.
    """

    retry_after: float | None

    def __init__(self, response: httpx.Response, retry_after: float | None) -> None:
        request = response.request
        wait = "no Retry-After" if retry_after is None else f"retry after {retry_after:g} s"
        super().__init__(
            f"{request.method} {request.url} was throttled: HTTP {response.status_code} "
            f"{response.reason_phrase} ({wait})",
            request=request,
            response=response,
        )
        self.retry_after = retry_after


SAFE_TO_RETRY: tuple[type[Exception], ...] = (
    Throttled,
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)
"""Failures after which the server has certainly not processed the request.

For ``Retry(retry_on=SAFE_TO_RETRY)`` on sinks that write. A read timeout or a
connection dropped mid-answer (``httpx.ReadTimeout``, ``httpx.ReadError``,
``httpx.RemoteProtocolError``) may come after the server applied the batch;
add them only when the endpoint is idempotent.
"""


def retry_after(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """The delay, in seconds, that the response headers ask for; ``None`` if none.

    Reads, in this order: ``Retry-After-Ms`` (milliseconds, sent by Azure and
    OpenAI style APIs), then ``Retry-After`` as delta-seconds (fractions
    accepted) or as an HTTP date (RFC 9110, section 10.2.3), measured from
    ``now`` (default: the current UTC time); a date in the past gives ``0.0``.
    Negative, non-finite or unparsable values are ignored. Header names are
    matched case-insensitively.
    """
    lowered = headers if isinstance(headers, httpx.Headers) else httpx.Headers(headers)
    millis = _seconds(lowered.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000.0
    value = lowered.get("retry-after")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, origin unknown
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def raise_for_throttling(
    response: httpx.Response,
    *,
    statuses: Collection[int] = THROTTLING_STATUSES,
    max_retry_after: float = 60.0,
) -> None:
    """Raise :class:`Throttled` if ``response.status_code`` is in ``statuses``.

    The exception's ``retry_after`` is :func:`retry_after` of the headers. A
    delay longer than ``max_retry_after`` seconds is not honoured (``None``:
    ``Retry``'s own backoff applies and the tries run out soon), so that one
    ``Retry-After: 86400`` cannot park a dispatch slot for a day; pass
    ``math.inf`` to honour any delay.

    Raises:
        Throttled: the response is a throttling answer.
    """
    if response.status_code not in statuses:
        return
    delay = retry_after(response.headers)
    if delay is not None and delay > max_retry_after:
        delay = None
    raise Throttled(response, delay)
