"""asyncbatch: asyncio-native micro-batching.

Layout (public names are re-exported here; everything else is private):

- ``_batcher``     Batcher: accumulation, the dispatch rule, sink calls
- ``_timers``      linger deadlines and the heartbeat grid
- ``_results``     mapping a sink's answer back onto items
- ``_retry``       Retry: which failures are retried, and after how long
- ``_stats``       BatcherStats snapshots and per-batch BatchReports
- ``_exceptions``  the AsyncBatchError tree
"""

from ._batcher import Batcher as Batcher
from ._batcher import Overflow as Overflow
from ._batcher import SinkResult as SinkResult
from ._exceptions import AsyncBatchError as AsyncBatchError
from ._exceptions import BatcherClosed as BatcherClosed
from ._exceptions import QueueFull as QueueFull
from ._exceptions import ResultMismatch as ResultMismatch
from ._retry import Retry as Retry
from ._stats import BatcherStats as BatcherStats
from ._stats import BatchReport as BatchReport
from ._stats import DispatchReason as DispatchReason

__version__ = "0.1.0"

__all__ = [
    "AsyncBatchError",
    "BatchReport",
    "Batcher",
    "BatcherClosed",
    "BatcherStats",
    "DispatchReason",
    "Overflow",
    "QueueFull",
    "ResultMismatch",
    "Retry",
    "SinkResult",
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
