"""
The resource server's gate in front of `/mcp`: the browser's Origin, the
bearer token (every request on its own, sessions or not), and the user's
Forgejo authorization behind it, renewed if need be.  What passes goes to
L{fjmcp.http.streamable}.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from fjmcp.config import Config
from fjmcp.forgejo.client import UpstreamError
from fjmcp.forgejo.credentials import LoginRequiredError, UpstreamCredentials
from fjmcp.http.common import cross_origin, json_response, preflights, unexpected
from fjmcp.http.streamable import MCPEndpoint
from fjmcp.mcp.jsonrpc import INTERNAL_ERROR, INVALID_REQUEST
from fjmcp.mcp.jsonrpc import error as rpc_error
from fjmcp.oauth.discovery import SCOPES_SUPPORTED, resource_metadata_url
from fjmcp.oauth.tokens import InvalidTokenError, MissingTokenError, TokenService

log = Logger()


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def www_authenticate(
    config: Config,
    error: str | None = None,
    description: str | None = None,
    scope: str | None = None,
) -> bytes:
    """
    The C{WWW-Authenticate} value of a 401 from C{/mcp} (RFC 6750 section
    3, RFC 9728 section 5.1): always with C{resource_metadata}, which
    clients need to start discovery; with C{error} only when a token was
    sent (C{error=None} for L{MissingTokenError}).
    """
    params = []
    if error is not None:
        params.append(f"error={_quote(error)}")
        if description:
            params.append(f"error_description={_quote(description)}")
    if scope:
        params.append(f"scope={_quote(scope)}")
    params.append(f"resource_metadata={_quote(resource_metadata_url(config))}")
    return ("Bearer " + ", ".join(params)).encode("ascii", "replace")


class MCPGate:
    """
    `/mcp` (and `/mcp/`, never a redirect between them).
    """

    app = Klein()
    preflights(app, ("/mcp", "/mcp/"))

    def __init__(
        self,
        config: Config,
        tokens: TokenService,
        credentials: UpstreamCredentials,
        mcp: MCPEndpoint,
    ) -> None:
        self._config = config
        self._tokens = tokens
        self._credentials = credentials
        self._mcp = mcp
        self._origins = {config.public_url.lower(), *config.allowed_origins}

    def resource(self) -> Any:
        return self.app.resource()

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        return unexpected(request, failure)

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
    @cross_origin
    async def mcp(self, request: Request) -> bytes | None:
        """
        Every request is authenticated on its own, sessions or not; a valid
        token must also still stand for a usable Forgejo authorization.
        """
        origin = request.getHeader(b"origin")
        if origin is not None and origin.decode("latin-1").lower() not in self._origins:
            # DNS rebinding and cross-site pages: a browser says where it
            # comes from, and only known origins may talk to /mcp.
            return json_response(
                request,
                403,
                rpc_error(None, INVALID_REQUEST, "Forbidden: this Origin may not use /mcp"),
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
                rpc_error(
                    None, INTERNAL_ERROR, "Forgejo cannot be reached right now; try again shortly"
                ),
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
        return await self._mcp.delete(request, grant.forgejo_user_id)
