"""
Forgejo logins in flight, whatever they are for, and the connections page's
single-use form tokens.

A Forgejo login is one round trip through Forgejo's own login: its state
(single use: the statement that claims it deletes it), the browser that
left, the broker's PKCE verifier (sealed), and its purpose: completing a
pending authorization (which the same claim takes with it) or signing in
to the connections page.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred

from fjmcp.store.authorizations import PENDING_COLUMNS, PendingAuthorization, lock_pending
from fjmcp.store.database import Database, Txn

PURPOSES = ("authorize", "connections")


@attrs.frozen
class ForgejoLogin:
    """
    A claimed login: what it was for, which browser left for it, the sealed
    verifier, and for C{authorize} the authorization it completes (a
    L{fjmcp.store.authorizations.PendingAuthorization}'s fields).
    """

    purpose: str
    browser_hash: bytes = attrs.field(repr=False)
    verifier_enc: bytes = attrs.field(repr=False)
    authorization: PendingAuthorization | None


def insert_forgejo_login(
    txn: Txn,
    state_hash: bytes,
    purpose: str,
    browser_hash: bytes,
    verifier_enc: bytes,
    now: float,
    expires_at: float,
    authorization_id: int | None = None,
) -> None:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown login purpose {purpose!r}")
    txn.execute(
        "INSERT INTO forgejo_logins (state_hash, purpose, browser_hash, authorization_id,"
        " verifier_enc, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (state_hash, purpose, browser_hash, authorization_id, verifier_enc, now, expires_at),
    )


class LoginStore(Database):
    def approve_pending_authorization(
        self,
        consent_hash: bytes,
        browser_hash: bytes,
        state_hash: bytes,
        verifier_enc: bytes,
        expires_at: float,
    ) -> Deferred[PendingAuthorization | None]:
        """
        The user approved: start the Forgejo login that completes the
        authorization.  Only once, only from the
        browser that saw the form, only before expiry.
        """
        now = self._now()

        def q(txn: Txn) -> PendingAuthorization | None:
            lock_pending(txn, consent_hash)
            txn.execute(
                "UPDATE pending_authorizations SET expires_at = ?"
                " WHERE consent_hash = ? AND browser_hash = ? AND expires_at > ?"
                " AND NOT EXISTS (SELECT 1 FROM forgejo_logins"
                "   WHERE authorization_id = pending_authorizations.id)"
                f" RETURNING {PENDING_COLUMNS}",
                (expires_at, consent_hash, browser_hash, now),
            )
            row = txn.fetchone()
            if row is None:
                return None
            pending = PendingAuthorization(*row)
            insert_forgejo_login(
                txn,
                state_hash,
                "authorize",
                browser_hash,
                verifier_enc,
                now,
                expires_at,
                pending.id,
            )
            return pending

        return self._write("approve_pending_authorization", q)

    def create_forgejo_login(
        self,
        state_hash: bytes,
        purpose: str,
        browser_hash: bytes,
        verifier_enc: bytes,
        expires_at: float,
    ) -> Deferred[None]:
        """
        A login that completes no authorization (the connections page's).
        """
        now = self._now()
        return self._write(
            "create_forgejo_login",
            lambda txn: insert_forgejo_login(
                txn, state_hash, purpose, browser_hash, verifier_enc, now, expires_at
            ),
        )

    def take_forgejo_login(self, state_hash: bytes) -> Deferred[ForgejoLogin | None]:
        """
        Claim a live login by its state, with the pending authorization it
        completes: both are gone after this, so a second return from Forgejo
        with the same state finds nothing.
        """
        now = self._now()

        def q(txn: Txn) -> ForgejoLogin | None:
            txn.execute(
                "DELETE FROM forgejo_logins WHERE state_hash = ?"
                " RETURNING purpose, browser_hash, verifier_enc, authorization_id, expires_at",
                (state_hash,),
            )
            row = txn.fetchone()
            if row is None or row[4] <= now:
                return None
            purpose, browser_hash, verifier_enc, authorization_id, _ = row
            authorization = None
            if authorization_id is not None:
                txn.execute(
                    f"DELETE FROM pending_authorizations WHERE id = ? RETURNING {PENDING_COLUMNS}",
                    (authorization_id,),
                )
                found = txn.fetchone()
                if found is None:
                    return None
                authorization = PendingAuthorization(*found)
            return ForgejoLogin(purpose, bytes(browser_hash), bytes(verifier_enc), authorization)

        return self._write("take_forgejo_login", q)

    # --- the connections page's forms

    def create_form_token(
        self, token_hash: bytes, session_hash: bytes, expires_at: float
    ) -> Deferred[None]:
        def q(txn: Txn) -> None:
            txn.execute(
                "INSERT INTO form_tokens (token_hash, session_hash, expires_at) VALUES (?, ?, ?)",
                (token_hash, session_hash, expires_at),
            )

        return self._write("create_form_token", q)

    def take_form_token(self, token_hash: bytes, session_hash: bytes) -> Deferred[int | None]:
        """
        Use up a form token issued to this login session; the user it was
        issued to, if it was still good (and its login session live).
        """
        now = self._now()

        def q(txn: Txn) -> int | None:
            txn.execute(
                "DELETE FROM form_tokens WHERE token_hash = ? AND session_hash = ?"
                " RETURNING expires_at",
                (token_hash, session_hash),
            )
            row = txn.fetchone()
            if row is None or row[0] <= now:
                return None
            txn.execute(
                "SELECT forgejo_user_id FROM login_sessions WHERE session_hash = ?"
                " AND expires_at > ?",
                (session_hash, now),
            )
            user = txn.fetchone()
            return int(user[0]) if user else None

        return self._write("take_form_token", q)
