"""
The broker's store, run synchronously for C{fjmcp-admin}: L{SyncStore} runs
the daemon's own store methods (so there is one copy of every statement)
on one plain C{sqlite3} connection configured as the daemon's (WAL, the same
busy timeout, C{BEGIN IMMEDIATE} for every write), so the command and the
daemon wait for each other instead of failing.  L{open_store} never
migrates: a database at another schema version than this fjmcp knows is
refused, because the daemon that owns it may be older or newer than this
command.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from fjmcp.cli.output import AdminError
from fjmcp.config import DB_FILENAME
from fjmcp.store import Store, configure_connection, known_migrations
from fjmcp.store.database import BUSY_TIMEOUT_MS, Cursor, StoreEvents

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

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._clock = _WallClock()
        self.path = path
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
        except BaseException:
            self._rollback()
            raise
        if self._conn.in_transaction:
            self._conn.commit()
        return succeed(result)

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.rollback()

    def close(self) -> None:
        self._conn.close()

    @property
    def connection(self) -> sqlite3.Connection:
        return self._conn


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


def open_store(data_dir: Path) -> SyncStore:
    """
    The live database in C{data_dir}, checked to be one this fjmcp knows.

    @raise AdminError: (status 2) with what to do about it.
    """
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
    version, known = int(row[0]), schema_version()
    if version != known:
        conn.close()
        newer = "a newer" if version > known else "an older"
        raise AdminError(
            f"{path} has schema version {version} but this fjmcp-admin knows {known} "
            f"(the database is from {newer} fjmcp); use the fjmcp-admin installed with the "
            "daemon that runs on it",
            2,
        )
    return SyncStore(conn, path)
