"""
The broker's HTTP face: the Klein resource tree.  Routes turn requests into
calls on domain objects and results into responses; they hold no state of
their own.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from fjmcp import __version__
from fjmcp.clients import ClientRegistry
from fjmcp.config import Config
from fjmcp.discovery import authorization_server_metadata, protected_resource_metadata
from fjmcp.registration import RegistrationError

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


def access_log_line(timestamp: str, request: Any) -> str:
    """
    One access-log line per request, without the query string: OAuth
    redirects carry codes and state there, and logs outlive them.
    """
    client = getattr(request.getClientAddress(), "host", "-")
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
        return json.loads(content), None
    except ValueError:
        return None, oauth_error(
            request, 400, "invalid_client_metadata", "the request body is not valid JSON"
        )


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
    ) -> None:
        self._config = config
        self._store = store
        self._sessions = sessions
        self._clock = clock
        self._clients = clients

    def resource(self) -> Any:
        return self.app.resource()

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
