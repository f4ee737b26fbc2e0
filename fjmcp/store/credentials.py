"""
Forgejo users and their one upstream credential each (sealed tokens), and
the claim on renewing it that one process at a time holds.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred

from fjmcp.store.database import Database, Txn


@attrs.frozen
class UpstreamUser:
    """
    A Forgejo account as C{GET /api/v1/user} describes it.
    """

    forgejo_user_id: int
    login: str
    full_name: str = ""


@attrs.frozen
class SealedCredential:
    """
    A user's Forgejo tokens as stored: sealed, never in the clear.
    C{lifetime} is the access token's lifetime as Forgejo gave it; L{None}
    for a credential stored before that was kept.
    """

    forgejo_user_id: int
    access_token_enc: bytes = attrs.field(repr=False)
    refresh_token_enc: bytes | None = attrs.field(repr=False)
    expires_at: float
    scope: str
    generation: int
    updated_at: float
    lifetime: float | None = None


class CredentialStore(Database):
    def replace_upstream_credential(
        self,
        user: UpstreamUser,
        access_token_enc: bytes,
        refresh_token_enc: bytes | None,
        expires_at: float,
        scope: str,
        lifetime: float | None = None,
    ) -> Deferred[int]:
        """
        Record C{user} and make the given sealed tokens their only upstream
        credential, atomically.  Fires with the credential's new generation
        (1 for a first login, +1 on every replacement).
        """
        now = self._now()

        def q(txn: Txn) -> int:
            txn.execute(
                "INSERT INTO users (forgejo_user_id, login, full_name, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (forgejo_user_id) DO UPDATE SET"
                " login = excluded.login, full_name = excluded.full_name,"
                " updated_at = excluded.updated_at",
                (user.forgejo_user_id, user.login, user.full_name, now, now),
            )
            txn.execute(
                "INSERT INTO upstream_credentials (forgejo_user_id, access_token_enc,"
                " refresh_token_enc, expires_at, scope, generation, updated_at, lifetime)"
                " VALUES (?, ?, ?, ?, ?, 1, ?, ?)"
                " ON CONFLICT (forgejo_user_id) DO UPDATE SET"
                " access_token_enc = excluded.access_token_enc,"
                " refresh_token_enc = excluded.refresh_token_enc,"
                " expires_at = excluded.expires_at, scope = excluded.scope,"
                " lifetime = excluded.lifetime,"
                " generation = upstream_credentials.generation + 1,"
                " updated_at = excluded.updated_at, refresh_claimed_until = NULL"
                " RETURNING generation",
                (
                    user.forgejo_user_id,
                    access_token_enc,
                    refresh_token_enc,
                    expires_at,
                    scope,
                    now,
                    lifetime,
                ),
            )
            return int(txn.fetchone()[0])

        return self._write("replace_upstream_credential", q)

    def claim_upstream_refresh(
        self, forgejo_user_id: int, generation: int, now: float, until: float
    ) -> Deferred[bool]:
        """
        Claim the renewal of the user's credential at C{generation} from
        C{now} until C{until} (both by the claimant's clock, which every
        claimant shares): True for exactly one caller (on any node) while
        the claim holds; False when the credential has moved on or another
        claim is live.  Storing the renewed credential ends the claim.
        """

        def q(txn: Txn) -> bool:
            txn.execute(
                "UPDATE upstream_credentials SET refresh_claimed_until = ?"
                " WHERE forgejo_user_id = ? AND generation = ?"
                " AND (refresh_claimed_until IS NULL OR refresh_claimed_until <= ?)",
                (until, forgejo_user_id, generation, now),
            )
            return txn.rowcount == 1

        return self._write("claim_upstream_refresh", q)

    def release_upstream_refresh(
        self, forgejo_user_id: int, generation: int, until: float
    ) -> Deferred[None]:
        """
        Give up a claim (the one made until C{until}) whose renewal failed,
        so another caller may try; a newer claim of another, made after
        this one lapsed, stays.
        """

        def q(txn: Txn) -> None:
            txn.execute(
                "UPDATE upstream_credentials SET refresh_claimed_until = NULL"
                " WHERE forgejo_user_id = ? AND generation = ? AND refresh_claimed_until = ?",
                (forgejo_user_id, generation, until),
            )

        return self._write("release_upstream_refresh", q)

    def get_upstream_credential(self, forgejo_user_id: int) -> Deferred[SealedCredential | None]:
        def q(txn: Txn) -> SealedCredential | None:
            txn.execute(
                "SELECT forgejo_user_id, access_token_enc, refresh_token_enc, expires_at,"
                " scope, generation, updated_at, lifetime FROM upstream_credentials"
                " WHERE forgejo_user_id = ?",
                (forgejo_user_id,),
            )
            row = txn.fetchone()
            return SealedCredential(*row) if row else None

        return self._read("get_upstream_credential", q)

    def get_user(self, forgejo_user_id: int) -> Deferred[UpstreamUser | None]:
        def q(txn: Txn) -> UpstreamUser | None:
            txn.execute(
                "SELECT forgejo_user_id, login, full_name FROM users WHERE forgejo_user_id = ?",
                (forgejo_user_id,),
            )
            row = txn.fetchone()
            return UpstreamUser(*row) if row else None

        return self._read("get_user", q)
