"""Static checks of ``@batch``'s types: mypy reads this file, pytest does not run it.

Each ``assert_type`` pins what a decorated function or method looks like to a
caller; each ``# type: ignore[...]`` pins an error mypy must report (mypy
--strict flags an ignore that is not needed, so a lost error fails the check).
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, assert_type

from asyncbatch import BatchedFunction, BatchedMethod, BoundBatchedMethod, batch
from asyncbatch._stats import BatcherStats


class Vector:
    pass


@batch(max_size=64, max_wait=0.01)
async def embed(texts: list[str]) -> list[Vector]:
    return [Vector() for _ in texts]


@batch()
async def lookup(ids: list[int]) -> dict[int, str]:
    return {i: str(i) for i in ids}


@batch(max_size=10)
async def write(lines: list[bytes]) -> None:
    pass


@batch()
async def maybe(ids: list[int]) -> Sequence[float] | Mapping[int, float] | None:
    return None


@batch()
async def per_item_errors(ids: list[int]) -> list[int | ValueError]:
    return list(ids)


@batch()
async def takes_sequence(names: Sequence[str]) -> tuple[int, ...]:
    return tuple(len(n) for n in names)


class Store:
    @batch(max_size=500, key=lambda row: row)
    async def get(self, ids: list[int]) -> list[str]:
        return [str(i) for i in ids]

    @batch()
    async def put(self, rows: list[tuple[int, str]]) -> None:
        pass


async def check_functions() -> None:
    assert_type(embed, BatchedFunction[str, Vector])
    call = embed("hello")
    _ = assert_type(call, Coroutine[Any, Any, Vector])
    call.close()
    assert_type(await embed("hello"), Vector)
    assert_type(await embed("hello", timeout=1.0), Vector)
    assert_type(await lookup(1), str)
    assert_type(await write(b"x"), None)
    assert_type(await maybe(1), float | None)
    assert_type(await per_item_errors(1), int)
    assert_type(await takes_sequence("x"), int)

    assert_type(await embed.submit_many(["a", "b"]), list[Vector])
    assert_type(
        await embed.submit_many(["a"], return_exceptions=True), list[Vector | BaseException]
    )
    assert_type(await embed.flush(), None)
    assert_type(await embed.aclose(), None)
    assert_type(await embed.aclose(cancel=True), None)
    assert_type(embed.stats, BatcherStats)
    assert_type(embed.__name__, str)
    assert_type(embed.__qualname__, str)

    await embed(1)  # type: ignore[arg-type]
    await embed(["a"])  # type: ignore[arg-type]
    await lookup("1")  # type: ignore[arg-type]
    await embed.submit_many([1])  # type: ignore[list-item]
    embed.nothing  # type: ignore[attr-defined]  # noqa: B018


async def check_methods() -> None:
    store = Store()
    assert_type(Store.get, BatchedMethod[Store, int, str])
    assert_type(store.get, BoundBatchedMethod[int, str])
    call = store.get(1)
    _ = assert_type(call, Coroutine[Any, Any, str])
    call.close()
    assert_type(await store.get(1), str)
    assert_type(await Store.get(store, 1), str)
    assert_type(await store.put((1, "a")), None)
    assert_type(await store.get.submit_many([1, 2]), list[str])
    assert_type(await store.get.flush(), None)
    assert_type(await store.get.aclose(cancel=False), None)
    assert_type(store.get.stats, BatcherStats)

    await store.get("1")  # type: ignore[arg-type]
    await store.put(1)  # type: ignore[arg-type]
    await Store.get(object(), 1)  # type: ignore[arg-type]


def check_decoration_errors() -> None:
    async def no_list(item: int) -> int:
        return item

    async def wrong_options(items: list[int]) -> list[int]:
        return items

    batch(max_size="10")  # type: ignore[arg-type]
    batch(max_sise=10)  # type: ignore[call-arg]
    batch(overflow="drop_newest")  # type: ignore[arg-type]
    batch()(no_list)  # type: ignore[arg-type]

    def not_async(items: list[int]) -> list[int]:
        return items

    batch()(not_async)  # type: ignore[arg-type]
    batch()(wrong_options)
