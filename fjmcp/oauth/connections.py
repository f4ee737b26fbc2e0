"""
A person's own view of the MCP clients they approved (the C{/connections}
page): signing in to see it, listing the clients, and revoking one.

Signing in reuses the consent flow's pieces: the broker's login cookie when
the browser has one, and otherwise a round trip through Forgejo's login
(the broker's own PKCE pair and a single-use state bound to the browser
cookie), which ends in the same login cookie.  Such a login in flight lives
in memory only: a restart in the middle of it means clicking once more.

Revoking a client revokes every grant the user holds at it and forgets the
approval (the next authorization asks again) in one transaction, then ends
the user's live sessions of that client and forgets cached bearer checks
of those grants at once, without waiting for the periodic check.

The revoke form carries a token that is single use, bound to the login
session it was shown to and short-lived; the route also refuses posts
that a browser marks as coming from elsewhere (L{cross_site}).  Knows
nothing of HTTP: the routes pass cookies and fields in and get data,
addresses or L{PageError}s back.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from fjmcp.forgejo.client import ForgejoClient, UpstreamError
from fjmcp.forgejo.credentials import UpstreamCredentials
from fjmcp.mcp.sessions import SessionManager
from fjmcp.oauth.authorize import PageError, open_login_session
from fjmcp.oauth.registration import redirect_host
from fjmcp.oauth.tokens import TokenService
from fjmcp.secrets.crypto import new_pkce_pair, new_token, token_hash
from fjmcp.store import Store

# A person has this long between leaving for Forgejo's login and coming back.
LOGIN_LIFETIME = 600.0
# A page's revoke form is good for this long, once.
FORM_LIFETIME = 3600.0
# Bounds on what anonymous visitors can make the broker remember.
MAX_PENDING_LOGINS = 10_000
MAX_FORM_TOKENS = 10_000
REVOKE_REASON = "revoked by the user on the connections page"

log = Logger()


@attrs.frozen
class Connection:
    """
    One client as its user sees it.  C{self_named}: the name is only the
    client's own claim (it registered itself); a client ID metadata
    document's name comes from the client's own domain, its C{client_id}.
    """

    client_id: str
    name: str
    self_named: bool
    redirect_hosts: tuple[str, ...]
    approved_at: float | None
    last_used_at: float | None
    live_grants: int
    live_sessions: int


@attrs.frozen
class Revoked:
    client_id: str
    grants: int
    sessions: int


@attrs.frozen
class _PendingLogin:
    browser_hash: bytes
    verifier: str = attrs.field(repr=False)
    expires_at: float


@attrs.frozen
class _FormToken:
    user_id: int
    login_hash: bytes
    expires_at: float


def cross_site(origin: str | None, fetch_site: str | None, public_url: str) -> bool:
    """
    Whether a form POST says it comes from a page that is not ours: an
    C{Origin} naming another origin, or C{Sec-Fetch-Site} saying the request
    is cross-site (or same-site: a sibling subdomain is not us either).

    C{Origin: null} proves nothing either way: browsers send it for their
    own same-origin form posts when the page's referrer policy is
    C{no-referrer} (as a proxy may impose), so it is left to the other
    defences: the single-use form token, and the login cookie that is
    C{SameSite=Lax} and so never sent on a cross-site POST.
    """
    if origin is not None and origin != "null" and origin.lower() != public_url.lower():
        return True
    return fetch_site is not None and fetch_site.lower() not in ("same-origin", "none")


def _hosts(uris: tuple[str, ...]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for uri in uris:
        seen.setdefault(redirect_host(uri), None)
    return tuple(seen)


class Connections:
    """
    The connections page's domain.  C{clock} provides C{seconds()}.
    """

    def __init__(
        self,
        store: Store,
        sessions: SessionManager,
        tokens: TokenService,
        upstream: ForgejoClient,
        credentials: UpstreamCredentials,
        clock: IReactorTime,
    ) -> None:
        self._store = store
        self._sessions = sessions
        self._tokens = tokens
        self._upstream = upstream
        self._credentials = credentials
        self._clock = clock
        self._logins: dict[bytes, _PendingLogin] = {}
        self._forms: dict[bytes, _FormToken] = {}

    # --- who is looking

    async def user(self, login_session: str | None) -> int | None:
        """
        The Forgejo user id behind a login cookie, if it is live.
        """
        if not login_session:
            return None
        return await self._store.login_session_user(token_hash(login_session))

    async def user_login(self, user_id: int) -> str:
        user = await self._store.get_user(user_id)
        return user.login if user is not None else str(user_id)

    # --- signing in through Forgejo

    def start_login(self, browser: str) -> str:
        """
        Where to send a browser that is not signed in: Forgejo's login, with
        a state that only this browser (its binding cookie) can bring back.
        """
        now = self._clock.seconds()
        self._prune(self._logins, now, MAX_PENDING_LOGINS)
        state = new_token()
        verifier, challenge = new_pkce_pair()
        self._logins[token_hash(state)] = _PendingLogin(
            token_hash(browser), verifier, now + LOGIN_LIFETIME
        )
        return self._upstream.authorize_url(state, challenge)

    def owns_login(self, state: str) -> bool:
        """
        Whether a return from Forgejo belongs to a connections-page login
        (and not to a client's authorization).
        """
        return bool(state) and token_hash(state) in self._logins

    async def finish_login(self, args: Mapping[str, str], browser: str | None) -> str:
        """
        The browser came back from Forgejo: exchange the code, keep the
        user's new Forgejo credential (Forgejo has just invalidated the
        previous refresh token) and return a new login session.

        @raise PageError: the login is unknown, expired, from another
            browser, or Forgejo refused it.
        """
        pending = self._logins.pop(token_hash(args.get("state", "")), None)
        if (
            pending is None
            or pending.expires_at <= self._clock.seconds()
            or not browser
            or not hmac.compare_digest(token_hash(browser), pending.browser_hash)
        ):
            raise PageError(
                400,
                "Sign-in expired",
                "This sign-in is unknown, has expired or was started in another browser. "
                "Open your connections page again.",
            )
        if "error" in args:
            log.info("Forgejo ended a connections-page login with {e}", e=args["error"][:100])
            raise PageError(
                403, "Not signed in", "The sign-in at Forgejo was cancelled or refused."
            )
        try:
            user = await self._credentials.sign_in(args.get("code", ""), pending.verifier)
        except UpstreamError as e:
            log.warn("a connections-page sign-in could not be completed: {error}", error=str(e))
            raise PageError(
                502, "Sign-in failed", "Forgejo did not accept the sign-in; try again."
            ) from None
        login_session = await open_login_session(self._store, user.id, self._clock.seconds())
        log.info(
            "user {login} ({user}) signed in to the connections page",
            login=user.login,
            user=user.id,
        )
        return login_session

    # --- the page

    async def of_user(self, user_id: int) -> list[Connection]:
        """
        The clients the user approved or holds a live grant at.  Last use
        counts the user's live sessions of the client too.
        """
        records = await self._store.list_connections(user_id)
        # Session times and stored times are both this clock's seconds.
        sessions = self._sessions.of_user(user_id)
        out = []
        for record in records:
            mine = [s for s in sessions if s.client_id == record.client_id]
            last = record.last_used_at
            if mine:
                seen = max(s.last_used for s in mine)
                last = seen if last is None else max(last, seen)
            cimd = record.kind == "cimd"
            out.append(
                Connection(
                    client_id=record.client_id,
                    name=record.client_name
                    or (urlsplit(record.client_id).netloc if cimd else "")
                    or "An unnamed application",
                    self_named=not cimd,
                    redirect_hosts=_hosts(record.redirect_uris),
                    approved_at=record.approved_at,
                    last_used_at=last,
                    live_grants=record.live_grants,
                    live_sessions=len(mine),
                )
            )
        return out

    def form_token(self, user_id: int, login_session: str) -> str:
        """
        A token for one revoke form: single use, for this user and login
        session only, for L{FORM_LIFETIME} seconds.
        """
        now = self._clock.seconds()
        self._prune(self._forms, now, MAX_FORM_TOKENS)
        token = new_token()
        self._forms[token_hash(token)] = _FormToken(
            user_id, token_hash(login_session), now + FORM_LIFETIME
        )
        return token

    def take_form_token(self, token: str, user_id: int, login_session: str) -> bool:
        """
        Use up a form token; True if it was issued to this user and login
        session and is still good.
        """
        if not token:
            return False
        issued = self._forms.pop(token_hash(token), None)
        return (
            issued is not None
            and issued.expires_at > self._clock.seconds()
            and issued.user_id == user_id
            and hmac.compare_digest(issued.login_hash, token_hash(login_session))
        )

    # --- revoking

    async def revoke(self, user_id: int, client_id: str) -> Revoked:
        """
        Revoke all the user's grants at the client, forget their approval of
        it, and end their live sessions of it now.  A client the user never
        approved is left alone (nothing to revoke, nothing said).
        """
        done = await self._store.disconnect_client(user_id, client_id, REVOKE_REASON)
        ids = set(done.family_ids)
        self._tokens.forget_families(ids)
        ended = self._sessions.end_matching(
            lambda s: s.user_id == user_id and (s.client_id == client_id or s.family_id in ids),
            "the user revoked this client's access",
        )
        if done.consent_forgotten or ids or ended:
            log.info(
                "user {user} revoked client {client}: {grants} grants revoked,"
                " {sessions} sessions ended",
                user=user_id,
                client=client_id[:200],
                grants=len(ids),
                sessions=ended,
            )
        return Revoked(client_id, len(ids), ended)

    @staticmethod
    def _prune(table: dict[bytes, Any], now: float, limit: int) -> None:
        for key in [k for k, v in table.items() if v.expires_at <= now]:
            del table[key]
        # Oldest first (dicts keep insertion order) when someone floods us.
        while len(table) >= limit:
            del table[next(iter(table))]
