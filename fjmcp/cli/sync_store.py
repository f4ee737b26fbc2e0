"""
The broker's store, run synchronously for C{fjmcp-admin}: L{SyncStore} runs
the daemon's own store methods (so there is one copy of every statement)
on one plain connection: C{sqlite3} configured as the daemon's (WAL, the
same busy timeout, C{BEGIN IMMEDIATE} for every write), so the command and
the daemon wait for each other instead of failing; or C{psycopg} to the
daemons' PostgreSQL database, with their row locks.  L{open_store} never
migrates: a database at another schema version than this fjmcp knows is
refused, because the daemon that owns it may be older or newer than this
command.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from fjmcp.cli.output import AdminError
from fjmcp.config import DB_FILENAME
from fjmcp.store import Store, StoreError, configure_connection, known_migrations
from fjmcp.store.database import BUSY_TIMEOUT_MS, Cursor, StoreEvents, connect_postgres
from fjmcp.store.engines import SQLITE, Location, PostgreSQLLocation, SQLiteLocation

T = TypeVar("T")


class _WallClock(Clock):
    """
    The store's clock (an C{IReactorTime}) in wall-clock seconds; the store
    only ever asks it the time.
    """

    def seconds(self) -> float:
        return time.time()


class SyncStore(Store):
    """
    The daemon's L{Store}, with each transaction run at once on one plain
    C{sqlite3} connection instead of in a thread pool: every method returns
    an already-fired Deferred, which L{wait} unwraps.
    """

    def __init__(self, conn: Any, location: Path | Location) -> None:
        self._conn = conn
        self._clock = _WallClock()
        self.location = SQLiteLocation(location) if isinstance(location, Path) else location
        self.path = self.location.path if isinstance(self.location, SQLiteLocation) else None
        self.engine = self.location.engine
        self.events = StoreEvents()

    def _interact(self, desc: str, interaction: Callable[[Cursor], T]) -> Deferred[T]:
        try:
            result = interaction(self._conn.cursor())
        except sqlite3.OperationalError as e:
            self._rollback()
            if "locked" in str(e) or "busy" in str(e):
                raise AdminError(
                    f"the database stayed busy for {BUSY_TIMEOUT_MS // 1000} s ({desc}); try again"
                ) from None
            raise AdminError(f"the database refused {desc}: {e}") from None
        except BaseException as e:
            self._rollback()
            if self.engine is not SQLITE and _is_postgres_error(e):
                raise AdminError(f"the database refused {desc}: {e}") from None
            raise
        if self._in_transaction():
            self._conn.commit()
        return succeed(result)

    def _in_transaction(self) -> bool:
        if self.engine is SQLITE:
            return bool(self._conn.in_transaction)
        from psycopg.pq import TransactionStatus

        return bool(self._conn.info.transaction_status != TransactionStatus.IDLE)

    def _rollback(self) -> None:
        if self._in_transaction():
            self._conn.rollback()

    def close(self) -> None:
        self._conn.close()

    @property
    def connection(self) -> sqlite3.Connection:
        """
        The SQLite connection (for its online backup).

        @raise AdminError: on PostgreSQL, whose own tools make backups.
        """
        if self.engine is not SQLITE:
            raise AdminError(
                "the database is PostgreSQL: back it up with its own tools, e.g."
                " pg_dump -Fc (see docs/deploy-cluster.md)",
                2,
            )
        return self._conn


def _is_postgres_error(e: BaseException) -> bool:
    import psycopg

    return isinstance(e, psycopg.Error)


def wait(d: Deferred[T]) -> T:
    """
    The result of a Deferred that has already fired (every L{SyncStore} one).
    """
    results: list[T | Failure] = []
    d.addBoth(results.append)
    assert results, "SyncStore returned a Deferred that has not fired"
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def schema_version() -> int:
    return known_migrations()[-1].version


def _check_version(version: int, where: str) -> None:
    known = schema_version()
    if version != known:
        newer = "a newer" if version > known else "an older"
        raise AdminError(
            f"{where} has schema version {version} but this fjmcp-admin knows {known} "
            f"(the database is from {newer} fjmcp); use the fjmcp-admin installed with the "
            "daemon that runs on it",
            2,
        )


def open_postgres(location: PostgreSQLLocation) -> SyncStore:
    """
    The daemons' PostgreSQL database, checked to be one this fjmcp knows.

    @raise AdminError: (status 2) with what to do about it.
    """
    try:
        conn = connect_postgres(location)
    except StoreError as e:
        raise AdminError(f"{e} (are --database and --database-password-file right?)", 2) from None
    try:
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
        _check_version(int(row[0]), location.describe())
    except AdminError:
        conn.close()
        raise
    except Exception as e:
        conn.close()
        raise AdminError(
            f"{location.describe()} is not an fjmcp database (has a daemon started on it?): {e}",
            2,
        ) from None
    return SyncStore(conn, location)


def open_store(data_dir: Path, database: Location | None = None) -> SyncStore:
    """
    The live database (PostgreSQL when given, else SQLite in C{data_dir}),
    checked to be one this fjmcp knows.

    @raise AdminError: (status 2) with what to do about it.
    """
    if isinstance(database, PostgreSQLLocation):
        return open_postgres(database)
    path = data_dir / DB_FILENAME
    if not data_dir.is_dir():
        raise AdminError(
            f"data directory {data_dir} does not exist (give --data-dir or set FJMCP_DATA_DIR "
            "as for the daemon)",
            2,
        )
    if not path.is_file():
        raise AdminError(
            f"no database at {path}: the daemon creates it at its first start; "
            "is --data-dir (FJMCP_DATA_DIR) right?",
            2,
        )
    try:
        # mode=rw: never create an empty database where the real one is not.
        conn = sqlite3.connect(
            f"file:{quote(str(path.resolve()))}?mode=rw",
            uri=True,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        configure_connection(conn)
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    except sqlite3.DatabaseError as e:
        hint = (
            " (run as the daemon's user)"
            if "unable to open" in str(e) or "readonly" in str(e)
            else ""
        )
        raise AdminError(f"{path} is not a usable fjmcp database: {e}{hint}", 2) from None
    except Exception as e:
        raise AdminError(f"cannot use {path}: {e}", 2) from None
    try:
        _check_version(int(row[0]), str(path))
    except AdminError:
        conn.close()
        raise
    return SyncStore(conn, path)
