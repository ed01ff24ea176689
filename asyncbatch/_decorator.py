"""``@batch``: write the batch function, call it one item at a time.

::

    @batch(max_size=64, max_wait=0.01)
    async def embed(texts: list[str]) -> list[Vector]: ...

    v = await embed("hello")  # one item in, its own result out

The decorated function becomes the *sink* of a :class:`Batcher` that the
wrapper creates on first use. Where that batcher lives:

- on a plain function, one batcher per event loop: a :class:`Batcher` binds to
  one loop, and a function is shared by every loop of the process (tests that
  call ``asyncio.run`` repeatedly, a worker thread running its own loop);
- on a method, one batcher per instance and event loop. The per-instance
  batchers are kept on the method (keyed by the instance's ``id``, cleaned up
  by a weak reference when the instance dies), not on the instance, so they
  neither keep it alive nor travel with ``copy``/``pickle``; the instances
  must support weak references (a class with ``__slots__`` needs
  ``"__weakref__"`` in them).

Entries of loops that have been closed are dropped whenever a new batcher is
created (or the figures are read), so repeated ``asyncio.run`` calls do not
pile batchers up. A batcher let go (its loop closed, its instance collected,
replaced after ``aclose()``) has its final counts folded into a running total
first, so the metrics integrations (``asyncbatch._observe.figures_of``) sum a
wrapper over every batcher it ever had: its counters never go back. None of
this is on the per-item path: a call looks its batcher up in one dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import inspect
import threading
import weakref
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Mapping,
    Sequence,
)
from typing import Any, Generic, Literal, Self, TypedDict, TypeVar, Unpack, overload

from ._batcher import _UNSET, Batcher, Overflow, _Unset
from ._concurrency import Adaptive
from ._observe import Figures, Observer, Totals
from ._retry import Retry
from ._stats import BatcherStats, BatchReport

__all__ = ["BatchOptions", "BatchedFunction", "BatchedMethod", "BoundBatchedMethod", "batch"]

_T = TypeVar("_T")
_R = TypeVar("_R")
_S = TypeVar("_S")

_Sink = Callable[[list[Any]], Awaitable[Any]]


class BatchOptions(TypedDict, total=False):
    """The keyword options of :class:`Batcher`, all optional, as ``@batch`` takes them.

    Only the options you pass are forwarded, so every default is the
    batcher's own. ``name`` defaults to the decorated function's
    ``__qualname__``. The per-item callables (``weigh``, ``key``,
    ``partition``) are typed on ``Any`` items: their item type is not checked
    against the decorated function's.
    """

    max_size: int
    max_wait: float | None
    interval: float | None
    max_weight: float | None
    weigh: Callable[[Any], float] | None
    max_concurrency: int | Adaptive | Literal["auto"] | None
    max_pending: int | None
    overflow: Overflow
    key: Callable[[Any], Hashable] | None
    dedupe: bool
    partition: Callable[[Any], Hashable] | None
    timeout: float | None
    retry: Retry | None
    on_batch: Callable[[BatchReport], object] | None
    name: str | None


# What the wrapper reports to ``inspect.signature``: the call it takes, not the
# batch function's (which ``__wrapped__`` would otherwise lead it to).
_ITEM = inspect.Parameter("item", inspect.Parameter.POSITIONAL_ONLY)
_TIMEOUT = inspect.Parameter("timeout", inspect.Parameter.KEYWORD_ONLY, default=None)
_SELF = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
_FUNCTION_SIGNATURE = inspect.Signature([_ITEM, _TIMEOUT])
_METHOD_SIGNATURE = inspect.Signature([_SELF, _ITEM, _TIMEOUT])

# Copied by ``functools.update_wrapper``; ``__annotations__`` is left out on
# purpose: the wrapper takes one item, not the list the annotations describe.
_ASSIGNED = ("__module__", "__name__", "__qualname__", "__doc__")


_Loop = asyncio.AbstractEventLoop


async def _never_called(items: list[Any]) -> None:
    """The sink of a batcher made only to read what its options come to."""


class _Retired:
    """The batchers a wrapper let go, for its metrics (guarded by the owner's lock).

    ``totals`` holds the final counts of those that are done. ``draining``
    holds those whose loop still runs with items pending or in flight (one
    replaced while its ``aclose()`` drains; an instance's, collected with
    ``put`` items left): their counts still move, so they are read like kept
    batchers until :meth:`settle` finds them done and folds them in. Each
    entry names the sink (``_Batchers``) that let it go: a method's instances
    share the family's ``_Retired``, and each keeps its own totals too (for
    its bound method's figures).
    """

    __slots__ = ("draining", "totals")

    def __init__(self) -> None:
        self.totals = Totals()
        self.draining: list[tuple[_Loop, Batcher[Any, Any], _Batchers[Any, Any]]] = []

    def add(self, loop: _Loop, batcher: Batcher[Any, Any], owner: _Batchers[Any, Any]) -> None:
        self.draining.append((loop, batcher, owner))

    def settle(self) -> None:
        """Fold in the draining batchers that are done: loop closed, or nothing left."""
        if not self.draining:
            return
        keep = []
        for entry in self.draining:
            loop, batcher, owner = entry
            stats = batcher.stats
            if loop.is_closed() or not (stats.pending or stats.in_flight):
                self.totals.add(stats)
                if owner._totals is not self.totals:
                    owner._totals.add(stats)
            else:
                keep.append(entry)
        self.draining = keep

    def batchers(self, owner: _Batchers[Any, Any] | None = None) -> list[Batcher[Any, Any]]:
        """The draining batchers (of ``owner`` only, if given)."""
        return [b for _, b, o in self.draining if owner is None or o is owner]


class _Family:
    """What the per-instance batchers of one ``@batch`` method share.

    ``lock`` guards every instance's tables and this; ``observers`` are the
    ones attached to the method on the class (every instance, those to come
    included). ``retired`` is every instance's: the batchers any of them let
    go, and those of the instances that are gone. ``by_loop`` lists the
    batchers the live instances have (open, or closed until replaced), by
    loop and instance: a read of the figures copies it under ``lock`` without
    visiting the instances, and checks each loop once for being closed.

    ``dead`` is where an instance's weak-reference callback leaves its
    batchers: that callback runs while the instance is deallocated, in any
    thread, maybe in a garbage collection pass started while this thread
    holds ``lock``, so it takes no lock; the next :meth:`collect` (under
    ``lock``) folds them in.
    """

    __slots__ = ("by_loop", "dead", "limit", "lock", "observers", "retired")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.observers: list[Observer] = []
        self.retired = _Retired()
        self.dead: deque[_Batchers[Any, Any]] = deque()
        self.by_loop: dict[_Loop, dict[_Batchers[Any, Any], Batcher[Any, Any]]] = {}
        self.limit: int | None = None  # a new batcher's concurrency limit, once asked

    def collect(self) -> None:
        """Fold in the gone instances' batchers, forget closed loops', settle (``lock`` held)."""
        while self.dead:
            self.dead.popleft().fold()
        for loop in [loop for loop in self.by_loop if loop.is_closed()]:
            for batchers in list(self.by_loop.get(loop, ())):
                batchers._forget_closed_loops()
        self.retired.settle()

    def kept(self) -> list[Batcher[Any, Any]]:
        """Every batcher the live instances have (``lock`` held)."""
        kept: list[Batcher[Any, Any]] = []
        for listed in self.by_loop.values():
            kept.extend(listed.values())
        return kept


class _Batchers(Generic[_T, _R]):
    """The batchers of one sink (a function, or a method bound to one instance), one per loop.

    ``_live`` holds the open batcher of each loop: the only lookup on the hot
    path. ``aclose()`` moves a loop's batcher to ``_closed``, where ``stats``
    (and a ``flush`` or second ``aclose`` racing the drain) still find it
    until the next call on that loop starts a fresh one. Batchers are closed
    only through ``aclose()`` here (they are not handed out), so an entry of
    ``_live`` is always open.

    A batcher let go (replaced after ``aclose()``, or its loop closed) goes
    to ``_retired``, which keeps its counts (in ``_totals`` once it is done).
    Every change to the tables is made under ``_lock`` (rare paths only: a
    batcher's start, ``aclose()``, attaching, a read of the figures), so
    :meth:`figures` sees each batcher in exactly one place. For a method,
    ``_family`` is the method's: its lock, observers and ``_retired`` are
    shared by all its instances, and its ``by_loop`` lists this instance's
    batchers too.
    """

    __slots__ = (
        "_closed",
        "_family",
        "_folded",
        "_latest",
        "_limit",
        "_live",
        "_lock",
        "_make",
        "_observers",
        "_retired",
        "_settings",
        "_totals",
        "name",
    )

    def __init__(
        self, make: Callable[..., Batcher[_T, _R]], name: str, family: _Family | None = None
    ) -> None:
        self._make = make
        self.name = name
        self._live: dict[_Loop, Batcher[_T, _R]] = {}
        self._closed: dict[_Loop, Batcher[_T, _R]] = {}
        self._latest: Batcher[_T, _R] | None = None
        self._observers: list[Observer] = []
        self._settings: dict[str, Any] = {}  # configure()d since the decoration
        self._limit: int | None = None  # a new batcher's concurrency limit, once asked
        self._family = family
        if family is None:
            self._lock: threading.RLock = threading.RLock()
            self._retired = _Retired()
            self._totals = self._retired.totals
        else:
            self._lock = family.lock
            self._retired = family.retired
            self._totals = Totals()  # this instance's own, for its bound method's figures
        self._folded = False  # its instance is gone and its batchers moved to the family

    def configure(self, changes: dict[str, Any]) -> None:
        """Apply ``changes`` to every open batcher and to those made from now on."""
        settings = {**self._settings, **changes}
        probe = self._make(**settings)  # checked as the constructor checks them
        self._settings = settings
        self._limit = probe.stats.concurrency_limit
        for batcher in list(self._live.values()):
            batcher.configure(**_own_policy(changes))

    def limit(self) -> int:
        """The concurrency limit a new batcher gets: ``max_concurrency`` as decorated
        or configured (``0``: none)."""
        if self._limit is None:
            self._limit = self._make(**self._settings).stats.concurrency_limit
        return self._limit

    def attach(self, observer: Observer) -> None:
        """Watch every batcher of this sink, those to come included."""
        with self._lock:
            self._observers.append(observer)
            self.attach_current(observer)

    def attach_current(self, observer: Observer) -> None:
        """Attach ``observer`` to the open batchers only (``_lock`` held)."""
        for batcher in self._live.values():
            batcher._attach(observer)

    def detach(self, observer: Observer) -> None:
        with self._lock:
            if observer in self._observers:
                self._observers.remove(observer)
            self.detach_all(observer)

    def detach_all(self, observer: Observer) -> None:
        """Detach ``observer`` from every batcher still here (``_lock`` held)."""
        for batcher in [
            *self._live.values(),
            *self._closed.values(),
            *self._retired.batchers(self),
        ]:
            batcher._detach(observer)

    def current(self) -> Batcher[_T, _R]:
        """The running loop's open batcher, created if there is none."""
        loop = asyncio.get_running_loop()
        batcher = self._live.get(loop)
        if batcher is None:
            batcher = self._start(loop)
        return batcher

    def _start(self, loop: _Loop) -> Batcher[_T, _R]:
        # Rare path: first call on this loop, or first call after ``aclose()``.
        # Under the lock: another thread may be running its own loop through
        # the same wrapper, or reading the figures.
        with self._lock:
            self._forget_closed_loops()
            replaced = self._closed.pop(loop, None)
            if replaced is not None:  # closed by aclose(), maybe still draining
                self._retired.add(loop, replaced, self)
            self._retired.settle()
            batcher = self._make(**self._settings)
            family = self._family
            for observer in (*(family.observers if family is not None else ()), *self._observers):
                batcher._attach(observer)
            self._live[loop] = batcher
            if family is not None:
                family.by_loop.setdefault(loop, {})[self] = batcher
            self._latest = batcher
        return batcher

    def _forget_closed_loops(self) -> None:
        """Let the batchers of closed loops go: no loop can run them again (``_lock`` held)."""
        for table in (self._live, self._closed):
            for loop in [loop for loop in table if loop.is_closed()]:
                self._retired.add(loop, table.pop(loop), self)
                self._unlist(loop)

    def _unlist(self, loop: _Loop) -> None:
        """Take this sink's batcher of ``loop`` off the family's list (``_lock`` held)."""
        family = self._family
        if family is None:
            return
        listed = family.by_loop.get(loop)
        if listed is not None:
            listed.pop(self, None)
            if not listed:
                del family.by_loop[loop]

    def figures(self) -> Figures:
        """The counts of the batchers let go, and the batchers to read now."""
        with self._lock:
            self._forget_closed_loops()
            self._retired.settle()
            return Figures(
                self._totals.copy(), self.kept(), self._retired.batchers(self), self.limit()
            )

    def kept(self) -> list[Batcher[_T, _R]]:
        """The batchers here now, open or closed (``_lock`` held)."""
        return [*self._live.values(), *self._closed.values()]

    def fold(self) -> None:
        """Its instance is gone: let every batcher go to the family (the family's lock held)."""
        if self._folded:  # two weak references' callbacks for one instance
            return
        self._folded = True
        for table in (self._live, self._closed):
            for loop, batcher in table.items():
                self._retired.add(loop, batcher, self)
                self._unlist(loop)
            table.clear()

    @property
    def stats(self) -> BatcherStats:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            batcher = self._latest
        else:
            batcher = self._live.get(loop)
            if batcher is None:
                batcher = self._closed.get(loop)
        return BatcherStats() if batcher is None else batcher.stats

    async def flush(self) -> None:
        loop = asyncio.get_running_loop()
        # The open batcher, and the one an ``aclose()`` may still be draining
        # (its flush waits for that drain).
        for batcher in (self._live.get(loop), self._closed.get(loop)):
            if batcher is not None:
                await batcher.flush()

    async def aclose(self, cancel: bool) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:  # moved in one step: a read of the figures sees it once
            batcher = self._live.pop(loop, None)
            if batcher is None:
                # Closed already, maybe still draining: ``Batcher.aclose`` waits
                # for that close to finish (a no-op once it has).
                batcher = self._closed.get(loop)
            else:
                self._closed[loop] = batcher
        if batcher is not None:
            await batcher.aclose(cancel=cancel)


class _Lifecycle(Generic[_T, _R]):
    """What every wrapper shares: the batchers of one sink and their lifecycle."""

    __slots__ = ("_state",)

    _state: _Batchers[_T, _R]

    async def flush(self) -> None:
        """Dispatch what the running loop's batcher holds now and wait for it.

        :meth:`Batcher.flush` on this loop's batcher: it waits for every batch
        holding an item submitted before the call, in flight ones included.
        If an :meth:`aclose` of this loop's batcher is still draining, it also
        waits for that drain. A no-op when this loop has no batcher (the
        wrapper was not called on it yet) or only a closed one.
        """
        await self._state.flush()

    async def aclose(self, *, cancel: bool = False) -> None:
        """Close the running loop's batcher: :meth:`Batcher.aclose`.

        Drains what it holds (``cancel=True``: fails it with ``BatcherClosed``
        and cancels the sink calls in flight) and waits for it. The wrapper
        stays usable: the next call on this loop, including one made while
        this close is still draining, starts a fresh batcher. Batchers of
        other loops are not touched. A no-op when this loop has no batcher.
        """
        await self._state.aclose(cancel)

    @property
    def stats(self) -> BatcherStats:
        """A snapshot of the counters of the running loop's batcher.

        After :meth:`aclose` it is the closed batcher's final snapshot, until
        the next call starts a fresh batcher (whose counters start at zero).
        All zero if the wrapper has not been called on this loop. Read outside
        any running loop (a metrics thread, or after ``asyncio.run``), it is
        the snapshot of the batcher created last, on whichever loop.
        """
        return self._state.stats

    @property
    def name(self) -> str:
        """The name of its batchers: ``name=`` or the batch function's qualified name."""
        return self._state.name

    def configure(
        self,
        *,
        max_size: int | _Unset = _UNSET,
        max_wait: float | _Unset | None = _UNSET,
        interval: float | _Unset | None = _UNSET,
        max_weight: float | _Unset | None = _UNSET,
        max_concurrency: int | Adaptive | Literal["auto"] | _Unset | None = _UNSET,
        max_pending: int | _Unset | None = _UNSET,
        timeout: float | _Unset | None = _UNSET,
    ) -> None:
        """:meth:`Batcher.configure` for every batcher of this function (or bound
        method), the ones of other loops and those made later included.

        Raises:
            TypeError, ValueError: a value the constructor would refuse;
                nothing is changed then.
        """
        given = {
            "max_size": max_size,
            "max_wait": max_wait,
            "interval": interval,
            "max_weight": max_weight,
            "max_concurrency": max_concurrency,
            "max_pending": max_pending,
            "timeout": timeout,
        }
        self._state.configure({k: v for k, v in given.items() if not isinstance(v, _Unset)})

    def _attach(self, observer: Observer) -> None:
        self._state.attach(observer)

    def _detach(self, observer: Observer) -> None:
        self._state.detach(observer)

    def _figures(self) -> Figures:
        # For the metrics integrations: see ``asyncbatch._observe.figures_of``.
        return self._state.figures()


class _Wrapper(_Lifecycle[_T, _R]):
    """The one-item calls of the function and bound-method wrappers."""

    __slots__ = ()

    async def __call__(self, item: _T, /, *, timeout: float | None = None) -> _R:  # noqa: ASYNC109
        """Submit one item to the running loop's batcher and wait for its own result.

        This is :meth:`Batcher.submit`: it returns the item's result or raises
        the item's own error (the sink's exception, ``ResultMismatch``,
        ``QueueFull``, ``TimeoutError`` when ``timeout`` seconds pass first).
        Cancelling the caller before its batch is dispatched withdraws the
        item. The batcher is created on the first call in each loop, and again
        on the first call after :meth:`aclose`.
        """
        return await self._state.current().submit(item, timeout=timeout)

    @overload
    async def submit_many(
        self, items: Iterable[_T], *, return_exceptions: Literal[False] = False
    ) -> list[_R]: ...
    @overload
    async def submit_many(
        self, items: Iterable[_T], *, return_exceptions: bool
    ) -> list[_R | BaseException]: ...
    async def submit_many(
        self, items: Iterable[_T], *, return_exceptions: bool = False
    ) -> list[_R] | list[_R | BaseException]:
        """Submit several items at once: :meth:`Batcher.submit_many`.

        Returns the results in input order; without ``return_exceptions`` it
        raises the first failure in input order once every item is resolved.
        """
        batcher = self._state.current()
        if return_exceptions:
            return await batcher.submit_many(items, return_exceptions=True)
        return await batcher.submit_many(items)


class BatchedFunction(_Wrapper[_T, _R]):
    """A batch function made callable one item at a time: what ``@batch`` returns.

    ``await f(item)`` submits ``item`` to the running loop's batcher (one per
    event loop, created on first use) and returns its own result. ``flush()``,
    ``aclose()`` and ``stats`` act on the running loop's batcher.
    ``__name__``, ``__qualname__``, ``__doc__``, ``__module__`` and
    ``__wrapped__`` are the batch function's.

    Like ``staticmethod``, it does not bind when stored on a class: ``@batch``
    on a method (``self, items``) makes a :class:`BatchedMethod` instead.
    """

    __slots__ = ("__dict__", "__weakref__")

    __name__: str
    __qualname__: str
    __wrapped__: Callable[..., Any]

    def __init__(self, fn: _Sink, options: BatchOptions) -> None:
        name = options.get("name") or getattr(fn, "__qualname__", None) or repr(fn)
        self._state = _Batchers(_maker(fn, options), name)
        functools.update_wrapper(self, fn, assigned=_ASSIGNED)
        self.__signature__ = _FUNCTION_SIGNATURE

    def __repr__(self) -> str:
        return f"<batched function {self.__qualname__}>"

    def __reduce__(self) -> str:
        # Pickled (and copied) by reference, like a function: by its name.
        return self.__qualname__


class StreamingBatchedFunction(_Lifecycle[_T, _R]):
    """An async generator batch function made callable one item at a time.

    What ``@batch`` returns for ``async def generate(items)`` that yields, each
    step, one entry per item (see :meth:`Batcher.submit_stream`):
    ``async for value in generate(item)`` iterates this caller's own results.
    ``flush()``, ``aclose()``, ``configure()`` and ``stats`` act on the running
    loop's batcher, as for :class:`BatchedFunction`.
    """

    __slots__ = ("__dict__", "__weakref__")

    __name__: str
    __qualname__: str
    __wrapped__: Callable[..., Any]

    def __init__(self, fn: Callable[[list[Any]], AsyncIterator[Any]], options: BatchOptions):
        name = options.get("name") or getattr(fn, "__qualname__", None) or repr(fn)
        self._state = _Batchers(_maker(fn, options), name)
        functools.update_wrapper(self, fn, assigned=_ASSIGNED)

    def __call__(self, item: _T, /) -> AsyncGenerator[_R, None]:
        """This item's stream: :meth:`Batcher.submit_stream` on the running loop's batcher."""
        return self._stream(item)

    async def _stream(self, item: _T) -> AsyncGenerator[_R, None]:
        # Closed with this generator (contextlib.aclosing, break): the caller
        # leaves the batcher's stream at once, not when the garbage collector
        # finalizes it.
        async with contextlib.aclosing(self._state.current().submit_stream(item)) as stream:
            async for value in stream:
                yield value

    def __repr__(self) -> str:
        return f"<batched generator function {self.__qualname__}>"

    def __reduce__(self) -> str:
        return self.__qualname__


class BatchedMethod(Generic[_S, _T, _R]):
    """A batch method made callable one item at a time: what ``@batch`` returns
    for ``async def m(self, items)``.

    ``obj.m`` is a :class:`BoundBatchedMethod`; ``await obj.m(item)`` submits
    to the batcher of ``obj`` on the running loop (one per instance and
    loop). ``Cls.m(obj, item)`` does the same. The batchers are not stored on
    the instance and do not keep it alive; the instance must support weak
    references.

    The method on the class (``Cls.m``) stands for all its instances: the
    metrics integrations accept it (``instrument(Cls.m)``) and sum every
    instance's batchers, those of instances made later included, under the
    one name ``name``; the counts of instances collected meanwhile are kept.
    """

    __slots__ = ("__dict__", "__weakref__", "_family", "_fn", "_instances", "_options")

    __name__: str
    __qualname__: str
    __wrapped__: Callable[..., Any]

    def __init__(self, fn: Callable[[Any, list[Any]], Awaitable[Any]], options: BatchOptions):
        self._fn = fn
        self._options = options
        self._instances: dict[int, _Batchers[_T, _R]] = {}
        self._family = _Family()
        functools.update_wrapper(self, fn, assigned=_ASSIGNED)
        self.__signature__ = _METHOD_SIGNATURE

    @property
    def name(self) -> str:
        """The name of its batchers (every instance's): ``name=`` or the method's qualified name."""
        return self._options.get("name") or self.__qualname__

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...
    @overload
    def __get__(
        self, instance: _S, owner: type[Any] | None = None
    ) -> BoundBatchedMethod[_T, _R]: ...
    def __get__(
        self, instance: _S | None, owner: type[Any] | None = None
    ) -> Self | BoundBatchedMethod[_T, _R]:
        if instance is None:
            return self
        return BoundBatchedMethod(self, instance, self._batchers_of(instance))

    async def __call__(
        self,
        instance: _S,
        item: _T,
        /,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the batcher's per-item timeout
    ) -> _R:
        """``Cls.m(obj, item)``: the same as ``obj.m(item)``."""
        return await self._batchers_of(instance).current().submit(item, timeout=timeout)

    def _batchers_of(self, instance: object) -> _Batchers[_T, _R]:
        batchers = self._instances.get(id(instance))
        if batchers is None:
            batchers = self._track(instance)
        return batchers

    def _track(self, instance: object) -> _Batchers[_T, _R]:
        # Keyed by ``id``: instances need not be hashable. An entry cannot
        # outlive its instance, so no other object can come to share its id:
        # the weak reference's callback removes it while the instance is
        # being deallocated, before its memory (and id) can be reused.
        key = id(instance)
        instances = self._instances
        dead = self._family.dead

        def forget(_: object) -> None:
            # No lock here (see ``_Family``). Left for the family first, then
            # removed: the next ``collect`` folds it in, once (``fold`` marks
            # it, should two callbacks leave it).
            batchers = instances.get(key)
            if batchers is not None:
                dead.append(batchers)
            instances.pop(key, None)

        try:
            ref = weakref.ref(instance, forget)
        except TypeError:
            cls = type(instance).__qualname__
            raise TypeError(
                f"@batch method {self.__qualname__!r} keeps one batcher per instance and "
                f"needs weak references to the instance, which {cls!r} does not support; "
                f"add '__weakref__' to {cls}.__slots__"
            ) from None
        fn = self._fn

        # The sink holds the instance weakly: the method's table of batchers
        # lives as long as the class, and must not keep its instances alive.
        # A waiting caller holds the bound method (and so the instance) until
        # its item is resolved, so the instance outlives every batch that
        # still has a caller.
        @functools.wraps(fn)
        async def sink(items: list[Any]) -> Any:
            obj = ref()
            if obj is None:  # pragma: no cover - every caller of the batch is gone
                raise ReferenceError(
                    f"the instance of {self.__qualname__!r} was garbage-collected "
                    "before its batch ran"
                )
            return await fn(obj, items)

        # ``ref`` (and so its callback) lives as long as this entry: the sink
        # holds it. ``setdefault``: if two threads race to make the first
        # entry of one instance, both use the winner's.
        batchers: _Batchers[_T, _R] = _Batchers(
            _maker(sink, self._options), self.name, self._family
        )
        with self._family.lock:
            self._family.collect()  # the instances gone since: their batchers are let go
            return instances.setdefault(key, batchers)

    def _attach(self, observer: Observer) -> None:
        # ``instrument(Cls.m)``: every instance's batchers, those to come included.
        family = self._family
        with family.lock:
            if observer not in family.observers:
                family.observers.append(observer)
            for batchers in list(self._instances.values()):
                batchers.attach_current(observer)

    def _detach(self, observer: Observer) -> None:
        family = self._family
        with family.lock:
            if observer in family.observers:
                family.observers.remove(observer)
            for batchers in list(self._instances.values()):
                batchers.detach_all(observer)
            for batcher in family.retired.batchers():
                batcher._detach(observer)

    def _figures(self) -> Figures:
        # Every instance's figures, and those of the instances gone: see
        # ``asyncbatch._observe.figures_of``. A snapshot of the batchers, taken
        # under the lock without visiting the instances (the loop needs that
        # lock for a first call on a new instance); their stats are read
        # after, outside it (``Figures.total``).
        family = self._family
        with family.lock:
            family.collect()
            if family.limit is None:  # a new instance's first batcher: the decorated options
                family.limit = Batcher(_never_called, **self._options).stats.concurrency_limit
            return Figures(
                family.retired.totals.copy(),
                family.kept(),
                family.retired.batchers(),
                family.limit,
            )

    def __repr__(self) -> str:
        return f"<batched method {self.__qualname__}>"

    def __reduce__(self) -> str:
        # Pickled (and copied) by reference, like a function: by its name.
        return self.__qualname__


class _Split:
    """A class attribute with one value on the class and another, computed, on
    its instances (``MethodType`` reads ``__doc__`` from its function too)."""

    def __init__(self, on_class: object, on_instance: Callable[[Any], object]) -> None:
        self._on_class = on_class
        self._on_instance = on_instance

    def __get__(self, instance: object, owner: object = None) -> Any:
        if instance is None:
            return self._on_class
        return self._on_instance(instance)


_BOUND_SLOTS = ("__func__", "__self__")


class BoundBatchedMethod(_Wrapper[_T, _R]):
    """A :class:`BatchedMethod` bound to one instance: ``obj.m``.

    ``await obj.m(item)`` submits to the batcher of ``obj`` on the running
    loop; ``flush()``, ``aclose()`` and ``stats`` act on that batcher only.
    Like a bound method, it holds the instance (``__self__``) and the method
    (``__func__``), and is made afresh on every attribute access; two of them
    are equal when they bind the same method to the same instance. Other
    attributes (``__name__``, ``__wrapped__``, ...) are the method's.
    """

    __slots__ = _BOUND_SLOTS

    # On instances, the method's docstring and the one-item call signature; on
    # the class, its own docstring and ``None`` (so ``inspect.signature`` of
    # the class still reads ``__init__``).
    __doc__ = _Split(__doc__, lambda bound: bound.__func__.__doc__)
    __signature__ = _Split(None, lambda bound: _FUNCTION_SIGNATURE)

    def __init__(
        self, method: BatchedMethod[Any, _T, _R], instance: object, state: _Batchers[_T, _R]
    ) -> None:
        # Declared here, not in the class body: there mypy would read a
        # ``BatchedMethod`` attribute through its ``__get__``.
        self.__func__: BatchedMethod[Any, _T, _R] = method
        self.__self__: object = instance
        self._state = state

    def __getattr__(self, name: str) -> Any:
        if name in _BOUND_SLOTS:  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.__func__, name)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BoundBatchedMethod):
            return NotImplemented
        return self.__func__ is other.__func__ and self.__self__ is other.__self__

    def __hash__(self) -> int:
        return hash((self.__func__, id(self.__self__)))

    def __reduce__(self) -> tuple[Callable[[object, str], Any], tuple[object, str]]:
        # Like a bound method: the instance, and the method looked up on it again.
        return getattr, (self.__self__, self.__func__.__name__)

    def __repr__(self) -> str:
        return f"<bound batched method {self.__func__.__qualname__} of {self.__self__!r}>"


def _required_positionals(fn: Callable[..., Any]) -> int:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return -1
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(
        1
        for p in signature.parameters.values()
        if p.kind in positional and p.default is inspect.Parameter.empty
    )


def _defined_in_class_body(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is a function written in a class body (a method to be).

    Decided by its ``__qualname__``, as Python wrote it: a function of a class
    body is named ``Cls.m`` (``outer.<locals>.Cls.m`` for a class made in a
    function), so the part before its name is a class name. A module-level
    function (``f``) or one nested in a function (``outer.<locals>.f``) is
    not; neither is anything but a plain function (a partial, a bound method,
    a callable object: Python binds none of them as a method either).
    Decorators that copy ``__qualname__`` (``functools.wraps``) keep the
    answer.
    """
    if not inspect.isfunction(inspect.unwrap(fn)) or isinstance(fn, functools.partial):
        return False
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(qualname, str):
        return False
    parts = qualname.split(".")
    return len(parts) >= 2 and parts[-2] != "<locals>"


def _signature_error(name: str, arity: int, method: bool) -> str:
    needs = (
        "@batch needs `async def f(items)` (one positional parameter: the list of items) "
        "or, in a class body, a method `async def m(self, items)`"
    )
    if arity < 0:
        return f"{needs}; it cannot read the signature of {name!r}"
    if arity == 2:
        return (
            f"{needs}; {name!r} takes 2 positional parameters but is not defined in a class "
            "body, so it is not a method: give the extra parameter a default, or bind it "
            "first (functools.partial), so that only the list of items is left"
        )
    where = "method" if method else "function"
    return f"{needs}; the {where} {name!r} takes {arity}"


def _is_async(fn: Callable[..., Any]) -> bool:
    fn = inspect.unwrap(fn)
    # A function, a partial of one, or an object with ``async def __call__``.
    return inspect.iscoroutinefunction(fn) or (
        callable(fn) and inspect.iscoroutinefunction(type(fn).__call__)
    )


class _BatchDecorator:
    """``batch(**options)``: turns a batch function or method into a one-item callable."""

    __slots__ = ("_options",)

    def __init__(self, options: BatchOptions) -> None:
        self._options = options

    # Functions: one parameter, the list of items.
    @overload
    def __call__(
        self, fn: Callable[[list[_T]], Awaitable[Sequence[_R | BaseException]]], /
    ) -> BatchedFunction[_T, _R]: ...
    @overload
    def __call__(
        self, fn: Callable[[list[_T]], Awaitable[Mapping[Any, _R | BaseException]]], /
    ) -> BatchedFunction[_T, _R]: ...
    @overload
    def __call__(
        self, fn: Callable[[list[_T]], Awaitable[None]], /
    ) -> BatchedFunction[_T, None]: ...
    @overload
    def __call__(
        self,
        fn: Callable[
            [list[_T]],
            Awaitable[Sequence[_R | BaseException] | Mapping[Any, _R | BaseException] | None],
        ],
        /,
    ) -> BatchedFunction[_T, _R | None]: ...
    # Methods: ``self`` and the list of items.
    @overload
    def __call__(
        self, fn: Callable[[_S, list[_T]], Awaitable[Sequence[_R | BaseException]]], /
    ) -> BatchedMethod[_S, _T, _R]: ...
    @overload
    def __call__(
        self, fn: Callable[[_S, list[_T]], Awaitable[Mapping[Any, _R | BaseException]]], /
    ) -> BatchedMethod[_S, _T, _R]: ...
    @overload
    def __call__(
        self, fn: Callable[[_S, list[_T]], Awaitable[None]], /
    ) -> BatchedMethod[_S, _T, None]: ...
    @overload
    def __call__(
        self,
        fn: Callable[
            [_S, list[_T]],
            Awaitable[Sequence[_R | BaseException] | Mapping[Any, _R | BaseException] | None],
        ],
        /,
    ) -> BatchedMethod[_S, _T, _R | None]: ...
    # Streaming: an async generator function of the list of items.
    @overload
    def __call__(
        self, fn: Callable[[list[_T]], AsyncIterator[Sequence[_R | BaseException | object]]], /
    ) -> StreamingBatchedFunction[_T, _R]: ...
    def __call__(
        self, fn: Callable[..., Any], /
    ) -> (
        BatchedFunction[Any, Any]
        | BatchedMethod[Any, Any, Any]
        | StreamingBatchedFunction[Any, Any]
    ):
        name = getattr(fn, "__qualname__", None) or repr(fn)
        if inspect.isasyncgenfunction(inspect.unwrap(fn)):
            if _required_positionals(fn) != 1 or _defined_in_class_body(fn):
                raise TypeError(
                    f"@batch on an async generator needs `async def f(items)` at module or "
                    f"function level (streaming methods are not supported), got {name!r}"
                )
            options = self._options
            if options.get("name") is None:
                options = {**options, "name": name}
            Batcher(fn, **options)
            return StreamingBatchedFunction(fn, options)
        if not _is_async(fn):
            raise TypeError(
                f"@batch needs an async function (async def), got {name!r}; its batches are awaited"
            )
        if isinstance(fn, classmethod):
            raise TypeError(
                f"@batch cannot wrap the classmethod object {name!r}; put @classmethod "
                "above @batch (`@classmethod` then `@batch(...)` then `async def m(cls, items)`)"
            )
        arity = _required_positionals(fn)
        method = _defined_in_class_body(fn)
        if not (arity == 1 or (arity == 2 and method)):
            raise TypeError(_signature_error(name, arity, method))
        options = self._options
        if options.get("name") is None:
            options = {**options, "name": name}
        # Validate the options now, at decoration, rather than at the first
        # call: the batcher binds to a loop only on first use, so this one is
        # simply dropped.
        Batcher(fn, **options)
        if arity == 1:
            return BatchedFunction(fn, options)
        return BatchedMethod(fn, options)


def batch(**options: Unpack[BatchOptions]) -> _BatchDecorator:
    """Make a batch function callable one item at a time.

    ::

        @batch(max_size=64, max_wait=0.01)
        async def embed(texts: list[str]) -> list[Vector]: ...

        v = await embed("hello")  # one item in, its own result out

        class Store:
            @batch(max_size=500)
            async def put(self, rows: list[Row]) -> None: ...

        await store.put(row)

    The decorated function is the sink of a :class:`Batcher` built with
    ``options`` (any of the batcher's keyword options; ``name`` defaults to
    the function's ``__qualname__``) and follows the batcher's rules for the
    answer: a sequence with one result per item, a mapping by ``key``, or
    ``None``. Concurrent calls are gathered into batches by size, weight and
    time exactly as :meth:`Batcher.submit` gathers them.

    - A function (``async def f(items)``) gets one batcher per event loop; a
      method (``async def m(self, items)``) one per instance and event loop.
      A batcher is created on the first call in a loop.
    - The wrapper (for a method, ``obj.m``) has ``flush()``, ``aclose()`` and
      ``stats`` for the running loop's batcher; ``flush``/``aclose`` do
      nothing and ``stats`` is all zero when that loop has no batcher yet.
      After ``aclose()`` the next call starts a fresh batcher.
    - The types are kept: ``async def f(items: list[T]) -> list[R]`` becomes a
      callable ``(item: T) -> Coroutine[Any, Any, R]``.

    A function is a method only when it is written in a class body (its
    ``__qualname__`` is ``Cls.m``): ``async def f(items, scale)`` at module
    level, or a partial or callable object of two parameters, is refused.
    An ``async def f(items)`` in a class body is a function that does not
    bind, like a ``staticmethod``. For a per-class batcher put ``@classmethod``
    above ``@batch``.

    Raises:
        TypeError: at decoration, for a function that is not ``async``, that
            does not take one list of items (after ``self`` for a method
            written in a class body), or a ``classmethod`` object; the
            message says the signature ``@batch`` needs.
        ValueError: at decoration, for an invalid option (the batcher's own
            validation message).
    """
    return _BatchDecorator(options)


def _own_policy(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with an :class:`Adaptive` of its own: one Adaptive serves one
    Batcher (its measurements are that batcher's), so every batcher of a
    wrapper, of every instance and loop, tunes its own limit."""
    policy = settings.get("max_concurrency")
    if isinstance(policy, Adaptive):
        return {**settings, "max_concurrency": copy.deepcopy(policy)}
    return dict(settings)


def _maker(sink: Any, options: Mapping[str, Any]) -> Callable[..., Batcher[Any, Any]]:
    """Makes the batchers of one wrapper: ``Batcher(sink, **options, **settings)``."""

    def make(**settings: Any) -> Batcher[Any, Any]:
        return Batcher(sink, **_own_policy({**options, **settings}))

    return make
