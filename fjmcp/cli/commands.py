"""
The commands of C{fjmcp-admin} on the data: listing, showing and deleting
clients, listing grants, revoking them by user or client, purging what
expired, and a consistent backup of the live database.  Each takes the
L{SyncStore} and the parsed arguments and returns a L{Result}, or raises an
L{AdminError}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sqlite3
import stat
from pathlib import Path

from fjmcp.cli.output import PROG, AdminError, Result, fields, iso, table
from fjmcp.cli.sync_store import SyncStore, wait
from fjmcp.secrets.keyring import fsync_directory
from fjmcp.store import UpstreamUser

REVOKE_REASON = "revoked by the operator"
DELETE_REASON = "client deleted by the operator"


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
    # On PostgreSQL this says to use the engine's own tools, before DEST is looked at.
    connection = store.connection
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
            connection.backup(copy)
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
