"""
The routes people see in a browser: the authorization flow (consent, the
decision, Forgejo's callback) and the connections page where a user revokes
the clients they approved.  Cookies, forms and HTML live here; the work is
L{fjmcp.oauth.authorize}'s and L{fjmcp.oauth.connections}'.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from fjmcp.config import Config
from fjmcp.http.common import RateGuard, cookie, html_page, rate_limited, unexpected
from fjmcp.http.pages import connections_page, consent_page, error_page
from fjmcp.oauth.authorize import AuthorizationFlow, Completed, Redirect
from fjmcp.oauth.connections import Connections, cross_site
from fjmcp.oauth.refusal import RefusalError
from fjmcp.oauth.signin import LOGIN_SESSION_LIFETIME, ForgejoSignIn
from fjmcp.secrets.crypto import new_token

MAX_FORM_BODY = 16 * 1024


def query_args(request: Request) -> dict[str, str]:
    """
    Query fields, and for a POST the urlencoded form fields, first value of
    each, as text.  (The site does not let Twisted parse forms.)

    @raise RefusalError: 400 when a field is not UTF-8 (raw or percent-encoded),
        413 when the form is larger than L{MAX_FORM_BODY}.
    """
    out = {}
    for key, values in request.args.items():
        if values:
            out[_utf8(key, "web address")] = _utf8(values[0], "web address")
    if request.method == b"POST" and request.content is not None:
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
        if content_type.lower() == b"application/x-www-form-urlencoded":
            request.content.seek(0)
            body = request.content.read(MAX_FORM_BODY + 1)
            if len(body) > MAX_FORM_BODY:
                # Cutting it short could split a character or a field.
                raise RefusalError(
                    413, "Form too large", f"This form is larger than {MAX_FORM_BODY} bytes."
                )
            # parse_qs on bytes decodes them as ASCII, strictly: any other
            # byte, even percent-encoded, would end in a 500.  On text, its
            # default would turn bad percent-escapes into U+FFFD silently.
            try:
                form = parse_qs(body.decode("utf-8"), keep_blank_values=True, errors="strict")
            except UnicodeDecodeError:
                raise _not_utf8("form") from None
            for key, values in form.items():
                out.setdefault(key, values[0])
    return out


def _not_utf8(where: str) -> RefusalError:
    return RefusalError(
        400,
        "Bad request",
        f"The text of this {where} is not UTF-8, so it cannot be read. Go back to the "
        "page it came from and try again; if it comes from a program, it must send UTF-8.",
    )


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _not_utf8(where) from None


class BrowserPages:
    """
    `/oauth/authorize`, `/oauth/callback`, `/connections`.
    """

    app = Klein()

    def __init__(
        self,
        config: Config,
        flow: AuthorizationFlow,
        connections: Connections,
        signin: ForgejoSignIn,
        limits: RateGuard,
    ) -> None:
        self._config = config
        self._flow = flow
        self._connections = connections
        self._signin = signin
        self.limits = limits
        secure = config.public_url.startswith("https://")
        # __Host- cookies need Secure, which plain-http loopback development lacks.
        prefix = b"__Host-" if secure else b""
        self._secure = secure
        self._browser_cookie = prefix + b"fjmcp-browser"
        self._login_cookie = prefix + b"fjmcp-login"

    def resource(self) -> Any:
        return self.app.resource()

    def _redirect(self, request: Request, location: str) -> bytes:
        request.setResponseCode(303)
        request.setHeader(b"Location", location.encode("utf-8"))
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        return b""

    def _set_cookie(self, request: Request, name: bytes, value: str, max_age: int) -> None:
        request.addCookie(
            name,
            value.encode("ascii"),
            path=b"/",
            max_age=str(max_age).encode(),
            secure=self._secure,
            httpOnly=True,
            sameSite="lax",
        )

    @app.handle_errors(RefusalError)
    def _page_error(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, RefusalError) and isinstance(request, Request)
        return html_page(request, e.status, error_page(e.title, e.message))

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        return unexpected(request, failure)

    # --- the authorization flow

    @app.route("/oauth/authorize", methods=["GET"])
    @rate_limited("authorize", page=True)
    async def authorize(self, request: Request) -> bytes:
        browser = cookie(request, self._browser_cookie) or new_token()
        self._set_cookie(request, self._browser_cookie, browser, 3600)
        result = await self._flow.begin(
            query_args(request), browser, cookie(request, self._login_cookie)
        )
        if isinstance(result, Redirect):
            return self._redirect(request, result.location)
        return html_page(
            request,
            200,
            consent_page(
                client_name=result.client_name,
                client_id=result.client_id,
                redirect_host=result.redirect_host,
                forgejo_url=self._config.forgejo_url,
                forgejo_scopes=self._config.forgejo_scopes,
                consent_token=result.consent_token,
                action="/oauth/authorize",
                unverified_name=result.unverified_name,
            ),
        )

    @app.route("/oauth/authorize", methods=["POST"])
    @rate_limited("authorize", page=True)
    async def decide(self, request: Request) -> bytes:
        result = await self._flow.decide(query_args(request), cookie(request, self._browser_cookie))
        return self._redirect(request, result.location)

    @app.route("/oauth/callback", methods=["GET"])
    async def callback(self, request: Request) -> bytes:
        returned = await self._signin.returned(
            query_args(request), cookie(request, self._browser_cookie)
        )
        if returned.purpose == "connections":
            login_session = await self._connections.finish_login(returned)
            self._set_cookie(
                request, self._login_cookie, login_session, int(LOGIN_SESSION_LIFETIME)
            )
            return self._redirect(request, self._config.public_url + "/connections")
        result = await self._flow.complete(returned)
        if isinstance(result, Completed):
            self._set_cookie(
                request, self._login_cookie, result.login_session, int(LOGIN_SESSION_LIFETIME)
            )
        return self._redirect(request, result.location)

    # --- the connections page

    def _connections_page(self, request: Request, status: int, body: bytes) -> bytes:
        # Forms post only here; and "same-origin" (not "no-referrer") so the
        # browser's POST carries our Origin instead of "null".
        return html_page(
            request, status, body, b"; form-action 'self'", referrer_policy=b"same-origin"
        )

    def _cross_site(self, request: Request) -> bool:
        origin = request.getHeader(b"origin")
        site = request.getHeader(b"sec-fetch-site")
        return cross_site(
            origin.decode("latin-1") if origin is not None else None,
            site.decode("latin-1") if site is not None else None,
            self._config.public_url,
        )

    @app.route("/connections", methods=["GET"])
    async def connections(self, request: Request) -> bytes:
        """
        The signed-in user's approved clients; a browser that is not signed
        in goes through Forgejo's login first and comes back here.
        """
        login_session = cookie(request, self._login_cookie)
        user_id = await self._connections.user(login_session)
        if user_id is None or login_session is None:
            # Only the sign-in costs anything upstream, so only it is limited.
            if (limited := self.limits.refuse(request, "authorize", page=True)) is not None:
                return limited
            browser = cookie(request, self._browser_cookie) or new_token()
            self._set_cookie(request, self._browser_cookie, browser, 3600)
            return self._redirect(request, await self._connections.start_login(browser))
        notice = None
        if query_args(request).get("revoked"):
            notice = "Access revoked. That application has to ask you again to connect."
        return self._connections_page(
            request,
            200,
            connections_page(
                user_login=await self._connections.user_login(user_id),
                forgejo_url=self._config.forgejo_url,
                connections=await self._connections.of_user(user_id),
                form_token=await self._connections.form_token(login_session),
                action="/connections/revoke",
                notice=notice,
            ),
        )

    @app.route("/connections/revoke", methods=["POST"])
    # Anyone may post here, and each post costs a database lookup before it
    # can be refused.
    @rate_limited("authorize", page=True)
    async def revoke_connection(self, request: Request) -> bytes:
        if self._cross_site(request):
            return self._connections_page(
                request,
                403,
                error_page("Forbidden", "This form can only be sent from this site's own page."),
            )
        login_session = cookie(request, self._login_cookie)
        user_id = await self._connections.user(login_session)
        form = query_args(request)
        if (
            user_id is None
            or login_session is None
            or not await self._connections.take_form_token(
                form.get("csrf", ""), user_id, login_session
            )
        ):
            return self._connections_page(
                request,
                403,
                error_page(
                    "Expired or foreign form",
                    "This form is not valid any more (it was used, expired, or comes from "
                    "another page). Open your connections page again.",
                ),
            )
        client_id = form.get("client_id", "")
        if client_id:
            await self._connections.revoke(user_id, client_id)
        return self._redirect(request, self._config.public_url + "/connections?revoked=1")
