"""
Store tests on both engines: a test class written against L{database_overrides}
(for a L{Config}) or L{fresh_location} runs on SQLite; the same class with
L{OnPostgreSQL} mixed in first runs on a fresh PostgreSQL database per test
(the throwaway cluster of tests/postgres_support.py), skipped where
PostgreSQL is missing and failing under CI=true.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from fjmcp.app.tap import store_location
from fjmcp.config import Config
from fjmcp.store import migrate_database
from fjmcp.store.engines import Location, PostgreSQLLocation, SQLiteLocation
from tests.postgres_support import postgres_database, postgres_missing


class OnPostgreSQL:
    """
    Mixed in before a store test class: the same tests on PostgreSQL.
    """

    engine = "postgresql"
    skip = postgres_missing()


def on_postgresql(test: object) -> bool:
    return getattr(test, "engine", "sqlite") == "postgresql"


def database_overrides(test: SynchronousTestCase) -> dict[str, Any]:
    """
    The L{Config} fields that put a test's broker on its engine: nothing for
    SQLite (broker.db in the data directory), a fresh database for PostgreSQL.
    """
    if not on_postgresql(test):
        return {}
    db = postgres_database(test)
    return {"database": db.url, "database_password": db.password}


def fresh_location(test: SynchronousTestCase) -> Location:
    """
    A new, empty database on the test's engine.
    """
    if on_postgresql(test):
        db = postgres_database(test)
        return PostgreSQLLocation(db.url, db.password)
    path = Path(test.mktemp()).resolve()
    path.mkdir(parents=True)
    return SQLiteLocation(path / "broker.db")


def migrated(config: Config) -> Location:
    """
    The configuration's database, migrated.
    """
    location = store_location(config)
    migrate_database(location)
    return location


def dump(location: Location) -> bytes:
    """
    Everything the database holds, as bytes to search for a secret in: the
    SQLite file itself, or every row of every table of PostgreSQL's.
    """
    if isinstance(location, SQLiteLocation):
        return location.path.read_bytes()
    import psycopg

    with psycopg.connect(**location.connect_kwargs()) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        ]
        out = []
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 - catalogue names
                out += [v if isinstance(v, bytes) else repr(v).encode() for v in row]
    return b"\n".join(out)


def rows(location: Location, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """
    The rows of one statement (in SQLite's spelling) on either engine, on a
    connection of its own.
    """
    if isinstance(location, SQLiteLocation):
        import sqlite3

        conn = sqlite3.connect(str(location.path), isolation_level=None, timeout=10)
        try:
            return list(conn.execute(sql, params).fetchall())
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(**location.connect_kwargs()) as pg:
        cursor = pg.execute(location.engine.sql(sql), params)
        return list(cursor.fetchall()) if cursor.description else []
