"""
The store on both engines: the same schema at every version, migrations on
PostgreSQL (once when nodes start together, refusing a newer schema, a
clear message for a wrong password), the statements whose spelling differs
between the engines, and the claim on renewing a user's Forgejo token.
"""

from __future__ import annotations

import multiprocessing
import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from fjmcp.store import (
    SchemaTooNewError,
    Store,
    StoredSession,
    StoreError,
    UpstreamUser,
    known_migrations,
    migrate_database,
)
from fjmcp.store.engines import POSTGRESQL, SQLITE, PostgreSQLLocation, SQLiteLocation
from tests.postgres_support import postgres_database, postgres_missing
from tests.store_engines import OnPostgreSQL, fresh_location, rows

CLIENT_METADATA = {
    "redirect_uris": ["https://a.example/cb"],
    "token_endpoint_auth_method": "none",
    "grant_types": ["authorization_code", "refresh_token"],
    "response_types": ["code"],
    "client_name": "Client A",
}


class MigrationParityTests(TestCase):
    def test_same_versions_and_names(self) -> None:
        """
        Version N is the same migration on either engine.
        """
        self.assertEqual(
            [(m.version, m.name) for m in known_migrations(SQLITE)],
            [(m.version, m.name) for m in known_migrations(POSTGRESQL)],
        )

    def test_same_tables_and_columns(self) -> None:
        """
        At the latest version both engines have the same tables with the
        same columns in the same order.
        """
        if postgres_missing():
            raise self.skipTest(str(postgres_missing()))
        sqlite_location = fresh_location(self)
        assert isinstance(sqlite_location, SQLiteLocation)
        migrate_database(sqlite_location)
        conn = sqlite3.connect(sqlite_location.path)
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name"
            )
        ]
        on_sqlite = {t: [r[1] for r in conn.execute(f'PRAGMA table_info("{t}")')] for t in tables}
        conn.close()
        db = postgres_database(self)
        location = PostgreSQLLocation(db.url, db.password)
        migrate_database(location)
        on_postgres: dict[str, list[str]] = {}
        for table, column in rows(
            location,
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
        ):
            on_postgres.setdefault(table, []).append(column)
        self.assertEqual(on_postgres, on_sqlite)


def _migrate_in_a_process(url: str, password: str) -> int:
    return migrate_database(PostgreSQLLocation(url, password))


class PostgresMigrationTests(TestCase):
    skip = postgres_missing()

    def setUp(self) -> None:
        db = postgres_database(self)
        self.db = db
        self.location = PostgreSQLLocation(db.url, db.password)

    def test_nodes_starting_together_migrate_once(self) -> None:
        """
        Four nodes starting at once on an empty database: every one finds
        the latest schema, and each migration was applied exactly once.
        """
        latest = known_migrations(POSTGRESQL)[-1].version
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(4) as pool:
            versions = pool.starmap(_migrate_in_a_process, [(self.db.url, self.db.password)] * 4)
        self.assertEqual(versions, [latest] * 4)
        applied = rows(self.location, "SELECT version FROM schema_migrations ORDER BY version")
        self.assertEqual([v for (v,) in applied], list(range(1, latest + 1)))

    def test_refuses_a_newer_schema(self) -> None:
        migrate_database(self.location)
        rows(self.location, "INSERT INTO schema_migrations VALUES (999, 'future', 0)")
        with self.assertRaises(SchemaTooNewError) as caught:
            migrate_database(self.location)
        self.assertIn("999", str(caught.exception))
        self.assertIn(self.db.url, str(caught.exception))

    def test_wrong_password_is_a_clear_error(self) -> None:
        wrong = PostgreSQLLocation(self.db.url, "not-the-password")
        with self.assertRaises(StoreError) as caught:
            migrate_database(wrong)
        message = str(caught.exception)
        self.assertIn(self.db.url, message)
        self.assertIn("password authentication failed", message)
        self.assertNotIn("not-the-password", message)

    def test_nobody_listening_is_a_clear_error(self) -> None:
        from tests.postgres_support import free_port

        url = f"postgresql://someone@127.0.0.1:{free_port()}/nothing"
        with self.assertRaises(StoreError) as caught:
            migrate_database(PostgreSQLLocation(url, "pw"))
        self.assertIn(url, str(caught.exception))


class StoreContract(TestCase):
    """
    Statements whose SQL differs between the engines, on SQLite (here) and
    on PostgreSQL (L{StoreContractOnPostgreSQL}).
    """

    def setUp(self) -> None:
        location = fresh_location(self)
        migrate_database(location)
        self.store = Store.open(location, reactor)
        self.addCleanup(self.store.close)

    async def users_and_client(self) -> None:
        await self.store.replace_upstream_credential(
            UpstreamUser(1, "Alice", "Alice A"), b"a", b"r", 1e12, "s"
        )
        await self.store.replace_upstream_credential(UpstreamUser(2, "bob"), b"b", None, 1e12, "s")
        await self.store.create_client("c1", "dcr", None, CLIENT_METADATA)

    async def grant(self, user: int, code: bytes) -> str:
        return await self.store.issue_authorization_code(
            code, "c1", user, "https://a.example/cb", "x" * 43, "S256", "s", "r", 1e12
        )

    async def test_find_user_ignores_case(self) -> None:
        await self.users_and_client()
        self.assertEqual(await self.store.find_user("alice"), UpstreamUser(1, "Alice", "Alice A"))
        self.assertEqual(await self.store.find_user("2"), UpstreamUser(2, "bob", ""))
        self.assertIsNone(await self.store.find_user("carol"))

    async def test_names_of_many(self) -> None:
        await self.users_and_client()
        users, clients = await self.store.names([1, 2, 3], ["c1", "nope"])
        self.assertEqual((users, clients), ({1: "Alice", 2: "bob"}, {"c1": "Client A"}))
        self.assertEqual(await self.store.names([], []), ({}, {}))

    async def test_revoked_families_of_many(self) -> None:
        await self.users_and_client()
        live = await self.grant(1, b"c" * 32)
        dead = await self.grant(2, b"d" * 32)
        await self.store.revoke_family(dead, "test")
        found = await self.store.revoked_families([live, dead, "gone"])
        self.assertEqual(found, {dead, "gone"})
        self.assertEqual(await self.store.revoked_families([]), set())

    async def test_connections_list(self) -> None:
        """
        The connections page's query (the later of approval and last use).
        """
        await self.users_and_client()
        await self.store.remember_consent(1, "c1", "s")
        await self.grant(1, b"c" * 32)
        [connection] = await self.store.list_connections(1)
        self.assertEqual(
            (connection.client_id, connection.client_name, connection.consented),
            ("c1", "Client A", True),
        )
        self.assertEqual(connection.redirect_uris, ("https://a.example/cb",))
        self.assertEqual(await self.store.list_connections(2), [])

    async def test_sessions_replace_and_cap(self) -> None:
        await self.users_and_client()

        def session(n: int) -> StoredSession:
            return StoredSession(1, "Alice", "c1", "f", "2025-11-25", {"n": n}, 0.0, float(n))

        for n in range(4):
            await self.store.save_mcp_session(bytes([n]) * 32, session(n), keep_per_user=3)
        # Saved again: replaced, not doubled.
        await self.store.save_mcp_session(bytes([3]) * 32, session(5), keep_per_user=3)
        self.assertIsNone(await self.store.find_mcp_session(bytes([0]) * 32))
        kept = await self.store.find_mcp_session(bytes([3]) * 32)
        assert kept is not None
        self.assertEqual((kept.initialize, kept.last_used_at), ({"n": 5}, 5.0))
        # Left: uses 1.0, 2.0 and 5.0.
        self.assertEqual(await self.store.forget_idle_mcp_sessions(2.5), 2)

    async def test_one_claim_at_a_time(self) -> None:
        """
        Of many claims on renewing one credential at once, exactly one
        wins; a stale generation never does; a stored renewal or a release
        ends the claim.
        """
        await self.users_and_client()
        claims = await gatherResults(
            [self.store.claim_upstream_refresh(1, 1, 100.0, 130.0) for _ in range(10)]
        )
        self.assertEqual(claims.count(True), 1)
        self.assertFalse(await self.store.claim_upstream_refresh(1, 1, 129.0, 160.0))
        # Lapsed: claimable again.
        self.assertTrue(await self.store.claim_upstream_refresh(1, 1, 130.0, 160.0))
        # The lapsed claim's holder releases nothing of the live one.
        await self.store.release_upstream_refresh(1, 1, 130.0)
        self.assertFalse(await self.store.claim_upstream_refresh(1, 1, 131.0, 161.0))
        await self.store.release_upstream_refresh(1, 1, 160.0)
        self.assertTrue(await self.store.claim_upstream_refresh(1, 1, 131.0, 161.0))
        generation = await self.store.replace_upstream_credential(
            UpstreamUser(1, "Alice"), b"a2", b"r2", 1e12, "s"
        )
        self.assertEqual(generation, 2)
        self.assertFalse(await self.store.claim_upstream_refresh(1, 1, 132.0, 162.0))
        self.assertTrue(await self.store.claim_upstream_refresh(1, 2, 132.0, 162.0))

    async def test_approval_races(self) -> None:
        """
        Two approvals and a denial of one pending authorization at once
        (a double submit, another tab): exactly one of them happens, and
        none fails (on PostgreSQL each waits for the other's row lock and
        then sees what it did).
        """
        await self.users_and_client()
        browser = b"b" * 32
        for i in range(8):
            consent = bytes([i]) * 32
            await self.store.create_pending_authorization(
                consent, browser, "c1", "https://a.example/cb", None, "x" * 43, "S256",
                "s", "r", 1e12,
            )  # fmt: skip
            results = await gatherResults(
                [
                    self.store.approve_pending_authorization(
                        consent, browser, bytes([i, 1]) * 16, b"v", 1e12
                    ),
                    self.store.deny_pending_authorization(consent, browser),
                    self.store.approve_pending_authorization(
                        consent, browser, bytes([i, 2]) * 16, b"v", 1e12
                    ),
                ]
            )
            self.assertEqual(sum(r is not None for r in results), 1, results)

    async def test_purge(self) -> None:
        await self.users_and_client()
        now = reactor.seconds()
        await self.store.create_login_session(b"s" * 32, 1, now - 1)
        await self.store.create_login_session(b"t" * 32, 1, now + 600)
        logins, _ = await self.store.purge_expired()
        self.assertEqual(logins, 1)
        self.assertIsNone(await self.store.login_session_user(b"s" * 32))
        self.assertEqual(await self.store.login_session_user(b"t" * 32), 1)

    async def test_disconnect_and_delete_client(self) -> None:
        await self.users_and_client()
        await self.store.remember_consent(1, "c1", "s")
        family = await self.grant(1, b"c" * 32)
        done = await self.store.disconnect_client(1, "c1", "test")
        self.assertEqual((done.consent_forgotten, done.family_ids), (True, (family,)))
        self.assertEqual(await self.store.delete_client("c1", "test"), 0)
        self.assertIsNone(await self.store.get_client("c1"))


class StoreContractOnPostgreSQL(OnPostgreSQL, StoreContract):
    pass
