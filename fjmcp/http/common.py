"""
What every branch of the HTTP tree shares: JSON and HTML answers with their
headers, CORS and rate limiting as decorators, reading bodies, the client's
address behind trusted proxies, the access log line, and the answer to an
unexpected error.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException

from fjmcp import safejson
from fjmcp.config import IPNetwork
from fjmcp.http.pages import error_page
from fjmcp.http.ratelimit import RateLimiter, client_address

log = Logger()

Handler = TypeVar("Handler", bound=Callable[..., Any])

CORS_ALLOW_HEADERS = (
    b"Authorization, Content-Type, Mcp-Session-Id, MCP-Protocol-Version, Last-Event-ID, "
    b"Mcp-Method, Mcp-Name"
)


def json_response(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode("utf-8")


def oauth_error(request: Request, status: int, error: str, description: str) -> bytes:
    return json_response(request, status, {"error": error, "error_description": description})


def html_page(
    request: Request,
    status: int,
    body: bytes,
    csp_extra: bytes = b"",
    referrer_policy: bytes = b"no-referrer",
) -> bytes:
    """
    A page for a person: never cached, never framed, no scripts.
    """
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


def allow_cross_origin(request: Request) -> None:
    """
    Browser-based clients (MCP Inspector) call these routes from another
    origin.  Nothing here relies on cookies, so any origin may read them.
    """
    request.setHeader(b"Access-Control-Allow-Origin", b"*")
    request.setHeader(b"Access-Control-Expose-Headers", b"WWW-Authenticate, Mcp-Session-Id")


def cross_origin(handler: Handler) -> Handler:
    """
    A route any origin may call (decorator, below C{@app.route}).
    """

    @functools.wraps(handler)
    def wrapped(self: Any, request: Request, *args: Any, **kwargs: Any) -> Any:
        allow_cross_origin(request)
        return handler(self, request, *args, **kwargs)

    return wrapped  # type: ignore[return-value]


def preflights(app: Klein, paths: Sequence[str]) -> None:
    """
    Answer CORS preflights for C{paths} on C{app}: before any
    authentication, never 401.
    """

    def preflight(self: Any, request: Request) -> bytes:
        allow_cross_origin(request)
        request.setHeader(b"Access-Control-Allow-Methods", b"GET, POST, DELETE, OPTIONS")
        request.setHeader(b"Access-Control-Allow-Headers", CORS_ALLOW_HEADERS)
        request.setHeader(b"Access-Control-Max-Age", b"86400")
        request.setResponseCode(204)
        return b""

    for path in paths:
        app.route(path, methods=["OPTIONS"], endpoint="preflight " + path)(preflight)


def request_client_address(request: Any, trusted_proxies: Sequence[IPNetwork]) -> str:
    """
    The real client's address: the peer's, or X-Forwarded-For's when the
    peer is a trusted proxy (see L{fjmcp.http.ratelimit.client_address}).
    """
    peer = getattr(request.getClientAddress(), "host", None)
    forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for") or []
    return client_address(peer, [v.decode("latin-1") for v in forwarded], trusted_proxies)


class RateGuard:
    """
    The per-address limits as the routes apply them (L{rate_limited}).
    """

    def __init__(self, limiter: RateLimiter, trusted_proxies: Sequence[IPNetwork]) -> None:
        self._limiter = limiter
        self._trusted = trusted_proxies

    def refuse(self, request: Request, endpoint: str, page: bool = False) -> bytes | None:
        """
        None if the caller may go on; otherwise the 429 answer, already set
        up: a page for people (C{page}), an OAuth error for programs.
        """
        client = request_client_address(request, self._trusted)
        wait = self._limiter.check(endpoint, client)
        if wait <= 0:
            return None
        seconds = max(1, math.ceil(wait))
        request.setHeader(b"Retry-After", str(seconds).encode())
        log.info("rate limit on {endpoint} for {client}", endpoint=endpoint, client=client)
        if page:
            return html_page(
                request,
                429,
                error_page("Too many requests", f"Please wait {seconds} seconds and try again."),
            )
        return oauth_error(
            request, 429, "invalid_request", f"too many requests; retry in {seconds} s"
        )


def rate_limited(endpoint: str, page: bool = False) -> Callable[[Handler], Handler]:
    """
    A route limited per client address (decorator, below C{@app.route}); the
    route's object holds a L{RateGuard} as C{limits}.
    """

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def wrapped(self: Any, request: Request, *args: Any, **kwargs: Any) -> Any:
            refusal = self.limits.refuse(request, endpoint, page)
            if refusal is not None:
                return refusal
            return handler(self, request, *args, **kwargs)

        return wrapped  # type: ignore[return-value]

    return decorate


def unexpected(request: IRequest, failure: Failure) -> bytes:
    """
    A bug or an outage below us: log it with the traceback, and answer
    without one.  Klein's own 404 and 405 pass through as they are.
    """
    assert isinstance(request, Request)
    if failure.check(HTTPException):
        e = failure.value
        assert isinstance(e, HTTPException) and e.code is not None
        request.setResponseCode(e.code)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return f"{e.code} {e.name}\n".encode()
    log.failure("unexpected error on {path}", failure, path=request.path.decode("latin-1"))
    return oauth_error(request, 500, "server_error", "an internal error occurred; see the log")


def read_body(request: Request, limit: int) -> bytes:
    """
    The request body, read to at most one byte past C{limit} so the caller
    can tell that it was too large without holding more of it.
    """
    return request.content.read(limit + 1) if request.content is not None else b""


def read_json_body(request: Request, limit: int) -> tuple[Any, bytes | None]:
    """
    The request's JSON body, or an error response already set up on
    C{request} (then the first item is None and the second the body to send).
    """
    content = read_body(request, limit)
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


def cookie(request: Request, name: bytes) -> str | None:
    value = request.getCookie(name)
    if not value:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


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
