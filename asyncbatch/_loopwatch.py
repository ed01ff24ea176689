"""Noticing that the event loop a batcher is bound to is shutting down.

``asyncio.run()`` (and ``asyncio.Runner``, and uvloop's ``run``) end by
calling ``loop.shutdown_asyncgens()``, which closes every async generator
that was started on the loop. A batcher binds with one such generator, whose
``finally`` tells it the loop is ending: it logs what would be lost and drops
its per-item thread shortcut, so a later ``asyncio.run()`` in the same thread
goes through the full loop check (and gets a clear error, or a clean rebind)
instead of joining a batch whose timers died with the old loop.

The generator holds the batcher weakly; when the batcher is closed or
collected first, :func:`stop_watching` finishes the generator on the spot, so
the loop's finalizer hook never has to run for it.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncGenerator
from typing import Protocol

__all__ = ["LoopWatch"]


class _Watched(Protocol):
    def _loop_ending(self) -> None: ...


class LoopWatch:
    """Calls ``owner._loop_ending()`` when the running loop shuts its async generators."""

    __slots__ = ("_agen", "_live")

    def __init__(self, owner: _Watched) -> None:
        self._live = True
        self._agen = self._watch(weakref.ref(owner))
        # The first step runs the loop's first-iteration hook: the loop now
        # knows the generator and will close it at shutdown.
        step = self._agen.asend(None)
        try:
            step.send(None)
        except StopIteration:  # pragma: no cover - it always stops at its yield
            pass

    async def _watch(self, ref: weakref.ReferenceType[_Watched]) -> AsyncGenerator[None]:
        try:
            yield
        finally:
            owner = ref()
            if self._live and owner is not None:
                owner._loop_ending()

    def stop(self) -> None:
        """Finish the watcher here and now, without its loop and without telling the owner."""
        self._live = False
        closing = self._agen.aclose()
        try:
            closing.send(None)
        except (StopIteration, RuntimeError):
            pass  # finished now (or was already)
        finally:
            closing.close()
