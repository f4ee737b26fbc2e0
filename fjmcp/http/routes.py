"""
The broker's HTTP face: the Klein resource tree.  Routes turn requests into
calls on domain objects and results into responses; they hold no state of
their own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol
from urllib.parse import parse_qs

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException

from fjmcp import __version__, safejson
from fjmcp.buildinfo import build_info
from fjmcp.config import Config, IPNetwork
from fjmcp.forgejo.client import UpstreamError
from fjmcp.forgejo.credentials import LoginRequiredError, UpstreamCredentials
from fjmcp.http.pages import connections_page, consent_page, error_page
from fjmcp.http.ratelimit import RateLimiter, client_address
from fjmcp.http.streamable import MCPEndpoint
from fjmcp.oauth.authorize import (
    LOGIN_SESSION_LIFETIME,
    AuthorizationFlow,
    Completed,
    PageError,
    Redirect,
)
from fjmcp.oauth.clients import ClientRegistry
from fjmcp.oauth.connections import Connections, cross_site
from fjmcp.oauth.discovery import (
    SCOPES_SUPPORTED,
    authorization_server_metadata,
    protected_resource_metadata,
)
from fjmcp.oauth.registration import RegistrationError
from fjmcp.oauth.tokens import MAX_BODY as MAX_TOKEN_BODY
from fjmcp.oauth.tokens import (
    InvalidTokenError,
    MissingTokenError,
    TokenService,
    www_authenticate,
)
from fjmcp.secrets.crypto import new_token

HEALTH_TIMEOUT = 3.0

log = Logger()


class HealthSource(Protocol):
    def check(self) -> Deferred[None]: ...


class SessionCount(Protocol):
    def __len__(self) -> int: ...


def json_response(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode("utf-8")


def request_client_address(request: Any, trusted_proxies: Sequence[IPNetwork]) -> str:
    """
    The real client's address: the peer's, or X-Forwarded-For's when the
    peer is a trusted proxy (see L{fjmcp.http.ratelimit.client_address}).
    """
    peer = getattr(request.getClientAddress(), "host", None)
    forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for") or []
    return client_address(peer, [v.decode("latin-1") for v in forwarded], trusted_proxies)


def access_log_formatter(trusted_proxies: Sequence[IPNetwork]) -> Callable[[str, Any], str]:
    def line(timestamp: str, request: Any) -> str:
        return access_log_line(timestamp, request, trusted_proxies)

    return line


def access_log_line(timestamp: str, request: Any, trusted_proxies: Sequence[IPNetwork] = ()) -> str:
    """
    One access-log line per request, without the query string: OAuth
    redirects carry codes and state there, and logs outlive them.
    """
    client = request_client_address(request, trusted_proxies)
    path = request.path.decode("latin-1", "replace")
    agent = (request.getHeader(b"user-agent") or b"-").decode("latin-1", "replace")
    return (
        f'"{client}" "{request.method.decode("latin-1")} {path} '
        f'{request.clientproto.decode("latin-1")}" {request.code} '
        f'{request.sentLength or "-"} "{agent}"'
    )


CORS_PATHS = (
    "/.well-known/oauth-authorization-server",
    "/.well-known/oauth-protected-resource",
    "/.well-known/oauth-protected-resource/mcp",
    "/oauth/register",
    "/oauth/token",
    "/oauth/revoke",
    "/mcp",
    "/mcp/",
)
CORS_ALLOW_HEADERS = (
    b"Authorization, Content-Type, Mcp-Session-Id, MCP-Protocol-Version, Last-Event-ID, "
    b"Mcp-Method, Mcp-Name"
)
MAX_REGISTRATION_BODY = 16 * 1024


def jsonrpc_error(code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}


def allow_cross_origin(request: Request) -> None:
    """
    Browser-based clients (MCP Inspector) call these routes from another
    origin.  Nothing here relies on cookies, so any origin may read them.
    """
    request.setHeader(b"Access-Control-Allow-Origin", b"*")
    request.setHeader(b"Access-Control-Expose-Headers", b"WWW-Authenticate, Mcp-Session-Id")


def oauth_error(request: Request, status: int, error: str, description: str) -> bytes:
    return json_response(request, status, {"error": error, "error_description": description})


def read_json_body(request: Request, limit: int) -> tuple[Any, bytes | None]:
    """
    The request's JSON body, or an error response already set up on
    C{request} (then the first item is None and the second the body to send).
    """
    content = request.content.read(limit + 1) if request.content is not None else b""
    if len(content) > limit:
        return None, oauth_error(
            request, 413, "invalid_request", f"the request body is larger than {limit} bytes"
        )
    try:
        return safejson.loads(content), None
    except safejson.JSONInputError as e:
        # Python's own decoder would take lone surrogates (which the store
        # cannot write) and let deep nesting end in a RecursionError: a 500.
        return None, oauth_error(
            request, 400, "invalid_client_metadata", f"the request body is not valid JSON: {e}"
        )


class UTF8Gate(Resource):
    """
    Answers a request whose path or Host name is not UTF-8 with a plain 400
    before Klein sees it: Klein cannot route such a request either, and
    answers 400 too, but logs each one as an error with a traceback, so any
    client could fill the operator's log with what are only bad requests.
    """

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: IRequest) -> Any:
        # What Klein decodes before routing: the path, percent-decoded by
        # twisted.web into segments, and the host name from Host.
        path = b"/".join([*request.prepath, *request.postpath])
        for what, raw in (("path", path), ("Host header", request.getRequestHostname())):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                request.setResponseCode(400)
                request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
                return f"400 Bad Request: the request's {what} is not UTF-8\n".encode()
        return self._inner.render(request)


class BrokerApp:
    """
    All broker routes.  Dependencies come in through the constructor so
    tests can serve the same tree over fakes.
    """

    app = Klein()

    def __init__(
        self,
        config: Config,
        store: HealthSource,
        sessions: SessionCount,
        clock: Any,
        clients: ClientRegistry | None = None,
        flow: AuthorizationFlow | None = None,
        tokens: TokenService | None = None,
        credentials: UpstreamCredentials | None = None,
        limiter: RateLimiter | None = None,
        mcp: MCPEndpoint | None = None,
        connections: Connections | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._sessions = sessions
        self._clock = clock
        self._clients = clients
        self._flow = flow
        self._tokens = tokens
        self._credentials = credentials
        self._limiter = limiter
        self._mcp = mcp
        self._connections = connections
        self._origins = {config.public_url.lower(), *config.allowed_origins}
        secure = config.public_url.startswith("https://")
        # __Host- cookies need Secure, which plain-http loopback development lacks.
        prefix = b"__Host-" if secure else b""
        self._secure = secure
        self._browser_cookie = prefix + b"fjmcp-browser"
        self._login_cookie = prefix + b"fjmcp-login"

    def resource(self) -> Any:
        return UTF8Gate(self.app.resource())

    def client_address(self, request: Request) -> str:
        return request_client_address(request, self._config.trusted_proxies)

    def _too_many(self, request: Request, endpoint: str) -> bytes | None:
        """
        None if the caller may go on; otherwise the 429 answer, already set up.
        """
        if self._limiter is None:
            return None
        wait = self._limiter.check(endpoint, self.client_address(request))
        if wait <= 0:
            return None
        seconds = max(1, math.ceil(wait))
        request.setHeader(b"Retry-After", str(seconds).encode())
        log.info(
            "rate limit on {endpoint} for {client}",
            endpoint=endpoint,
            client=self.client_address(request),
        )
        if endpoint == "authorize":
            return self._page(
                request,
                429,
                error_page("Too many requests", f"Please wait {seconds} seconds and try again."),
            )
        return oauth_error(
            request, 429, "invalid_request", f"too many requests; retry in {seconds} s"
        )

    @app.route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self, request: Request) -> bytes:
        """
        Liveness and readiness in one: 200 while the database answers, 503
        when it does not (a load balancer or podman then knows).
        """
        store = "ok"
        try:
            await self._store.check().addTimeout(HEALTH_TIMEOUT, self._clock)
        except Exception as e:
            log.error("health check: the store did not answer: {error}", error=e)
            store = "unavailable"
        return json_response(
            request,
            200 if store == "ok" else 503,
            {
                "status": "ok" if store == "ok" else "unavailable",
                "version": __version__,
                # Read once at start-up: which build answers (see fjmcp.buildinfo).
                "build": build_info().as_dict(),
                "store": store,
                "sessions": len(self._sessions),
            },
        )

    for _path in CORS_PATHS:

        @app.route(_path, methods=["OPTIONS"], endpoint="preflight " + _path)
        def preflight(self, request: Request) -> bytes:
            """
            CORS preflight: answered before any authentication, never 401.
            """
            allow_cross_origin(request)
            request.setHeader(b"Access-Control-Allow-Methods", b"GET, POST, DELETE, OPTIONS")
            request.setHeader(b"Access-Control-Allow-Headers", CORS_ALLOW_HEADERS)
            request.setHeader(b"Access-Control-Max-Age", b"86400")
            request.setResponseCode(204)
            return b""

    @app.route("/.well-known/oauth-authorization-server", methods=["GET"])
    def as_metadata(self, request: Request) -> bytes:
        allow_cross_origin(request)
        body = json_response(request, 200, authorization_server_metadata(self._config))
        request.setHeader(b"Cache-Control", b"public, max-age=3600")
        return body

    @app.route("/.well-known/oauth-protected-resource", methods=["GET"])
    @app.route("/.well-known/oauth-protected-resource/mcp", methods=["GET"], endpoint="prm_mcp")
    def resource_metadata(self, request: Request) -> bytes:
        allow_cross_origin(request)
        body = json_response(request, 200, protected_resource_metadata(self._config))
        request.setHeader(b"Cache-Control", b"public, max-age=3600")
        return body

    @app.route("/oauth/register", methods=["POST"])
    async def register(self, request: Request) -> bytes:
        allow_cross_origin(request)
        if (limited := self._too_many(request, "register")) is not None:
            return limited
        assert self._clients is not None
        body, error = read_json_body(request, MAX_REGISTRATION_BODY)
        if error is not None:
            return error
        try:
            registered = await self._clients.register(body)
        except RegistrationError as e:
            return oauth_error(request, 400, e.error, e.description)
        log.info(
            "registered client {client_id} ({name}, {method})",
            client_id=registered["client_id"],
            name=registered.get("client_name", "unnamed"),
            method=registered["token_endpoint_auth_method"],
        )
        return json_response(request, 201, registered)

    # --- the token and revocation endpoints (fjmcp.oauth.tokens does the work)

    @app.route("/oauth/token", methods=["POST"])
    async def token(self, request: Request) -> bytes:
        allow_cross_origin(request)
        if (limited := self._too_many(request, "token")) is not None:
            return limited
        assert self._tokens is not None
        status, headers, body = await self._tokens.token_response(
            read_body(request, MAX_TOKEN_BODY), oauth_request_headers(request)
        )
        return _send(request, status, headers, body)

    @app.route("/oauth/revoke", methods=["POST"])
    async def revoke(self, request: Request) -> bytes:
        allow_cross_origin(request)
        assert self._tokens is not None
        status, headers, body = await self._tokens.revoke(
            read_body(request, MAX_TOKEN_BODY), oauth_request_headers(request)
        )
        return _send(request, status, headers, body)

    # --- the MCP endpoint: the resource server's gate

    def _unauthorized(self, request: Request, error: str | None, description: str | None) -> bytes:
        # The scopes a client should ask for (MCP authorization: SHOULD), the
        # same as the metadata's scopes_supported.
        challenge = www_authenticate(self._config, error, description, " ".join(SCOPES_SUPPORTED))
        request.setHeader(b"WWW-Authenticate", challenge)
        body: dict[str, str] = {"error": error or "unauthorized"}
        body["error_description"] = description or "this endpoint needs a bearer token"
        return json_response(request, 401, body)

    @app.route("/mcp", methods=["GET", "POST", "DELETE"])
    @app.route("/mcp/", methods=["GET", "POST", "DELETE"], endpoint="mcp_slash")
    async def mcp(self, request: Request) -> bytes | None:
        """
        Every request is authenticated on its own, sessions or not; a valid
        token must also still stand for a usable Forgejo authorization.
        """
        allow_cross_origin(request)
        assert self._tokens is not None and self._credentials is not None
        origin = request.getHeader(b"origin")
        if origin is not None and origin.decode("latin-1").lower() not in self._origins:
            # DNS rebinding and cross-site pages: a browser says where it
            # comes from, and only known origins may talk to /mcp.
            return json_response(
                request, 403, jsonrpc_error(-32600, "Forbidden: this Origin may not use /mcp")
            )
        header = request.getHeader(b"authorization")
        try:
            grant = await self._tokens.check_bearer(
                header.decode("latin-1") if header is not None else None
            )
        except MissingTokenError:
            return self._unauthorized(request, None, None)
        except InvalidTokenError as e:
            return self._unauthorized(request, "invalid_token", e.description)
        try:
            forgejo_token = await self._credentials.access_token(grant.forgejo_user_id)
        except LoginRequiredError:
            return self._unauthorized(
                request,
                "invalid_token",
                "the Forgejo authorization behind this token has ended; authorize again",
            )
        except UpstreamError as e:
            log.warn("Forgejo could not renew a token: {error}", error=str(e))
            request.setHeader(b"Retry-After", b"30")
            return json_response(
                request,
                503,
                jsonrpc_error(-32603, "Forgejo cannot be reached right now; try again shortly"),
            )
        if self._mcp is None:
            # Only a tree built without sessions (some tests) gets here.
            return json_response(
                request, 501, jsonrpc_error(-32601, "this broker runs no MCP sessions")
            )
        method = request.method
        if method == b"POST":
            return await self._mcp.post(
                request,
                grant.forgejo_user_id,
                grant.client_id,
                forgejo_token,
                family_id=grant.family_id,
            )
        if method == b"GET":
            return await self._mcp.get(
                request, grant.forgejo_user_id, forgejo_token, family_id=grant.family_id
            )
        return self._mcp.delete(request, grant.forgejo_user_id)

    # --- the authorization flow (pages a person sees)

    def _page(
        self,
        request: Request,
        status: int,
        body: bytes,
        csp_extra: bytes = b"",
        referrer_policy: bytes = b"no-referrer",
    ) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Frame-Options", b"DENY")
        request.setHeader(
            b"Content-Security-Policy",
            b"default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
            b"base-uri 'none'" + csp_extra,
        )
        request.setHeader(b"Referrer-Policy", referrer_policy)
        return body

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

    @app.handle_errors(PageError)
    def _page_error(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, PageError) and isinstance(request, Request)
        return self._page(request, e.status, error_page(e.title, e.message))

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        """
        A bug or an outage below us: log it with the traceback, and answer
        without one.
        """
        assert isinstance(request, Request)
        if failure.check(HTTPException):
            # Klein's own 404/405: not ours to hide.
            e = failure.value
            assert isinstance(e, HTTPException) and e.code is not None
            request.setResponseCode(e.code)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return f"{e.code} {e.name}\n".encode()
        log.failure("unexpected error on {path}", failure, path=request.path.decode("latin-1"))
        return oauth_error(request, 500, "server_error", "an internal error occurred; see the log")

    @app.route("/oauth/authorize", methods=["GET"])
    async def authorize(self, request: Request) -> bytes:
        assert self._flow is not None
        if (limited := self._too_many(request, "authorize")) is not None:
            return limited
        browser = _cookie(request, self._browser_cookie) or new_token()
        self._set_cookie(request, self._browser_cookie, browser, 3600)
        result = await self._flow.begin(
            query_args(request), browser, _cookie(request, self._login_cookie)
        )
        if isinstance(result, Redirect):
            return self._redirect(request, result.location)
        return self._page(
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
    async def decide(self, request: Request) -> bytes:
        assert self._flow is not None
        if (limited := self._too_many(request, "authorize")) is not None:
            return limited
        result = await self._flow.decide(
            query_args(request), _cookie(request, self._browser_cookie)
        )
        return self._redirect(request, result.location)

    @app.route("/oauth/callback", methods=["GET"])
    async def callback(self, request: Request) -> bytes:
        assert self._flow is not None
        args = query_args(request)
        if self._connections is not None and self._connections.owns_login(args.get("state", "")):
            # A sign-in for the connections page, not a client's authorization.
            login_session = await self._connections.finish_login(
                args, _cookie(request, self._browser_cookie)
            )
            self._set_cookie(
                request, self._login_cookie, login_session, int(LOGIN_SESSION_LIFETIME)
            )
            return self._redirect(request, self._config.public_url + "/connections")
        result = await self._flow.callback(args)
        if isinstance(result, Completed):
            self._set_cookie(
                request, self._login_cookie, result.login_session, int(LOGIN_SESSION_LIFETIME)
            )
        return self._redirect(request, result.location)

    # --- the connections page (fjmcp.oauth.connections does the work)

    def _connections_page(self, request: Request, status: int, body: bytes) -> bytes:
        # Forms post only here; and "same-origin" (not "no-referrer") so the
        # browser's POST carries our Origin instead of "null".
        return self._page(
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
        assert self._connections is not None
        login_session = _cookie(request, self._login_cookie)
        user_id = await self._connections.user(login_session)
        if user_id is None or login_session is None:
            if (limited := self._too_many(request, "authorize")) is not None:
                return limited
            browser = _cookie(request, self._browser_cookie) or new_token()
            self._set_cookie(request, self._browser_cookie, browser, 3600)
            return self._redirect(request, self._connections.start_login(browser))
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
                form_token=self._connections.form_token(user_id, login_session),
                action="/connections/revoke",
                notice=notice,
            ),
        )

    @app.route("/connections/revoke", methods=["POST"])
    async def revoke_connection(self, request: Request) -> bytes:
        assert self._connections is not None
        # Anyone may post here, and each post costs a database lookup
        # before it can be refused.
        if (limited := self._too_many(request, "authorize")) is not None:
            return limited
        if self._cross_site(request):
            return self._connections_page(
                request,
                403,
                error_page("Forbidden", "This form can only be sent from this site's own page."),
            )
        login_session = _cookie(request, self._login_cookie)
        user_id = await self._connections.user(login_session)
        form = query_args(request)
        if (
            user_id is None
            or login_session is None
            or not self._connections.take_form_token(form.get("csrf", ""), user_id, login_session)
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


def _cookie(request: Request, name: bytes) -> str | None:
    value = request.getCookie(name)
    if not value:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


MAX_FORM_BODY = 16 * 1024


def query_args(request: Request) -> dict[str, str]:
    """
    Query fields, and for a POST the urlencoded form fields, first value of
    each, as text.  (The site does not let Twisted parse forms.)

    @raise PageError: 400 when a field is not UTF-8 (raw or percent-encoded),
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
                raise PageError(
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


def _not_utf8(where: str) -> PageError:
    return PageError(
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


def read_body(request: Request, limit: int) -> bytes:
    """
    The request body, read to at most one byte past C{limit} so the caller
    can tell that it was too large without holding more of it.
    """
    return request.content.read(limit + 1) if request.content is not None else b""


def oauth_request_headers(request: Request) -> dict[str, str]:
    """
    The headers an OAuth endpoint looks at, as text.
    """
    out = {}
    for name in (b"content-type", b"authorization"):
        value = request.getHeader(name)
        if value is not None:
            out[name.decode()] = value.decode("latin-1")
    return out


def _send(request: Request, status: int, headers: dict[str, str], body: Any) -> bytes:
    payload = json_response(request, status, body)
    for name, value in headers.items():
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
    return payload
