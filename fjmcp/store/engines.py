"""
The two database engines under the store, and where a database is.

SQLite is the embedded default: one file in the data directory, one
connection, writers serialised by C{BEGIN IMMEDIATE}.  PostgreSQL is for
several broker nodes on one database: a small pool of connections per
node, C{READ COMMITTED} writers that lock the rows they are about to change
(L{Engine.row_lock}), and advisory locks where SQLite relied on its single
writer (L{Engine.lock}).  The store writes its statements once, in SQLite's
spelling with C{?} placeholders; L{Engine.sql} gives PostgreSQL's.

A L{Location} is what C{--database} named; the password of a PostgreSQL
location is kept out of its C{repr} and out of every message.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Collection
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from fjmcp.store.database import Txn

# Seconds a PostgreSQL connection attempt may take before start-up (or a
# pool's reconnect) gives up with a message instead of hanging.
CONNECT_TIMEOUT = 10
# PostgreSQL connections per broker node: the reactor's thread pool runs one
# transaction per connection; more would mostly wait on row locks.
POSTGRES_POOL_SIZE = 5
# Every statement and every wait for a lock ends; a stuck transaction fails
# instead of holding a request (and a pool connection) forever.
POSTGRES_STATEMENT_TIMEOUT_MS = 15_000


@attrs.frozen
class Engine:
    """
    What differs between the engines in the store's SQL.
    """

    name: str
    # Opens a read transaction (one snapshot for all its statements).
    begin_read: str
    # Opens a write transaction.
    begin_write: str
    # Appended to a SELECT of rows the transaction goes on to change, so a
    # concurrent transaction doing the same waits (SQLite's writer lock
    # already serialises them).
    row_lock: str

    def sql(self, text: str) -> str:
        """
        C{text} (SQLite's spelling) in this engine's.
        """
        if self.name == "postgresql":
            return _postgres_sql(text)
        return text

    def member(self, column: str, values: Collection[object]) -> tuple[str, object]:
        """
        A condition "C{column} is one of C{values}" and its one parameter,
        for any number of values.
        """
        if self.name == "postgresql":
            return f"{column} = ANY(?)", list(values)
        return f"{column} IN (SELECT value FROM json_each(?))", json.dumps(list(values))

    def lock(self, txn: Txn, name: str) -> None:
        """
        Hold the lock called C{name} until C{txn} ends: only one transaction
        at a time, on any node, gets past this line.  (On SQLite every write
        transaction already holds the one write lock.)
        """
        if self.name == "postgresql":
            txn.execute("SELECT pg_advisory_xact_lock(?)", (lock_key(name),))


SQLITE = Engine(
    "sqlite",
    begin_read="BEGIN",
    begin_write="BEGIN IMMEDIATE",
    row_lock="",
)
POSTGRESQL = Engine(
    "postgresql",
    # Reads see one snapshot, as SQLite's do; read-only ones never fail to
    # serialise.
    begin_read="BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    begin_write="BEGIN ISOLATION LEVEL READ COMMITTED",
    row_lock=" FOR UPDATE",
)


@lru_cache(maxsize=1024)
def _postgres_sql(text: str) -> str:
    # psycopg's placeholder is %s, so a literal % must be doubled; the
    # store's statements have no ? inside string literals.
    return text.replace("%", "%%").replace("?", "%s")


def lock_key(name: str) -> int:
    """
    The 64-bit advisory lock number of a named lock, the same on every node.
    """
    return zlib.crc32(b"fjmcp:" + name.encode()) | (0x666A6D63 << 32)


@attrs.frozen
class SQLiteLocation:
    """
    A SQLite database file.
    """

    path: Path
    engine: Engine = attrs.field(default=SQLITE, init=False, repr=False)

    def describe(self) -> str:
        return str(self.path)


@attrs.frozen
class PostgreSQLLocation:
    """
    A PostgreSQL database, as a C{postgresql://} URL without a password,
    and the password that goes with it.
    """

    url: str
    password: str | None = attrs.field(default=None, repr=False)
    engine: Engine = attrs.field(default=POSTGRESQL, init=False, repr=False)

    def describe(self) -> str:
        return self.url

    def connect_kwargs(self) -> dict[str, Any]:
        """
        The arguments of C{psycopg.connect} for one connection.
        """
        kwargs: dict[str, Any] = {
            "conninfo": self.url,
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT,
            "application_name": "fjmcp",
            "options": f"-c statement_timeout={POSTGRES_STATEMENT_TIMEOUT_MS}"
            f" -c lock_timeout={POSTGRES_STATEMENT_TIMEOUT_MS}",
            # The server's timeouts do nothing when the server is gone
            # without closing the connection (a host lost, a network
            # partition): the kernel notices a dead peer within ~25 s
            # instead of ~15 min, and the pool's thread is free again.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 20_000,
        }
        if self.password is not None:
            kwargs["password"] = self.password
        return kwargs


Location = SQLiteLocation | PostgreSQLLocation
