"""
The throwaway PostgreSQL cluster of tests/postgres_support.py: each test's
database takes its own role and password and nothing else, and is gone
once the test ends.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.trial.reporter import TestResult
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.postgres_support import (
    PostgresDatabase,
    cluster_port,
    postgres_database,
    postgres_missing,
    superuser_connect,
)

MISSING = postgres_missing()


class PostgresDatabaseTests(TestCase):
    if MISSING:
        skip = MISSING

    def test_role_and_password(self) -> None:
        """
        The test's role logs in over TCP to 127.0.0.1 with its password (the
        one in the password file too), owns its database and may create
        tables in it; a wrong password is refused.
        """
        import psycopg

        db = postgres_database(self)
        self.assertEqual(db.url, f"postgresql://{db.role}@127.0.0.1:{cluster_port()}/{db.name}")
        self.assertNotIn(db.password, db.url)
        self.assertNotIn(db.password, repr(db))
        self.assertEqual(db.password_file.read_text().strip(), db.password)
        self.assertEqual(stat.S_IMODE(db.password_file.stat().st_mode), 0o600)
        self.assertEqual(db.password_file.stat().st_uid, os.geteuid())

        with db.connect() as connection:
            row = connection.execute(
                "SELECT current_user, current_database(), inet_server_addr()::text,"
                " inet_server_port()"
            ).fetchone()
            self.assertEqual(row, (db.role, db.name, "127.0.0.1/32", cluster_port()))
            connection.execute("CREATE TABLE t (x integer)")
            connection.execute("INSERT INTO t VALUES (1)")
            self.assertEqual(connection.execute("SELECT x FROM t").fetchall(), [(1,)])

        with self.assertRaises(psycopg.OperationalError) as raised:
            psycopg.connect(
                host="127.0.0.1",
                port=cluster_port(),
                dbname=db.name,
                user=db.role,
                password=db.password + "x",
                sslmode="disable",
            )
        self.assertIn("password authentication failed", str(raised.exception))

    def test_independent(self) -> None:
        """
        Two databases do not share tables, and one's role cannot connect to
        the other.
        """
        import psycopg

        first = postgres_database(self)
        second = postgres_database(self)
        self.assertNotEqual(first.name, second.name)
        self.assertNotEqual(first.role, second.role)
        self.assertNotEqual(first.password, second.password)
        with first.connect() as connection:
            connection.execute("CREATE TABLE only_first (x integer)")
        with second.connect() as connection:
            found = connection.execute("SELECT to_regclass('only_first')").fetchone()
            self.assertEqual(found, (None,))

        with self.assertRaises(psycopg.OperationalError) as raised:
            psycopg.connect(
                host="127.0.0.1",
                port=cluster_port(),
                dbname=second.name,
                user=first.role,
                password=first.password,
                sslmode="disable",
            )
        self.assertIn("permission denied", str(raised.exception))

    def test_dropped_at_cleanup(self) -> None:
        """
        The database and its role are gone once their test has ended, even
        with a connection to it still open.
        """
        made: list[PostgresDatabase] = []
        left_open: list[Any] = []

        class Inner(SynchronousTestCase):
            def test_make(self) -> None:
                db = postgres_database(self)
                made.append(db)
                left_open.append(db.connect())

        result = TestResult()
        Inner("test_make").run(result)
        self.assertTrue(result.wasSuccessful(), str(result.errors + result.failures))
        [db] = made
        [connection] = left_open
        self.addCleanup(connection.close)
        self.assertTrue(connection.closed or connection.broken or _dead(connection))

        with superuser_connect() as admin:
            databases = admin.execute(
                "SELECT count(*) FROM pg_database WHERE datname = %s", (db.name,)
            ).fetchone()
            roles = admin.execute(
                "SELECT count(*) FROM pg_roles WHERE rolname = %s", (db.role,)
            ).fetchone()
        self.assertEqual((databases, roles), ((0,), (0,)))

    def test_one_cluster_per_process(self) -> None:
        """
        The cluster listens on 127.0.0.1 only, on the port cluster_port()
        gives, which stays the same for the process.
        """
        port = cluster_port()
        with superuser_connect() as admin:
            self.assertEqual(admin.execute("SHOW listen_addresses").fetchone(), ("127.0.0.1",))
            self.assertEqual(admin.execute("SHOW port").fetchone(), (str(port),))
            self.assertEqual(admin.execute("SHOW fsync").fetchone(), ("off",))
        self.assertEqual(cluster_port(), port)


def _dead(connection: Any) -> bool:
    """
    Whether a query on C{connection} fails because its backend was ended.
    """
    import psycopg

    try:
        connection.execute("SELECT 1")
    except psycopg.OperationalError:
        return True
    return False
