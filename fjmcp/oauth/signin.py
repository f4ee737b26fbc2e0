"""
The one way a person signs in: a round trip through Forgejo's own login,
where the broker is one confidential client, with its own PKCE pair and a
single-use state.  Whatever the login is for is recorded with it (its
purpose): completing a client's authorization, or opening the connections
page.

A login in flight is stored (L{fjmcp.store.logins}): it survives a restart
and any node can finish it.  It can be finished once, within
L{LOGIN_LIFETIME}, by the browser that left for it (the binding cookie's
digest is stored with it).  Coming back with a code, the code is exchanged
for the user's Forgejo credential (Forgejo has just invalidated the
previous refresh token, so it replaces the stored one) and a broker login
session (the login cookie) is opened.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from fjmcp.forgejo.client import ForgejoClient, ForgejoUser, UpstreamError
from fjmcp.forgejo.credentials import UpstreamCredentials
from fjmcp.oauth.refusal import RefusalError
from fjmcp.secrets.crypto import (
    UPSTREAM_PKCE_CONTEXT,
    DecryptionError,
    SecretBox,
    new_pkce_pair,
    new_token,
    token_hash,
)
from fjmcp.store import ForgejoLogin, Store
from fjmcp.store.authorizations import PendingAuthorization

# A person has this long between leaving for Forgejo's login and coming back.
LOGIN_LIFETIME = 600.0
LOGIN_SESSION_LIFETIME = 30 * 86400.0

log = Logger()


class SignInFailedError(Exception):
    """
    Forgejo refused the returned code (or could not be asked); the message
    says why, for the log.
    """


@attrs.frozen
class Returned:
    """
    A browser back from Forgejo with a login it may finish: C{cancelled}
    is Forgejo's C{error} when the person cancelled or Forgejo refused.
    """

    purpose: str
    authorization: PendingAuthorization | None
    cancelled: str | None
    _code: str = attrs.field(repr=False)
    _verifier: str = attrs.field(repr=False)


@attrs.frozen
class SignedIn:
    user: ForgejoUser
    login_session: str = attrs.field(repr=False)


async def open_login_session(store: Store, user_id: int, now: float) -> str:
    """
    A new broker login (the cookie's value) for a user who just signed in
    at Forgejo; the store keeps only its digest.
    """
    login_session = new_token()
    await store.create_login_session(
        token_hash(login_session), user_id, now + LOGIN_SESSION_LIFETIME
    )
    return login_session


class ForgejoSignIn:
    def __init__(
        self,
        store: Store,
        box: SecretBox,
        upstream: ForgejoClient,
        credentials: UpstreamCredentials,
        clock: IReactorTime,
    ) -> None:
        self._store = store
        self._box = box
        self._upstream = upstream
        self._credentials = credentials
        self._clock = clock

    def _new(self) -> tuple[str, bytes, str]:
        """
        A state, the sealed verifier to store, and Forgejo's login address.
        """
        state = new_token()
        verifier, challenge = new_pkce_pair()
        sealed = self._box.seal(verifier, UPSTREAM_PKCE_CONTEXT)
        return state, sealed, self._upstream.authorize_url(state, challenge)

    async def for_connections(self, browser: str) -> str:
        """
        Where to send a browser to sign in to its connections page.
        """
        state, sealed, url = self._new()
        await self._store.create_forgejo_login(
            token_hash(state),
            "connections",
            token_hash(browser),
            sealed,
            self._clock.seconds() + LOGIN_LIFETIME,
        )
        return url

    async def for_authorization(self, consent_token: str, browser: str) -> str | None:
        """
        The person approved the authorization behind C{consent_token}: where
        to send them to sign in and complete it.  None when that approval
        cannot be used (expired, used, or from another browser).
        """
        state, sealed, url = self._new()
        pending = await self._store.approve_pending_authorization(
            token_hash(consent_token),
            token_hash(browser),
            token_hash(state),
            sealed,
            self._clock.seconds() + LOGIN_LIFETIME,
        )
        return None if pending is None else url

    async def returned(self, args: Mapping[str, str], browser: str | None) -> Returned:
        """
        The browser came back from Forgejo: claim its login (once).

        @raise RefusalError: the login is unknown, expired, already finished,
            from another browser, or sealed under a key no longer held.
        """
        state = args.get("state", "")
        login = await self._store.take_forgejo_login(token_hash(state)) if state else None
        if login is None or not _same_browser(login, browser):
            raise RefusalError(
                400,
                "Sign-in expired",
                "This sign-in is unknown, has expired, was already used or was started in "
                "another browser (it can be used once, within 10 minutes). Start again where "
                "you started it.",
            )
        try:
            verifier = self._box.open(login.verifier_enc, UPSTREAM_PKCE_CONTEXT)
        except DecryptionError as e:
            # Sealed under a key the key file no longer holds: the login
            # cannot finish, but it is the person's to restart, not a bug.
            log.warn("a sign-in in flight could not be resumed: {error}", error=str(e))
            raise RefusalError(
                400,
                "Sign-in expired",
                "This sign-in can no longer be completed. Start again where you started it.",
            ) from None
        if "error" in args:
            log.info(
                "Forgejo ended a {purpose} sign-in with {error}",
                purpose=login.purpose,
                error=args["error"][:100],
            )
        return Returned(
            login.purpose,
            login.authorization,
            args["error"][:100] if "error" in args else None,
            args.get("code", ""),
            verifier,
        )

    async def finish(self, returned: Returned) -> SignedIn:
        """
        Exchange the returned code: the user's Forgejo credential is stored
        and a broker login session opened.

        @raise SignInFailedError: Forgejo did not accept the code.
        """
        try:
            user = await self._credentials.sign_in(returned._code, returned._verifier)
        except UpstreamError as e:
            log.warn("a Forgejo sign-in could not be completed: {error}", error=str(e))
            raise SignInFailedError(str(e)) from None
        login_session = await open_login_session(self._store, user.id, self._clock.seconds())
        return SignedIn(user, login_session)


def _same_browser(login: ForgejoLogin, browser: str | None) -> bool:
    return bool(browser) and hmac.compare_digest(token_hash(browser or ""), login.browser_hash)
