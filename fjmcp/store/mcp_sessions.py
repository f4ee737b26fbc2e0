"""
MCP sessions kept beyond their child and the broker process: what it takes
to resume one (owner, client, grant, negotiated version, the client's
initialize request), found by the digest of its id.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from fjmcp.store.database import Database, Txn

_COLUMNS = (
    "forgejo_user_id, user_login, client_id, family_id, protocol_version, initialize,"
    " created_at, last_used_at"
)


@attrs.frozen
class StoredSession:
    user_id: int
    user_login: str
    client_id: str
    family_id: str
    protocol_version: str
    initialize: dict[str, Any]
    created_at: float
    last_used_at: float


def _stored(row: tuple[Any, ...]) -> StoredSession:
    return StoredSession(
        int(row[0]), row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7]
    )


class MCPSessionStore(Database):
    def save_mcp_session(
        self, session_hash: bytes, session: StoredSession, keep_per_user: int
    ) -> Deferred[None]:
        """
        Keep a session; of the user's sessions only the C{keep_per_user}
        most recently used stay (the table's own per-user cap, as the live
        table's: a restart does not let a user pile up more).
        """

        def q(txn: Txn) -> None:
            txn.execute(
                f"INSERT INTO mcp_sessions (session_hash, {_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (session_hash) DO UPDATE SET"
                " forgejo_user_id = excluded.forgejo_user_id,"
                " user_login = excluded.user_login, client_id = excluded.client_id,"
                " family_id = excluded.family_id, protocol_version = excluded.protocol_version,"
                " initialize = excluded.initialize, created_at = excluded.created_at,"
                " last_used_at = excluded.last_used_at",
                (
                    session_hash,
                    session.user_id,
                    session.user_login,
                    session.client_id,
                    session.family_id,
                    session.protocol_version,
                    json.dumps(session.initialize, separators=(",", ":")),
                    session.created_at,
                    session.last_used_at,
                ),
            )
            txn.execute(
                "DELETE FROM mcp_sessions WHERE forgejo_user_id = ? AND session_hash NOT IN"
                " (SELECT session_hash FROM mcp_sessions WHERE forgejo_user_id = ?"
                "  ORDER BY last_used_at DESC LIMIT ?)",
                (session.user_id, session.user_id, keep_per_user),
            )

        return self._write("save_mcp_session", q)

    def find_mcp_session(self, session_hash: bytes) -> Deferred[StoredSession | None]:
        def q(txn: Txn) -> StoredSession | None:
            txn.execute(
                f"SELECT {_COLUMNS} FROM mcp_sessions WHERE session_hash = ?",
                (session_hash,),
            )
            row = txn.fetchone()
            return _stored(row) if row else None

        return self._read("find_mcp_session", q)

    def touch_mcp_session(
        self, session_hash: bytes, last_used_at: float, family_id: str
    ) -> Deferred[None]:
        """
        Note a later use of a kept session, and its grant; never an earlier
        one (a node stopping may write what it last saw of a session that
        another node has used since).
        """

        def q(txn: Txn) -> None:
            txn.execute(
                "UPDATE mcp_sessions SET last_used_at = ?, family_id = ?"
                " WHERE session_hash = ? AND last_used_at <= ?",
                (last_used_at, family_id, session_hash, last_used_at),
            )

        return self._write("touch_mcp_session", q)

    def forget_mcp_session(
        self, session_hash: bytes, unless_used_after: float | None = None
    ) -> Deferred[bool]:
        """
        Forget a kept session; with C{unless_used_after}, only if its record
        says it was not used after then (another broker node that resumed
        it has written a later use, and keeps it).
        """

        def q(txn: Txn) -> bool:
            if unless_used_after is None:
                txn.execute("DELETE FROM mcp_sessions WHERE session_hash = ?", (session_hash,))
            else:
                txn.execute(
                    "DELETE FROM mcp_sessions WHERE session_hash = ? AND last_used_at <= ?",
                    (session_hash, unless_used_after),
                )
            return txn.rowcount == 1

        return self._write("forget_mcp_session", q)

    def forget_idle_mcp_sessions(self, used_before: float) -> Deferred[int]:
        def q(txn: Txn) -> int:
            txn.execute("DELETE FROM mcp_sessions WHERE last_used_at < ?", (used_before,))
            return txn.rowcount

        return self._write("forget_idle_mcp_sessions", q)
