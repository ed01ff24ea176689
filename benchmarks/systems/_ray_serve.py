"""Ray Serve's ``@serve.batch``, on a plain async function, without a cluster.

``serve.batch`` builds its queue lazily on the first call, on the running
loop, and starts one background task that forms batches and one task per
batch. Since Ray 2.x the queue's constructor logs a warning when
``max_batch_size * max_concurrent_batches`` exceeds the *replica's*
``max_ongoing_requests``, which it reads with ``serve.get_replica_context()``
-- and that raises outside a Serve replica. There is no replica here, so that
one construction-time check is replaced by a no-op (:func:`_without_replica_check`);
everything per item and per batch is Ray's code, unmodified (including its
metrics calls, which record nothing without a running Ray).
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import Handle, Settings, Sink

_patched = False


def _without_replica_check() -> Any:
    global _patched
    from ray import serve
    from ray.serve import batching

    if not _patched:

        def _no_replica_to_check(self: object) -> None:
            return None

        batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = (
            _no_replica_to_check
        )
        _patched = True
    return serve


async def open_ray_serve(sink: Sink, settings: Settings) -> Handle:
    serve = _without_replica_check()

    async def handler(items: list[int]) -> list[int]:
        return await sink(items)

    batched: Any = serve.batch(
        max_batch_size=settings.max_size,
        batch_wait_timeout_s=0.0,
        max_concurrent_batches=settings.concurrency,
    )(handler)

    async def close() -> None:
        # No public close: let the batch tasks finish (every caller already has
        # its result, they are at their last step), then cancel the queue's
        # background task. (Cancelling a batch task makes Ray's own done
        # callback log a CancelledError.)
        wrapper = batched._get_curr_iteration_start_times.__self__
        queue = wrapper._queue
        if queue is None:
            return
        if queue.tasks:
            await asyncio.wait(list(queue.tasks), timeout=5)
        task = queue._handle_batch_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return Handle(batched, close)
