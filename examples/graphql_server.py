"""A GraphQL server without N+1 queries: strawberry + asyncbatch DataLoaders + SQLite.

Schema: authors -> books -> reviews (and back: a review's book, a book's
author), stored in SQLite and read through aiosqlite. Every request gets fresh
DataLoaders from the context getter, so a query costs one SQL query per level
of the tree, however many nodes each level has::

    { authors { name books { title reviews { stars } } } }
    -> SELECT ... FROM authors                          (1 query)
    -> SELECT ... FROM books WHERE author_id IN (...)   (1 query for all authors)
    -> SELECT ... FROM reviews WHERE book_id IN (...)   (1 query for all books)

The same schema is also served without loaders at ``/graphql/naive``, where
each resolver runs its own query (1 + authors + books queries for the query
above). Each response reports its SQL query count in
``extensions.sqlQueries``.

Run it (needs the ``graphql`` extra: strawberry-graphql, uvicorn, aiosqlite)::

    python examples/graphql_server.py --port 8000
    curl -s localhost:8000/graphql -H 'content-type: application/json' \\
        -d '{"query": "{ authors { name books { title reviews { stars } } } }"}'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import aiosqlite
import strawberry
import uvicorn
from strawberry.asgi import GraphQL
from strawberry.extensions import SchemaExtension

from asyncbatch import DataLoader

T = TypeVar("T")

# ------------------------------------------------------------------- storage

SCHEMA_SQL = """
CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE books (
    id INTEGER PRIMARY KEY,
    author_id INTEGER NOT NULL REFERENCES authors(id),
    title TEXT NOT NULL
);
CREATE TABLE reviews (
    id INTEGER PRIMARY KEY,
    book_id INTEGER NOT NULL REFERENCES books(id),
    stars INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX books_author ON books(author_id);
CREATE INDEX reviews_book ON reviews(book_id);
"""


async def create_database(
    path: str = ":memory:",
    authors: int = 10,
    books_per_author: int = 3,
    reviews_per_book: int = 4,
    seed: int = 7,
) -> aiosqlite.Connection:
    """Open (and fill) a SQLite database. Some authors get no books, some books
    no reviews, so empty lists are exercised too."""
    rng = random.Random(seed)
    conn = await aiosqlite.connect(path)
    conn.row_factory = sqlite3.Row
    await conn.executescript(SCHEMA_SQL)
    book_id = review_id = 0
    for author_id in range(1, authors + 1):
        await conn.execute("INSERT INTO authors VALUES (?, ?)", (author_id, f"Author {author_id}"))
        for _ in range(0 if author_id % 5 == 0 else books_per_author):
            book_id += 1
            await conn.execute(
                "INSERT INTO books VALUES (?, ?, ?)",
                (book_id, author_id, f"Book {book_id} by {author_id}"),
            )
            for _ in range(0 if book_id % 4 == 0 else reviews_per_book):
                review_id += 1
                await conn.execute(
                    "INSERT INTO reviews VALUES (?, ?, ?, ?)",
                    (review_id, book_id, rng.randint(1, 5), f"Review {review_id}"),
                )
    await conn.commit()
    return conn


@dataclass
class Database:
    """The connection, and the number of SQL queries run on behalf of one request."""

    conn: aiosqlite.Connection
    queries: int = 0
    log: list[str] = field(default_factory=list)

    async def fetch(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        self.queries += 1
        self.log.append(sql)
        async with self.conn.execute(sql, tuple(params)) as cursor:
            return list(await cursor.fetchall())


def id_list(ids: list[int]) -> str:
    """One SQL parameter for a whole batch: ``IN (SELECT value FROM json_each(?))``."""
    return json.dumps(ids)


# ------------------------------------------------------------ request context


class Repository(Protocol):
    """What the resolvers need; one implementation batches, one does not."""

    def author(self, author_id: int) -> Awaitable[Author]: ...
    def book(self, book_id: int) -> Awaitable[Book]: ...
    def books_of(self, author_id: int) -> Awaitable[list[Book]]: ...
    def reviews_of(self, book_id: int) -> Awaitable[list[Review]]: ...


@dataclass
class Context:
    """What every resolver of one request sees as ``info.context``."""

    db: Database
    repo: Repository


# --------------------------------------------------------------------- schema


@strawberry.type
class Review:
    id: int
    stars: int
    body: str
    book_id: strawberry.Private[int]

    @strawberry.field
    async def book(self, info: strawberry.Info[Context, None]) -> Book:
        return await info.context.repo.book(self.book_id)


@strawberry.type
class Book:
    id: int
    title: str
    author_id: strawberry.Private[int]

    @strawberry.field
    async def author(self, info: strawberry.Info[Context, None]) -> Author:
        return await info.context.repo.author(self.author_id)

    @strawberry.field
    async def reviews(self, info: strawberry.Info[Context, None]) -> list[Review]:
        return await info.context.repo.reviews_of(self.id)


@strawberry.type
class Author:
    id: int
    name: str

    @strawberry.field
    async def books(self, info: strawberry.Info[Context, None]) -> list[Book]:
        return await info.context.repo.books_of(self.id)


def author_of(row: sqlite3.Row) -> Author:
    return Author(id=row["id"], name=row["name"])


def book_of(row: sqlite3.Row) -> Book:
    return Book(id=row["id"], title=row["title"], author_id=row["author_id"])


def review_of(row: sqlite3.Row) -> Review:
    return Review(id=row["id"], stars=row["stars"], body=row["body"], book_id=row["book_id"])


@strawberry.type
class Query:
    @strawberry.field
    async def authors(self, info: strawberry.Info[Context, None], limit: int = 100) -> list[Author]:
        rows = await info.context.db.fetch(
            "SELECT id, name FROM authors ORDER BY id LIMIT ?", (limit,)
        )
        return [author_of(row) for row in rows]

    @strawberry.field
    async def author(self, info: strawberry.Info[Context, None], id: int) -> Author | None:
        try:
            return await info.context.repo.author(id)
        except LookupError:
            return None


class QueryCount(SchemaExtension):
    """Reports the request's SQL query count in the response's ``extensions``."""

    def get_results(self) -> dict[str, Any]:
        context = self.execution_context.context
        return {"sqlQueries": context.db.queries} if isinstance(context, Context) else {}


schema = strawberry.Schema(query=Query, extensions=[QueryCount])


# ------------------------------------------------------- data access (2 ways)


class Loaders:
    """Per-request DataLoaders: one SQL query per batch of keys."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._authors = DataLoader(self._load_authors)
        self._books = DataLoader(self._load_books)
        self._books_of = DataLoader(self._load_books_of)
        self._reviews_of = DataLoader(self._load_reviews_of)

    # The resolvers' view: loads are plain futures to await.
    def author(self, author_id: int) -> Awaitable[Author]:
        return self._authors.load(author_id)

    def book(self, book_id: int) -> Awaitable[Book]:
        return self._books.load(book_id)

    def books_of(self, author_id: int) -> Awaitable[list[Book]]:
        return self._books_of.load(author_id)

    def reviews_of(self, book_id: int) -> Awaitable[list[Review]]:
        return self._reviews_of.load(book_id)

    # Batch functions. Lookups by id answer with a mapping keyed by id, and
    # an exception instance for an id that does not exist (it fails only that
    # key); one-to-many lookups answer with one list per key, in key order.
    async def _load_authors(self, ids: list[int]) -> dict[int, Author | Exception]:
        rows = await self.db.fetch(
            "SELECT id, name FROM authors WHERE id IN (SELECT value FROM json_each(?))",
            (id_list(ids),),
        )
        found: dict[int, Author | Exception] = {row["id"]: author_of(row) for row in rows}
        for missing in set(ids) - found.keys():
            found[missing] = LookupError(f"no author {missing}")
        return found

    async def _load_books(self, ids: list[int]) -> dict[int, Book | Exception]:
        rows = await self.db.fetch(
            "SELECT id, author_id, title FROM books WHERE id IN (SELECT value FROM json_each(?))",
            (id_list(ids),),
        )
        found: dict[int, Book | Exception] = {row["id"]: book_of(row) for row in rows}
        for missing in set(ids) - found.keys():
            found[missing] = LookupError(f"no book {missing}")
        return found

    async def _load_books_of(self, author_ids: list[int]) -> list[list[Book]]:
        rows = await self.db.fetch(
            "SELECT id, author_id, title FROM books "
            "WHERE author_id IN (SELECT value FROM json_each(?)) ORDER BY id",
            (id_list(author_ids),),
        )
        return group(rows, author_ids, "author_id", book_of)

    async def _load_reviews_of(self, book_ids: list[int]) -> list[list[Review]]:
        rows = await self.db.fetch(
            "SELECT id, book_id, stars, body FROM reviews "
            "WHERE book_id IN (SELECT value FROM json_each(?)) ORDER BY id",
            (id_list(book_ids),),
        )
        return group(rows, book_ids, "book_id", review_of)


def group(
    rows: list[sqlite3.Row], keys: list[int], column: str, make: Callable[[sqlite3.Row], T]
) -> list[list[T]]:
    """Rows grouped under the keys they belong to, one list per key, in key order."""
    groups: dict[int, list[T]] = {key: [] for key in keys}
    for row in rows:
        groups[row[column]].append(make(row))
    return [groups[key] for key in keys]


class NaiveQueries:
    """The N+1 way: every resolver call runs its own query."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def author(self, author_id: int) -> Author:
        rows = await self.db.fetch("SELECT id, name FROM authors WHERE id = ?", (author_id,))
        if not rows:
            raise LookupError(f"no author {author_id}")
        return author_of(rows[0])

    async def book(self, book_id: int) -> Book:
        rows = await self.db.fetch(
            "SELECT id, author_id, title FROM books WHERE id = ?", (book_id,)
        )
        if not rows:
            raise LookupError(f"no book {book_id}")
        return book_of(rows[0])

    async def books_of(self, author_id: int) -> list[Book]:
        rows = await self.db.fetch(
            "SELECT id, author_id, title FROM books WHERE author_id = ? ORDER BY id",
            (author_id,),
        )
        return [book_of(row) for row in rows]

    async def reviews_of(self, book_id: int) -> list[Review]:
        rows = await self.db.fetch(
            "SELECT id, book_id, stars, body FROM reviews WHERE book_id = ? ORDER BY id",
            (book_id,),
        )
        return [review_of(row) for row in rows]


# ------------------------------------------------------------------ the app


class GraphQLApp(GraphQL[Context, None]):
    """Strawberry's ASGI app with a fresh context, and fresh loaders, per request."""

    def __init__(self, conn: Callable[[], aiosqlite.Connection], batched: bool) -> None:
        super().__init__(schema, graphql_ide=None)
        self._conn = conn
        self._batched = batched

    async def get_context(self, request: Any, response: Any) -> Context:
        db = Database(self._conn())
        repo: Repository = Loaders(db) if self._batched else NaiveQueries(db)
        return Context(db=db, repo=repo)


ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


def make_app(
    database: Callable[[], Awaitable[aiosqlite.Connection]] = create_database,
) -> ASGIApp:
    """The ASGI app: ``/graphql`` (DataLoaders) and ``/graphql/naive`` (N+1).

    The database is opened at startup and closed at shutdown (ASGI lifespan).
    """
    state: dict[str, aiosqlite.Connection] = {}

    def conn() -> aiosqlite.Connection:
        return state["conn"]

    batched = GraphQLApp(conn, batched=True)
    naive = GraphQLApp(conn, batched=False)

    async def app(
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["conn"] = await database()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await state.pop("conn").close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope.get("path", "")
        if path == "/graphql":
            await batched(scope, receive, send)
        elif path == "/graphql/naive":
            await naive(scope, receive, send)
        else:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"not found"})

    return app


def listening_socket(port: int = 0) -> socket.socket:
    """A socket bound to 127.0.0.1 (port 0: a free port chosen by the OS)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@contextlib.asynccontextmanager
async def running_server(
    database: Callable[[], Awaitable[aiosqlite.Connection]] = create_database,
) -> AsyncIterator[str]:
    """Serve the app with uvicorn on 127.0.0.1 in this event loop; yields its URL."""
    sock = listening_socket()
    host, port = sock.getsockname()
    config = uvicorn.Config(make_app(database), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # startup failed: raise why
            await asyncio.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--authors", type=int, default=10)
    args = parser.parse_args()

    async def database() -> aiosqlite.Connection:
        return await create_database(authors=args.authors)

    sock = listening_socket(args.port)
    print(f"GraphQL on http://127.0.0.1:{args.port}/graphql (naive: /graphql/naive)")
    uvicorn.Server(uvicorn.Config(make_app(database), lifespan="on")).run(sockets=[sock])


if __name__ == "__main__":
    main()
