"""
The broker's own grants: token families, authorization codes, access and
refresh tokens (stored as SHA-256 digests only).

A family is one chain of tokens that started with one authorization code;
revoking it revokes everything issued in it.  The token endpoint does all of
one request's work in one write transaction through L{TokenTransaction}
(see L{TokenStore.token_transaction}), so redeeming a code and rotating a
refresh token are atomic even when requests race.  Single use is enforced by
the statements themselves: a code is claimed by an C{UPDATE ... WHERE
used_at IS NULL} whose row count is checked, revocation only touches rows
not yet revoked.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred

from fjmcp.store.clients import ClientRecord
from fjmcp.store.database import Database, Txn

T = TypeVar("T")

_FAMILY_COLUMNS = (
    "f.family_id, f.client_id, f.forgejo_user_id, f.scope, f.resource, f.created_at,"
    " f.last_used_at, f.revoked_at, f.revoked_reason"
)
_FAMILY_WIDTH = 9


@attrs.frozen
class TokenFamily:
    """
    One grant: what a user allowed a client, and every token issued from it.
    """

    family_id: str
    client_id: str
    forgejo_user_id: int
    scope: str
    resource: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None
    revoked_reason: str | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@attrs.frozen
class AuthorizationCodeRecord:
    family: TokenFamily
    redirect_uri: str
    code_challenge: str
    code_challenge_method: str
    created_at: float
    expires_at: float
    used_at: float | None


@attrs.frozen
class RefreshTokenRecord:
    family: TokenFamily
    created_at: float
    expires_at: float
    rotated_at: float | None
    revoked_at: float | None


@attrs.frozen
class AccessTokenRecord:
    family: TokenFamily
    scope: str
    created_at: float
    expires_at: float
    revoked_at: float | None


def _family(row: tuple[Any, ...]) -> TokenFamily:
    return TokenFamily(*row[:_FAMILY_WIDTH])


def _revoke_family_txn(txn: Txn, family_id: str, reason: str, now: float) -> bool:
    """
    Revoke a family and every token in it; True if it was live until now,
    and then the store announces it once the transaction commits.
    """
    txn.execute(
        "UPDATE token_families SET revoked_at = ?, revoked_reason = ?"
        " WHERE family_id = ? AND revoked_at IS NULL",
        (now, reason, family_id),
    )
    changed = txn.rowcount == 1
    txn.execute(
        "UPDATE access_tokens SET revoked_at = ? WHERE family_id = ? AND revoked_at IS NULL",
        (now, family_id),
    )
    txn.execute(
        "UPDATE refresh_tokens SET revoked_at = ? WHERE family_id = ? AND revoked_at IS NULL",
        (now, family_id),
    )
    if changed:
        txn.call_after(txn.events.grant_revoked, family_id, reason)
    return changed


def _access_token_txn(txn: Txn, token_hash: bytes) -> AccessTokenRecord | None:
    txn.execute(
        f"SELECT {_FAMILY_COLUMNS}, a.scope, a.created_at, a.expires_at, a.revoked_at"
        " FROM access_tokens a JOIN token_families f ON f.family_id = a.family_id"
        " WHERE a.token_hash = ?",
        (token_hash,),
    )
    row = txn.fetchone()
    if row is None:
        return None
    family = _family(row)
    scope, created_at, expires_at, revoked_at = row[_FAMILY_WIDTH:]
    return AccessTokenRecord(
        family, family.scope if scope is None else scope, created_at, expires_at, revoked_at
    )


class TokenTransaction:
    """
    The statements the token and revocation endpoints need, bound to one
    open write transaction and to the time of the request.  Only
    L{TokenStore.token_transaction} makes these; they live as long as the
    function it runs.
    """

    def __init__(self, txn: Txn, now: float) -> None:
        self._txn = txn
        self.now = now

    def client(self, client_id: str) -> ClientRecord | None:
        self._txn.execute(
            "SELECT client_id, kind, client_secret_hash, metadata, created_at, last_used_at"
            " FROM clients WHERE client_id = ?",
            (client_id,),
        )
        row = self._txn.fetchone()
        if row is None:
            return None
        return ClientRecord(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5])

    # The code and refresh token lookups lock their rows (and the family's)
    # on PostgreSQL: two nodes redeeming one code or rotating one refresh
    # token take turns, and the second sees what the first did, as behind
    # SQLite's single writer.  The family first: revoking a family locks it
    # and then its tokens, and locks taken in one order never deadlock.

    def _lock_family_of(self, table: str, column: str, digest: bytes) -> None:
        if self._txn.engine.row_lock:
            self._txn.execute(
                "SELECT 1 FROM token_families WHERE family_id ="
                f" (SELECT family_id FROM {table} WHERE {column} = ?){self._txn.engine.row_lock}",
                (digest,),
            )
            self._txn.fetchall()

    def authorization_code(self, code_hash: bytes) -> AuthorizationCodeRecord | None:
        self._lock_family_of("authorization_codes", "code_hash", code_hash)
        self._txn.execute(
            f"SELECT {_FAMILY_COLUMNS}, c.redirect_uri, c.code_challenge,"
            " c.code_challenge_method, c.created_at, c.expires_at, c.used_at"
            " FROM authorization_codes c JOIN token_families f ON f.family_id = c.family_id"
            f" WHERE c.code_hash = ?{self._txn.engine.row_lock}",
            (code_hash,),
        )
        row = self._txn.fetchone()
        if row is None:
            return None
        return AuthorizationCodeRecord(_family(row), *row[_FAMILY_WIDTH:])

    def claim_authorization_code(self, code_hash: bytes) -> bool:
        """
        Mark a code used.  False when it already was: the caller lost a race
        and must not issue anything.
        """
        self._txn.execute(
            "UPDATE authorization_codes SET used_at = ? WHERE code_hash = ? AND used_at IS NULL",
            (self.now, code_hash),
        )
        return bool(self._txn.rowcount == 1)

    def refresh_token(self, token_hash: bytes) -> RefreshTokenRecord | None:
        self._lock_family_of("refresh_tokens", "token_hash", token_hash)
        self._txn.execute(
            f"SELECT {_FAMILY_COLUMNS}, r.created_at, r.expires_at, r.rotated_at, r.revoked_at"
            " FROM refresh_tokens r JOIN token_families f ON f.family_id = r.family_id"
            f" WHERE r.token_hash = ?{self._txn.engine.row_lock}",
            (token_hash,),
        )
        row = self._txn.fetchone()
        if row is None:
            return None
        return RefreshTokenRecord(_family(row), *row[_FAMILY_WIDTH:])

    def access_token(self, token_hash: bytes) -> AccessTokenRecord | None:
        return _access_token_txn(self._txn, token_hash)

    def mark_rotated(self, token_hash: bytes) -> None:
        """
        Record that a refresh token was exchanged.  Only the first exchange
        counts: the grace window runs from it and is never extended.
        """
        self._txn.execute(
            "UPDATE refresh_tokens SET rotated_at = ? WHERE token_hash = ? AND rotated_at IS NULL",
            (self.now, token_hash),
        )

    def add_tokens(
        self,
        family_id: str,
        access_hash: bytes,
        access_expires_at: float,
        scope: str,
        refresh_hash: bytes | None,
        refresh_expires_at: float,
    ) -> None:
        """
        Store a newly issued access token (and refresh token) in a family.
        C{scope} is the access token's own; the family's scope is kept for
        the refresh token.
        """
        self._txn.execute(
            "INSERT INTO access_tokens (token_hash, family_id, created_at, expires_at, scope)"
            " VALUES (?, ?, ?, ?, ?)",
            (access_hash, family_id, self.now, access_expires_at, scope),
        )
        if refresh_hash is not None:
            self._txn.execute(
                "INSERT INTO refresh_tokens (token_hash, family_id, created_at, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (refresh_hash, family_id, self.now, refresh_expires_at),
            )
        self._txn.execute(
            "UPDATE token_families SET last_used_at = ? WHERE family_id = ?",
            (self.now, family_id),
        )
        # A client in use is never pruned; this is what says it is.
        self._txn.execute(
            "UPDATE clients SET last_used_at = ? WHERE client_id ="
            " (SELECT client_id FROM token_families WHERE family_id = ?)",
            (self.now, family_id),
        )

    def revoke_family(self, family_id: str, reason: str) -> bool:
        return _revoke_family_txn(self._txn, family_id, reason, self.now)

    def revoke_access_token(self, token_hash: bytes) -> bool:
        self._txn.execute(
            "UPDATE access_tokens SET revoked_at = ? WHERE token_hash = ? AND revoked_at IS NULL",
            (self.now, token_hash),
        )
        if self._txn.rowcount != 1:
            return False
        self._txn.call_after(self._txn.events.access_token_revoked, token_hash)
        return True


class TokenStore(Database):
    def issue_authorization_code(
        self,
        code_hash: bytes,
        client_id: str,
        forgejo_user_id: int,
        redirect_uri: str,
        code_challenge: str,
        code_challenge_method: str,
        scope: str,
        resource: str,
        expires_at: float,
    ) -> Deferred[str]:
        """
        Start a new token family with one authorization code; fires with the
        family's id.  The user row must exist (the login recorded it).
        """
        now = self._now()
        family_id = secrets.token_hex(16)

        def q(txn: Txn) -> str:
            txn.execute(
                "INSERT INTO token_families (family_id, client_id, forgejo_user_id, scope,"
                " resource, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (family_id, client_id, forgejo_user_id, scope, resource, now),
            )
            txn.execute(
                "INSERT INTO authorization_codes (code_hash, family_id, redirect_uri,"
                " code_challenge, code_challenge_method, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    code_hash,
                    family_id,
                    redirect_uri,
                    code_challenge,
                    code_challenge_method,
                    now,
                    expires_at,
                ),
            )
            return family_id

        return self._write("issue_authorization_code", q)

    def token_transaction(
        self, desc: str, now: float, fn: Callable[[TokenTransaction], T]
    ) -> Deferred[T]:
        """
        Run C{fn} in one write transaction: everything it does commits
        together when it returns, and nothing does when it raises; a code or
        refresh token it reads stays locked until then.  C{fn} runs in the
        pool's thread: it must not touch the reactor or wait on anything.
        """
        return self._write(desc, lambda txn: fn(TokenTransaction(txn, now)))

    def get_access_token(self, token_hash: bytes) -> Deferred[AccessTokenRecord | None]:
        return self._read("get_access_token", lambda txn: _access_token_txn(txn, token_hash))

    # --- grants as the admin command sees them

    def list_families(
        self,
        forgejo_user_id: int | None = None,
        client_id: str | None = None,
        include_revoked: bool = False,
    ) -> Deferred[list[TokenFamily]]:
        """
        Grants that have had tokens issued (an unredeemed code is not one
        yet), newest first, optionally of one user and/or one client.
        """
        where = [
            "(EXISTS (SELECT 1 FROM access_tokens a WHERE a.family_id = f.family_id)"
            " OR EXISTS (SELECT 1 FROM refresh_tokens r WHERE r.family_id = f.family_id))"
        ]
        args: list[object] = []
        if forgejo_user_id is not None:
            where.append("f.forgejo_user_id = ?")
            args.append(forgejo_user_id)
        if client_id is not None:
            where.append("f.client_id = ?")
            args.append(client_id)
        if not include_revoked:
            where.append("f.revoked_at IS NULL")

        def q(txn: Txn) -> list[TokenFamily]:
            txn.execute(
                f"SELECT {_FAMILY_COLUMNS} FROM token_families f WHERE {' AND '.join(where)}"
                " ORDER BY f.created_at DESC, f.family_id",
                args,
            )
            return [_family(row) for row in txn.fetchall()]

        return self._read("list_families", q)

    def revoke_family(self, family_id: str, reason: str) -> Deferred[bool]:
        """
        Revoke one family and all its tokens; fires True if it was live.
        """
        now = self._now()
        return self._write(
            "revoke_family", lambda txn: _revoke_family_txn(txn, family_id, reason, now)
        )

    def revoke_families(
        self,
        reason: str,
        forgejo_user_id: int | None = None,
        client_id: str | None = None,
    ) -> Deferred[int]:
        """
        Revoke every live family of a user, of a client, or of a user at one
        client; fires with how many were revoked.
        """
        if forgejo_user_id is None and client_id is None:
            raise ValueError("name a user, a client or both")
        where = ["revoked_at IS NULL"]
        args: list[object] = []
        if forgejo_user_id is not None:
            where.append("forgejo_user_id = ?")
            args.append(forgejo_user_id)
        if client_id is not None:
            where.append("client_id = ?")
            args.append(client_id)
        now = self._now()

        def q(txn: Txn) -> int:
            txn.execute(f"SELECT family_id FROM token_families WHERE {' AND '.join(where)}", args)
            ids = [row[0] for row in txn.fetchall()]
            return sum(_revoke_family_txn(txn, family_id, reason, now) for family_id in ids)

        return self._write("revoke_families", q)

    def prune_tokens(self, before: float) -> Deferred[int]:
        """
        Delete codes and tokens that expired before C{before}, and families
        left with nothing in them (a family is created with its code, in one
        transaction, so none is empty while in use); fires with the number
        of rows deleted.
        """

        def q(txn: Txn) -> int:
            deleted = 0
            for table in ("authorization_codes", "access_tokens", "refresh_tokens"):
                txn.execute(f"DELETE FROM {table} WHERE expires_at < ?", (before,))
                deleted += txn.rowcount
            txn.execute(
                "DELETE FROM token_families WHERE"
                " NOT EXISTS (SELECT 1 FROM authorization_codes c"
                "   WHERE c.family_id = token_families.family_id)"
                " AND NOT EXISTS (SELECT 1 FROM access_tokens a"
                "   WHERE a.family_id = token_families.family_id)"
                " AND NOT EXISTS (SELECT 1 FROM refresh_tokens r"
                "   WHERE r.family_id = token_families.family_id)"
            )
            return int(deleted + txn.rowcount)

        return self._write("prune_tokens", q)

    # --- live sessions and their grants

    def revoked_families(self, family_ids: Collection[str]) -> Deferred[set[str]]:
        """
        Of C{family_ids}, those that are revoked or no longer exist, in one
        query (the broker asks every few seconds about the grants behind
        its live sessions and cached bearer checks).  The ids go in as one
        parameter, so there is no limit on how many.
        """
        wanted = sorted(set(family_ids))

        def q(txn: Txn) -> set[str]:
            if not wanted:
                return set()
            among, ids = txn.engine.member("family_id", wanted)
            txn.execute(
                f"SELECT family_id FROM token_families WHERE {among} AND revoked_at IS NULL",
                (ids,),
            )
            live = {row[0] for row in txn.fetchall()}
            return set(wanted) - live

        return self._read("revoked_families", q)
