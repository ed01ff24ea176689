"""``DataLoader``: per-key request coalescing and caching on top of the Batcher.

How a load travels:

- A key being loaded is a ``_Key``: one future that is at once the cache
  entry and the Batcher's future for the key (``Batcher._put_key`` takes it
  in place of a future of its own). The Batcher resolves it like any of its
  futures; ``_Key.set_result``/``set_exception``/``cancel`` pass the outcome
  on to the key's callers there and then: no done-callback, so callers wake
  in the loop iteration that delivers the batch.
- A finished key (or a future made by :meth:`DataLoader.prime`) is handed
  out as it is: cancelling a finished future does nothing, so sharing it is
  safe.
- A caller of a key that is still loading gets its own ``_Waiter`` future,
  so one caller's cancellation never cancels the load for the others. A
  waiter counts itself out when it is cancelled (it overrides ``cancel()``,
  which ``Task.cancel``, ``gather`` and timeouts all go through); when the
  last caller goes before the result, the key cancels its future (the
  Batcher drops a cancelled item at dispatch, so the batch function never
  sees the key) and leaves the cache.
- ``load_many`` joins every key it needs with one ``_Gather`` future that
  counts the keys down, instead of a future per load.

No task and no callback per caller, and the loop is checked with a
thread-id compare per call (``asyncio.get_running_loop`` costs a ``getpid``
system call per call on Python 3.11).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import threading
from collections.abc import (
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Mapping,
    MutableMapping,
    Sequence,
)
from typing import Any, Generic, Literal, Self, TypeAlias, TypedDict, TypeVar, Unpack, overload

from ._batcher import _UNSET, Batcher, _Unset
from ._concurrency import Adaptive
from ._exceptions import BatcherClosed, ResultMismatch
from ._observe import Observer
from ._options import _check_int
from ._results import describe
from ._retry import Retry
from ._stats import BatcherStats, BatchReport

__all__ = ["BatchLoadFn", "DataLoader", "LoaderOptions"]

K = TypeVar("K")
V = TypeVar("V")

BatchLoadFn: TypeAlias = Callable[
    [list[K]],
    Awaitable[Sequence[V | Exception] | Mapping[Any, V | Exception]],
]
"""``async def load(keys: list[K]) -> Sequence[V | Exception] | Mapping[key, V | Exception]``."""


class LoaderOptions(TypedDict, total=False):
    """Batcher options a :class:`DataLoader` passes through (see :class:`Batcher`).

    ``max_size``, ``max_wait``, ``key`` and ``dedupe`` are not among them: the
    loader sets them from ``max_batch_size``, ``max_wait`` and ``cache_key``.
    """

    interval: float | None
    max_weight: float | None
    weigh: Callable[[Any], float] | None
    max_concurrency: int | Adaptive | Literal["auto"] | None
    max_pending: int | None
    overflow: Literal["block", "reject", "drop_oldest"]
    partition: Callable[[Any], Hashable] | None
    timeout: float | None
    retry: Retry | None
    on_batch: Callable[[BatchReport], object] | None
    name: str | None


_OWN_OPTIONS = {
    "max_size": "max_batch_size",
    "key": "cache_key",
    "dedupe": None,
    "sink": "batch_load_fn",
}


_future_cancel = asyncio.Future.cancel
_future_exception = asyncio.Future.exception
_future_result = asyncio.Future.result
_future_set_exception = asyncio.Future.set_exception
_future_set_result = asyncio.Future.set_result
_get_ident = threading.get_ident


class _Key(asyncio.Future[Any]):
    """A key being loaded: its cache entry, the Batcher's future, and its callers.

    The Batcher resolves it; the overrides below resolve the key's callers
    (``waiters`` from :meth:`DataLoader.load`, ``gathers`` from
    :meth:`DataLoader.load_many`) in the same step. ``live`` counts the
    callers not cancelled. The loader sets every attribute before use. It is
    handed to a caller only once done, or with ``cache=False``, where a load
    has it to itself (the Batcher coalesces equal keys of one batch, each
    with its own future).
    """

    __slots__ = ("ck", "gathers", "live", "loader", "waiters")
    loader: DataLoader[Any, Any] | None  # None once resolved (no reference cycle)
    ck: Hashable
    waiters: list[_Waiter] | None
    gathers: list[_Gather] | None
    live: int

    def leave(self) -> None:
        """One caller gave up; the last one to go before the result withdraws the key."""
        self.live -= 1
        if self.live == 0 and not self.done():
            # Forget the key (in cancel) before the Batcher sees the cancellation,
            # so that a load in this same iteration starts afresh; before
            # dispatch the Batcher drops the key, after dispatch its result.
            self.cancel()

    def set_result(self, result: Any) -> None:
        _future_set_result(self, result)
        self.loader = None
        waiters = self.waiters
        if waiters is not None:
            self.waiters = None
            for waiter in waiters:
                if not waiter.done():
                    _future_set_result(waiter, result)
        gathers = self.gathers
        if gathers is not None:
            self.gathers = None
            for gather in gathers:
                if not gather.done():
                    gather._remaining -= 1
                    if gather._remaining == 0:
                        gather.finish()

    def set_exception(self, exception: BaseException | type[BaseException]) -> None:
        _future_set_exception(self, exception)
        error = _future_exception(self)  # retrieved: its callers get it
        assert error is not None
        loader = self.loader
        self.loader = None
        if loader is not None:
            loader._forget(self)  # a failed load is not cached
        waiters = self.waiters
        if waiters is not None:
            self.waiters = None
            for waiter in waiters:
                if not waiter.done():
                    _future_set_exception(waiter, error)
        if self.gathers is not None:
            self._count_down()

    def cancel(self, msg: Any | None = None) -> bool:
        # Every caller left (leave), or someone cancelled the cache entry
        # itself: its callers are cancelled with it.
        if not _future_cancel(self, msg):
            return False
        loader = self.loader
        self.loader = None
        if loader is not None:
            loader._forget(self)  # a cancelled load is not cached
        waiters = self.waiters
        if waiters is not None:
            self.waiters = None
            for waiter in waiters:
                _future_cancel(waiter, msg)
        if self.gathers is not None:
            self._count_down()
        return True

    def _count_down(self) -> None:
        gathers = self.gathers
        assert gathers is not None
        self.gathers = None
        for gather in gathers:
            if not gather.done():
                gather._remaining -= 1
                if gather._remaining == 0:
                    gather.finish()


class _Waiter(asyncio.Future[Any]):
    """One caller's view of a key: cancelling it cancels only that caller."""

    __slots__ = ("_key",)
    _key: _Key

    def cancel(self, msg: Any | None = None) -> bool:
        if not _future_cancel(self, msg):
            return False
        self._key.leave()
        return True


class _Gather(asyncio.Future[list[Any]]):
    """The future of one ``load_many`` call: done when its last key settles.

    ``_remaining`` counts the keys it waits for that are not resolved yet.
    It starts at 0 and is raised by the number of keys once they are all
    joined: a key resolved while ``load_many`` still runs (an eager task
    factory can run a whole batch at once) takes it below 0, never to 0.
    """

    __slots__ = ("_cks", "_futs", "_keys", "_remaining", "_return_exceptions")
    _cks: list[Hashable]  # every load's cache key, in input order
    _futs: dict[Hashable, Any]  # each distinct cache key's future (None until joined)
    _keys: list[_Key]  # the keys it waits for
    _remaining: int
    _return_exceptions: bool

    def cancel(self, msg: Any | None = None) -> bool:
        if not _future_cancel(self, msg):
            return False
        for key in self._keys:
            key.leave()
        return True

    def finish(self) -> None:
        # Every future is done now: one read per distinct key, then the
        # values in input order (both loops in C).
        futs = self._futs
        try:
            values = dict(zip(futs, map(_future_result, futs.values()), strict=True))
        except BaseException:
            self._finish_with_errors()
            return
        self.set_result(list(map(values.__getitem__, self._cks)))

    def _finish_with_errors(self) -> None:
        futs = self._futs
        values: list[Any] = []
        for ck in self._cks:
            try:
                values.append(futs[ck].result())
            except BaseException as exc:
                if not self._return_exceptions:
                    self.set_exception(exc)
                    return
                values.append(exc)
        self.set_result(values)


def _not_running() -> bool:
    return False


class DataLoader(Generic[K, V]):
    """Coalesce the loads of one request into batched, cached calls.

    Resolvers ask for one key at a time; the loader hands the keys asked for
    in the same loop iteration to one call of your batch function, and caches
    the result per key, so a GraphQL query (or any tree of resolvers) costs
    one query per level instead of one per node (the N+1 problem)::

        async def load_users(ids: list[int]) -> Mapping[int, User]:
            rows = await db.fetch("SELECT * FROM users WHERE id = ANY($1)", ids)
            return {row["id"]: User(**row) for row in rows}

        async def handle_request(request):
            users = DataLoader(load_users)  # one loader per request
            a, b = await asyncio.gather(users.load(1), users.load(2))  # one query

    **One loader per request.** The cache lives as long as the loader and is
    never invalidated by itself: a loader shared by every request serves
    stale data, keeps every value ever loaded, and mixes users' permissions.
    Create loaders where the request starts (a GraphQL ``context_getter``, a
    middleware) and drop them with it. A loader is bound to the event loop it
    is first used on; using it from another loop while that one is still open
    raises ``RuntimeError`` (loaders kept in globals and reused from another
    thread or another ``asyncio.run`` are a classic source of hangs with other
    DataLoader libraries). Once that loop is closed, the next use rebinds and
    empties the cache.

    It is a :class:`Batcher` underneath (``dedupe=True``, ``key=cache_key``,
    ``max_size=max_batch_size``): every Batcher option can be passed through,
    e.g. ``max_concurrency``, ``timeout``, ``retry``, ``partition``.

    **Recursive loads.** A batch function may ``load()`` from its own loader
    (a tree of keys, a factorial): the nested keys go into a later batch,
    which is dispatched while the outer call still runs. That needs a free
    dispatch slot, so the loader has no concurrency limit by default
    (``max_concurrency=None``, like every other DataLoader); with a limit,
    keep it above the recursion depth, or the nested batch waits for a slot
    its own parent holds.

    Keys are any hashable value, ``None`` included (many DataLoaders refuse
    ``None``; here it is a key like any other).

    Args:
        batch_load_fn: ``async def fn(keys: list[K])`` returning either a
            sequence with one value per key, in key order, or a mapping from
            key (``cache_key(key)`` when given) to value. A value that is an
            ``Exception`` instance fails only that key; raising fails every key
            of the call. A key missing from a mapping fails with
            ``ResultMismatch`` naming it; a sequence of the wrong length, or
            ``None``, fails every key with ``ResultMismatch``.
        max_batch_size: keys per call of ``batch_load_fn``, an ``int >= 1``
            (``1000.0`` is a ``TypeError``, where some DataLoaders take floats).
        max_wait: seconds the first key of a batch waits for others. ``0`` (the
            default) dispatches at the end of the current loop iteration, so
            every load issued before the loop goes idle shares the call.
        cache: ``False`` disables the cache: every load asks the batch
            function again, but equal keys of one batch still share one slot.
        cache_key: ``cache_key(key) -> Hashable``, for keys that are not
            hashable or whose identity is not their equality (``dict`` keys,
            objects with an ``id``).
        cache_map: the cache, any ``MutableMapping`` from cache key to
            ``asyncio.Future`` (e.g. an LRU mapping to bound memory); a plain
            dict by default. It is not used when ``cache=False``.
        **batcher_options: passed to the :class:`Batcher`; see
            :class:`LoaderOptions`. ``name`` defaults to the batch function's
            qualified name, used in ``repr`` and error messages.
            ``max_concurrency`` (calls of ``batch_load_fn`` running at once)
            defaults to ``None``: no limit.

    Raises:
        TypeError: ``batch_load_fn`` is not callable or is a plain (not
            ``async``) function, ``cache_key`` is not callable, ``cache_map``
            is not a mutable mapping, ``batcher_options`` names an option the
            loader sets itself, or a count (``max_batch_size``,
            ``max_concurrency``, ``max_pending``) is not an ``int``.
        ValueError: a bad ``max_batch_size``, ``max_wait`` or Batcher option
            (out of range, or not finite where a number is needed).
    """

    def __init__(
        self,
        batch_load_fn: BatchLoadFn[K, V],
        *,
        max_batch_size: int = 1000,
        max_wait: float | None = 0.0,
        cache: bool = True,
        cache_key: Callable[[K], Hashable] | None = None,
        cache_map: MutableMapping[Any, asyncio.Future[V]] | None = None,
        **batcher_options: Unpack[LoaderOptions],
    ) -> None:
        if not callable(batch_load_fn):
            raise TypeError(
                "DataLoader needs an async batch function taking a list of keys and "
                "returning a sequence or mapping of values, got "
                f"{type(batch_load_fn).__name__}: {batch_load_fn!r}"
            )
        for option, ours in _OWN_OPTIONS.items():
            if option in batcher_options:
                hint = f"; use {ours}=" if ours else ""
                raise TypeError(f"DataLoader sets the Batcher's {option}= itself{hint}")
        if cache_key is not None and not callable(cache_key):
            raise TypeError(f"cache_key must be callable, got {cache_key!r}")
        if cache_map is not None and not isinstance(cache_map, MutableMapping):
            raise TypeError(
                f"cache_map must be a MutableMapping (get, __setitem__, __delitem__, "
                f"clear), got {type(cache_map).__name__}"
            )
        _check_int("max_batch_size", max_batch_size, 1)
        name = batcher_options.get("name") or str(
            getattr(batch_load_fn, "__qualname__", None) or repr(batch_load_fn)
        )
        _check_async(batch_load_fn, name)
        batcher_options["name"] = name
        # No limit by default: a batch function that loads from its own loader
        # needs a free slot for the nested batch while it holds its own.
        batcher_options.setdefault("max_concurrency", None)
        self._batcher: Batcher[K, V] = Batcher(
            _checked(batch_load_fn, name),
            max_size=max_batch_size,
            max_wait=max_wait,
            key=cache_key,
            dedupe=True,
            **batcher_options,
        )
        self._name = name
        self._cache_key = cache_key
        self._cache: MutableMapping[Any, asyncio.Future[V]] | None = None
        if cache:
            self._cache = {} if cache_map is None else cache_map
        self._loop: asyncio.AbstractEventLoop | None = None
        # Per call, the loop is checked as "on the bound loop's thread, and that
        # loop is running" (then it is the running loop); see _check_loop.
        self._thread: int | None = None
        self._running: Callable[[], bool] = _not_running
        # Plain counters, read by ``stats``: loads answered without sending a
        # key (hits), loads that sent one (misses), and batcher slots that
        # prime() answered before dispatch (the batcher never resolves those).
        self._hits = 0
        self._misses = 0

    # ----------------------------------------------------------------- loading

    def load(self, key: K) -> asyncio.Future[V]:
        """Load one key: a future of its value, shared with concurrent loads.

        Use it as ``await loader.load(key)``; it is a plain method, so loads
        can also be started now and awaited later. A cached key resolves at
        once; otherwise the key joins the open batch, and every load of that
        key until the result arrives waits for the same call.

        Raises (when awaited): the key's own error: what ``batch_load_fn``
        raised or returned for it, ``ResultMismatch``, ``TimeoutError``
        (Batcher ``timeout``), ``BatcherClosed`` (closed with
        ``cancel=True``). Failed loads are not cached: the next load asks
        again.

        Raises (at once, before anything changes): ``RuntimeError`` with no
        running loop (called from another thread, or outside a coroutine), or
        when the loader is bound to another loop that is still open;
        ``BatcherClosed`` after :meth:`aclose` for a key that is not cached;
        ``QueueFull`` when a ``max_pending`` bound is reached; ``TypeError``
        for an unhashable key without ``cache_key``. Each names the loader.

        ``None`` is a key like any other.

        Cancellation: cancelling the returned future (or the task awaiting
        it) affects only this caller. If every caller of a key cancels before
        its batch is dispatched, the key is withdrawn from the batch and is
        not cached.
        """
        if self._thread != _get_ident() or not self._running():
            self._check_loop()
        ck: Hashable = key if self._cache_key is None else self._cache_key(key)
        cache = self._cache
        if cache is None:
            # Not shared with anyone (equal keys of one batch share the Batcher's
            # slot, each with its own future): the key's future is the caller's.
            if self._batcher.closed:
                raise self._closed_error()
            kf = self._new_key(ck)
            kf.live = 1
            self._batcher._put_key(key, ck, kf)
            self._misses += 1
            return kf
        try:
            fut = cache.get(ck)
        except TypeError:
            raise _unhashable(key) from None
        if fut is not None:
            if fut.done():
                self._hits += 1
                return fut
            if type(fut) is _Key and fut.loader is self:
                waiter = _Waiter(loop=self._loop)
                waiter._key = fut
                if fut.waiters is None:
                    fut.waiters = [waiter]
                else:
                    fut.waiters.append(waiter)
                fut.live += 1
                self._hits += 1
                return waiter
            # else: a pending future someone else put in the cache; replace it
        if self._batcher.closed:
            raise self._closed_error()
        waiter = _Waiter(loop=self._loop)
        kf = self._new_key(ck)
        kf.waiters = [waiter]
        kf.live = 1
        waiter._key = kf
        cache[ck] = kf
        try:
            self._batcher._put_key(key, ck, kf)
        except BaseException:
            kf.cancel()  # uncached
            raise
        self._misses += 1
        return waiter

    @overload
    def load_many(
        self, keys: Iterable[K], return_exceptions: Literal[False] = False
    ) -> asyncio.Future[list[V]]: ...

    @overload
    def load_many(
        self, keys: Iterable[K], return_exceptions: Literal[True]
    ) -> asyncio.Future[list[V | BaseException]]: ...

    def load_many(
        self, keys: Iterable[K], return_exceptions: bool = False
    ) -> asyncio.Future[list[V]] | asyncio.Future[list[V | BaseException]]:
        """Load several keys: a future of their values, in input order.

        The same as gathering :meth:`load` of each key, without a future per
        key: ``keys`` is read once, at the call, and a key repeated in it is
        loaded once (also with ``cache=False``). With
        ``return_exceptions=False`` the first failure in input order is
        raised once every key is resolved; with ``True`` failures are
        returned in place of values. Cancelling it cancels its interest in
        every key (keys nobody else waits for are withdrawn, as with
        :meth:`load`). Raises at once like :meth:`load`, with the same loop,
        thread and state checks made before anything changes; then none of
        its keys is loaded for it. In ``stats`` each key of ``keys`` counts
        as one load (a repeated key joins the first: a cache hit).
        """
        if self._thread != _get_ident() or not self._running():
            self._check_loop()
        loop = self._loop
        cache_key = self._cache_key
        # The per-load work is done in C: copy the keys, find the distinct ones
        # (in first-seen order); finish() maps the values back onto the loads.
        keys = list(keys)
        cks: list[Any] = keys if cache_key is None else list(map(cache_key, keys))
        try:
            futs: dict[Any, Any] = dict.fromkeys(cks)
        except TypeError:
            raise _unhashable(_first_unhashable(keys, cks)) from None
        if self._batcher.closed and not self._all_answerable(futs):
            raise self._closed_error()
        # The key object to load for each cache key: the first one seen.
        firsts = (
            None if cache_key is None else dict(zip(reversed(cks), reversed(keys), strict=True))
        )
        gather = _Gather(loop=loop)
        joined: list[_Key] = []
        gather._cks = cks
        gather._futs = futs
        gather._keys = joined
        gather._return_exceptions = return_exceptions
        gather._remaining = 0
        cache = self._cache
        new_keys: list[Any] = []  # submitted together after the loop
        new_cks: list[Hashable] = []
        new_futs: list[asyncio.Future[Any]] = []
        try:
            for ck in futs:
                if cache is not None:
                    fut = cache.get(ck)
                    if fut is not None:
                        if fut.done():
                            futs[ck] = fut
                            continue
                        if type(fut) is _Key and fut.loader is self:
                            gathers = fut.gathers
                            if gathers is None:
                                fut.gathers = [gather]
                            else:
                                gathers.append(gather)
                            fut.live += 1
                            joined.append(fut)
                            futs[ck] = fut
                            continue
                        # else: a pending future someone else put in the cache
                kf = _Key(loop=loop)
                kf.loader = self
                kf.ck = ck
                kf.waiters = None
                kf.gathers = [gather]
                kf.live = 1
                futs[ck] = kf
                if cache is not None:
                    cache[ck] = kf
                joined.append(kf)
                new_keys.append(ck if firsts is None else firsts[ck])
                new_cks.append(ck)
                new_futs.append(kf)
            if new_futs:
                self._batcher._put_keys(new_keys, new_cks, new_futs)
        except BaseException:
            # Withdraws every key this call alone wanted, submitted or not.
            gather.cancel()
            raise
        self._misses += len(new_futs)
        self._hits += len(cks) - len(new_futs)
        gather._remaining += len(joined)
        if gather._remaining == 0 and not gather.done():
            gather.finish()
        return gather

    def _all_answerable(self, cks: Iterable[Hashable]) -> bool:
        """Whether every key is cached or loading already (no new batcher slot)."""
        cache = self._cache
        if cache is None:
            return False
        for ck in cks:
            fut = cache.get(ck)
            if fut is None or not (fut.done() or (type(fut) is _Key and fut.loader is self)):
                return False
        return True

    def _closed_error(self) -> BatcherClosed:
        return BatcherClosed(
            f"{self!r} is closed; keys that are not cached cannot be loaded after aclose()"
        )

    def _new_key(self, ck: Hashable) -> _Key:
        kf = _Key(loop=self._loop)
        kf.loader = self
        kf.ck = ck
        kf.waiters = None
        kf.gathers = None
        return kf

    def _forget(self, kf: _Key) -> None:
        """Drop a key that failed or was withdrawn from the cache (if still there)."""
        cache = self._cache
        if cache is None:
            return
        ck = kf.ck
        try:
            if cache.get(ck) is kf:
                del cache[ck]
        except Exception as exc:  # a user's cache_map; the Batcher is delivering
            assert self._loop is not None
            self._loop.call_exception_handler(
                {
                    "message": f"cache_map of {self!r} raised while forgetting {ck!r}",
                    "exception": exc,
                }
            )

    def _check_loop(self) -> None:
        """The slow path of the per-call loop check: bind, rebind or refuse."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                f"{self!r} needs a running event loop: no running event loop in this "
                "thread. Call it from a coroutine or callback on the loader's loop (from "
                "another thread, submit a coroutine with asyncio.run_coroutine_threadsafe)"
            ) from None
        if loop is not self._loop:
            self._bind(loop)
        self._thread = _get_ident()
        self._running = loop.is_running

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        bound = self._loop
        if bound is not None:
            if not bound.is_closed():
                raise RuntimeError(
                    f"{self!r} is bound to another event loop ({bound!r}) that is "
                    "still open; a DataLoader caches futures of one loop. Create one "
                    "loader per request (and so per loop), not one per process"
                )
            # The old loop is gone, and its futures with it.
            if self._cache is not None:
                self._cache.clear()
        self._loop = loop

    # ------------------------------------------------------------------- cache

    def prime(self, key: K, value: V | Exception, force: bool = False) -> Self:
        """Give ``key`` the value ``value`` without calling the batch function.

        - Loads of ``key`` waiting in a batch that is not dispatched yet are
          answered with ``value`` now, and the key leaves that batch (a batch
          whose keys are all primed is never sent). This holds with
          ``cache=False`` too, and whatever ``force`` says.
        - The cache (``cache=True``) gets ``value`` for ``key`` if it holds
          nothing for it; with ``force=True`` a cached value, or a load
          already dispatched, is replaced: later loads get ``value``. Callers
          already waiting for a dispatched load still get that load's result.
        - An ``Exception`` instance is ``key``'s failure: waiting loads raise
          it, and with ``cache=True`` later loads raise it until the key is
          cleared (a failure the batch function returns is never cached; a
          primed one is). It is not reported as "never retrieved".

        Same as strawberry's ``prime``. Returns the loader, for chaining.

        Raises:
            RuntimeError: no running event loop in this thread, or the
                loader is bound to another loop that is still open (it makes
                futures of the loader's loop).
            TypeError: ``key`` (or its ``cache_key``) is unhashable.

        Cancellation: not a coroutine; nothing to cancel.
        """
        return self.prime_many(((key, value),), force=force)

    def prime_many(
        self,
        values: Mapping[K, V | Exception] | Iterable[tuple[K, V | Exception]],
        force: bool = False,
    ) -> Self:
        """:meth:`prime` for each ``(key, value)`` of a mapping or of pairs, in order.

        Every key is checked (hashable) before anything changes; a key given
        twice is primed twice, in order (without ``force`` the first value
        stays cached). Raises like :meth:`prime`. Returns the loader.
        """
        self._check_loop()
        pairs = values.items() if isinstance(values, Mapping) else values
        cache_key = self._cache_key
        primed: list[tuple[Hashable, V | Exception]] = []
        for key, value in pairs:
            ck = key if cache_key is None else cache_key(key)
            try:
                hash(ck)
            except TypeError:
                raise _unhashable(key) from None
            primed.append((ck, value))
        loop = self._loop
        assert loop is not None
        cache = self._cache
        for ck, value in primed:
            self._answer_pending(ck, value)
            if cache is None:
                continue
            if force or cache.get(ck) is None:
                fut: asyncio.Future[V] = loop.create_future()
                if isinstance(value, Exception):
                    fut.set_exception(value)
                    fut.exception()  # nobody may ever load it: not "never retrieved"
                else:
                    fut.set_result(value)
                cache[ck] = fut
        return self

    def _answer_pending(self, ck: Hashable, value: V | Exception) -> None:
        """Resolve the loads of ``ck`` waiting in undispatched batches with ``value``."""
        batcher = self._batcher
        if batcher._loop is self._loop:  # else its batches belong to a loop that is gone
            batcher._answer_pending(ck, value)

    def clear(self, key: K) -> Self:
        """Drop ``key`` from the cache; the next load asks the batch function.

        Only the cache entry goes: loads already waiting for ``key`` still get
        the result of the load in progress (use :meth:`prime` to answer them
        with a value of your own). Does nothing with ``cache=False`` or for a
        key not cached. Needs no event loop, but while the loader's loop runs
        it must be called from that loop's thread. Returns the loader, for
        chaining.

        Raises:
            RuntimeError: called from another thread while the loader's loop
                runs (the cache is not thread-safe).
        """
        cache = self._cache
        if cache is not None:
            self._check_thread()
            cache.pop(key if self._cache_key is None else self._cache_key(key), None)
        return self

    def clear_all(self) -> Self:
        """Empty the cache; loads in progress still resolve their callers.

        Like :meth:`clear` for every key, with the same thread rule. Returns
        the loader.
        """
        if self._cache is not None:
            self._check_thread()
            self._cache.clear()
        return self

    def _check_thread(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running() and self._thread != _get_ident():
            raise RuntimeError(
                f"{self!r} belongs to an event loop running in another thread; "
                "change its cache from that loop's thread"
            )

    # --------------------------------------------------------------- lifecycle

    @property
    def name(self) -> str:
        """The loader's name: ``name=`` or the batch function's qualified name."""
        return self._name

    @property
    def stats(self) -> BatcherStats:
        """A snapshot of the loader's counters (a :class:`BatcherStats`).

        ``cache_hits`` counts loads answered without sending their key to the
        batch function: from the cache, or by joining a key already loading
        (also a key repeated within one ``load_many``). ``cache_misses``
        counts loads that sent their key (with ``cache=False``, every
        :meth:`load`). Each key of a ``load_many`` is one load. The other
        fields are the underlying Batcher's and count keys sent to it, not
        loads; a key answered by :meth:`prime` before its batch was
        dispatched counts as ``succeeded`` (or ``failed`` for an exception).
        """
        stats = self._batcher.stats
        return dataclasses.replace(
            stats,
            cache_hits=self._hits,
            cache_misses=self._misses,
        )

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has started."""
        return self._batcher.closed

    def configure(
        self,
        *,
        max_batch_size: int | _Unset = _UNSET,
        max_wait: float | _Unset | None = _UNSET,
        interval: float | _Unset | None = _UNSET,
        max_weight: float | _Unset | None = _UNSET,
        max_concurrency: int | Adaptive | Literal["auto"] | _Unset | None = _UNSET,
        max_pending: int | _Unset | None = _UNSET,
        timeout: float | _Unset | None = _UNSET,
    ) -> None:
        """:meth:`Batcher.configure` for the loader's batcher, at once and safely.

        ``max_batch_size`` is the loader's name for ``max_size``; the other
        options are the Batcher's.

        Raises:
            TypeError, ValueError: a value the constructor would refuse;
                nothing is changed then.
            BatcherClosed: the loader is closed.
        """
        if not isinstance(max_batch_size, _Unset):
            _check_int("max_batch_size", max_batch_size, 1)  # named as the loader names it
        self._batcher.configure(
            max_size=max_batch_size,
            max_wait=max_wait,
            interval=interval,
            max_weight=max_weight,
            max_concurrency=max_concurrency,
            max_pending=max_pending,
            timeout=timeout,
        )

    def _attach(self, observer: Observer) -> None:
        self._batcher._attach(observer)

    def _detach(self, observer: Observer) -> None:
        self._batcher._detach(observer)

    async def aclose(self, cancel: bool = False) -> None:
        """Close the underlying Batcher (see :meth:`Batcher.aclose`).

        Keys still pending are loaded (``cancel=False``) or fail with
        ``BatcherClosed`` (``cancel=True``). Afterwards cached keys still
        resolve; a load that needs the batch function raises
        ``BatcherClosed``. Idempotent.
        """
        await self._batcher.aclose(cancel=cancel)

    async def __aenter__(self) -> Self:
        self._check_loop()
        await self._batcher.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        cached = "off" if self._cache is None else len(self._cache)
        state = "closed" if self._batcher.closed else "open"
        stats = self._batcher.stats
        loading = stats.pending + stats.in_flight  # keys: one Batcher slot each
        return f"<DataLoader {self._name!r} [{state}] cached={cached} loading={loading}>"


def _check_async(fn: object, name: str) -> None:
    """Refuse a batch function that is plainly not async, at construction.

    A plain function or method (``def``, a lambda, a partial of one) would
    only fail once called. Other callables (objects with ``__call__``) are
    checked when called: see :func:`_checked`.
    """
    inner: Any = fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    inner = inspect.unwrap(inner)
    if (inspect.isfunction(inner) or inspect.ismethod(inner)) and not (
        inspect.iscoroutinefunction(inner)
    ):
        raise TypeError(
            f"batch function {name!r} of a DataLoader must be async (`async def "
            "load(keys): ...`, returning a sequence or mapping of values), but it is "
            "a plain function"
        )


def _checked(fn: BatchLoadFn[K, V], name: str) -> BatchLoadFn[K, V]:
    """The batch function, with the loader's own checks on what it returns."""

    @functools.wraps(fn)
    async def sink(keys: list[K]) -> Any:
        pending = fn(keys)
        if not inspect.isawaitable(pending):
            raise TypeError(
                f"batch function {name!r} must be async (return an awaitable of a "
                f"sequence or mapping of values), but it returned "
                f"{type(pending).__name__}"
            )
        result = await pending
        if result is None:
            # The Batcher reads None as "no results" (write-only sinks); for a
            # loader it is a forgotten return.
            raise ResultMismatch(
                f"batch function {name!r} returned None for {len(keys)} keys; it must "
                "return a sequence with one value per key, in key order, or a mapping "
                f"keyed by key (keys: {describe(keys)})"
            )
        return result

    return sink


def _first_unhashable(keys: list[Any], cks: list[Hashable]) -> object:
    for key, ck in zip(keys, cks, strict=True):
        try:
            hash(ck)
        except TypeError:
            return key
    return None  # pragma: no cover - only called when one of them is unhashable


def _unhashable(key: object) -> TypeError:
    return TypeError(
        f"DataLoader keys must be hashable, or pass cache_key= to map them to a "
        f"hashable cache key; cannot hash {key!r}"
    )
