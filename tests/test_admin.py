"""
fjmcp-admin against a live broker: the command runs as its own process (as
an operator runs it) on the database the broker in this process is using.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue

import tests.broker_support as broker_support
from fjmcp.app.tap import store_location
from fjmcp.cli import admin
from fjmcp.oauth.grants import REVOCATION_INTERVAL
from fjmcp.secrets.crypto import key_id
from fjmcp.secrets.keyring import CHECK_INTERVAL, read_key_file, write_key_file
from fjmcp.store import UpstreamUser, known_migrations
from tests.broker_support import Broker, BrokerTestCase, browser, location, query
from tests.helpers import sleep, wait_until
from tests.store_engines import OnPostgreSQL, rows

ROOT = Path(__file__).resolve().parent.parent
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


class AdminTestCase(BrokerTestCase):
    """
    A broker whose box follows a key file, as fjmcp.app.tap builds it, and the
    admin command pointed at its data directory and key file.
    """

    def setUp(self) -> None:
        keys_dir = Path(self.mktemp()).resolve()
        keys_dir.mkdir()
        self.key_file = keys_dir / "secret.key"
        self.first_key = os.urandom(32)
        write_key_file(self.key_file, [self.first_key])
        self.broker = Broker(
            self,
            secret_key=self.first_key,
            secret_keys=(self.first_key,),
            secret_key_file=self.key_file,
        )
        self.browser = browser()
        self.verifier, self.challenge = broker_support.new_pkce_pair()

    def base_args(self) -> list[str]:
        args = ["--data-dir", str(self.broker.data), "--secret-key-file", str(self.key_file)]
        config = self.broker.config
        if config.database:
            password = Path(self.mktemp()).resolve()
            password.write_text(config.database_password or "")
            password.chmod(0o600)
            args += ["--database", config.database, "--database-password-file", str(password)]
        return args

    async def cli(self, *argv: str) -> tuple[int, str, str]:
        """
        Run fjmcp-admin as its own process while the broker goes on
        serving: (exit status, stdout, stderr).
        """
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "fjmcp.cli.admin", *self.base_args(), *argv],
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            path=str(ROOT),
        )
        return code, out.decode(), err.decode()

    async def cli_json(self, *argv: str) -> dict[str, Any]:
        code, out, err = await self.cli("--json", *argv)
        self.assertEqual(code, 0, f"{argv}: {err}")
        self.assertEqual(err, "")
        result: dict[str, Any] = json.loads(out)
        return result

    def run_here(self, *argv: str, data_dir: str | None = None) -> tuple[int, str, str]:
        """
        The same command in this process (quick, for output shapes); it
        blocks the reactor while it runs, which the broker's store (in its
        own thread) does not mind.
        """
        args = self.base_args() if data_dir is None else ["--data-dir", data_dir]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = admin.main([*args, *argv])
        return code, out.getvalue(), err.getvalue()

    def login_as(self, login: str) -> Any:
        # A fresh browser per user, as different people would use.
        self.browser = browser()
        return self.login_tokens(login)

    async def session_as(self, login: str) -> tuple[str, str]:
        self.browser = browser()
        return await self.mcp_session(login)

    async def open_session(self, token: str) -> str:
        code, body, headers = await self.mcp_rpc(
            token,
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {}},
            },
        )
        self.assertEqual(code, 200, body)
        session_id = (headers.getRawHeaders(b"mcp-session-id") or [b""])[0].decode()
        await self.mcp_rpc(
            token, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session_id
        )
        return session_id

    async def whoami(self, token: str, session_id: str) -> tuple[int, dict[str, Any]]:
        code, body, _ = await self.mcp_rpc(
            token,
            {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                "params": {"name": "whoami", "arguments": {}},
            },
            session_id,
        )
        if code != 200 or "result" not in body:
            # Refused, or (a session ended under the call) an error answer.
            return code, body
        return code, json.loads(body["result"]["content"][0]["text"])

    def forgejo_login_of(self, forgejo_token: str) -> str | None:
        found = self.broker.forge.user_for_access_token(forgejo_token)
        return found[0].login if found else None

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """
        One statement on the broker's database, on a connection of its own.
        """
        return rows(store_location(self.broker.config), sql, params)


class RevokeTests(AdminTestCase):
    async def test_revoking_a_user_ends_their_sessions_and_tokens(self) -> None:
        """
        The operator revokes alice's grants while she has a session open:
        within seconds her session is gone and her token is refused; bob,
        at the same broker, notices nothing.
        """
        alice, alice_session = await self.session_as("alice")
        bob, bob_session = await self.session_as("bob")
        self.assertEqual((await self.whoami(alice, alice_session))[0], 200)
        alice_id = self.broker.forge.user_by_login("alice").id  # type: ignore[union-attr]
        self.assertEqual(len(self.broker.sessions.of_user(alice_id)), 1)

        result = await self.cli_json("revoke", "--user", "alice")
        self.assertEqual(result["revoked"], 1)
        self.assertEqual(result["user"]["login"], "alice")

        await wait_until(
            lambda: not self.broker.sessions.of_user(alice_id),
            3 * REVOCATION_INTERVAL + 2,
            "the end of alice's session",
        )
        code, _ = await self.whoami(alice, alice_session)
        self.assertEqual(code, 401)
        code, _, headers = await self.mcp_rpc(
            alice,
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {}},
            },
        )
        self.assertEqual(code, 401)
        self.assertIn(b"invalid_token", (headers.getRawHeaders(b"www-authenticate") or [b""])[0])

        code, who = await self.whoami(bob, bob_session)
        self.assertEqual(code, 200)
        self.assertEqual(self.forgejo_login_of(who["token"]), "bob")

        # The grant is kept, marked as the operator's doing.
        grants = (await self.cli_json("grants", "list", "--user", "alice", "--all"))["grants"]
        self.assertEqual(len(grants), 1)
        self.assertEqual(grants[0]["revoked_reason"], "revoked by the operator")
        self.assertTrue(ISO.match(grants[0]["revoked_at"]))
        live = (await self.cli_json("grants", "list"))["grants"]
        self.assertEqual([g["user_login"] for g in live], ["bob"])

    async def test_revoke_a_user_at_one_client(self) -> None:
        first = await self.login_as("alice")
        second = await self.login_as("alice")
        result = await self.cli_json(
            "revoke", "--user", "alice", "--client", first["client"]["client_id"]
        )
        self.assertEqual(result["revoked"], 1)
        live = (await self.cli_json("grants", "list", "--user", "alice"))["grants"]
        self.assertEqual([g["client_id"] for g in live], [second["client"]["client_id"]])
        # Nothing left to revoke is not an error: the command can be re-run.
        again = await self.cli_json("revoke", "--client", first["client"]["client_id"])
        self.assertEqual(again["revoked"], 0)


class KeyRotationTests(AdminTestCase):
    async def check_everyone(self, tokens: dict[str, str]) -> None:
        """
        Each user opens a new MCP session, whose child is given that user's
        own Forgejo token, opened from the store (not from memory).
        """
        # Without the credential cache (as CACHE_SECONDS later), so the
        # sealed value itself is opened.
        self.broker.credentials._cache.clear()
        for login, token in tokens.items():
            session_id = await self.open_session(token)
            code, who = await self.whoami(token, session_id)
            self.assertEqual(code, 200, who)
            self.assertEqual(self.forgejo_login_of(who["token"]), login)

    def stored_key_ids(self) -> set[str]:
        rows = self.query("SELECT access_token_enc, refresh_token_enc FROM upstream_credentials")
        ids = set()
        for access, refresh in rows:
            for value in (access, refresh):
                if value is not None:
                    ids.add(value[1:9].hex())
        return ids

    async def test_rotation_keeps_every_credential_usable(self) -> None:
        tokens = {login: (await self.login_as(login))["access_token"] for login in ("alice", "bob")}
        # Carol is half-way through a login (her verifier toward Forgejo is
        # sealed in the store) across the whole rotation.
        carol = self.browser = browser()
        client = await self.broker.register()
        _, body = await self.consent(client["client_id"])
        upstream_url = location(await self.approve(body))
        old_id = key_id(self.first_key).hex()
        self.assertEqual(self.stored_key_ids(), {old_id})

        rotated = await self.cli_json("rotate-key")
        new_id = rotated["current_key_id"]
        self.assertNotEqual(new_id, old_id)
        self.assertEqual(rotated["key_ids"], [new_id, old_id])
        self.assertEqual(rotated["resealed"], {"credentials": 2, "pending_authorizations": 1})
        self.assertEqual(rotated["unreadable"], 0)
        self.assertEqual(len(read_key_file(self.key_file)), 2)
        self.assertEqual(self.key_file.stat().st_mode & 0o777, 0o600)
        self.assertEqual(self.stored_key_ids(), {new_id})
        # The daemon meets values under a key it has not loaded: it looks
        # at the key file again.
        await self.check_everyone(tokens)

        retired = await self.cli_json("rotate-key", "--retire-old")
        self.assertEqual(retired["retired_key_ids"], [old_id])
        self.assertEqual(retired["key_ids"], [new_id])
        keys = read_key_file(self.key_file)
        self.assertEqual([key_id(k).hex() for k in keys], [new_id])
        self.assertNotIn(base64.b64encode(self.first_key), self.key_file.read_bytes())
        await self.check_everyone(tokens)

        # Carol finishes her login, begun under the retired key.
        self.browser = carol
        final = await self.through_forgejo(upstream_url, "carol")
        self.assertIn("code", query(final))

        # A restarted daemon reads the new file and still opens everything.
        await self.broker.restart()
        await self.check_everyone(tokens)

        # Nothing left to retire is not an error.
        code, out, err = await self.cli("rotate-key", "--retire-old")
        self.assertEqual(code, 0, err)
        self.assertIn("nothing to retire", out)

    async def test_the_daemon_seals_with_the_new_key(self) -> None:
        """
        A login a second after a rotation is sealed under the new key by the
        daemon, which has not been restarted (and has not opened anything
        under the new key yet, which would also make it look at the file).
        """
        await self.login_as("alice")
        new_id = (await self.cli_json("rotate-key"))["current_key_id"]
        await sleep(CHECK_INTERVAL + 0.1)
        await self.login_as("bob")
        self.assertEqual(self.stored_key_ids(), {new_id})

    async def test_rotation_refuses_a_key_file_that_is_not_the_daemons(self) -> None:
        """
        Pointed at some other key file, rotate-key would sign everyone out:
        it refuses and changes nothing.
        """
        await self.login_as("alice")
        other = self.key_file.with_name("other.key")
        write_key_file(other, [os.urandom(32)])
        before = other.read_bytes()
        for argv in (["rotate-key"], ["rotate-key", "--retire-old"]):
            code, out, err = await self.cli("--secret-key-file", str(other), *argv)
            self.assertEqual((code, out), (2, ""), err)
            self.assertIn("none of the stored credentials opens with the keys in", err)
            self.assertEqual(other.read_bytes(), before)
        self.assertEqual(self.stored_key_ids(), {key_id(self.first_key).hex()})

    async def test_rotation_needs_a_readable_key_file(self) -> None:
        code, out, err = await self.cli("--secret-key-file", "/nonexistent/key", "rotate-key")
        self.assertEqual(code, 2)
        self.assertEqual(out, "")
        self.assertIn("cannot read the key file /nonexistent/key", err)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.key_file.write_text("not a key\n")
        code, _, err = await self.cli("rotate-key")
        self.assertEqual(code, 2)
        self.assertIn("must hold 32 random bytes in base64", err)
        self.assertNotIn("Traceback", err)


class BackupTests(AdminTestCase):
    async def test_backup_under_write_load_restores(self) -> None:
        """
        While the broker writes as fast as it can, a backup is taken; the
        copy is a consistent database a new broker starts on, where the
        tokens issued before the backup still work.
        """
        alice = await self.login_as("alice")
        # Bulk, so the copy takes a moment while the writes go on.
        store = self.broker.store
        for n in range(50):
            await store.replace_upstream_credential(
                UpstreamUser(10_000 + n, f"user{n}", ""), os.urandom(600), None, 1e10, "s"
            )
        [(before,)] = self.query("SELECT COUNT(*) FROM login_sessions")

        written = 0
        running = True

        async def write_loop() -> None:
            # Each credential goes in with its user in one transaction: a
            # copy with one and not the other would be a torn copy.
            nonlocal written
            while running:
                user = UpstreamUser(20_000 + written, f"loop{written}", "")
                await store.replace_upstream_credential(user, os.urandom(200), None, 1e10, "s")
                await store.create_login_session(os.urandom(32), 10_000, time.time() + 3600)
                written += 1

        loop = ensureDeferred(write_loop())
        dest = Path(self.mktemp()).resolve()
        dest.mkdir()
        started = written
        try:
            result = await self.cli_json("backup", str(dest / "copy.db"))
        finally:
            running = False
            await loop
        self.assertGreater(written - started, 0, "no writes happened during the backup")
        self.assertEqual(result["integrity"], "ok")
        self.assertEqual(result["schema_version"], known_migrations()[-1].version)
        copy = Path(result["path"])
        self.assertEqual(copy, dest / "copy.db")
        self.assertEqual(result["bytes"], copy.stat().st_size)
        self.assertEqual(copy.stat().st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(dest), ["copy.db"])

        conn = sqlite3.connect(str(copy))
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        self.assertEqual(conn.execute("PRAGMA foreign_key_check").fetchall(), [])
        sessions = conn.execute("SELECT COUNT(*) FROM login_sessions").fetchone()[0]
        [(after,)] = self.query("SELECT COUNT(*) FROM login_sessions")
        self.assertTrue(before <= sessions <= after, (before, sessions, after))
        self.assertEqual(result["rows"]["login_sessions"], sessions)
        users = conn.execute("SELECT COUNT(*) FROM users").fetchone()[0]
        self.assertGreaterEqual(users, 51)
        credentials = conn.execute("SELECT COUNT(*) FROM upstream_credentials").fetchone()[0]
        self.assertEqual(users, credentials)
        conn.close()

        # A second backup to the same name is refused; the first is untouched.
        code, _, err = await self.cli("backup", str(copy))
        self.assertEqual(code, 2)
        self.assertIn("refusing to overwrite", err)
        self.assertEqual(copy.stat().st_size, result["bytes"])

        # A broker started on the copy (same key) honours alice's token and
        # hands her session her Forgejo token.
        restored_dir = Path(self.mktemp()).resolve()
        restored_dir.mkdir()
        os.link(copy, restored_dir / "broker.db")
        self.broker = Broker(
            self,
            data=restored_dir,
            # The tokens were issued for the first broker's address.
            public_url=self.broker.public_url,
            secret_key=self.first_key,
            secret_keys=(self.first_key,),
            secret_key_file=self.key_file,
        )
        session_id = await self.open_session(alice["access_token"])
        code, who = await self.whoami(alice["access_token"], session_id)
        self.assertEqual(code, 200)
        self.assertTrue(who["token"])


class CommandTests(AdminTestCase):
    async def test_clients(self) -> None:
        alice = await self.login_as("alice")
        await self.broker.register(client_name="Unused client")
        client_id = alice["client"]["client_id"]

        code, out, err = self.run_here("clients", "list")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(
            lines[0].split(),
            ["CLIENT_ID", "KIND", "NAME", "CREATED", "LAST_USED", "GRANTS", "USERS"],
        )
        self.assertEqual(len(lines), 3)
        # Aligned: every column starts where its header does.
        starts = [lines[0].index(h) for h in ("KIND", "CREATED")]
        for line in lines[1:]:
            for start in starts:
                self.assertEqual(line[start - 2 : start], "  ", line)
                self.assertNotEqual(line[start], " ", line)
        self.assertIn("Unused client", out)

        listed = json.loads(self.run_here("--json", "clients", "list")[1])["clients"]
        self.assertEqual(len(listed), 2)
        mine = next(c for c in listed if c["client_id"] == client_id)
        self.assertEqual(
            set(mine),
            {
                "client_id",
                "kind",
                "client_name",
                "created_at",
                "last_used_at",
                "live_grants",
                "users",
            },
        )
        self.assertEqual((mine["kind"], mine["live_grants"], mine["users"]), ("dcr", 1, 1))
        self.assertTrue(ISO.match(mine["created_at"]))

        shown = json.loads(self.run_here("--json", "clients", "show", client_id)[1])["client"]
        self.assertEqual(shown["redirect_uris"], [broker_support.REDIRECT])
        self.assertEqual(shown["live_grants"], 1)
        code, out, _ = self.run_here("clients", "show", client_id)
        self.assertEqual(code, 0)
        self.assertRegex(out, r"(?m)^redirect uris:\s+http://127\.0\.0\.1:9/callback$")

        for command in ("show", "delete"):
            code, out, err = self.run_here("clients", command, "no-such-client")
            self.assertEqual((code, out), (1, ""))
            self.assertEqual(
                err,
                "fjmcp-admin: error: no client 'no-such-client' "
                "(`fjmcp-admin clients list` shows them)\n",
            )
            code, out, _ = self.run_here("--json", "clients", command, "no-such-client")
            self.assertEqual(code, 1)
            self.assertEqual(json.loads(out)["status"], 1)

        # Deleting a client in use ends its grants: the token stops working.
        session_id = await self.open_session(alice["access_token"])
        deleted = await self.cli_json("clients", "delete", client_id)
        self.assertEqual(deleted, {"client_id": client_id, "deleted": True, "grants_revoked": 1})
        listed = json.loads(self.run_here("--json", "clients", "list")[1])["clients"]
        self.assertNotIn(client_id, [c["client_id"] for c in listed])
        deadline = time.monotonic() + 3 * REVOCATION_INTERVAL + 2
        code = 200
        while code != 401 and time.monotonic() < deadline:
            await sleep(0.2)
            code, _ = await self.whoami(alice["access_token"], session_id)
        self.assertEqual(code, 401)

    async def test_grants_list(self) -> None:
        alice = await self.login_as("alice")
        await self.login_as("bob")
        alice_id = self.broker.forge.user_by_login("alice").id  # type: ignore[union-attr]
        code, out, err = self.run_here("grants", "list")
        self.assertEqual((code, err), (0, ""))
        header, *rows = out.splitlines()
        self.assertEqual(
            header.split(), ["GRANT", "USER", "CLIENT_ID", "CLIENT_NAME", "CREATED", "LAST_USED"]
        )
        self.assertEqual(len(rows), 2)
        by_id = json.loads(self.run_here("--json", "grants", "list", "--user", str(alice_id))[1])
        by_login = json.loads(self.run_here("--json", "grants", "list", "--user", "ALICE")[1])
        self.assertEqual(by_id, by_login)
        (grant,) = by_login["grants"]
        self.assertEqual(grant["user_login"], "alice")
        self.assertEqual(grant["client_id"], alice["client"]["client_id"])
        self.assertIsNone(grant["revoked_at"])
        self.assertTrue(ISO.match(grant["created_at"]) and ISO.match(grant["last_used_at"]))

        code, out, err = self.run_here("grants", "list", "--user", "mallory")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("no user 'mallory' has signed in", err)
        code, out, err = self.run_here("revoke")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("name --user, --client or both", err)

    async def test_purge(self) -> None:
        await self.login_as("alice")
        alice_id = self.broker.forge.user_by_login("alice").id  # type: ignore[union-attr]
        store = self.broker.store
        await store.create_login_session(b"x" * 32, alice_id, time.time() - 10)
        await store.create_login_session(b"y" * 32, alice_id, time.time() + 3600)
        # An access token that expired two days ago (kept one day).
        self.query("UPDATE access_tokens SET expires_at = ?", (time.time() - 2 * 86400,))
        result = await self.cli_json("purge")
        self.assertEqual(set(result), {"purged"})
        self.assertGreaterEqual(result["purged"]["logins"], 1)
        self.assertGreaterEqual(result["purged"]["tokens"], 1)
        left = [bytes(h) for (h,) in self.query("SELECT session_hash FROM login_sessions")]
        self.assertNotIn(b"x" * 32, left)
        self.assertIn(b"y" * 32, left)
        self.assertEqual(self.query("SELECT COUNT(*) FROM access_tokens"), [(0,)])
        code, out, _ = self.run_here("purge")
        self.assertEqual(code, 0)
        self.assertEqual(out, "purged 0 expired login(s) and 0 expired code(s) and token(s)\n")

    async def test_unusable_databases(self) -> None:
        empty = Path(self.mktemp()).resolve()
        empty.mkdir()
        code, out, err = await self.cli("--data-dir", str(empty), "clients", "list")
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn(f"no database at {empty}/broker.db", err)
        # Nothing was created there.
        self.assertEqual(os.listdir(empty), [])

        code, _, err = self.run_here("clients", "list", data_dir=str(empty / "missing"))
        self.assertEqual(code, 2)
        self.assertIn("does not exist", err)

        (empty / "broker.db").write_bytes(b"this is not SQLite" * 100)
        code, out, err = self.run_here("--json", "clients", "list", data_dir=str(empty))
        self.assertEqual(code, 2)
        self.assertIn("is not a usable fjmcp database", json.loads(out)["error"])

        await self.newer_schema_is_refused()

    async def newer_schema_is_refused(self) -> None:
        """
        A database from a newer fjmcp is refused, not touched.
        """
        self.query("INSERT INTO schema_migrations VALUES (99, 'future', 0)")
        code, _, err = await self.cli("clients", "list")
        self.assertEqual(code, 2)
        self.assertIn("has schema version 99", err)
        self.assertNotIn("Traceback", err)

    async def test_usage_errors(self) -> None:
        code, out, err = self.run_here("frobnicate")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("invalid choice", err)
        self.assertEqual(len(err.splitlines()), 1)
        # Global options are accepted after the command too.
        code, out, _ = self.run_here("clients", "list", "--json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out), {"clients": []})


# fjmcp-admin against the nodes' PostgreSQL database.


class RevokeOnPostgreSQL(OnPostgreSQL, RevokeTests):
    pass


class KeyRotationOnPostgreSQL(OnPostgreSQL, KeyRotationTests):
    pass


class CommandOnPostgreSQL(OnPostgreSQL, CommandTests):
    async def test_unusable_databases(self) -> None:
        config = self.broker.config
        wrong = Path(self.mktemp()).resolve()
        wrong.write_text("not-the-password")
        code, out, err = await self.cli(
            "--database", config.database, "--database-password-file", str(wrong), "clients", "list"
        )
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("password authentication failed", err)
        self.assertNotIn("not-the-password", err)
        code, _, err = await self.cli("--database", "postgresql://:pw@host/db", "clients", "list")
        self.assertEqual(code, 2)
        self.assertIn("password in it", err)
        self.assertNotIn(":pw@", err)
        await self.newer_schema_is_refused()

    async def test_backup_points_to_the_engines_tools(self) -> None:
        code, out, err = await self.cli("backup", self.mktemp())
        self.assertEqual((code, out), (2, ""))
        self.assertIn("pg_dump", err)
