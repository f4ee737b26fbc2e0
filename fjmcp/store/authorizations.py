"""
Authorizations in flight and remembered: pending authorization requests
(from the consent page until the Forgejo login that completes them, see
L{fjmcp.store.logins}), users' consents per client, broker login sessions.

Single use is enforced by the statements themselves (a row is claimed by the
UPDATE or DELETE that uses it), so two concurrent requests cannot both win.
"""

from __future__ import annotations

import json

import attrs
from twisted.internet.defer import Deferred

from fjmcp.store.database import Database, Txn
from fjmcp.store.tokens import _revoke_family_txn

PENDING_COLUMNS = (
    "id, client_id, redirect_uri, client_state, code_challenge, code_challenge_method,"
    " scope, resource, expires_at"
)


@attrs.frozen
class PendingAuthorization:
    """
    An authorization request between the consent page and the user's
    return from Forgejo.
    """

    id: int
    client_id: str
    redirect_uri: str
    client_state: str | None
    code_challenge: str
    code_challenge_method: str
    scope: str
    resource: str
    expires_at: float


@attrs.frozen
class ConnectionRecord:
    """
    A client as one user sees it on the connections page.  C{consented}
    says whether the approval is remembered (no consent page next time);
    C{live_grants} counts the user's unrevoked grants at it.
    """

    client_id: str
    kind: str
    client_name: str | None
    redirect_uris: tuple[str, ...]
    approved_at: float | None
    last_used_at: float | None
    live_grants: int
    consented: bool


@attrs.frozen
class Disconnected:
    """
    What revoking a client for one user did: whether an approval was
    forgotten, and the grants (token families) revoked.
    """

    consent_forgotten: bool
    family_ids: tuple[str, ...]


def lock_pending(txn: Txn, consent_hash: bytes) -> None:
    """
    On PostgreSQL, wait for any other transaction on this pending
    authorization (an approval, a denial) to end: the statement after this
    one then sees what it did, as behind SQLite's single writer.
    """
    txn.execute(
        f"SELECT id FROM pending_authorizations WHERE consent_hash = ?{txn.engine.row_lock}",
        (consent_hash,),
    )
    txn.fetchall()


class AuthorizationStore(Database):
    def create_pending_authorization(
        self,
        consent_hash: bytes,
        browser_hash: bytes,
        client_id: str,
        redirect_uri: str,
        client_state: str | None,
        code_challenge: str,
        code_challenge_method: str,
        scope: str,
        resource: str,
        expires_at: float,
    ) -> Deferred[None]:
        now = self._now()

        def q(txn: Txn) -> None:
            txn.execute(
                "INSERT INTO pending_authorizations (consent_hash, browser_hash, client_id,"
                " redirect_uri, client_state, code_challenge, code_challenge_method, scope,"
                " resource, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    consent_hash,
                    browser_hash,
                    client_id,
                    redirect_uri,
                    client_state,
                    code_challenge,
                    code_challenge_method,
                    scope,
                    resource,
                    now,
                    expires_at,
                ),
            )

        return self._write("create_pending_authorization", q)

    def deny_pending_authorization(
        self, consent_hash: bytes, browser_hash: bytes
    ) -> Deferred[PendingAuthorization | None]:
        """
        Remove and return a live pending authorization the user has not
        approved, found by its consent token and the browser that saw the
        form.  A second call finds nothing.
        """
        now = self._now()

        def q(txn: Txn) -> PendingAuthorization | None:
            lock_pending(txn, consent_hash)
            txn.execute(
                "DELETE FROM pending_authorizations WHERE consent_hash = ? AND browser_hash = ?"
                " AND NOT EXISTS (SELECT 1 FROM forgejo_logins"
                "   WHERE authorization_id = pending_authorizations.id)"
                f" RETURNING {PENDING_COLUMNS}",
                (consent_hash, browser_hash),
            )
            row = txn.fetchone()
            if row is None or row[-1] <= now:
                return None
            return PendingAuthorization(*row)

        return self._write("deny_pending_authorization", q)

    def remember_consent(self, forgejo_user_id: int, client_id: str, scope: str) -> Deferred[None]:
        now = self._now()

        def q(txn: Txn) -> None:
            txn.execute(
                "INSERT INTO consents (forgejo_user_id, client_id, scope, granted_at, last_used_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (forgejo_user_id, client_id) DO UPDATE SET"
                " scope = excluded.scope, last_used_at = excluded.last_used_at",
                (forgejo_user_id, client_id, scope, now, now),
            )

        return self._write("remember_consent", q)

    def has_consent(self, forgejo_user_id: int, client_id: str) -> Deferred[bool]:
        def q(txn: Txn) -> bool:
            txn.execute(
                "SELECT 1 FROM consents WHERE forgejo_user_id = ? AND client_id = ?",
                (forgejo_user_id, client_id),
            )
            return txn.fetchone() is not None

        return self._read("has_consent", q)

    def create_login_session(
        self, session_hash: bytes, forgejo_user_id: int, expires_at: float
    ) -> Deferred[None]:
        now = self._now()

        def q(txn: Txn) -> None:
            txn.execute(
                "INSERT INTO login_sessions (session_hash, forgejo_user_id, created_at, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (session_hash, forgejo_user_id, now, expires_at),
            )

        return self._write("create_login_session", q)

    def login_session_user(self, session_hash: bytes) -> Deferred[int | None]:
        now = self._now()

        def q(txn: Txn) -> int | None:
            txn.execute(
                "SELECT forgejo_user_id FROM login_sessions WHERE session_hash = ?"
                " AND expires_at > ?",
                (session_hash, now),
            )
            row = txn.fetchone()
            return int(row[0]) if row else None

        return self._read("login_session_user", q)

    def purge_expired_authorizations(self) -> Deferred[int]:
        """
        Forget abandoned logins and expired login sessions; returns how many.
        """
        now = self._now()

        def q(txn: Txn) -> int:
            count = 0
            for table in ("forgejo_logins", "pending_authorizations", "form_tokens"):
                txn.execute(f"DELETE FROM {table} WHERE expires_at <= ?", (now,))
                count += txn.rowcount
            txn.execute("DELETE FROM login_sessions WHERE expires_at <= ?", (now,))
            return count + txn.rowcount

        return self._write("purge_expired_authorizations", q)

    # --- a user's own view of the clients they approved (the connections page)

    def list_connections(self, forgejo_user_id: int) -> Deferred[list[ConnectionRecord]]:
        """
        The clients a user approved or holds a live grant at, with when they
        were approved and last used (a token issued or refreshed, or the
        approval renewed), most recently used first.
        """

        def q(txn: Txn) -> list[ConnectionRecord]:
            txn.execute(
                "WITH mine AS ("
                "  SELECT client_id FROM consents WHERE forgejo_user_id = ?"
                "  UNION SELECT client_id FROM token_families"
                "    WHERE forgejo_user_id = ? AND revoked_at IS NULL),"
                " grants AS ("
                "  SELECT client_id, MIN(created_at) AS first, MAX(last_used_at) AS last,"
                "    SUM(CASE WHEN revoked_at IS NULL THEN 1 ELSE 0 END) AS live"
                "  FROM token_families WHERE forgejo_user_id = ? GROUP BY client_id)"
                " SELECT c.client_id, c.kind, c.client_name, c.redirect_uris,"
                "  COALESCE(k.granted_at, g.first),"
                # The later of the two (SQLite's MAX(a, b) is GREATEST elsewhere).
                "  CASE WHEN COALESCE(k.last_used_at, 0) > COALESCE(g.last, 0)"
                "   THEN k.last_used_at ELSE COALESCE(g.last, 0) END,"
                "  COALESCE(g.live, 0), k.granted_at IS NOT NULL"
                " FROM mine m JOIN clients c ON c.client_id = m.client_id"
                " LEFT JOIN consents k ON k.client_id = c.client_id AND k.forgejo_user_id = ?"
                " LEFT JOIN grants g ON g.client_id = c.client_id"
                " ORDER BY 6 DESC, c.client_id",
                (forgejo_user_id,) * 4,
            )
            return [
                ConnectionRecord(
                    client_id=row[0],
                    kind=row[1],
                    client_name=row[2],
                    redirect_uris=tuple(json.loads(row[3])),
                    approved_at=row[4],
                    last_used_at=row[5] or None,
                    live_grants=int(row[6]),
                    consented=bool(row[7]),
                )
                for row in txn.fetchall()
            ]

        return self._read("list_connections", q)

    def disconnect_client(
        self, forgejo_user_id: int, client_id: str, reason: str
    ) -> Deferred[Disconnected]:
        """
        In one transaction: revoke every live grant the user holds at the
        client and forget their approval of it, so the next authorization
        request shows the consent page again.
        """
        now = self._now()

        def q(txn: Txn) -> Disconnected:
            txn.execute(
                "DELETE FROM consents WHERE forgejo_user_id = ? AND client_id = ?",
                (forgejo_user_id, client_id),
            )
            forgotten = txn.rowcount == 1
            txn.execute(
                "SELECT family_id FROM token_families"
                " WHERE forgejo_user_id = ? AND client_id = ? AND revoked_at IS NULL",
                (forgejo_user_id, client_id),
            )
            ids = [row[0] for row in txn.fetchall()]
            for family_id in ids:
                _revoke_family_txn(txn, family_id, reason, now)
            return Disconnected(forgotten, tuple(ids))

        return self._write("disconnect_client", q)
