"""
C{fjmcp-admin}: the operator's command for the broker's live database.

    fjmcp-admin [--data-dir DIR | --database URL [--database-password-file FILE]]
                [--secret-key-file FILE] [--json] COMMAND ...

    clients list | clients show CLIENT_ID | clients delete CLIENT_ID
    grants list [--user LOGIN_OR_ID] [--client CLIENT_ID] [--all]
    revoke --user LOGIN_OR_ID | --client CLIENT_ID   (both: that user at that client)
    purge
    backup DEST
    rotate-key [--retire-old]

It runs beside the daemon, on the same database, in its own process:
synchronous, with its own connection configured as the daemon's (SQLite:
WAL, the same busy timeout, C{BEGIN IMMEDIATE} for every write; PostgreSQL:
the daemons' row locks), so the two wait for each other instead of failing.
It runs the store's own methods (L{fjmcp.cli.sync_store}), so there is one
copy of every statement.  It never migrates:
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

This module is the command line: the parser, running one command, the exit
status.  The commands are L{fjmcp.cli.commands} (clients, grants, revoke,
purge, backup) and L{fjmcp.cli.rotation} (rotate-key); what they print is
L{fjmcp.cli.output}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fjmcp.cli.commands import (
    backup,
    clients_delete,
    clients_list,
    clients_show,
    grants_list,
    purge,
    revoke,
)
from fjmcp.cli.output import PROG, AdminError, Result
from fjmcp.cli.rotation import rotate_key
from fjmcp.cli.sync_store import SyncStore, open_store
from fjmcp.config.build import read_database_password
from fjmcp.config.values import parse_database_url
from fjmcp.store.engines import PostgreSQLLocation


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
        "--database",
        metavar="URL",
        default=default(os.environ.get("FJMCP_DATABASE") or ""),
        help="the daemons' PostgreSQL database, postgresql://USER@HOST:PORT/DBNAME "
        "(empty: SQLite in --data-dir) [env FJMCP_DATABASE]",
    )
    parser.add_argument(
        "--database-password-file",
        metavar="FILE",
        default=default(os.environ.get("FJMCP_DATABASE_PASSWORD_FILE") or None),
        help="file holding the PostgreSQL password [env FJMCP_DATABASE_PASSWORD_FILE, "
        "default: $CREDENTIALS_DIRECTORY/database-password if there]",
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
        store = open_store(Path(args.data_dir), _database(args))
        return 0, args.run(store, args), None
    except AdminError as e:
        return e.status, None, str(e)
    except KeyboardInterrupt:
        return 1, None, "interrupted"
    finally:
        if store is not None:
            store.close()


def _database(args: argparse.Namespace) -> PostgreSQLLocation | None:
    """
    The PostgreSQL database the options name, or None for SQLite.

    @raise AdminError: (status 2) a bad URL or an unreadable password file.
    """
    try:
        url = parse_database_url(args.database)
    except ValueError as e:
        raise AdminError(f"--database: {e}", 2) from None
    if not url:
        return None
    problems: list[str] = []
    password = read_database_password(
        args.database_password_file, "--database-password-file", os.environ, problems
    )
    if problems:
        raise AdminError("; ".join(problems), 2)
    return PostgreSQLLocation(url, password)


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
