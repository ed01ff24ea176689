"""``DataLoader``: per-key request coalescing and caching on top of the Batcher.

How a load travels:

- The cache maps a cache key to the *Batcher's* future for that key (or to a
  finished future made by :meth:`DataLoader.prime`). A finished future is
  handed out as it is: cancelling a finished future does nothing, so sharing
  it is safe.
- A key that is still loading is a ``_Slot``: its Batcher future, plus the
  callers waiting on it. Each caller gets its own ``_Waiter`` future, so one
  caller's cancellation never cancels the load for the others. A waiter
  counts itself out when it is cancelled; when the last one goes before the
  result, the slot cancels its Batcher future (the Batcher drops a cancelled
  item at dispatch, so the batch function never sees the key) and leaves the
  cache.
- ``load_many`` joins every slot it needs with one ``_Gather`` future that
  counts the slots down, instead of a future and a callback per key.

No task and no callback per caller: a waiter is resolved by its slot's one
done-callback, and notices its own cancellation by overriding ``cancel()``
(which ``Task.cancel``, ``gather`` and timeouts all go through).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
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

from ._batcher import Batcher
from ._exceptions import ResultMismatch
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
    max_concurrency: int
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


class _Waiter(asyncio.Future[Any]):
    """One caller's view of a slot: cancelling it cancels only that caller."""

    __slots__ = ("_slot",)
    _slot: _Slot

    def cancel(self, msg: Any | None = None) -> bool:
        if not super().cancel(msg):
            return False
        self._slot.leave()
        return True


class _Gather(asyncio.Future[list[Any]]):
    """The future of one ``load_many`` call: done when its last slot settles."""

    __slots__ = ("_futs", "_remaining", "_return_exceptions", "_slots")
    _futs: list[asyncio.Future[Any]]
    _slots: list[_Slot]
    _remaining: int
    _return_exceptions: bool

    def cancel(self, msg: Any | None = None) -> bool:
        if not super().cancel(msg):
            return False
        slots, self._slots = self._slots, []
        for slot in slots:
            slot.leave()
        return True

    def finish(self) -> None:
        # Every future is done now: read them in input order.
        self._slots = []
        futs = self._futs
        try:
            values = [fut.result() for fut in futs]
        except BaseException:
            values = []
            for fut in futs:
                try:
                    values.append(fut.result())
                except BaseException as exc:
                    if not self._return_exceptions:
                        self.set_exception(exc)
                        return
                    values.append(exc)
        self.set_result(values)


class _Slot:
    """A key being loaded: its Batcher future and the callers waiting for it."""

    __slots__ = ("ck", "fut", "gathers", "live", "loader", "waiters")

    def __init__(self, loader: DataLoader[Any, Any], ck: Hashable, fut: asyncio.Future[Any]):
        self.loader = loader
        self.ck = ck
        self.fut = fut
        self.waiters: list[_Waiter] = []
        self.gathers: list[_Gather] | None = None
        self.live = 0  # callers (waiters and gathers) not cancelled

    def leave(self) -> None:
        self.live -= 1
        if self.live == 0 and not self.fut.done():
            # Every caller gave up before the result. Forget the key first, so
            # that a load in this same iteration starts afresh instead of
            # finding a cancelled future, then withdraw it: before dispatch the
            # Batcher drops it, after dispatch it drops its result.
            self.loader._forget(self)
            self.fut.cancel()

    def settle(self, fut: asyncio.Future[Any]) -> None:
        """The Batcher resolved the key: pass the outcome to every caller."""
        self.loader._slots.pop(fut, None)
        waiters, self.waiters = self.waiters, []
        if fut.cancelled():
            for waiter in waiters:
                waiter.cancel()
        else:
            exc = fut.exception()
            if exc is None:
                value = fut.result()
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(value)
            else:
                self.loader._forget(self)  # a failed load is not cached
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
        gathers = self.gathers
        if gathers is not None:
            self.gathers = None
            for gather in gathers:
                if not gather.done():
                    gather._remaining -= 1
                    if gather._remaining == 0:
                        gather.finish()


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

    Args:
        batch_load_fn: ``async def fn(keys: list[K])`` returning either a
            sequence with one value per key, in key order, or a mapping from
            key (``cache_key(key)`` when given) to value. A value that is an
            ``Exception`` instance fails only that key; raising fails every key
            of the call. A key missing from a mapping fails with
            ``ResultMismatch`` naming it; a sequence of the wrong length, or
            ``None``, fails every key with ``ResultMismatch``.
        max_batch_size: keys per call of ``batch_load_fn`` (``>= 1``).
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

    Raises:
        TypeError: ``batch_load_fn`` or ``cache_key`` is not callable,
            ``cache_map`` is not a mutable mapping, or ``batcher_options``
            names an option the loader sets itself.
        ValueError: a bad ``max_batch_size``, ``max_wait`` or Batcher option.
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
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
            raise TypeError(f"max_batch_size must be an int, got {max_batch_size!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size!r}")
        name = batcher_options.get("name") or str(
            getattr(batch_load_fn, "__qualname__", None) or repr(batch_load_fn)
        )
        batcher_options["name"] = name
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
        self._slots: dict[asyncio.Future[Any], _Slot] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

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

        Raises (at once): ``RuntimeError`` with no running loop, or when the
        loader is bound to another loop that is still open; ``BatcherClosed``
        after :meth:`aclose` for a key that is not cached; ``QueueFull`` when
        a ``max_pending`` bound is reached; ``TypeError`` for an unhashable
        key without ``cache_key``.

        Cancellation: cancelling the returned future (or the task awaiting
        it) affects only this caller. If every caller of a key cancels before
        its batch is dispatched, the key is withdrawn from the batch and is
        not cached.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        ck: Hashable = key if self._cache_key is None else self._cache_key(key)
        cache = self._cache
        if cache is not None:
            try:
                fut = cache.get(ck)
            except TypeError:
                raise _unhashable(key) from None
            if fut is not None:
                if fut.done():
                    return fut
                slot = self._slots.get(fut) or self._submit(key, ck)
            else:
                slot = self._submit(key, ck)
        else:
            slot = self._submit(key, ck)
        # Inlined _Slot.join: this is the hot path.
        waiter = _Waiter(loop=loop)
        waiter._slot = slot
        slot.waiters.append(waiter)
        slot.live += 1
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
        key. With ``return_exceptions=False`` the first failure in input order
        is raised once every key is resolved; with ``True`` failures are
        returned in place of values. Cancelling it cancels its interest in
        every key (keys nobody else waits for are withdrawn, as with
        :meth:`load`). Raises at once like :meth:`load`.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        gather = _Gather(loop=loop)
        futs: list[asyncio.Future[Any]] = []
        joined: list[_Slot] = []
        gather._futs = futs
        gather._slots = joined
        gather._return_exceptions = return_exceptions
        cache = self._cache
        slots = self._slots
        cache_key = self._cache_key
        try:
            for key in keys:
                ck: Hashable = key if cache_key is None else cache_key(key)
                slot = None
                if cache is not None:
                    try:
                        fut = cache.get(ck)
                    except TypeError:
                        raise _unhashable(key) from None
                    if fut is not None:
                        if fut.done():
                            futs.append(fut)
                            continue
                        slot = slots.get(fut)
                if slot is None:
                    slot = self._submit(key, ck)
                gathers = slot.gathers
                if gathers is None:
                    slot.gathers = [gather]
                elif gathers[-1] is not gather:
                    gathers.append(gather)
                else:  # a repeated key: this call already waits for it
                    futs.append(slot.fut)
                    continue
                slot.live += 1
                joined.append(slot)
                futs.append(slot.fut)
        except BaseException:
            gather.cancel()
            raise
        gather._remaining = len(joined)
        if not joined:
            gather.finish()
        return gather

    def _submit(self, key: K, ck: Hashable) -> _Slot:
        fut = self._batcher.submit_nowait(key)
        slot = _Slot(self, ck, fut)
        self._slots[fut] = slot
        fut.add_done_callback(slot.settle)
        if self._cache is not None:
            self._cache[ck] = fut
        return slot

    def _forget(self, slot: _Slot) -> None:
        self._slots.pop(slot.fut, None)
        cache = self._cache
        if cache is not None and cache.get(slot.ck) is slot.fut:
            del cache[slot.ck]

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
            self._slots.clear()
            if self._cache is not None:
                self._cache.clear()
        self._loop = loop

    # ------------------------------------------------------------------- cache

    def prime(self, key: K, value: V | Exception) -> Self:
        """Put ``value`` in the cache for ``key``, unless the key is already there.

        An ``Exception`` instance is cached as that key's failure (loads of
        it raise it until it is cleared). To replace a cached value, clear
        first: ``loader.clear(key).prime(key, value)``. Does nothing with
        ``cache=False``. Needs the running loop (it makes a future).
        """
        cache = self._cache
        if cache is None:
            return self
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        ck = key if self._cache_key is None else self._cache_key(key)
        if ck in cache:
            return self
        fut: asyncio.Future[V] = loop.create_future()
        if isinstance(value, Exception):
            fut.set_exception(value)
            fut.exception()  # nobody may ever load it: do not log it as unretrieved
        else:
            fut.set_result(value)
        cache[ck] = fut
        return self

    def clear(self, key: K) -> Self:
        """Drop ``key`` from the cache; the next load asks the batch function.

        Callers already waiting for the key still get the result of the load
        in progress. Returns the loader, for chaining.
        """
        cache = self._cache
        if cache is not None:
            cache.pop(key if self._cache_key is None else self._cache_key(key), None)
        return self

    def clear_all(self) -> Self:
        """Empty the cache (loads in progress still resolve their callers)."""
        if self._cache is not None:
            self._cache.clear()
        return self

    # --------------------------------------------------------------- lifecycle

    @property
    def name(self) -> str:
        """The loader's name: ``name=`` or the batch function's qualified name."""
        return self._name

    @property
    def stats(self) -> BatcherStats:
        """The underlying Batcher's counters.

        They count keys sent to the Batcher, not loads: a load served from
        the cache, or waiting for a key already loading, is not in them.
        """
        return self._batcher.stats

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has started."""
        return self._batcher.closed

    async def aclose(self, cancel: bool = False) -> None:
        """Close the underlying Batcher (see :meth:`Batcher.aclose`).

        Keys still pending are loaded (``cancel=False``) or fail with
        ``BatcherClosed`` (``cancel=True``). Afterwards cached keys still
        resolve; a load that needs the batch function raises
        ``BatcherClosed``. Idempotent.
        """
        await self._batcher.aclose(cancel=cancel)

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        await self._batcher.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        cached = "off" if self._cache is None else len(self._cache)
        state = "closed" if self._batcher.closed else "open"
        return f"<DataLoader {self._name!r} [{state}] cached={cached} loading={len(self._slots)}>"


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


def _unhashable(key: object) -> TypeError:
    return TypeError(
        f"DataLoader keys must be hashable, or pass cache_key= to map them to a "
        f"hashable cache key; cannot hash {key!r}"
    )
