"""
The broker's rules for its own grants, as an oauthlib C{RequestValidator}.

oauthlib runs the protocol of the token and revocation endpoints (grant
dispatch, the order of checks, PKCE, the token response); this validator
answers its questions from the database.  One validator serves one endpoint
call and is bound to that call's open write transaction (a
L{TokenTransaction}) and to the time of the request, so everything the call
reads and writes commits together or not at all.  It runs in the database
pool's thread: nothing here may touch the reactor.

Where oauthlib's defaults differ from what the broker promises, the
validator raises the OAuth error itself (with a description a client
developer can act on) instead of returning False:

 - a missing C{code_verifier} and a C{redirect_uri} that differs from the
   authorization request are C{invalid_grant} (oauthlib: C{invalid_request});
 - only S256 codes are redeemable (oauthlib also knows C{plain});
 - a replayed code and a refresh token reused after its grace window revoke
   their whole family before the error is returned;
 - requested scopes on refresh are narrowed to what was granted, never
   refused (clients send their own, such as C{claudeai}).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import re
from typing import Any

import attrs
from oauthlib.oauth2 import RequestValidator
from oauthlib.oauth2.rfc6749 import errors
from oauthlib.oauth2.rfc6749.utils import scope_to_list

from fjmcp.oauth.clients import ClientRegistry
from fjmcp.oauth.registration import ClientMetadata
from fjmcp.secrets.crypto import constant_time_equal, token_hash
from fjmcp.store.clients import ClientRecord
from fjmcp.store.tokens import RefreshTokenRecord, TokenTransaction

# RFC 7636 section 4.1: 43 to 128 characters of the unreserved set.
CODE_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")


def same_resource(given: str, expected: str) -> bool:
    """
    RFC 8707 resources compared as clients send them: with or without a
    trailing slash (interop trap 1).
    """
    return given.rstrip("/") == expected.rstrip("/")


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class RefreshVerdict(enum.Enum):
    """
    What presenting a refresh token at a given time means.
    """

    OK = "ok"
    REVOKED = "revoked"
    REUSED = "reused"  # rotated, and the grace window is over: revoke the family
    EXPIRED = "expired"


def refresh_verdict(record: RefreshTokenRecord, now: float, grace: float) -> RefreshVerdict:
    """
    The family rules for one refresh token, in the order they apply:

     1. a revoked family (or token) stays dead;
     2. a token exchanged before is still good for C{grace} seconds after
        its first exchange (clients refresh concurrently); after that,
        presenting it is reuse, and the caller revokes the family;
     3. an expired token is refused (nothing else happens);
     4. otherwise it is good.
    """
    if record.family.revoked or record.revoked_at is not None:
        return RefreshVerdict.REVOKED
    if record.rotated_at is not None and now - record.rotated_at > grace:
        return RefreshVerdict.REUSED
    if now >= record.expires_at:
        return RefreshVerdict.EXPIRED
    return RefreshVerdict.OK


@attrs.frozen
class ClientCredentials:
    """
    Who the client says it is, as taken from the request before any
    database work: C{method} is C{client_secret_basic} (HTTP Basic),
    C{client_secret_post} (secret in the body) or C{none}.
    """

    client_id: str
    secret: str | None = attrs.field(repr=False)
    method: str


class CodeRaceError(Exception):
    """
    An authorization code validated as unused could not be claimed.  Cannot
    happen while writers are serialised (BEGIN IMMEDIATE); if it does, the
    transaction is rolled back and the caller treats it as a replay.
    """

    def __init__(self, family_id: str) -> None:
        super().__init__(family_id)
        self.family_id = family_id


class GrantValidator(RequestValidator):
    """
    Answers oauthlib for one token or revocation request, inside that
    request's transaction.
    """

    def __init__(
        self,
        tx: TokenTransaction,
        credentials: ClientCredentials,
        *,
        resource: str,
        access_token_lifetime: float,
        refresh_token_lifetime: float,
        refresh_grace_period: float,
    ) -> None:
        self._tx = tx
        self._credentials = credentials
        self._resource = resource
        self._access_lifetime = access_token_lifetime
        self._refresh_lifetime = refresh_token_lifetime
        self._grace = refresh_grace_period
        self._client: ClientRecord | None = None
        self._client_loaded = False
        # What the grant validated, for save_token and the caller.
        self.family_id: str | None = None
        # Grants this call revoked, so the caller can end their sessions once
        # the transaction has committed.
        self.revoked_families: list[str] = []
        self.forgejo_user_id: int | None = None
        self._code_hash: bytes | None = None
        self._code_challenge: str | None = None
        self._redirect_uri: str | None = None
        self._refresh_hash: bytes | None = None
        self._family_scope = ""

    def _revoke_family(self, family_id: str, reason: str) -> None:
        if self._tx.revoke_family(family_id, reason):
            self.revoked_families.append(family_id)

    # --- clients

    def _load_client(self) -> ClientRecord | None:
        # Loaded once per call and reused by every hook, as
        # django-oauth-toolkit caches it on the request.
        if not self._client_loaded:
            self._client = self._tx.client(self._credentials.client_id)
            self._client_loaded = True
        return self._client

    def _known_client(self, request: Any) -> ClientRecord:
        client = self._load_client()
        if client is None:
            # 401, so that a client holding a forgotten registration
            # registers again (interop trap 10).
            raise errors.InvalidClientError(
                description="unknown client_id; register again", request=request
            )
        return client

    @staticmethod
    def _is_public(client: ClientRecord) -> bool:
        return bool(ClientMetadata.from_json(client.metadata).is_public)

    def client_authentication_required(self, request: Any, *args: Any, **kwargs: Any) -> bool:
        client = self._load_client()
        # An unknown client goes down the authenticating path and fails there.
        return client is None or not self._is_public(client)

    def authenticate_client(self, request: Any, *args: Any, **kwargs: Any) -> bool:
        """
        A confidential client proves its secret.  Either secret method is
        accepted whatever was registered: both prove the same secret, and
        clients have been seen registering one and using the other.
        """
        client = self._known_client(request)
        if self._credentials.method == "none" or not self._credentials.secret:
            raise errors.InvalidClientError(
                description="this client must authenticate with its client secret",
                request=request,
            )
        if not ClientRegistry.secret_matches(client, self._credentials.secret):
            raise errors.InvalidClientError(
                description="client authentication failed", request=request
            )
        request.client = client
        return True

    def authenticate_client_id(
        self, client_id: str, request: Any, *args: Any, **kwargs: Any
    ) -> bool:
        """
        A public client only names itself.  A secret it sends anyway is
        ignored: none was issued to it, so the secret proves nothing, and
        refusing it would only break clients with a confused configuration.
        """
        request.client = self._known_client(request)
        return True

    def validate_grant_type(
        self, client_id: str, grant_type: str, client: Any, request: Any, *args: Any, **kwargs: Any
    ) -> bool:
        # Registered grant_types are the client's own restriction (RFC 7591),
        # and many register the default (authorization_code alone) yet
        # refresh; both grants the broker serves are open to every client.
        return grant_type in ("authorization_code", "refresh_token")

    # --- authorization codes

    def validate_code(
        self, client_id: str, code: str, client: Any, request: Any, *args: Any, **kwargs: Any
    ) -> bool:
        code_hash = token_hash(code)
        record = self._tx.authorization_code(code_hash)
        if record is None:
            raise errors.InvalidGrantError(
                description="unknown or pruned authorization code", request=request
            )
        family = record.family
        if family.client_id != client.client_id:
            raise errors.InvalidGrantError(
                description="the authorization code was issued to another client",
                request=request,
            )
        if record.used_at is not None:
            # RFC 6749 section 4.1.2 and 10.5: a replayed code revokes the
            # tokens issued from it.  Raised inside oauthlib's validation, so
            # the revocation commits with the error response.
            self._revoke_family(family.family_id, "authorization code replayed")
            raise errors.InvalidGrantError(
                description="the authorization code was already used; "
                "the tokens issued from it are revoked",
                request=request,
            )
        if family.revoked:
            raise errors.InvalidGrantError(
                description="this authorization was revoked", request=request
            )
        if self._tx.now >= record.expires_at:
            raise errors.InvalidGrantError(
                description="the authorization code expired", request=request
            )
        if record.code_challenge_method != "S256":
            raise errors.InvalidGrantError(
                description="the authorization code was not bound with PKCE S256",
                request=request,
            )
        if not same_resource(family.resource, self._resource):
            raise errors.InvalidGrantError(
                description="the authorization code is for another resource", request=request
            )
        verifier = request.code_verifier
        if verifier is None:
            raise errors.InvalidGrantError(
                description="code_verifier is required (PKCE)", request=request
            )
        if not CODE_VERIFIER.fullmatch(verifier):
            raise errors.InvalidGrantError(
                description="code_verifier must be 43 to 128 unreserved characters",
                request=request,
            )
        # oauthlib checks the verifier again after this; doing it here too
        # gives the client a description and compares in constant time.
        if not constant_time_equal(s256(verifier), record.code_challenge):
            raise errors.InvalidGrantError(
                description="code_verifier does not match the code_challenge", request=request
            )
        self._code_hash = code_hash
        self._code_challenge = record.code_challenge
        self._redirect_uri = record.redirect_uri
        self.family_id = family.family_id
        self.forgejo_user_id = family.forgejo_user_id
        request.user = family.forgejo_user_id
        # The code's grant decides the scope; a scope parameter is ignored.
        request.scopes = scope_to_list(family.scope) or []
        return True

    def is_pkce_required(self, client_id: str, request: Any) -> bool:
        return True

    def get_code_challenge(self, code: str, request: Any) -> str | None:
        return self._code_challenge

    def get_code_challenge_method(self, code: str, request: Any) -> str:
        return "S256"

    def get_default_redirect_uri(
        self, client_id: str, request: Any, *args: Any, **kwargs: Any
    ) -> str | None:
        # The authorize endpoint lets a client with exactly one registered
        # redirect URI leave it out; then the token request may as well.
        client = request.client
        if client is None:
            return None
        uris = ClientMetadata.from_json(client.metadata).redirect_uris
        return uris[0] if len(uris) == 1 else None

    def confirm_redirect_uri(
        self,
        client_id: str,
        code: str,
        redirect_uri: str,
        client: Any,
        request: Any,
        *args: Any,
        **kwargs: Any,
    ) -> bool:
        if redirect_uri != self._redirect_uri:
            # RFC 6749 sections 4.1.3 and 5.2: invalid_grant (oauthlib would
            # say invalid_request).
            raise errors.InvalidGrantError(
                description="redirect_uri does not match the authorization request",
                request=request,
            )
        return True

    def invalidate_authorization_code(
        self, client_id: str, code: str, request: Any, *args: Any, **kwargs: Any
    ) -> None:
        # The write enforces single use, whatever validate_code saw.
        assert self._code_hash is not None and self.family_id is not None
        if not self._tx.claim_authorization_code(self._code_hash):
            raise CodeRaceError(self.family_id)

    # --- refresh tokens

    def validate_refresh_token(
        self, refresh_token: str, client: Any, request: Any, *args: Any, **kwargs: Any
    ) -> bool:
        refresh_hash = token_hash(refresh_token)
        record = self._tx.refresh_token(refresh_hash)
        if record is None:
            raise errors.InvalidGrantError(description="unknown refresh token", request=request)
        family = record.family
        if family.client_id != client.client_id:
            raise errors.InvalidGrantError(
                description="the refresh token was issued to another client", request=request
            )
        verdict = refresh_verdict(record, self._tx.now, self._grace)
        if verdict is RefreshVerdict.REVOKED:
            raise errors.InvalidGrantError(
                description="this authorization was revoked; sign in again", request=request
            )
        if verdict is RefreshVerdict.REUSED:
            # Interop trap 7: reuse after the grace window means the token
            # leaked (or a client lost track); kill the whole family.
            self._revoke_family(family.family_id, "refresh token reused after grace period")
            raise errors.InvalidGrantError(
                description="the refresh token was already used; this authorization is "
                "revoked, sign in again",
                request=request,
            )
        if verdict is RefreshVerdict.EXPIRED:
            raise errors.InvalidGrantError(
                description="the refresh token expired; sign in again", request=request
            )
        if not same_resource(family.resource, self._resource):
            raise errors.InvalidGrantError(
                description="the refresh token is for another resource", request=request
            )
        self._refresh_hash = refresh_hash
        self.family_id = family.family_id
        self.forgejo_user_id = family.forgejo_user_id
        self._family_scope = family.scope
        request.user = family.forgejo_user_id
        return True

    def get_original_scopes(
        self, refresh_token: str, request: Any, *args: Any, **kwargs: Any
    ) -> list[str]:
        return scope_to_list(self._family_scope) or []

    def is_within_original_scope(
        self, request_scopes: list[str], refresh_token: str, request: Any, *args: Any, **kwargs: Any
    ) -> bool:
        # Never refuse a scope; narrow_scopes drops what was not granted.
        return True

    def narrow_scopes(self, request: Any) -> None:
        """
        A post-token hook of the refresh grant: the new access token gets
        the requested scopes that were granted, or the family's scope when
        none of them were (RFC 6749 section 3.3 lets the server ignore a
        requested scope; the response always says which scope was issued).
        """
        granted = scope_to_list(self._family_scope) or []
        asked = request.scopes or []
        request.scopes = [s for s in asked if s in granted] or granted

    def rotate_refresh_token(self, request: Any) -> bool:
        # OAuth 2.1: refresh tokens of public clients must rotate; the broker
        # rotates everyone's.
        return True

    # --- issuing

    def save_token(self, token: dict[str, Any], request: Any, *args: Any, **kwargs: Any) -> None:
        assert self.family_id is not None
        now = self._tx.now
        refresh = token.get("refresh_token")
        self._tx.add_tokens(
            self.family_id,
            token_hash(token["access_token"]),
            now + self._access_lifetime,
            token.get("scope", ""),
            token_hash(refresh) if refresh else None,
            now + self._refresh_lifetime,
        )
        if self._refresh_hash is not None:
            self._tx.mark_rotated(self._refresh_hash)

    # --- revocation (RFC 7009)

    def revoke_token(
        self, token: str, token_type_hint: str | None, request: Any, *args: Any, **kwargs: Any
    ) -> None:
        """
        An access token revokes itself; a refresh token revokes its family.
        Another client's token, or an unknown one, is left alone without
        saying so (the answer is 200 either way, so it is no oracle).
        """
        digest = token_hash(token)
        client_id = request.client.client_id
        lookups = ["access_token", "refresh_token"]
        if token_type_hint == "refresh_token":  # noqa: S105 - a hint name
            lookups.reverse()
        for kind in lookups:
            if kind == "access_token":
                access = self._tx.access_token(digest)
                if access is not None:
                    if access.family.client_id == client_id:
                        self._tx.revoke_access_token(digest)
                    return
            else:
                refresh = self._tx.refresh_token(digest)
                if refresh is not None:
                    if refresh.family.client_id == client_id:
                        self._revoke_family(refresh.family.family_id, "revoked by the client")
                    return
