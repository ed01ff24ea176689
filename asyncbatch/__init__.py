"""asyncbatch: asyncio-native micro-batching.

Layout (public names are re-exported here; everything else is private):

- ``_batcher``     Batcher: the public surface and the per-item hot path
- ``_core``        the Batcher's state, declared once for its parts
- ``_dispatch``    the dispatch rule: when a batch is due, when it starts
- ``_runner``      sink calls (timeout, retry, isolation) and result delivery
- ``_overflow``    room under max_pending: block, reject, drop_oldest
- ``_batch``       one batch's record
- ``_options``     option checks (constructor and configure)
- ``_concurrency`` how many sink calls at once: the Adaptive policy
- ``_observe``     hooks for integrations (per batch, never per item)
- ``_loopwatch``   noticing that the bound loop shuts down
- ``_timers``      linger deadlines and the heartbeat grid
- ``_results``     mapping a sink's answer back onto items
- ``_retry``       Retry, Retryable: which failures are retried, after how long
- ``_stats``       BatcherStats snapshots and per-batch BatchReports
- ``_exceptions``  the AsyncBatchError tree
- ``_decorator``   @batch: a batcher per loop (and per instance) behind a function
- ``_loader``      DataLoader: request coalescing with a per-key future cache
- ``_stream``      chunks: micro-batching an async iterable
- ``_streaming``   streaming per-item results: each caller's stream, END
- ``contrib/``     optional integrations (``bulkapi``, ``httpx``, ``prometheus``, ``otel``,
                   ``redis``); never imported here
"""

from ._batcher import Batcher as Batcher
from ._batcher import Overflow as Overflow
from ._batcher import SinkResult as SinkResult
from ._concurrency import Adaptive as Adaptive
from ._decorator import BatchedFunction as BatchedFunction
from ._decorator import BatchedMethod as BatchedMethod
from ._decorator import BatchOptions as BatchOptions
from ._decorator import BoundBatchedMethod as BoundBatchedMethod
from ._decorator import StreamingBatchedFunction as StreamingBatchedFunction
from ._decorator import batch as batch
from ._exceptions import AsyncBatchError as AsyncBatchError
from ._exceptions import BatcherClosed as BatcherClosed
from ._exceptions import QueueFull as QueueFull
from ._exceptions import ResultMismatch as ResultMismatch
from ._loader import BatchLoadFn as BatchLoadFn
from ._loader import DataLoader as DataLoader
from ._loader import LoaderOptions as LoaderOptions
from ._retry import Retry as Retry
from ._retry import Retryable as Retryable
from ._stats import BatcherStats as BatcherStats
from ._stats import BatchReport as BatchReport
from ._stats import DispatchReason as DispatchReason
from ._stream import chunks as chunks
from ._streaming import END as END

__version__ = "0.1.0"

__all__ = [
    "END",
    "Adaptive",
    "AsyncBatchError",
    "BatchLoadFn",
    "BatchOptions",
    "BatchReport",
    "BatchedFunction",
    "BatchedMethod",
    "Batcher",
    "BatcherClosed",
    "BatcherStats",
    "BoundBatchedMethod",
    "DataLoader",
    "DispatchReason",
    "LoaderOptions",
    "Overflow",
    "QueueFull",
    "ResultMismatch",
    "Retry",
    "Retryable",
    "SinkResult",
    "StreamingBatchedFunction",
    "batch",
    "chunks",
]

# Public objects say ``asyncbatch.X`` in reprs and tracebacks, not the private module.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("asyncbatch."):
        try:
            _obj.__module__ = __name__
        except (AttributeError, TypeError):  # pragma: no cover - aliases
            pass
del _name, _obj
