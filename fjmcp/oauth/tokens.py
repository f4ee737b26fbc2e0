"""
The broker's own tokens: the token endpoint (RFC 6749 with PKCE, RFC 8707
resources), revocation (RFC 7009) and bearer checking for C{/mcp}.

Tokens are opaque random strings; the database keeps only their SHA-256
digests.  Every token belongs to a family that started with one
authorization code:

 - a code is single use; presenting it again revokes the family;
 - a refresh always rotates (a new access and a new refresh token);
 - the refresh token just exchanged keeps working for
   C{config.refresh_grace_period} seconds after its first exchange, each
   time issuing another pair in the same family, so clients that refresh
   concurrently (several nodes, retries) are not locked out; presented
   after that window it revokes the whole family (reuse detection);
 - revoking a refresh token revokes its family; revoking an access token
   revokes only it.

Lifetimes: codes L{CODE_LIFETIME}; access tokens
C{config.access_token_lifetime}; refresh tokens
C{config.refresh_token_lifetime}, counted afresh from each rotation (a grant
in use does not expire; an idle one does).

oauthlib does the protocol work inside one database transaction per request
(L{fjmcp.oauth.validator}).  This module does what comes before it (body
limits, form parsing, duplicate parameters, client credentials from HTTP
Basic, the C{resource} parameter) and after it (status codes and headers
the broker promises and oauthlib does not produce).  It knows nothing of
Klein: the routes pass bytes and header values in and get
C{(status, headers, body)} back.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from oauthlib.oauth2 import (
    AuthorizationCodeGrant,
    BearerToken,
    RefreshTokenGrant,
    RevocationEndpoint,
    TokenEndpoint,
)
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from fjmcp import metrics
from fjmcp.config import Config
from fjmcp.oauth.grants import AccessGrant, BearerCache
from fjmcp.oauth.validator import (
    ClientCredentials,
    CodeRaceError,
    GrantValidator,
    same_resource,
)
from fjmcp.secrets.crypto import new_token, token_hash
from fjmcp.store import Store
from fjmcp.store.tokens import TokenTransaction

# An authorization code is redeemed by the client right after the redirect.
CODE_LIFETIME = 60.0
MAX_BODY = 16 * 1024
MAX_FIELDS = 50
GRANT_TYPES = ("authorization_code", "refresh_token")
# What the two endpoints read.  Everything else is dropped before oauthlib
# sees the form (RFC 6749 section 3.2: unknown parameters are ignored), so a
# form field cannot land on an attribute of oauthlib's request object such
# as C{user}, C{client} or C{extra_credentials}.
OAUTH_PARAMETERS = frozenset(
    {
        "grant_type",
        "code",
        "redirect_uri",
        "code_verifier",
        "client_id",
        "refresh_token",
        "scope",
        "resource",
        "token",
        "token_type_hint",
    }
)
FORM = "application/x-www-form-urlencoded"
BASIC_CHALLENGE = 'Basic realm="fjmcp", charset="UTF-8"'
# RFC 6750 section 2.1: b64token.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

# oauthlib logs refresh tokens in the clear at DEBUG; keep that out of any
# log a deployment might route standard logging to.
logging.getLogger("oauthlib").setLevel(logging.INFO)

log = Logger()

Response = tuple[int, dict[str, str], dict[str, Any]]


class MissingTokenError(Exception):
    """
    The request carried no bearer token at all.
    """


class InvalidTokenError(Exception):
    """
    The bearer token is malformed, unknown, expired, revoked or for another
    resource; the message says which (it goes into C{error_description}).
    """

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class _RequestError(Exception):
    def __init__(
        self, status: int, error: str, description: str, headers: Mapping[str, str] = {}
    ) -> None:
        super().__init__(f"{error}: {description}")
        self.response: Response = (
            status,
            {**NO_STORE, **headers},
            {"error": error, "error_description": description},
        )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def parse_form(body: bytes, headers: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """
    An C{application/x-www-form-urlencoded} body as one value per name, and
    the C{resource} values apart (RFC 8707 allows several).  Empty values
    count as absent (RFC 6749 section 3.2); any other name given twice is
    refused (section 3.2 again).

    @raise _RequestError: for anything else.
    """
    if len(body) > MAX_BODY:
        raise _RequestError(
            413, "invalid_request", f"the request body is larger than {MAX_BODY} bytes"
        )
    media_type = (_header(headers, "content-type") or "").split(";")[0].strip().lower()
    if media_type != FORM:
        raise _RequestError(400, "invalid_request", f"the request body must be {FORM}")
    try:
        pairs = parse_qsl(
            body.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=True,
            errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except ValueError:
        raise _RequestError(
            400, "invalid_request", f"the request body is not valid {FORM} (UTF-8)"
        ) from None
    form: dict[str, str] = {}
    resources: list[str] = []
    seen: set[str] = set()
    for name, value in pairs:
        if name == "resource":
            if value:
                resources.append(value)
            continue
        if name in seen:
            raise _RequestError(400, "invalid_request", f"parameter {name!r} is repeated")
        seen.add(name)
        if value:
            form[name] = value
    if resources:
        form["resource"] = resources[0]
    return form, resources


def client_credentials(form: Mapping[str, str], headers: Mapping[str, str]) -> ClientCredentials:
    """
    The client's claimed identity and secret from HTTP Basic (RFC 6749
    section 2.3.1, form-urlencoded id and secret) or the body.

    @raise _RequestError: when there is none, or it is malformed or mixed.
    """
    authorization = (_header(headers, "authorization") or "").strip()
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("ascii")
            raw_id, colon, raw_secret = decoded.partition(":")
            if not colon:
                raise ValueError("no colon")
            client_id = unquote_plus(raw_id, errors="strict")
            secret = unquote_plus(raw_secret, errors="strict")
        except (ValueError, binascii.Error):
            raise _RequestError(
                401,
                "invalid_client",
                "malformed HTTP Basic credentials",
                {"WWW-Authenticate": BASIC_CHALLENGE},
            ) from None
        if "client_secret" in form:
            raise _RequestError(
                400,
                "invalid_request",
                "use one client authentication method: HTTP Basic or client_secret in the body",
            )
        if form.get("client_id", client_id) != client_id:
            raise _RequestError(
                401,
                "invalid_client",
                "client_id in the body differs from the HTTP Basic user name",
                {"WWW-Authenticate": BASIC_CHALLENGE},
            )
        if not client_id:
            raise _RequestError(
                401,
                "invalid_client",
                "empty client_id in HTTP Basic credentials",
                {"WWW-Authenticate": BASIC_CHALLENGE},
            )
        return ClientCredentials(client_id, secret or None, "client_secret_basic")
    client_id = form.get("client_id", "")
    if not client_id:
        raise _RequestError(
            401,
            "invalid_client",
            "client authentication is required: send client_id (and client_secret "
            "if one was issued), or HTTP Basic credentials",
        )
    posted = form.get("client_secret")
    return ClientCredentials(client_id, posted, "client_secret_post" if posted else "none")


def _for_oauthlib(form: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in form.items() if name in OAUTH_PARAMETERS}


def _oauth_response(
    status: int, headers: Mapping[str, str], body: str, credentials: ClientCredentials
) -> Response:
    """
    oauthlib's answer as the broker sends it.  oauthlib challenges a 401
    with C{Bearer} (right for resources, wrong here); the token endpoint
    challenges C{Basic} when the client used it (RFC 6749 section 5.2) and
    not at all otherwise.
    """
    out = {k: v for k, v in headers.items() if k.lower() not in ("www-authenticate",)}
    out.update(NO_STORE)
    if status == 401 and credentials.method == "client_secret_basic":
        out["WWW-Authenticate"] = BASIC_CHALLENGE
    out.pop("Content-Type", None)
    payload = json.loads(body) if body else {}
    return status, out, payload


class TokenService:
    """
    The token and revocation endpoints and the bearer check, over the store.
    C{clock} provides C{seconds()}; tests pass a L{twisted.internet.task.Clock}.
    What a revocation ends beyond the store (cached bearer checks, sessions)
    is L{fjmcp.oauth.grants.GrantEnds}'s: the store announces it.
    """

    def __init__(
        self, store: Store, config: Config, clock: IReactorTime, bearers: BearerCache
    ) -> None:
        self._bearers = bearers
        self._store = store
        self._config = config
        self._clock = clock

    # --- for the authorize flow

    async def issue_code(
        self,
        client_id: str,
        forgejo_user_id: int,
        redirect_uri: str,
        code_challenge: str,
        scope: str,
        resource: str,
        code_challenge_method: str = "S256",
    ) -> str:
        """
        Issue a new authorization code (and its token family); returns the
        code to send to the client.
        """
        code = new_token()
        await self._store.issue_authorization_code(
            token_hash(code),
            client_id,
            forgejo_user_id,
            redirect_uri,
            code_challenge,
            code_challenge_method,
            scope,
            resource,
            self._clock.seconds() + CODE_LIFETIME,
        )
        return code

    # --- POST /oauth/token

    def _validator(self, tx: TokenTransaction, credentials: ClientCredentials) -> GrantValidator:
        return GrantValidator(
            tx,
            credentials,
            resource=self._config.mcp_url,
            access_token_lifetime=self._config.access_token_lifetime,
            refresh_token_lifetime=self._config.refresh_token_lifetime,
            refresh_grace_period=self._config.refresh_grace_period,
        )

    def _check_resource(self, resources: list[str]) -> None:
        if any(not same_resource(r, self._config.mcp_url) for r in resources):
            raise _RequestError(
                400, "invalid_target", f"this server only issues tokens for {self._config.mcp_url}"
            )

    async def token_response(self, body: bytes, headers: Mapping[str, str]) -> Response:
        revoked: list[str] = []
        response = await self._token_response(body, headers, revoked)
        grant_type = _grant_type(body, headers)
        metrics.token_request(grant_type, response[0], response[2])
        if revoked and grant_type is not None:
            # The token endpoint revokes only on a replayed code or a reused
            # refresh token.
            metrics.token_reused(grant_type)
        return response

    async def _token_response(
        self, body: bytes, headers: Mapping[str, str], revoked: list[str]
    ) -> Response:
        """
        Answer a token request: C{(status, headers, JSON body)}.  Never
        raises; every failure is an OAuth error response.  The grants it
        revoked are added to C{revoked}.
        """
        try:
            form, resources = parse_form(body, headers)
            # Absent means the default, the MCP URL (old clients send none).
            self._check_resource(resources)
            grant_type = form.get("grant_type")
            if grant_type is None:
                raise _RequestError(400, "invalid_request", "grant_type is required")
            if grant_type not in GRANT_TYPES:
                raise _RequestError(
                    400,
                    "unsupported_grant_type",
                    "grant_type must be authorization_code or refresh_token",
                )
            credentials = client_credentials(form, headers)
        except _RequestError as e:
            return e.response
        now = self._clock.seconds()
        uri = self._config.public_url + "/oauth/token"

        def endpoint_call(tx: TokenTransaction) -> tuple[Response, GrantValidator]:
            validator = self._validator(tx, credentials)
            bearer = BearerToken(
                validator,
                token_generator=lambda request: new_token(),
                expires_in=int(self._config.access_token_lifetime),
            )
            endpoint = TokenEndpoint(
                "authorization_code",
                bearer,
                {
                    "authorization_code": AuthorizationCodeGrant(validator),
                    "refresh_token": RefreshTokenGrant(
                        validator, post_token=[validator.narrow_scopes]
                    ),
                },
            )
            out_headers, out_body, status = endpoint.create_token_response(
                uri, "POST", _for_oauthlib(form), {}
            )
            return _oauth_response(status, out_headers, out_body, credentials), validator

        try:
            response, validator = await self._store.token_transaction(
                "token " + grant_type, now, endpoint_call
            )
        except CodeRaceError as e:
            try:
                if await self._store.revoke_family(e.family_id, "authorization code replayed"):
                    revoked.append(e.family_id)
            except CancelledError:
                raise
            except Exception:
                log.failure("could not revoke grant {family}", family=e.family_id)
            return _RequestError(
                400, "invalid_grant", "the authorization code was already used"
            ).response
        except CancelledError:
            # The client went away (Klein cancels the handler); the
            # transaction has finished or will finish on its own.
            raise
        except Exception:
            log.failure("token request ({grant_type}) failed", grant_type=grant_type)
            return _RequestError(
                500, "server_error", "the token request could not be completed; try again"
            ).response
        revoked.extend(validator.revoked_families)
        status, _, payload = response
        if status == 200:
            log.info(
                "issued tokens ({grant_type}) to client {client} for user {user} (grant {family})",
                grant_type=grant_type,
                client=credentials.client_id[:200],
                user=validator.forgejo_user_id,
                family=validator.family_id,
            )
        elif payload.get("error") in ("invalid_grant", "invalid_client"):
            log.info(
                "token request ({grant_type}) from client {client!r} refused: {error}:"
                " {description}",
                grant_type=grant_type,
                client=credentials.client_id[:200],
                error=payload.get("error"),
                description=payload.get("error_description", ""),
            )
        return response

    # --- POST /oauth/revoke

    async def revoke(self, body: bytes, headers: Mapping[str, str]) -> Response:
        """
        Answer a revocation request (RFC 7009): 200 for any token, known or
        not, once the client has authenticated; a client revokes only its own
        tokens.  Never raises.
        """
        try:
            form, _ = parse_form(body, headers)
            credentials = client_credentials(form, headers)
        except _RequestError as e:
            return e.response
        now = self._clock.seconds()
        uri = self._config.public_url + "/oauth/revoke"

        def endpoint_call(tx: TokenTransaction) -> tuple[Response, GrantValidator]:
            validator = self._validator(tx, credentials)
            endpoint = RevocationEndpoint(validator)
            out_headers, out_body, status = endpoint.create_revocation_response(
                uri, "POST", _for_oauthlib(form), {}
            )
            return _oauth_response(status, out_headers, out_body, credentials), validator

        try:
            response, _ = await self._store.token_transaction("revoke", now, endpoint_call)
            return response
        except CancelledError:
            raise
        except Exception:
            log.failure("revocation request failed")
            return _RequestError(
                500, "server_error", "the revocation could not be completed; try again"
            ).response

    # --- bearer tokens at /mcp

    async def check_bearer(self, authorization: str | None) -> AccessGrant:
        """
        The grant behind an C{Authorization: Bearer} header value.  Only the
        header is accepted (no query or body tokens, as OAuth 2.1 requires;
        oauthlib's resource endpoint would take those too, so the header is
        parsed here).

        @raise MissingTokenError: no bearer token was sent.
        @raise InvalidTokenError: it is not a token this broker would honour.
        """
        if not authorization or not authorization.strip():
            raise MissingTokenError()
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise MissingTokenError()
        value = value.strip()
        if not value:
            raise MissingTokenError()
        if not _B64TOKEN.fullmatch(value):
            raise InvalidTokenError("malformed bearer token")
        digest = token_hash(value)
        cached = self._bearers.get(digest)
        if cached is not None:
            return cached
        record = await self._store.get_access_token(digest)
        now = self._clock.seconds()
        if record is None:
            raise InvalidTokenError("unknown access token")
        family = record.family
        if record.revoked_at is not None or family.revoked:
            raise InvalidTokenError("the access token was revoked")
        if now >= record.expires_at:
            raise InvalidTokenError("the access token expired")
        if not same_resource(family.resource, self._config.mcp_url):
            raise InvalidTokenError("the access token is for another resource")
        grant = AccessGrant(
            family.forgejo_user_id, family.client_id, family.family_id, record.scope
        )
        # Every /mcp request checks its token; a few seconds of memory saves
        # a database round trip on nearly all of them.
        self._bearers.put(digest, grant, record.expires_at)
        return grant


def _grant_type(body: bytes, headers: Mapping[str, str]) -> str | None:
    """
    The grant type a token request names, for the metrics label.
    """
    try:
        return parse_form(body, headers)[0].get("grant_type")
    except _RequestError:
        return None
