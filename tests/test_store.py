"""
The SQLite store: schema versions, WAL files, atomic credential replacement,
concurrent writers, and surviving a kill -9 in the middle of writing.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from fjmcp.store import (
    Migration,
    SchemaTooNewError,
    Store,
    UpstreamUser,
    apply_migrations,
    known_migrations,
    migrate_database,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class StoreTestCase(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.path = self.dir / "broker.db"

    def open_store(self) -> Store:
        migrate_database(self.path)
        store = Store.open(self.path, reactor)
        self.addCleanup(store.close)
        return store


class MigrationTests(StoreTestCase):
    def test_fresh_database(self) -> None:
        version = migrate_database(self.path)
        self.assertEqual(version, known_migrations()[-1].version)
        conn = sqlite3.connect(self.path)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        conn.close()
        for table in (
            "clients",
            "consents",
            "authorization_codes",
            "token_families",
            "access_tokens",
            "refresh_tokens",
            "upstream_credentials",
            "users",
            "pending_authorizations",
            "schema_migrations",
        ):
            self.assertIn(table, tables)

    def test_idempotent(self) -> None:
        """
        Starting again on a migrated database changes nothing and makes no backup.
        """
        migrate_database(self.path)
        migrate_database(self.path)
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), ["broker.db"])

    def test_refuses_newer_database(self) -> None:
        migrate_database(self.path)
        conn = sqlite3.connect(self.path)
        conn.execute("INSERT INTO schema_migrations VALUES (999, 'future', 0)")
        conn.commit()
        conn.close()
        with self.assertRaises(SchemaTooNewError) as cm:
            migrate_database(self.path)
        self.assertIn("schema version 999", str(cm.exception))
        self.assertIn("restore a backup", str(cm.exception))

    def test_failed_migration_rolls_back(self) -> None:
        """
        A migration that fails half-way leaves neither its tables nor its
        version row behind.
        """
        conn = sqlite3.connect(self.path, isolation_level=None)
        bad = [
            Migration(1, "good", "CREATE TABLE a (x INTEGER)"),
            Migration(2, "bad", "CREATE TABLE b (x INTEGER); INSERT INTO nowhere VALUES (1)"),
        ]
        with self.assertRaises(sqlite3.OperationalError):
            apply_migrations(conn.cursor(), self.path, 0.0, bad)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
        conn.close()
        self.assertIn("a", tables)
        self.assertNotIn("b", tables)
        self.assertEqual(versions, [1])

    def test_backup_before_upgrade(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        first = [Migration(1, "one", "CREATE TABLE a (x INTEGER); INSERT INTO a VALUES (42)")]
        apply_migrations(conn.cursor(), self.path, 0.0, first)
        second = [*first, Migration(2, "two", "ALTER TABLE a ADD COLUMN y TEXT")]
        apply_migrations(conn.cursor(), self.path, 0.0, second)
        conn.close()
        backup = self.dir / "broker.db.v1.bak"
        self.assertTrue(backup.exists())
        old = sqlite3.connect(backup)
        self.assertEqual(old.execute("SELECT * FROM a").fetchall(), [(42,)])
        old.close()

    async def test_pool_connection_settings(self) -> None:
        """
        The pool's connection runs in WAL mode with foreign keys on, and the
        database keeps its -wal and -shm files beside it in the data dir.
        """
        store = self.open_store()
        user = UpstreamUser(1, "alice")
        await store.replace_upstream_credential(user, b"a", None, 1.0, "")

        def pragmas(txn):
            txn.execute("PRAGMA journal_mode")
            mode = txn.fetchone()[0]
            txn.execute("PRAGMA foreign_keys")
            fks = txn.fetchone()[0]
            txn.execute("PRAGMA synchronous")
            sync = txn.fetchone()[0]
            return mode, fks, sync

        mode, fks, sync = await store._pool.runInteraction(pragmas)
        self.assertEqual((mode, fks, sync), ("wal", 1, 1))
        names = {p.name for p in self.dir.iterdir()}
        self.assertEqual(names, {"broker.db", "broker.db-wal", "broker.db-shm"})

    async def test_store_migrate_refuses_newer(self) -> None:
        store = self.open_store()
        conn = sqlite3.connect(self.path)
        conn.execute("INSERT INTO schema_migrations VALUES (999, 'future', 0)")
        conn.commit()
        conn.close()
        with self.assertRaises(SchemaTooNewError):
            await store.migrate()


class CredentialTests(StoreTestCase):
    async def test_one_credential_per_user(self) -> None:
        """
        Each replacement bumps the generation and leaves exactly the newest
        tokens; the user's login follows renames.
        """
        store = self.open_store()
        alice = UpstreamUser(7, "alice", "Alice")
        self.assertIsNone(await store.get_upstream_credential(7))
        self.assertEqual(await store.replace_upstream_credential(alice, b"a1", b"r1", 10.0, "s"), 1)
        self.assertEqual(await store.replace_upstream_credential(alice, b"a2", b"r2", 20.0, "s"), 2)
        renamed = UpstreamUser(7, "alice2", "Alice Two")
        self.assertEqual(
            await store.replace_upstream_credential(renamed, b"a3", None, 30.0, "s"), 3
        )
        cred = await store.get_upstream_credential(7)
        assert cred is not None
        self.assertEqual(
            (cred.access_token_enc, cred.refresh_token_enc, cred.expires_at, cred.generation),
            (b"a3", None, 30.0, 3),
        )
        self.assertEqual(await store.get_user(7), renamed)
        self.assertNotIn("a3", repr(cred))

    async def test_logins_in_flight_survive_the_upgrade_to_one_sign_in(self) -> None:
        """
        Schema 3 moved the Forgejo login of an approved authorization out of
        pending_authorizations into forgejo_logins: a person who was at
        Forgejo during the upgrade finishes their login; one still on the
        consent page can still approve.
        """
        conn = sqlite3.connect(self.path, isolation_level=None)
        apply_migrations(conn.cursor(), self.path, 0.0, known_migrations()[:2])
        conn.execute(
            "INSERT INTO clients (client_id, kind, token_endpoint_auth_method, redirect_uris,"
            " grant_types, response_types, metadata, created_at)"
            " VALUES ('c', 'dcr', 'none', '[]', '[]', '[]', '{}', 0)"
        )
        for n, state in [(1, b"\xaa"), (2, None)]:
            conn.execute(
                "INSERT INTO pending_authorizations (id, consent_hash, browser_hash, state_hash,"
                " client_id, redirect_uri, client_state, code_challenge, code_challenge_method,"
                " scope, resource, upstream_verifier_enc, created_at, expires_at)"
                " VALUES (?, ?, x'bb', ?, 'c', 'http://127.0.0.1/cb', 'st', 'ch', 'S256', '',"
                " 'r', ?, 0, 9e9)",
                (n, bytes([n]), state, b"sealed" if state else None),
            )
        conn.close()
        store = self.open_store()
        login = await store.take_forgejo_login(b"\xaa")
        assert login is not None and login.authorization is not None
        self.assertEqual(
            (login.purpose, login.browser_hash, login.verifier_enc, login.authorization.id),
            ("authorize", b"\xbb", b"sealed", 1),
        )
        self.assertEqual(login.authorization.client_state, "st")
        self.assertIsNone(await store.take_forgejo_login(b"\xaa"))
        approved = await store.approve_pending_authorization(
            bytes([2]), b"\xbb", b"new-state", b"sealed-2", 9e9
        )
        assert approved is not None
        self.assertEqual(approved.id, 2)
        # Approved once only.
        self.assertIsNone(
            await store.approve_pending_authorization(bytes([2]), b"\xbb", b"s3", b"x", 9e9)
        )

    async def test_lifetime_kept_and_old_rows_still_read(self) -> None:
        """
        The token lifetime Forgejo gave is stored with the credential; a
        row written under schema 1 (no lifetime) reads back with lifetime
        None after the upgrade, everything else intact.
        """
        conn = sqlite3.connect(self.path, isolation_level=None)
        apply_migrations(conn.cursor(), self.path, 0.0, known_migrations()[:1])
        conn.execute("INSERT INTO users VALUES (1, 'old', '', 0, 0)")
        conn.execute(
            "INSERT INTO upstream_credentials (forgejo_user_id, access_token_enc,"
            " refresh_token_enc, expires_at, scope, updated_at)"
            " VALUES (1, x'aa', x'bb', 50.0, 's', 0)"
        )
        conn.close()
        store = self.open_store()
        old = await store.get_upstream_credential(1)
        assert old is not None
        self.assertEqual(
            (old.access_token_enc, old.refresh_token_enc, old.expires_at, old.lifetime),
            (b"\xaa", b"\xbb", 50.0, None),
        )
        await store.replace_upstream_credential(
            UpstreamUser(1, "old"), b"a2", b"r2", 170.0, "s", lifetime=120.0
        )
        new = await store.get_upstream_credential(1)
        assert new is not None
        self.assertEqual((new.expires_at, new.lifetime, new.generation), (170.0, 120.0, 2))

    async def test_concurrent_replacements(self) -> None:
        """
        Many replacements at once: every one gets its own generation and the
        stored row is the last one's.
        """
        store = self.open_store()
        user = UpstreamUser(1, "bob")
        gens = await gatherResults(
            [
                store.replace_upstream_credential(user, f"a{i}".encode(), None, float(i), "")
                for i in range(50)
            ]
        )
        self.assertEqual(sorted(gens), list(range(1, 51)))
        cred = await store.get_upstream_credential(1)
        assert cred is not None
        self.assertEqual(cred.generation, 50)

    async def test_two_processes_write(self) -> None:
        """
        Another process (the admin command, say) writing the same file at the
        same time: neither side fails with "database is locked".
        """
        store = self.open_store()
        script = textwrap.dedent(
            """
            import sqlite3, sys
            from fjmcp.store import configure_connection
            conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=5)
            configure_connection(conn)
            for i in range(300):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT INTO users VALUES (?, ?, '', 0, 0)"
                    " ON CONFLICT DO UPDATE SET updated_at = updated_at + 1",
                    (1000 + i % 7, "other"),
                )
                conn.execute("COMMIT")
            print("done")
            """
        )
        other = deferToThread(
            subprocess.run,
            [sys.executable, "-c", script, str(self.path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=PROJECT_ROOT,
        )
        for i in range(100):
            await store.replace_upstream_credential(UpstreamUser(i % 5, "u"), b"x", None, 0.0, "")
        result = await other
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "done")


CRASH_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from twisted.internet import reactor, task
    from fjmcp.store import Store, UpstreamUser, migrate_database

    path = Path(sys.argv[1])
    migrate_database(path)

    async def main(reactor):
        store = Store.open(path, reactor)
        i = 0
        while True:
            uid = i % 40
            payload = f"{uid}:{i}".encode() * 50
            gen = await store.replace_upstream_credential(
                UpstreamUser(uid, f"user{uid}"), payload, payload, float(i), str(i))
            sys.stdout.write(f"{uid} {gen} {i}\\n")
            sys.stdout.flush()
            i += 1

    task.react(lambda r: __import__("twisted.internet.defer", fromlist=["x"])
               .Deferred.fromCoroutine(main(r)))
    """
)


class CrashTests(StoreTestCase):
    def test_kill_9_mid_write(self) -> None:
        """
        A broker killed with SIGKILL while writing as fast as it can: the
        database passes integrity_check, and every write it had confirmed is
        there with consistent contents.
        """
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_WRITER, str(self.path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=PROJECT_ROOT,
        )
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        confirmed: dict[int, tuple[int, int]] = {}
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while len(confirmed) < 40 or sum(g for g, _ in confirmed.values()) < 400:
            line = proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                self.fail(f"writer stopped early: {proc.stderr.read() if proc.stderr else ''}")
            uid, gen, i = map(int, line.split())
            confirmed[uid] = (gen, i)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Read what it confirmed after the kill too: those lines were
        # written after their commits as well.
        rest = proc.stdout.read()
        for line in rest.splitlines():
            parts = line.split()
            if len(parts) == 3:
                uid, gen, i = map(int, parts)
                confirmed[uid] = (gen, i)

        conn = sqlite3.connect(self.path)
        self.assertEqual(conn.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        self.assertEqual(conn.execute("PRAGMA foreign_key_check").fetchall(), [])
        rows = conn.execute(
            "SELECT forgejo_user_id, generation, access_token_enc, refresh_token_enc, scope"
            " FROM upstream_credentials"
        ).fetchall()
        conn.close()
        stored = {uid: (gen, acc, ref, scope) for uid, gen, acc, ref, scope in rows}
        for uid, (gen, i) in confirmed.items():
            self.assertIn(uid, stored)
            s_gen, acc, ref, scope = stored[uid]
            self.assertGreaterEqual(s_gen, gen)
            # Each row is one whole write, never a mix of two.
            self.assertEqual(acc, ref)
            self.assertEqual(acc, f"{uid}:{scope}".encode() * 50)
            self.assertGreaterEqual(int(scope), i)
        # And the database opens and migrates again as the next start would.
        migrate_database(self.path)


class PurgeTests(StoreTestCase):
    async def test_expired_logins_and_tokens_are_purged(self) -> None:
        """
        The periodic purge drops abandoned logins and expired sessions, and
        keeps what is still alive.
        """
        from fjmcp.app.tap import purge_expired

        store = self.open_store()
        await store.replace_upstream_credential(UpstreamUser(1, "alice"), b"x", None, 0.0, "")
        await store.create_client(
            "c1",
            "dcr",
            None,
            {
                "redirect_uris": ["https://a/cb"],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code"],
                "response_types": ["code"],
            },
        )
        now = reactor.seconds()
        for i, expires in enumerate((now - 10, now + 600)):
            await store.create_pending_authorization(
                bytes([i]) * 32, b"b" * 32, "c1", "https://a/cb", None, "x" * 43, "S256",
                "", "https://mcp.example.org/mcp", expires,
            )  # fmt: skip
        await store.create_login_session(b"s" * 32, 1, now - 1)
        await store.create_login_session(b"t" * 32, 1, now + 600)
        await purge_expired(store)
        self.assertIsNone(await store.login_session_user(b"s" * 32))
        self.assertEqual(await store.login_session_user(b"t" * 32), 1)
        conn = sqlite3.connect(self.path)
        left = conn.execute("SELECT COUNT(*) FROM pending_authorizations").fetchone()[0]
        conn.close()
        self.assertEqual(left, 1)
