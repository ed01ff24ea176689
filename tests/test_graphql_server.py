"""The GraphQL example over real HTTP: one SQL query per tree level, same answers.

The server (uvicorn, in this test's event loop) listens on 127.0.0.1 on a
port the OS picks, and is stopped when each test ends.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import graphql_server

pytestmark = pytest.mark.realtime

AUTHORS = 40  # every 5th has no books; 3 books each, every 4th book has no reviews

THREE_LEVELS = """
query ($n: Int!) {
  authors(limit: $n) { id name books { id title reviews { id stars body } } }
}
"""
FIVE_LEVELS = """
query ($n: Int!) {
  authors(limit: $n) {
    name
    books { title reviews { stars book { id author { id name } } } }
  }
}
"""


@pytest.fixture
async def server() -> AsyncIterator[httpx.AsyncClient]:
    database = functools.partial(graphql_server.create_database, authors=AUTHORS)
    async with (
        graphql_server.running_server(database) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        assert url.startswith("http://127.0.0.1:")
        yield client


async def ask(
    client: httpx.AsyncClient, query: str, path: str = "/graphql", **variables: Any
) -> tuple[Any, int]:
    """POST a query; returns its data and the SQL query count the server reports."""
    response = await client.post(path, json={"query": query, "variables": variables})
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body["errors"]
    return body["data"], body["extensions"]["sqlQueries"]


def count_nodes(data: Any) -> tuple[int, int, int]:
    authors = data["authors"]
    books = [b for a in authors for b in a["books"]]
    reviews = [r for b in books for r in b["reviews"]]
    return len(authors), len(books), len(reviews)


@pytest.mark.parametrize("n", [1, 4, 40])
async def test_one_sql_query_per_level_whatever_the_number_of_nodes(
    server: httpx.AsyncClient, n: int
) -> None:
    data, queries = await ask(server, THREE_LEVELS, n=n)
    authors, books, _ = count_nodes(data)
    assert authors == n
    assert queries == 3  # authors, their books, the books' reviews

    naive, naive_queries = await ask(server, THREE_LEVELS, "/graphql/naive", n=n)
    assert naive == data  # same answer, node for node
    assert naive_queries == 1 + authors + books  # the N+1 pattern


async def test_the_tree_is_not_trivial(server: httpx.AsyncClient) -> None:
    data, _ = await ask(server, THREE_LEVELS, n=AUTHORS)
    authors, books, reviews = count_nodes(data)
    assert (authors, books, reviews) == (40, 96, 288)
    assert any(a["books"] == [] for a in data["authors"])
    assert any(b["reviews"] == [] for a in data["authors"] for b in a["books"])


async def test_five_levels_five_queries(server: httpx.AsyncClient) -> None:
    data, queries = await ask(server, FIVE_LEVELS, n=AUTHORS)
    # authors, books by author, reviews by book, books by id, authors by id
    assert queries == 5
    naive, naive_queries = await ask(server, FIVE_LEVELS, "/graphql/naive", n=AUTHORS)
    assert naive == data
    reviews = [r for a in data["authors"] for b in a["books"] for r in b["reviews"]]
    assert naive_queries > 2 * len(reviews)
    for author in data["authors"]:
        for book in author["books"]:
            for review in book["reviews"]:
                assert review["book"]["author"]["name"] == author["name"]


async def test_loaders_live_per_request(server: httpx.AsyncClient) -> None:
    # Concurrent requests do not share loaders (each pays its own three
    # queries), and a later request does not read an earlier one's cache.
    results = await asyncio.gather(*(ask(server, THREE_LEVELS, n=10) for _ in range(5)))
    assert [queries for _, queries in results] == [3] * 5
    assert all(data == results[0][0] for data, _ in results)
    _, queries = await ask(server, THREE_LEVELS, n=10)
    assert queries == 3


async def test_lookup_by_id_and_a_missing_id(server: httpx.AsyncClient) -> None:
    query = "query ($id: Int!) { author(id: $id) { name books { title } } }"
    data, queries = await ask(server, query, id=3)
    assert data["author"]["name"] == "Author 3"
    assert len(data["author"]["books"]) == 3
    assert queries == 2
    data, queries = await ask(server, query, id=999)
    assert data == {"author": None}
    assert queries == 1
    assert await ask(server, query, "/graphql/naive", id=999) == (data, 1)


async def test_unknown_path_is_404(server: httpx.AsyncClient) -> None:
    response = await server.get("/nope")
    assert response.status_code == 404
