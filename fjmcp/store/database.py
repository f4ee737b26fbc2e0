"""
The database underneath the store: the connection pool, transactions and
schema migrations, on either engine (L{fjmcp.store.engines}).

The store package owns every SQL statement.  An C{adbapi.ConnectionPool}
runs all work off the reactor thread (SQLite: one connection; PostgreSQL: a
few); every transaction has a name (for logs and errors).  On SQLite writers
take the lock up front with C{BEGIN IMMEDIATE}, so two processes on the same
file (the daemon and the admin command) wait for each other instead of
failing on a lock upgrade; on PostgreSQL they lock the rows they change.
The schema is versioned by the files in L{fjmcp.store.migrations}, one
folder per engine with the same version numbers.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger

from fjmcp import metrics
from fjmcp.store.engines import (
    POSTGRES_POOL_SIZE,
    SQLITE,
    Engine,
    Location,
    PostgreSQLLocation,
    SQLiteLocation,
    lock_key,
)

if TYPE_CHECKING:
    from fjmcp.interfaces import IBrokerReactor

T = TypeVar("T")
D = TypeVar("D", bound="Database")
Cursor = Any  # a DB-API cursor (adbapi hands its Transaction, which is one)

BUSY_TIMEOUT_MS = 5000
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

log = Logger()


class Signal:
    """
    Something the store announces after a transaction that did it commits:
    listeners are called in the order they connected, on the reactor thread,
    and one that fails is logged without stopping the others.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._listeners: list[Callable[..., object]] = []

    def connect(self, listener: Callable[..., object]) -> None:
        self._listeners.append(listener)

    def __call__(self, *args: object) -> None:
        for listener in self._listeners:
            try:
                listener(*args)
            except Exception:
                log.failure("a listener of {signal} failed", signal=self._name)


@attrs.frozen
class StoreEvents:
    """
    What committed transactions announce.  C{grant_revoked(family_id, reason)}:
    a token family that was live is revoked; C{access_token_revoked(digest)}:
    one access token is.  Another process's revocations are not announced
    here (see L{fjmcp.oauth.grant_ends}).
    """

    grant_revoked: Signal = attrs.Factory(lambda: Signal("grant_revoked"))
    access_token_revoked: Signal = attrs.Factory(lambda: Signal("access_token_revoked"))


class Txn:
    """
    One transaction's cursor, and what to run once it has committed (as
    Synapse's C{call_after}): a side effect of a write (ending the sessions
    of a revoked grant) must not happen if the write rolls back, and must
    not be collected by hand by every caller.
    """

    __slots__ = ("_after", "_cursor", "engine", "events")

    def __init__(self, cursor: Cursor, events: StoreEvents, engine: Engine = SQLITE) -> None:
        self._cursor = cursor
        self._after: list[tuple[Callable[..., object], tuple[object, ...]]] = []
        self.events = events
        self.engine = engine

    def execute(self, sql: str, params: Sequence[object] | Mapping[str, object] = ()) -> None:
        self._cursor.execute(self.engine.sql(sql), params)

    def lock(self, name: str) -> None:
        """
        See L{Engine.lock}.
        """
        self.engine.lock(self, name)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cursor.fetchall())

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    def call_after(self, fn: Callable[..., object], *args: object) -> None:
        """
        Run C{fn(*args)} on the reactor thread once this transaction has
        committed; never if it rolls back.
        """
        self._after.append((fn, args))

    def committed(self) -> None:
        for fn, args in self._after:
            fn(*args)


class StoreError(Exception):
    """
    The database cannot be used; the message says what to do about it.
    """


class SchemaTooNewError(StoreError):
    """
    The database was written by a newer fjmcp than this one.
    """


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str


def known_migrations(engine: Engine = SQLITE) -> list[Migration]:
    """
    The engine's migrations, in order; both engines have the same numbers
    and names, so a schema version means the same tables on either.
    """
    migrations = []
    for entry in resources.files("fjmcp.store.migrations").joinpath(engine.name).iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            migrations.append(
                Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8"))
            )
    migrations.sort(key=lambda m: m.version)
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise StoreError(f"migrations must be numbered 1..N without gaps, found {versions}")
    return migrations


def configure_connection(conn: sqlite3.Connection) -> None:
    """
    Per-connection settings; run by the pool on every new connection.
    """
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(
            f"SQLite refused WAL mode (got {mode!r}); put the data directory on a local file system"
        )
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


def as_location(where: Path | Location) -> Location:
    return SQLiteLocation(where) if isinstance(where, Path) else where


def make_pool(where: Path | Location, reactor: IReactorCore | None = None) -> adbapi.ConnectionPool:
    """
    The one place a pool is built.  SQLite: one connection (SQLite serialises
    writers anyway, and a single connection keeps reads consistent with our
    writes).  PostgreSQL: a few, reconnected when the server went away.
    """
    kwargs: dict[str, Any] = {}
    if reactor is not None:
        kwargs["cp_reactor"] = reactor
    location = as_location(where)
    if isinstance(location, PostgreSQLLocation):
        return adbapi.ConnectionPool(
            "psycopg",
            cp_min=1,
            cp_max=POSTGRES_POOL_SIZE,
            cp_reconnect=True,
            cp_noisy=False,
            **location.connect_kwargs(),
            **kwargs,
        )
    path = location.path
    return adbapi.ConnectionPool(
        "sqlite3",
        str(path),
        # Autocommit at the driver level: we issue BEGIN ourselves so writers
        # can ask for IMMEDIATE; adbapi still commits or rolls back at the end.
        isolation_level=None,
        check_same_thread=False,
        timeout=BUSY_TIMEOUT_MS / 1000,
        cp_min=1,
        cp_max=1,
        cp_openfun=configure_connection,
        **kwargs,
    )


def _pending(
    cursor: Any, where: str, migrations: list[Migration], real: str
) -> tuple[int, int, list[Migration]]:
    cursor.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        f" version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at {real} NOT NULL)"
    )
    cursor.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    current = int(cursor.fetchone()[0])
    latest = migrations[-1].version if migrations else 0
    if current > latest:
        raise SchemaTooNewError(
            f"{where} has schema version {current}, but this fjmcp "
            f"only knows up to {latest}: run the newer fjmcp that wrote it, or restore "
            "a backup"
        )
    return current, latest, [m for m in migrations if m.version > current]


def apply_migrations(
    cursor: Any,
    path: Path | Location | None,
    now: float,
    migrations: list[Migration] | None = None,
) -> int:
    """
    Bring the schema up to date, one transaction per migration, and refuse a
    database written by a newer fjmcp.  C{cursor} is a DB-API cursor on a
    connection in autocommit mode.  Returns the schema version.
    """
    if isinstance(path, PostgreSQLLocation):
        return _apply_postgres_migrations(cursor, path, now, migrations)
    if isinstance(path, SQLiteLocation):
        path = path.path
    if migrations is None:
        migrations = known_migrations()
    current, latest, pending = _pending(cursor, str(path or "the database"), migrations, "REAL")
    if pending and current > 0 and path is not None:
        _backup_before_upgrade(cursor.connection, path, current)
    for m in pending:
        log.info("applying schema migration {version} ({name})", version=m.version, name=m.name)
        # executescript would commit an open transaction first, so the whole
        # migration, its bookkeeping row and the COMMIT go in one script; a
        # failure leaves the transaction open for the caller to roll back.
        try:
            cursor.executescript(
                "BEGIN IMMEDIATE;\n"
                + m.sql
                + f";\nINSERT INTO schema_migrations VALUES ({m.version}, '{m.name}', "
                f"{now!r});\nCOMMIT;"
            )
        except Exception:
            if cursor.connection.in_transaction:
                cursor.connection.rollback()
            raise
    return latest


# Nodes starting together take turns: the first applies what is pending,
# the others then find nothing to do.
_MIGRATION_LOCK = "migrate"


def _apply_postgres_migrations(
    cursor: Any, location: PostgreSQLLocation, now: float, migrations: list[Migration] | None
) -> int:
    if migrations is None:
        migrations = known_migrations(location.engine)
    cursor.execute("SELECT pg_advisory_lock(%s)", (lock_key(_MIGRATION_LOCK),))
    try:
        current, latest, pending = _pending(
            cursor, location.describe(), migrations, "DOUBLE PRECISION"
        )
        if pending and current > 0:
            log.info(
                "upgrading the PostgreSQL schema from version {current}; there is no automatic"
                " backup on PostgreSQL (see docs/deploy-cluster.md)",
                current=current,
            )
        for m in pending:
            log.info("applying schema migration {version} ({name})", version=m.version, name=m.name)
            conn = cursor.connection
            with conn.transaction():
                # No parameters: psycopg sends the file as one simple query,
                # several statements allowed.
                cursor.execute(m.sql.encode())
                cursor.execute(
                    "INSERT INTO schema_migrations VALUES (%s, %s, %s)", (m.version, m.name, now)
                )
        return latest
    finally:
        cursor.execute("SELECT pg_advisory_unlock(%s)", (lock_key(_MIGRATION_LOCK),))


def _backup_before_upgrade(conn: sqlite3.Connection, path: Path, version: int) -> None:
    target = path.with_name(f"{path.name}.v{version}.bak")
    dest = sqlite3.connect(str(target))
    try:
        conn.backup(dest)
    finally:
        dest.close()
    log.info("backed up the database to {target} before upgrading", target=str(target))


def connect_postgres(location: PostgreSQLLocation) -> Any:
    """
    One plain connection (autocommit) to a PostgreSQL location.

    @raise StoreError: it cannot be reached or refused us, saying which.
    """
    import psycopg

    try:
        return psycopg.connect(**location.connect_kwargs())
    except psycopg.Error as e:
        # libpq's message names host, port and user but never the password.
        raise StoreError(f"cannot connect to {location.describe()}: {e}".strip()) from None


def migrate_database(where: Path | Location, now: float | None = None) -> int:
    """
    Open (creating if needed, for SQLite) and migrate the database
    synchronously.  For start-up only, before the reactor runs: a daemon that
    cannot use its database should refuse to start, not half-start.
    """
    location = as_location(where)
    now = time.time() if now is None else now
    if isinstance(location, PostgreSQLLocation):
        pg = connect_postgres(location)
        try:
            return apply_migrations(pg.cursor(), location, now)
        finally:
            pg.close()
    path = location.path
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        configure_connection(conn)
        return apply_migrations(conn.cursor(), path, now)
    finally:
        conn.close()


class Database:
    """
    The pool and the transaction helpers every store mixin builds on.
    Methods return Deferreds; none blocks the reactor.
    """

    def __init__(
        self,
        pool: adbapi.ConnectionPool,
        clock: IReactorTime,
        path: Path | Location | None = None,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self.location = None if path is None else as_location(path)
        # The SQLite file, for what only SQLite has (backups, its -wal).
        self.path = self.location.path if isinstance(self.location, SQLiteLocation) else None
        self.engine = SQLITE if self.location is None else self.location.engine
        self.events = StoreEvents()

    @classmethod
    def open(cls: type[D], where: Path | Location, reactor: IBrokerReactor) -> D:
        return cls(make_pool(where, reactor), reactor, where)

    def close(self) -> None:
        if self._pool.running or self._pool.startID:
            self._pool.close()

    def _now(self) -> float:
        return self._clock.seconds()

    def _read(self, desc: str, fn: Callable[[Txn], T]) -> Deferred[T]:
        def interaction(txn: Txn) -> T:
            txn.execute(self.engine.begin_read)
            return fn(txn)

        return self._run(desc, interaction)

    def _write(self, desc: str, fn: Callable[[Txn], T]) -> Deferred[T]:
        def interaction(txn: Txn) -> T:
            txn.execute(self.engine.begin_write)
            return fn(txn)

        return self._run(desc, interaction)

    def _run(self, desc: str, fn: Callable[[Txn], T]) -> Deferred[T]:
        # desc names the transaction for whoever reads a traceback and for
        # metrics; no per-call log event: it costs every request.
        def interaction(cursor: Cursor) -> tuple[T, Txn]:
            txn = Txn(cursor, self.events, self.engine)
            return fn(txn), txn

        def committed(done: tuple[T, Txn]) -> T:
            result, txn = done
            txn.committed()
            return result

        ran = self._interact(desc, interaction).addCallback(committed)
        return metrics.timed_store_operation(desc, ran)

    def _interact(self, desc: str, interaction: Callable[[Cursor], T]) -> Deferred[T]:
        """
        Run C{interaction} in a transaction that commits when it returns and
        rolls back when it raises.
        """
        return self._pool.runInteraction(interaction)

    # --- schema

    def migrate(self) -> Deferred[int]:
        """
        Bring the schema up to date through the pool; see L{apply_migrations}.
        """
        return self._interact(
            "migrate", lambda cursor: apply_migrations(cursor, self.location, self._now())
        )

    def schema_version(self) -> Deferred[int]:
        def q(txn: Txn) -> int:
            txn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            return int(txn.fetchone()[0])

        return self._read("schema_version", q)

    def check(self) -> Deferred[None]:
        """
        Fires when the database answers a query; fails otherwise.
        """

        def q(txn: Txn) -> None:
            txn.execute("SELECT COUNT(*) FROM schema_migrations")
            txn.fetchone()

        return self._read("check", q)
