"""
C{fjmcp-admin}: the operator's command for the broker's live database.

    fjmcp-admin [--data-dir DIR] [--secret-key-file FILE] [--json] COMMAND ...

    clients list | clients show CLIENT_ID | clients delete CLIENT_ID
    grants list [--user LOGIN_OR_ID] [--client CLIENT_ID] [--all]
    revoke --user LOGIN_OR_ID | --client CLIENT_ID   (both: that user at that client)
    purge
    backup DEST
    rotate-key [--retire-old]

It runs beside the daemon, on the same database file, in its own process:
synchronous, with its own SQLite connection configured as the daemon's
(WAL, the same busy timeout, C{BEGIN IMMEDIATE} for every write), so the two
wait for each other instead of failing.  It runs the store's own methods
(L{SyncStore}), so there is one copy of every statement.  It never migrates:
a database at another schema version than this fjmcp knows is refused,
because the daemon that owns it may be older or newer than this command.

What the daemon notices, and when: revoked or deleted grants end their MCP
sessions and stop their bearer tokens within the daemon's revocation sweep
(a few seconds); a rotated key is picked up within about a second (see
L{fjmcp.secrets.keyring}, also for where rotation cannot work without a restart).

Exit status: 0 done; 1 not found (unknown client or user) or the operation
failed (the message says why); 2 a usage or configuration mistake (no
database, unreadable key file, an existing backup file).  Errors are one
line on stderr, never a traceback; with C{--json} every command prints one
JSON object on stdout, errors as C{{"error": ...}}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sqlite3
import stat
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from fjmcp.config import DB_FILENAME
from fjmcp.forgejo.credentials import credential_context
from fjmcp.secrets.crypto import UPSTREAM_PKCE_CONTEXT, DecryptionError, SecretBox, key_id
from fjmcp.secrets.keyring import (
    CHECK_INTERVAL,
    KeyFileError,
    fsync_directory,
    new_key,
    read_key_file,
    write_key_file,
)
from fjmcp.store import Store, UpstreamUser, configure_connection, known_migrations
from fjmcp.store.admin import ResealBatch
from fjmcp.store.database import BUSY_TIMEOUT_MS, Cursor, StoreEvents, Txn

T = TypeVar("T")

PROG = "fjmcp-admin"
REVOKE_REASON = "revoked by the operator"
DELETE_REASON = "client deleted by the operator"
# Before retiring old keys, the key file must be this old, so the daemon
# (which looks at it at most once per CHECK_INTERVAL) seals with the current key.
SETTLE_SECONDS = 2 * CHECK_INTERVAL
RESEAL_BATCH = 200


class AdminError(Exception):
    """
    What the operator is told, and the exit status that goes with it.
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class _WallClock:
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
        self._clock = _WallClock()  # type: ignore[assignment]
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


# --- output


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    moment = datetime.datetime.fromtimestamp(t, datetime.UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [list(headers), *cells]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs) + 1
    out = []
    for k, v in pairs:
        if isinstance(v, list | tuple):
            v = ", ".join(str(x) for x in v) or "-"
        out.append(f"{(k + ':').ljust(width)} {'-' if v is None else v}")
    return "\n".join(out)


@attrs.frozen
class Result:
    """
    What a command prints: C{data} with --json, else C{text}.
    """

    data: dict[str, Any]
    text: str


# --- commands


def _client_or_fail(store: SyncStore, client_id: str) -> None:
    if wait(store.get_client(client_id)) is None:
        raise AdminError(f"no client {client_id!r} (`{PROG} clients list` shows them)")


def _user_or_fail(store: SyncStore, login_or_id: str) -> UpstreamUser:
    user = wait(store.find_user(login_or_id))
    if user is None:
        raise AdminError(f"no user {login_or_id!r} has signed in through this broker")
    return user


def clients_list(store: SyncStore, args: argparse.Namespace) -> Result:
    clients = wait(store.list_clients())
    data = [
        {
            "client_id": c.client_id,
            "kind": c.kind,
            "client_name": c.client_name,
            "created_at": iso(c.created_at),
            "last_used_at": iso(c.last_used_at),
            "live_grants": c.live_grants,
            "users": c.users,
        }
        for c in clients
    ]
    text = (
        table(
            ["CLIENT_ID", "KIND", "NAME", "CREATED", "LAST_USED", "GRANTS", "USERS"],
            [list(d.values()) for d in data],
        )
        if data
        else "no clients"
    )
    return Result({"clients": data}, text)


def clients_show(store: SyncStore, args: argparse.Namespace) -> Result:
    record = wait(store.get_client(args.client_id))
    summary = wait(store.client_summary(args.client_id))
    if record is None or summary is None:
        _client_or_fail(store, args.client_id)
        raise AssertionError("unreachable")
    meta = record.metadata
    data = {
        "client_id": record.client_id,
        "kind": record.kind,
        "client_name": meta.get("client_name"),
        "client_uri": meta.get("client_uri"),
        "redirect_uris": list(meta.get("redirect_uris", [])),
        "grant_types": list(meta.get("grant_types", [])),
        "token_endpoint_auth_method": meta.get("token_endpoint_auth_method"),
        "created_at": iso(record.created_at),
        "last_used_at": iso(record.last_used_at),
        "live_grants": summary.live_grants,
        "users": summary.users,
        "metadata": meta,
    }
    text = fields([(k.replace("_", " "), v) for k, v in data.items() if k != "metadata"])
    return Result({"client": data}, text)


def clients_delete(store: SyncStore, args: argparse.Namespace) -> Result:
    revoked = wait(store.delete_client(args.client_id, DELETE_REASON))
    if revoked is None:
        _client_or_fail(store, args.client_id)
        raise AssertionError("unreachable")
    return Result(
        {"client_id": args.client_id, "deleted": True, "grants_revoked": revoked},
        f"deleted client {args.client_id}; revoked {revoked} grant(s)"
        + (", whose MCP sessions end within seconds" if revoked else ""),
    )


def grants_list(store: SyncStore, args: argparse.Namespace) -> Result:
    user = _user_or_fail(store, args.user) if args.user is not None else None
    if args.client is not None:
        _client_or_fail(store, args.client)
    families = wait(
        store.list_families(
            user.forgejo_user_id if user else None, args.client, include_revoked=args.all
        )
    )
    logins, names = wait(
        store.names({f.forgejo_user_id for f in families}, {f.client_id for f in families})
    )
    data = [
        {
            "grant_id": f.family_id,
            "user_id": f.forgejo_user_id,
            "user_login": logins.get(f.forgejo_user_id),
            "client_id": f.client_id,
            "client_name": names.get(f.client_id),
            "scope": f.scope,
            "created_at": iso(f.created_at),
            "last_used_at": iso(f.last_used_at),
            "revoked_at": iso(f.revoked_at),
            "revoked_reason": f.revoked_reason,
        }
        for f in families
    ]
    headers = ["GRANT", "USER", "CLIENT_ID", "CLIENT_NAME", "CREATED", "LAST_USED"]
    keys = ["grant_id", "user_login", "client_id", "client_name", "created_at", "last_used_at"]
    if args.all:
        headers += ["REVOKED", "REASON"]
        keys += ["revoked_at", "revoked_reason"]
    text = table(headers, [[d[k] for k in keys] for d in data]) if data else "no grants"
    return Result({"grants": data}, text)


def revoke(store: SyncStore, args: argparse.Namespace) -> Result:
    if args.user is None and args.client is None:
        raise AdminError("revoke: name --user, --client or both", 2)
    user = _user_or_fail(store, args.user) if args.user is not None else None
    if args.client is not None:
        _client_or_fail(store, args.client)
    count = wait(
        store.revoke_families(
            REVOKE_REASON,
            forgejo_user_id=user.forgejo_user_id if user else None,
            client_id=args.client,
        )
    )
    whose = " ".join(
        part
        for part in (
            f"of user {user.login}" if user else "",
            f"at client {args.client}" if args.client else "",
        )
        if part
    )
    return Result(
        {
            "revoked": count,
            "user": {"id": user.forgejo_user_id, "login": user.login} if user else None,
            "client_id": args.client,
        },
        f"revoked {count} grant(s) {whose}"
        + ("; their MCP sessions end within seconds" if count else ""),
    )


def purge(store: SyncStore, args: argparse.Namespace) -> Result:
    logins, tokens = wait(store.purge_expired())
    return Result(
        {"purged": {"logins": logins, "tokens": tokens}},
        f"purged {logins} expired login(s) and {tokens} expired code(s) and token(s)",
    )


def _table_counts(conn: sqlite3.Connection) -> dict[str, int]:
    names = [
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            " ORDER BY name"
        )
    ]
    # Table names come from the database's own catalogue, not from input.
    return {n: int(conn.execute(f'SELECT COUNT(*) FROM "{n}"').fetchone()[0]) for n in names}  # noqa: S608


def backup(store: SyncStore, args: argparse.Namespace) -> Result:
    """
    A consistent copy: SQLite's online backup copies the whole database in
    one step under one read transaction, which in WAL mode sees one
    snapshot and does not hold the daemon's writers up.  The copy is
    written under a temporary name, checked, and only then linked to DEST,
    so DEST never names a half-written or unchecked file.
    """
    dest = Path(args.dest)
    if dest.is_dir():
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        dest = dest / f"broker-{stamp}.db"
    if dest.exists() or dest.is_symlink():
        raise AdminError(f"{dest} exists; refusing to overwrite it (give a new file name)", 2)
    if not dest.parent.is_dir():
        raise AdminError(f"cannot write {dest}: {dest.parent} is not a directory", 2)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, stat.S_IRUSR | stat.S_IWUSR)
    except OSError as e:
        raise AdminError(f"cannot write in {dest.parent}: {e.strerror}", 2) from None
    os.close(fd)
    try:
        copy = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            store.connection.backup(copy)
            # A single self-contained file (no -wal beside it); the daemon
            # puts it back in WAL mode when it opens it.
            copy.execute("PRAGMA journal_mode=DELETE")
            check = [row[0] for row in copy.execute("PRAGMA integrity_check")]
            if check != ["ok"]:
                raise AdminError(f"the copy failed its integrity check: {'; '.join(check[:5])}")
            version = int(copy.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0])
            counts = _table_counts(copy)
        finally:
            copy.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, dest)
        except FileExistsError:
            raise AdminError(f"{dest} exists; refusing to overwrite it", 2) from None
        except OSError as e:
            raise AdminError(f"cannot write {dest}: {e.strerror}", 2) from None
    except sqlite3.Error as e:
        raise AdminError(f"the backup failed: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(dest.parent)
    size = dest.stat().st_size
    return Result(
        {
            "path": str(dest.resolve()),
            "bytes": size,
            "schema_version": version,
            "integrity": "ok",
            "rows": counts,
        },
        f"backed up to {dest.resolve()} ({size} bytes, schema {version}, integrity ok); "
        "the secret key file is not in it: keep that safe separately",
    )


# --- key rotation


@attrs.define
class _Resealing:
    """
    Re-seals every sealed value under C{box}'s current key, counting what
    it changed and what opened with no key at all.
    """

    box: SecretBox
    credentials: int = 0
    verifiers: int = 0
    unreadable: int = 0

    def _reseal(self, context: str, sealed: bytes) -> bytes | None:
        try:
            return self.box.reseal(sealed, context)
        except DecryptionError:
            # Lost already (its key is gone): the user signs in again when
            # it is needed; rotation must not be held up by it.
            self.unreadable += 1
            return None

    def run(self, store: SyncStore) -> None:
        def credential(user_id: int, which: str, sealed: bytes) -> bytes | None:
            return self._reseal(credential_context(user_id, which), sealed)

        def verifier(row_id: int, which: str, sealed: bytes) -> bytes | None:
            return self._reseal(UPSTREAM_PKCE_CONTEXT, sealed)

        # One short write transaction per batch, so the daemon's writes are
        # never held up for long on a big database.
        batch: ResealBatch | None = None
        while batch is None or batch.next_after is not None:
            after = -1 if batch is None else batch.next_after
            assert after is not None
            batch = wait(store.reseal_upstream_credentials(credential, after, RESEAL_BATCH))
            self.credentials += batch.changed
        batch = None
        while batch is None or batch.next_after is not None:
            after = -1 if batch is None else batch.next_after
            assert after is not None
            batch = wait(store.reseal_pending_verifiers(verifier, after, RESEAL_BATCH))
            self.verifiers += batch.changed


def _key_file(args: argparse.Namespace) -> Path:
    if not args.secret_key_file:
        raise AdminError(
            "rotate-key needs the daemon's key file: give --secret-key-file or set "
            "FJMCP_SECRET_KEY_FILE",
            2,
        )
    return Path(args.secret_key_file)


def _read_keys(path: Path) -> tuple[bytes, ...]:
    try:
        return read_key_file(path)
    except OSError as e:
        raise AdminError(f"cannot read the key file {path}: {e.strerror}", 2) from None
    except KeyFileError as e:
        raise AdminError(f"the key file {path} is unusable: {'; '.join(e.problems)}", 2) from None


def _write_keys(path: Path, keys: Sequence[bytes]) -> None:
    try:
        write_key_file(path, keys)
    except OSError as e:
        raise AdminError(
            f"cannot replace the key file {path}: {e.strerror}; it and its directory must be "
            "writable (a systemd LoadCredential copy is read-only: rotate the source file, "
            "then restart the service)",
            2,
        ) from None


def rotate_key(store: SyncStore, args: argparse.Namespace) -> Result:
    # A symlink stays one: the file it points to is what gets replaced.
    path = Path(os.path.realpath(_key_file(args)))
    keys = _read_keys(path)
    if not os.access(path.parent, os.W_OK):
        raise AdminError(
            f"cannot replace the key file {path}: {path.parent} is not writable (a systemd "
            "LoadCredential copy is read-only: rotate the source file, then restart the service)",
            2,
        )
    return _retire_old(store, path, keys) if args.retire_old else _rotate(store, path, keys)


def _check_keys_open(store: SyncStore, path: Path, keys: tuple[bytes, ...]) -> None:
    """
    Refuse to rotate with a key file that opens none of the stored
    credentials: it is not the daemon's, and re-encrypting under it would
    sign every user out.  (The first batch is enough to tell.)
    """
    box = SecretBox(keys)
    tried: list[bool] = []

    def probe(user_id: int, which: str, sealed: bytes) -> None:
        try:
            box.open(sealed, credential_context(user_id, which))
            tried.append(True)
        except DecryptionError:
            tried.append(False)

    wait(store.reseal_upstream_credentials(probe, -1, RESEAL_BATCH))
    if tried and not any(tried):
        raise AdminError(
            f"none of the stored credentials opens with the keys in {path}: is it the key file "
            "the daemon uses (--secret-key-file / FJMCP_SECRET_KEY_FILE)? Nothing was changed",
            2,
        )


def _rotate(store: SyncStore, path: Path, keys: tuple[bytes, ...]) -> Result:
    _check_keys_open(store, path, keys)
    key = new_key()
    ring: list[tuple[bytes, ...]] = []

    def write(txn: Txn) -> None:
        # Under the database's write lock: a second rotate-key waits here
        # instead of both writing the file from the same old contents.
        current = _read_keys(path)
        ring.append((key, *current))
        _write_keys(path, ring[0])

    wait(store._write("rotate_key_file", write))
    resealing = _Resealing(SecretBox(ring[0]))
    resealing.run(store)
    kid = key_id(key).hex()
    text = (
        f"new key {kid} written to {path} ({len(ring[0])} keys, new one first); "
        f"re-encrypted {resealing.credentials} stored credential(s) and "
        f"{resealing.verifiers} login(s) in flight. The old key stays in the file to open "
        f"anything the daemon sealed in the next second; `{PROG} rotate-key --retire-old` "
        "removes it."
    )
    return Result(_rotation_data(path, ring[0], resealing, []), _warn(text, resealing))


def _retire_old(store: SyncStore, path: Path, keys: tuple[bytes, ...]) -> Result:
    _check_keys_open(store, path, keys)
    # Let the daemon see the current key before anything is checked: it
    # looks at the file at most once a second before sealing.
    age = time.time() - path.stat().st_mtime
    if age < SETTLE_SECONDS:
        time.sleep(SETTLE_SECONDS - age)
    resealing = _Resealing(SecretBox(keys))
    resealing.run(store)
    retired: list[bytes] = []

    def write(txn: Txn) -> None:
        current = _read_keys(path)
        if current[0] != keys[0]:
            raise AdminError(
                f"the key file {path} changed while old keys were being retired "
                "(another rotate-key?); run this again"
            )
        retired.extend(current[1:])
        if retired:
            _write_keys(path, current[:1])

    wait(store._write("retire_old_keys", write))
    # Anything the daemon stored under an old key after the first pass
    # (sealed just before it saw the new file) is caught here; this command
    # still holds the old keys in memory.
    resealing.box = SecretBox((keys[0], *retired, *keys[1:]))
    resealing.run(store)
    ids = [key_id(k).hex() for k in retired]
    text = (
        f"retired {len(retired)} old key(s) ({', '.join(ids)}); {path} now holds only key "
        f"{key_id(keys[0]).hex()}; re-encrypted {resealing.credentials} stored credential(s) "
        f"and {resealing.verifiers} login(s) in flight"
        if retired
        else f"{path} holds only the current key {key_id(keys[0]).hex()}: nothing to retire"
        + (
            f" (re-encrypted {resealing.credentials} credential(s) still in the old format)"
            if resealing.credentials
            else ""
        )
    )
    return Result(_rotation_data(path, keys[:1], resealing, ids), _warn(text, resealing))


def _rotation_data(
    path: Path, keys: Sequence[bytes], resealing: _Resealing, retired: list[str]
) -> dict[str, Any]:
    return {
        "key_file": str(path),
        "current_key_id": key_id(keys[0]).hex(),
        "key_ids": [key_id(k).hex() for k in keys],
        "retired_key_ids": retired,
        "resealed": {
            "credentials": resealing.credentials,
            "pending_authorizations": resealing.verifiers,
        },
        "unreadable": resealing.unreadable,
    }


def _warn(text: str, resealing: _Resealing) -> str:
    if resealing.unreadable:
        text += (
            f"\nwarning: {resealing.unreadable} stored value(s) open with no key in the file; "
            "those users must sign in again"
        )
    return text


# --- the command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise AdminError(f"{message} (see `{PROG} --help`)", 2)


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """
    The global options, accepted before the command and (so an operator
    need not remember where) after it.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=default(os.environ.get("FJMCP_DATA_DIR") or "fjmcp-data"),
        help="the daemon's data directory, holding broker.db "
        "[env FJMCP_DATA_DIR, default: fjmcp-data]",
    )
    parser.add_argument(
        "--secret-key-file",
        metavar="FILE",
        default=default(os.environ.get("FJMCP_SECRET_KEY_FILE") or None),
        help="the daemon's secret key file; only rotate-key needs it [env FJMCP_SECRET_KEY_FILE]",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print one JSON object instead of text",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Inspect and administer a running fjmcp broker's database.",
        epilog="Exit status: 0 done, 1 not found or failed, 2 usage or configuration error.",
    )
    _global_options(parser, suppress=False)
    common = _Parser(add_help=False)
    _global_options(common, suppress=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    clients = commands.add_parser("clients", help="list, show or delete MCP clients")
    clients_commands = clients.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = clients_commands.add_parser("list", parents=[common], help="every registered client")
    p.set_defaults(run=clients_list)
    p = clients_commands.add_parser("show", parents=[common], help="one client in full")
    p.add_argument("client_id", metavar="CLIENT_ID")
    p.set_defaults(run=clients_show)
    p = clients_commands.add_parser(
        "delete", parents=[common], help="revoke a client's grants, then delete it"
    )
    p.add_argument("client_id", metavar="CLIENT_ID")
    p.set_defaults(run=clients_delete)

    grants = commands.add_parser("grants", help="list grants (token families)")
    grants_commands = grants.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = grants_commands.add_parser("list", parents=[common], help="live grants, newest first")
    p.add_argument("--user", metavar="LOGIN_OR_ID", help="only this Forgejo user's")
    p.add_argument("--client", metavar="CLIENT_ID", help="only this client's")
    p.add_argument("--all", action="store_true", help="include revoked grants")
    p.set_defaults(run=grants_list)

    p = commands.add_parser(
        "revoke",
        parents=[common],
        help="revoke a user's or a client's grants (both: that user at that client)",
    )
    p.add_argument("--user", metavar="LOGIN_OR_ID")
    p.add_argument("--client", metavar="CLIENT_ID")
    p.set_defaults(run=revoke)

    p = commands.add_parser(
        "purge", parents=[common], help="delete expired codes, tokens and abandoned logins"
    )
    p.set_defaults(run=purge)

    p = commands.add_parser(
        "backup", parents=[common], help="copy the live database to DEST (a new file or a dir)"
    )
    p.add_argument("dest", metavar="DEST")
    p.set_defaults(run=backup)

    p = commands.add_parser(
        "rotate-key",
        parents=[common],
        help="put a new key first in the key file and re-encrypt stored credentials",
    )
    p.add_argument(
        "--retire-old",
        action="store_true",
        help="instead: re-encrypt everything under the current key and drop the older ones",
    )
    p.set_defaults(run=rotate_key)
    return parser


def run(argv: Sequence[str]) -> tuple[int, Result | None, str | None]:
    """
    Parse and run one command: (exit status, what to print, error message).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:  # --help
        return int(e.code or 0), None, None
    except AdminError as e:
        return e.status, None, str(e)
    store: SyncStore | None = None
    try:
        store = open_store(Path(args.data_dir))
        return 0, args.run(store, args), None
    except AdminError as e:
        return e.status, None, str(e)
    except KeyboardInterrupt:
        return 1, None, "interrupted"
    finally:
        if store is not None:
            store.close()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    want_json = "--json" in argv
    try:
        status, result, error = run(argv)
    except Exception as e:  # a bug: still one line, not a traceback
        status, result, error = 1, None, f"unexpected failure: {type(e).__name__}: {e}"
    if error is not None:
        sys.stderr.write(f"{PROG}: error: {error}\n")
        if want_json:
            print(json.dumps({"error": error, "status": status}))
    elif result is not None:
        print(json.dumps(result.data, indent=2) if want_json else result.text)
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
