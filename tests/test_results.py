"""Result mapping: sequences, mappings, None, per-item errors, mismatches."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from asyncbatch import Batcher, ResultMismatch

from .support import RecordingSink


async def gather_all(b: Batcher[Any, Any], items: list[Any]) -> list[Any]:
    return await b.submit_many(items, return_exceptions=True)


async def test_sequence_result_in_order() -> None:
    async with Batcher(RecordingSink(lambda xs: [x + 1 for x in xs])) as b:
        assert await b.submit_many([1, 2, 3]) == [2, 3, 4]


async def test_tuple_and_generator_free_sequences_are_accepted() -> None:
    async with Batcher(RecordingSink(lambda xs: tuple(x * 2 for x in xs))) as b:
        assert await b.submit_many([1, 2]) == [2, 4]


async def test_mapping_by_item_and_by_key() -> None:
    async with Batcher(RecordingSink(lambda xs: {x: x * x for x in xs})) as b:
        assert await b.submit_many([3, 4]) == [9, 16]
    sink = RecordingSink(lambda xs: {x["id"]: x["v"] for x in xs})
    async with Batcher(sink, key=lambda x: x["id"]) as b:
        assert await b.submit_many([{"id": 1, "v": "a"}, {"id": 2, "v": "b"}]) == ["a", "b"]


async def test_none_resolves_every_item_to_none() -> None:
    async with Batcher(RecordingSink(lambda xs: None)) as b:
        assert await b.submit_many([1, 2, 3]) == [None, None, None]


async def test_exception_entries_fail_only_their_item() -> None:
    boom = ValueError("bad item 2")
    async with Batcher(RecordingSink(lambda xs: [boom if x == 2 else x for x in xs])) as b:
        assert await gather_all(b, [1, 2, 3]) == [1, boom, 3]
        with pytest.raises(ValueError, match="bad item 2"):
            await b.submit(2)
    assert b.stats.failed == 2
    assert b.stats.succeeded == 2


async def test_sink_exception_fails_the_whole_batch_with_the_original() -> None:
    class Down(Exception):
        pass

    async def sink(items: list[int]) -> list[int]:
        raise Down("backend down")

    async with Batcher(sink) as b:
        results = await gather_all(b, [1, 2])
    assert all(isinstance(r, Down) for r in results)
    assert results[0] is results[1]
    assert results[0].__traceback__ is not None


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (lambda xs: [1], r"returned 1 results for a batch of 3 items"),
        (lambda xs: [1, 2, 3, 4], r"returned 4 results for a batch of 3 items"),
        (lambda xs: "abc", r"returned str for a batch of 3 items"),
        (lambda xs: b"abc", r"returned bytes"),
        (lambda xs: 42, r"returned int"),
    ],
)
async def test_wrong_shape_fails_every_item_with_result_mismatch(
    answer: Any, expected: str
) -> None:
    sink = RecordingSink(answer)
    async with Batcher(sink, name="users") as b:
        results = await gather_all(b, [1, 2, 3])
    assert all(isinstance(r, ResultMismatch) for r in results)
    message = str(results[0])
    assert "'users'" in message
    assert re.search(expected, message), message


async def test_mapping_missing_key_fails_only_that_item() -> None:
    async with Batcher(RecordingSink(lambda xs: {1: "one", 3: "three"}), name="lookup") as b:
        results = await gather_all(b, [1, 2, 3])
    assert results[0] == "one"
    assert results[2] == "three"
    assert isinstance(results[1], ResultMismatch)
    assert "without key 2" in str(results[1])
    assert "'lookup'" in str(results[1])


async def test_mapping_with_unhashable_items_and_no_key() -> None:
    async with Batcher(RecordingSink(lambda xs: {}), name="m") as b:
        results = await gather_all(b, [[1], [2]])
    assert all(isinstance(r, ResultMismatch) for r in results)
    assert "key=" in str(results[0])


async def test_result_values_with_odd_equality_are_passed_through() -> None:
    class Weird:
        def __eq__(self, other: object) -> bool:
            raise AssertionError("results must not be compared")

        __hash__ = object.__hash__

    w = Weird()
    async with Batcher(RecordingSink(lambda xs: dict.fromkeys(xs, w))) as b:
        assert await b.submit(1) is w


async def test_mismatch_message_shows_a_few_items_not_all() -> None:
    async with Batcher(RecordingSink(lambda xs: []), name="s", max_size=1000) as b:
        results = await gather_all(b, list(range(100)))
    message = str(results[0])
    assert "97 more" in message
    assert len(message) < 400


async def test_wrong_shape_never_hangs_a_caller() -> None:
    async with Batcher(RecordingSink(lambda xs: object())) as b:
        async with asyncio.timeout(5):
            with pytest.raises(ResultMismatch):
                await b.submit(1)
