"""
A person's own view of the MCP clients they approved (the C{/connections}
page): signing in to see it, listing the clients, and revoking one.

Signing in is the broker's login cookie when the browser has one, and
otherwise the one Forgejo sign-in (L{fjmcp.oauth.signin}) with the purpose
C{connections}, which ends in the same login cookie.

Revoking a client revokes every grant the user holds at it and forgets the
approval (the next authorization asks again) in one transaction; once it
commits, L{fjmcp.oauth.grants.GrantEnds} ends the grants' live sessions
and cached bearer checks.

The revoke form carries a token that is single use, bound to the login
session it was shown to and short-lived (stored, like everything a request
needs); the route also refuses posts that a browser marks as coming from
elsewhere (L{cross_site}).  Knows nothing of HTTP: the routes pass cookies
and fields in and get data, addresses or L{RefusalError} back.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from fjmcp.mcp.sessions import SessionManager
from fjmcp.oauth.refusal import RefusalError
from fjmcp.oauth.registration import redirect_host
from fjmcp.oauth.signin import ForgejoSignIn, Returned, SignInFailedError
from fjmcp.secrets.crypto import new_token, token_hash
from fjmcp.store import Store

# A page's revoke form is good for this long, once.
FORM_LIFETIME = 3600.0
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
        signin: ForgejoSignIn,
        clock: IReactorTime,
    ) -> None:
        self._store = store
        self._sessions = sessions
        self._signin = signin
        self._clock = clock

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

    async def start_login(self, browser: str) -> str:
        """
        Where to send a browser that is not signed in: Forgejo's login, which
        only this browser (its binding cookie) can finish.
        """
        return await self._signin.for_connections(browser)

    async def finish_login(self, returned: Returned) -> str:
        """
        The browser came back from a connections-page sign-in: a new login
        session.

        @raise RefusalError: Forgejo cancelled or refused the sign-in.
        """
        if returned.cancelled is not None:
            raise RefusalError(
                403, "Not signed in", "The sign-in at Forgejo was cancelled or refused."
            )
        try:
            signed_in = await self._signin.finish(returned)
        except SignInFailedError:
            raise RefusalError(
                502, "Sign-in failed", "Forgejo did not accept the sign-in; try again."
            ) from None
        log.info(
            "user {login} ({user}) signed in to the connections page",
            login=signed_in.user.login,
            user=signed_in.user.id,
        )
        return signed_in.login_session

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

    async def form_token(self, login_session: str) -> str:
        """
        A token for one revoke form: single use, for this login session
        only, for L{FORM_LIFETIME} seconds.
        """
        token = new_token()
        await self._store.create_form_token(
            token_hash(token), token_hash(login_session), self._clock.seconds() + FORM_LIFETIME
        )
        return token

    async def take_form_token(self, token: str, user_id: int, login_session: str) -> bool:
        """
        Use up a form token; True if it was issued to this user's login
        session and is still good.
        """
        if not token:
            return False
        owner = await self._store.take_form_token(token_hash(token), token_hash(login_session))
        return owner == user_id

    # --- revoking

    async def revoke(self, user_id: int, client_id: str) -> Revoked:
        """
        Revoke all the user's grants at the client, forget their approval of
        it, and end their live sessions of it now.  A client the user never
        approved is left alone (nothing to revoke, nothing said).
        """
        live = [s for s in self._sessions.of_user(user_id) if s.client_id == client_id]
        # Committing ends the grants' sessions and cached bearer checks
        # (the store announces each revoked grant to GrantEnds).
        done = await self._store.disconnect_client(user_id, client_id, REVOKE_REASON)
        ids = set(done.family_ids)
        ended = sum(1 for s in live if s.ended)
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
