"""
What the operator's command (C{fjmcp-admin}) asks of the store beyond what
the daemon uses: client listings and deletion, user lookup, names for a
grant listing, and re-sealing every sealed value under a new key.

Like every mixin these return Deferreds; the admin command runs the same
methods synchronously on its own connection (L{fjmcp.cli.admin.SyncStore}), so
there is one copy of each statement.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import attrs
from twisted.internet.defer import Deferred

from fjmcp.store.credentials import UpstreamUser
from fjmcp.store.database import Database, Txn
from fjmcp.store.tokens import _revoke_family_txn

# A grant is a family that has had tokens issued (an unredeemed code is not
# one yet), as in TokenStore.list_families.
_HAS_TOKENS = (
    "(EXISTS (SELECT 1 FROM access_tokens a WHERE a.family_id = f.family_id)"
    " OR EXISTS (SELECT 1 FROM refresh_tokens r WHERE r.family_id = f.family_id))"
)

# reseal(owner, context-part, sealed) -> the value sealed anew, or None to
# leave it as it is.
Resealer = Callable[[int, str, bytes], "bytes | None"]


@attrs.frozen
class ClientSummary:
    client_id: str
    kind: str
    client_name: str | None
    created_at: float
    last_used_at: float | None
    live_grants: int
    users: int


@attrs.frozen
class ResealBatch:
    """
    One transaction's worth of re-sealing: how many rows were looked at and
    changed, and where the next batch starts (None: that was the last).
    """

    seen: int
    changed: int
    next_after: int | None


class AdminStore(Database):
    def list_clients(self) -> Deferred[list[ClientSummary]]:
        """
        Every client, newest first, with its live grants and their users.
        """

        def q(txn: Txn) -> list[ClientSummary]:
            txn.execute(
                "SELECT c.client_id, c.kind, c.client_name, c.created_at, c.last_used_at,"
                " COUNT(f.family_id), COUNT(DISTINCT f.forgejo_user_id)"
                " FROM clients c LEFT JOIN token_families f ON f.client_id = c.client_id"
                f" AND f.revoked_at IS NULL AND {_HAS_TOKENS}"
                " GROUP BY c.client_id ORDER BY c.created_at DESC, c.client_id"
            )
            return [ClientSummary(*row) for row in txn.fetchall()]

        return self._read("list_clients", q)

    def client_summary(self, client_id: str) -> Deferred[ClientSummary | None]:
        def q(txn: Txn) -> ClientSummary | None:
            txn.execute(
                "SELECT c.client_id, c.kind, c.client_name, c.created_at, c.last_used_at,"
                " COUNT(f.family_id), COUNT(DISTINCT f.forgejo_user_id)"
                " FROM clients c LEFT JOIN token_families f ON f.client_id = c.client_id"
                f" AND f.revoked_at IS NULL AND {_HAS_TOKENS}"
                " WHERE c.client_id = ? GROUP BY c.client_id",
                (client_id,),
            )
            row = txn.fetchone()
            return ClientSummary(*row) if row else None

        return self._read("client_summary", q)

    def delete_client(self, client_id: str, reason: str) -> Deferred[int | None]:
        """
        Revoke every live grant of the client, then delete it with all its
        rows, in one transaction; fires with how many grants were revoked,
        or None when there is no such client.  (Revoking first does not
        change the outcome of the cascade; it keeps one way of ending a
        grant, and the daemon's session sweep sees both as gone.)
        """
        now = self._now()

        def q(txn: Txn) -> int | None:
            txn.execute("SELECT 1 FROM clients WHERE client_id = ?", (client_id,))
            if txn.fetchone() is None:
                return None
            txn.execute(
                "SELECT family_id FROM token_families WHERE client_id = ? AND revoked_at IS NULL",
                (client_id,),
            )
            ids = [row[0] for row in txn.fetchall()]
            revoked = sum(_revoke_family_txn(txn, family_id, reason, now) for family_id in ids)
            txn.execute("DELETE FROM clients WHERE client_id = ?", (client_id,))
            return revoked

        return self._write("delete_client", q)

    def find_user(self, login_or_id: str) -> Deferred[UpstreamUser | None]:
        """
        The user with this Forgejo login (case-insensitive, as Forgejo's), or
        else with this numeric Forgejo user id.
        """

        def q(txn: Txn) -> UpstreamUser | None:
            txn.execute(
                "SELECT forgejo_user_id, login, full_name FROM users"
                " WHERE lower(login) = lower(?) ORDER BY login = ? DESC LIMIT 1",
                (login_or_id, login_or_id),
            )
            row = txn.fetchone()
            if row is None and login_or_id.strip().isdigit():
                txn.execute(
                    "SELECT forgejo_user_id, login, full_name FROM users WHERE forgejo_user_id = ?",
                    (int(login_or_id),),
                )
                row = txn.fetchone()
            return UpstreamUser(*row) if row else None

        return self._read("find_user", q)

    def names(
        self, user_ids: Collection[int], client_ids: Collection[str]
    ) -> Deferred[tuple[dict[int, str], dict[str, str | None]]]:
        """
        Users' logins and clients' names, for a listing of grants.
        """
        users = sorted(set(user_ids))
        clients = sorted(set(client_ids))

        def q(txn: Txn) -> tuple[dict[int, str], dict[str, str | None]]:
            among, ids = txn.engine.member("forgejo_user_id", users)
            txn.execute(f"SELECT forgejo_user_id, login FROM users WHERE {among}", (ids,))
            logins = {int(row[0]): row[1] for row in txn.fetchall()}
            among, ids = txn.engine.member("client_id", clients)
            txn.execute(f"SELECT client_id, client_name FROM clients WHERE {among}", (ids,))
            return logins, {row[0]: row[1] for row in txn.fetchall()}

        return self._read("names", q)

    # --- key rotation

    def reseal_upstream_credentials(
        self, reseal: Resealer, after: int = -1, limit: int = 200
    ) -> Deferred[ResealBatch]:
        """
        Re-seal the stored Forgejo tokens of up to C{limit} users (by id,
        after C{after}) in one write transaction.  C{reseal} is called with
        the user id, "access" or "refresh", and the sealed value; it runs
        in the transaction, so it must be quick and must not wait.  The
        credential's generation is left alone: the token inside is the same.
        The rows are locked until the batch commits (on PostgreSQL), so a
        renewal that commits meanwhile waits instead of being overwritten.
        """

        def q(txn: Txn) -> ResealBatch:
            txn.execute(
                "SELECT forgejo_user_id, access_token_enc, refresh_token_enc"
                " FROM upstream_credentials WHERE forgejo_user_id > ?"
                f" ORDER BY forgejo_user_id LIMIT ?{txn.engine.row_lock}",
                (after, limit),
            )
            rows = txn.fetchall()
            changed = 0
            for user_id, access, refresh in rows:
                new_access = reseal(user_id, "access", access)
                new_refresh = reseal(user_id, "refresh", refresh) if refresh is not None else None
                if new_access is None and new_refresh is None:
                    continue
                txn.execute(
                    "UPDATE upstream_credentials SET access_token_enc = ?, refresh_token_enc = ?"
                    " WHERE forgejo_user_id = ?",
                    (new_access or access, new_refresh or refresh, user_id),
                )
                changed += 1
            last = int(rows[-1][0]) if len(rows) == limit else None
            return ResealBatch(len(rows), changed, last)

        return self._write("reseal_upstream_credentials", q)

    def reseal_pending_verifiers(
        self, reseal: Resealer, after: int = -1, limit: int = 200
    ) -> Deferred[ResealBatch]:
        """
        The same for the PKCE verifiers of Forgejo logins in flight (the
        owner passed to C{reseal} is the login's row id).
        """

        def q(txn: Txn) -> ResealBatch:
            txn.execute(
                "SELECT id, verifier_enc FROM forgejo_logins WHERE id > ? ORDER BY id LIMIT ?"
                f"{txn.engine.row_lock}",
                (after, limit),
            )
            rows = txn.fetchall()
            changed = 0
            for row_id, verifier in rows:
                if verifier is None:
                    continue
                new = reseal(row_id, "verifier", verifier)
                if new is not None:
                    txn.execute(
                        "UPDATE forgejo_logins SET verifier_enc = ? WHERE id = ?",
                        (new, row_id),
                    )
                    changed += 1
            last = int(rows[-1][0]) if len(rows) == limit else None
            return ResealBatch(len(rows), changed, last)

        return self._write("reseal_pending_verifiers", q)
