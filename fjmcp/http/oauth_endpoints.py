"""
The authorization server's endpoints for programs: metadata discovery,
dynamic client registration, the token endpoint and revocation.  Any
origin may call them (CORS); registration, tokens and revocation are rate
limited per client address (a revocation checks client credentials too).
The work is L{fjmcp.oauth}'s.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from fjmcp.config import Config
from fjmcp.http.common import (
    RateGuard,
    cross_origin,
    json_response,
    oauth_error,
    preflights,
    rate_limited,
    read_body,
    read_json_body,
    unexpected,
)
from fjmcp.oauth.clients import ClientRegistry
from fjmcp.oauth.discovery import authorization_server_metadata, protected_resource_metadata
from fjmcp.oauth.registration import RegistrationError
from fjmcp.oauth.tokens import MAX_BODY as MAX_TOKEN_BODY
from fjmcp.oauth.tokens import TokenService

MAX_REGISTRATION_BODY = 16 * 1024

log = Logger()


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


def _metadata(request: Request, document: dict[str, Any]) -> bytes:
    # Built from configuration only: caches may keep it for an hour.
    body = json_response(request, 200, document)
    request.setHeader(b"Cache-Control", b"public, max-age=3600")
    return body


class OAuthEndpoints:
    """
    Metadata, registration, token and revocation.
    """

    app = Klein()
    preflights(
        app,
        (
            "/.well-known/oauth-authorization-server",
            "/.well-known/oauth-protected-resource",
            "/.well-known/oauth-protected-resource/mcp",
            "/oauth/register",
            "/oauth/token",
            "/oauth/revoke",
        ),
    )

    def __init__(
        self, config: Config, clients: ClientRegistry, tokens: TokenService, limits: RateGuard
    ) -> None:
        self._config = config
        self._clients = clients
        self._tokens = tokens
        self.limits = limits

    def resource(self) -> Any:
        return self.app.resource()

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        return unexpected(request, failure)

    @app.route("/.well-known/oauth-authorization-server", methods=["GET"])
    @cross_origin
    def as_metadata(self, request: Request) -> bytes:
        return _metadata(request, authorization_server_metadata(self._config))

    @app.route("/.well-known/oauth-protected-resource", methods=["GET"])
    @app.route("/.well-known/oauth-protected-resource/mcp", methods=["GET"], endpoint="prm_mcp")
    @cross_origin
    def resource_metadata(self, request: Request) -> bytes:
        return _metadata(request, protected_resource_metadata(self._config))

    @app.route("/oauth/register", methods=["POST"])
    @cross_origin
    @rate_limited("register")
    async def register(self, request: Request) -> bytes:
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

    @app.route("/oauth/token", methods=["POST"])
    @cross_origin
    @rate_limited("token")
    async def token(self, request: Request) -> bytes:
        status, headers, body = await self._tokens.token_response(
            read_body(request, MAX_TOKEN_BODY), oauth_request_headers(request)
        )
        return _send(request, status, headers, body)

    @app.route("/oauth/revoke", methods=["POST"])
    @cross_origin
    @rate_limited("revoke")
    async def revoke(self, request: Request) -> bytes:
        status, headers, body = await self._tokens.revoke(
            read_body(request, MAX_TOKEN_BODY), oauth_request_headers(request)
        )
        return _send(request, status, headers, body)
