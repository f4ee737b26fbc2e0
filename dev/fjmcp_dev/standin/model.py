"""
The stand-in Forgejo's world: seeded users, repositories, issues and files,
OAuth2 applications, and Forgejo's token rules (one grant per user+app whose
counter invalidates every older refresh token, JWT access tokens, expiry).

Pure domain code with an injected clock: no HTTP here, so the token rules
can be tested (and property-tested) directly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

ACCESS_TOKEN_LIFETIME = 3600
REFRESH_TOKEN_LIFETIME = 730 * 3600
VERSION = "11.0.1+gitea-1.22.0"

SCOPE_CATEGORIES = (
    "activitypub",
    "admin",
    "issue",
    "misc",
    "notification",
    "organization",
    "package",
    "repository",
    "user",
)


class OAuthError(Exception):
    """
    An OAuth2 error as Forgejo reports it: C{error} code and description.
    """

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description


@attrs.define
class User:
    id: int
    login: str
    full_name: str
    email: str
    is_admin: bool = False
    password: str = "password"


@attrs.define
class Issue:
    id: int
    number: int
    title: str
    body: str
    author: str
    state: str = "open"
    created: float = 1704164645.0


@attrs.define
class Repo:
    id: int
    owner: str
    name: str
    description: str = ""
    private: bool = False
    default_branch: str = "main"
    issues: list[Issue] = attrs.Factory(list)
    files: dict[str, str] = attrs.Factory(dict)
    collaborators: list[str] = attrs.Factory(list)
    created: float = 1704164645.0

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


@attrs.define
class App:
    """
    An OAuth2 application registered in Forgejo.
    """

    client_id: str
    client_secret: str
    name: str
    redirect_uris: list[str]
    confidential: bool
    owner_id: int = 0


@attrs.define
class Grant:
    """
    Forgejo's single grant per (user, application).  Every token issue bumps
    C{counter}; a refresh token carries the counter it was issued with.
    """

    id: int
    user_id: int
    client_id: str
    scope: str
    counter: int = 1


@attrs.define
class AuthorizationCode:
    """
    Single use, and (as in Forgejo) without a lifetime of its own.
    """

    code: str
    grant_id: int
    redirect_uri: str
    code_challenge: str
    code_challenge_method: str


@attrs.frozen
class TokenResponse:
    access_token: str
    refresh_token: str
    expires_in: int
    id_token: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "access_token": self.access_token,
            "token_type": "bearer",
            "expires_in": self.expires_in,
            "refresh_token": self.refresh_token,
        }
        if self.id_token is not None:
            body["id_token"] = self.id_token
        return body


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forgejo_secret(prefix: str) -> str:
    return prefix + base64.b32encode(secrets.token_bytes(32)).decode().rstrip("=").lower()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def redirect_uri_matches(registered: list[str], given: str, public_client: bool) -> bool:
    """
    Forgejo's rule: the whole URI compared case-insensitively with one
    trailing slash trimmed; for public clients an http loopback IP with a
    port also matches the registration without the port (RFC 8252).
    """

    def norm(uri: str) -> str:
        uri = uri.lower()
        return uri[:-1] if uri.endswith("/") else uri

    candidates = {norm(given)}
    if public_client:
        # A URI Python cannot parse (bad port, bad IPv6 literal) just gets
        # no loopback leniency: it is a 400, not a crash.
        try:
            parts = urlsplit(given)
            hostname = parts.hostname or ""
            loopback = (
                parts.scheme == "http"
                and parts.port is not None
                and ipaddress.ip_address(hostname).is_loopback
            )
        except ValueError:
            loopback = False
        if loopback:
            host = f"[{hostname}]" if ":" in hostname else hostname
            candidates.add(norm(urlunsplit(parts._replace(netloc=host))))
    return any(norm(r) in candidates for r in registered)


def pkce_verifies(verifier: str, challenge: str, method: str) -> bool:
    if method == "S256":
        computed = _b64(hashlib.sha256(verifier.encode()).digest())
    elif method in ("plain", ""):
        computed = verifier
    else:
        return False
    return hmac.compare_digest(computed.encode(), challenge.encode())


def parse_scope(scope: str) -> set[str]:
    """
    The API scopes a grant's space-separated C{scope} allows.  Values that
    are not API scopes (C{openid}, C{profile}, C{claudeai}, ...) are ignored;
    a grant that names no API scope at all gets C{all}.
    """
    known = {"all", "public-only"} | {
        f"{level}:{cat}" for level in ("read", "write") for cat in SCOPE_CATEGORIES
    }
    # Forgejo splits on single spaces, so "read:user,read:issue" is one
    # unknown value, not two scopes.
    scopes = {s for s in scope.split(" ") if s in known}
    if not scopes:
        scopes.add("all")
    return scopes


def scope_allows(scopes: set[str], required: str) -> bool:
    """
    Does a grant with C{scopes} satisfy C{required} (e.g. C{read:user})?
    C{write:X} implies C{read:X}; C{all} implies everything.
    """
    if "all" in scopes or required in scopes:
        return True
    level, _, category = required.partition(":")
    return level == "read" and f"write:{category}" in scopes


class Forge:
    """
    The stand-in's whole state, in memory.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        access_token_lifetime: int = ACCESS_TOKEN_LIFETIME,
        invalidate_refresh_tokens: bool = True,
    ) -> None:
        self._clock = clock
        self._signing_key = secrets.token_bytes(32)
        self.access_token_lifetime = access_token_lifetime
        self.invalidate_refresh_tokens = invalidate_refresh_tokens
        # The id_token's C{iss}: Forgejo's AppURL without its trailing slash
        # (the web side sets it to its base URL).
        self.issuer = "http://forgejo.invalid"
        self.users: dict[int, User] = {}
        self.repos: list[Repo] = []
        self.apps: dict[str, App] = {}
        self.grants: dict[int, Grant] = {}
        self.codes: dict[str, AuthorizationCode] = {}
        self._next_grant = 1
        self._next_id = 1000

    def now(self) -> float:
        return self._clock()

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # --- people and things

    def add_user(self, login: str, full_name: str = "", is_admin: bool = False) -> User:
        user = User(
            id=len(self.users) + 1,
            login=login,
            full_name=full_name or login.title(),
            email=f"{login}@example.invalid",
            is_admin=is_admin,
        )
        self.users[user.id] = user
        return user

    def user_by_login(self, login: str) -> User | None:
        return next((u for u in self.users.values() if u.login == login), None)

    def add_repo(self, owner: str, name: str, **kwargs: Any) -> Repo:
        repo = Repo(id=len(self.repos) + 1, owner=owner, name=name, **kwargs)
        self.repos.append(repo)
        return repo

    def repo(self, owner: str, name: str) -> Repo | None:
        return next(
            (
                r
                for r in self.repos
                if r.owner.lower() == owner.lower() and r.name.lower() == name.lower()
            ),
            None,
        )

    def can_see(self, user: User, repo: Repo, public_only: bool) -> bool:
        if not repo.private:
            return True
        if public_only:
            return False
        return user.is_admin or repo.owner == user.login or user.login in repo.collaborators

    def repos_of(self, user: User) -> list[Repo]:
        return [r for r in self.repos if r.owner == user.login or user.login in r.collaborators]

    # --- OAuth2 applications

    def add_app(
        self,
        name: str,
        redirect_uris: list[str],
        confidential: bool = True,
        client_id: str | None = None,
        client_secret: str | None = None,
        owner_id: int = 0,
    ) -> App:
        app = App(
            client_id=client_id or str(uuid.uuid4()),
            client_secret=client_secret or _forgejo_secret("gto_"),
            name=name,
            redirect_uris=redirect_uris,
            confidential=confidential,
            owner_id=owner_id,
        )
        self.apps[app.client_id] = app
        return app

    def grant_for(self, user_id: int, client_id: str) -> Grant | None:
        return next(
            (g for g in self.grants.values() if g.user_id == user_id and g.client_id == client_id),
            None,
        )

    def ensure_grant(self, user_id: int, client_id: str, scope: str) -> Grant:
        grant = self.grant_for(user_id, client_id)
        if grant is None:
            grant = Grant(self._next_grant, user_id, client_id, scope)
            self._next_grant += 1
            self.grants[grant.id] = grant
        else:
            grant.scope = scope
        return grant

    def revoke_grant(self, user_id: int, client_id: str) -> None:
        """
        What a user removing an authorized application does: every token of
        that grant stops working at once.
        """
        grant = self.grant_for(user_id, client_id)
        if grant is not None:
            del self.grants[grant.id]

    def issue_code(self, grant: Grant, redirect_uri: str, code_challenge: str, method: str) -> str:
        code = _forgejo_secret("gta_")
        self.codes[code] = AuthorizationCode(code, grant.id, redirect_uri, code_challenge, method)
        return code

    # --- tokens

    def _sign(self, claims: dict[str, Any]) -> str:
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        sig = hmac.new(self._signing_key, f"{header}.{payload}".encode(), hashlib.sha256)
        return f"{header}.{payload}.{_b64(sig.digest())}"

    def _verify(self, token: str) -> dict[str, Any] | None:
        parts = token.split(".")
        if len(parts) != 3:
            return None
        sig = hmac.new(self._signing_key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256)
        try:
            if not hmac.compare_digest(_b64(sig.digest()), parts[2]):
                return None
            claims = json.loads(_unb64(parts[1]))
        except (ValueError, TypeError):
            return None
        return claims if isinstance(claims, dict) else None

    def _issue(self, grant: Grant, with_id_token: bool, app: App) -> TokenResponse:
        now = int(self.now())
        # Every issue for this grant (a code exchange too) moves the counter,
        # which is what makes every earlier refresh token stale.
        grant.counter += 1
        access = self._sign(
            {
                "gnt": grant.id,
                "tt": 0,
                "exp": now + self.access_token_lifetime,
                "iat": now,
                "jti": secrets.token_hex(8),
            }
        )
        refresh = self._sign(
            {
                "gnt": grant.id,
                "tt": 1,
                "cnt": grant.counter,
                "exp": now + REFRESH_TOKEN_LIFETIME,
                "iat": now,
                "jti": secrets.token_hex(8),
            }
        )
        id_token = None
        if with_id_token:
            user = self.users[grant.user_id]
            id_token = self._sign(
                {
                    "iss": self.issuer,
                    "sub": str(user.id),
                    "aud": [app.client_id],
                    "exp": now + self.access_token_lifetime,
                    "iat": now,
                    "name": user.full_name,
                    "preferred_username": user.login,
                }
            )
        return TokenResponse(access, refresh, self.access_token_lifetime, id_token)

    def authenticate_client(
        self, client_id: str, client_secret: str | None, grant_type: str
    ) -> App:
        """
        Forgejo's client check, with its quirks: the same failure is
        C{unauthorized_client} on the code grant but C{invalid_client} on the
        refresh grant, and the unknown-client text quotes differently.
        """
        refreshing = grant_type == "refresh_token"
        app = self.apps.get(client_id)
        if app is None:
            quoted = json.dumps(client_id) if refreshing else f"'{client_id}'"
            raise OAuthError("invalid_client", f"cannot load client with client id: {quoted}")
        if app.confidential:
            failure = "invalid_client" if refreshing else "unauthorized_client"
            if not client_secret:
                raise OAuthError(failure, "invalid empty client secret")
            if not hmac.compare_digest(client_secret.encode(), app.client_secret.encode()):
                raise OAuthError(failure, "invalid client secret")
        return app

    def exchange_code(
        self, app: App, code: str, redirect_uri: str, code_verifier: str
    ) -> TokenResponse:
        if redirect_uri and not redirect_uri_matches(
            app.redirect_uris, redirect_uri, not app.confidential
        ):
            raise OAuthError("unauthorized_client", "unexpected redirect URI")
        auth = self.codes.get(code)
        if auth is None:
            raise OAuthError("unauthorized_client", "client is not authorized")
        if auth.code_challenge_method and not pkce_verifies(
            code_verifier, auth.code_challenge, auth.code_challenge_method
        ):
            # A failed verifier does not use the code up.
            raise OAuthError("unauthorized_client", "failed PKCE code challenge")
        grant = self.grants.get(auth.grant_id)
        if grant is None or grant.client_id != app.client_id:
            raise OAuthError("invalid_grant", "invalid grant")
        del self.codes[code]
        return self._issue(grant, "openid" in grant.scope.split(), app)

    def refresh(self, app: App, refresh_token: str) -> TokenResponse:
        claims = self._verify(refresh_token)
        # A JWT is expired from its C{exp} second on (RFC 7519, and golang-jwt).
        if claims is None or claims.get("exp", 0) <= self.now():
            raise OAuthError("unauthorized_client", "unable to parse refresh token")
        grant = self.grants.get(claims.get("gnt", -1))
        if grant is None:
            raise OAuthError("invalid_grant", "grant does not exist")
        counter = claims.get("cnt", 0)
        if self.invalidate_refresh_tokens and (counter == 0 or counter != grant.counter):
            raise OAuthError("unauthorized_client", "token was already used")
        return self._issue(grant, "openid" in grant.scope.split(), app)

    def grant_for_token(self, token: str, access_only: bool = True) -> Grant | None:
        """
        The live grant behind a token, or None when the token is not ours,
        expired, issued in the future, of the wrong type, or its grant was
        removed (that is how a user's "revoke" reaches every token at once).
        """
        claims = self._verify(token)
        now = self.now()
        if (
            claims is None
            or (access_only and claims.get("tt") != 0)
            or claims.get("exp", 0) <= now
            or claims.get("iat", 0) > now + 60
        ):
            return None
        return self.grants.get(claims.get("gnt", -1))

    def user_for_access_token(self, token: str) -> tuple[User, set[str]] | None:
        """
        The user and API scopes behind an access token.
        """
        grant = self.grant_for_token(token)
        if grant is None:
            return None
        return self.users[grant.user_id], parse_scope(grant.scope)


def seed(forge: Forge) -> None:
    """
    Users and repositories the tests and the demo rely on.
    """
    forge.add_user("alice", "Alice Liddell", is_admin=True)
    forge.add_user("bob", "Bob Builder")
    forge.add_user("carol", "Carol Danvers")
    hello = forge.add_repo("alice", "hello-world", description="Alice's first repository")
    hello.files["README.md"] = "# hello-world\n\nA repository on the Forgejo stand-in.\n"
    hello.issues.append(Issue(forge.new_id(), 1, "Say hello in French", "Bonjour !", "bob"))
    hello.issues.append(
        Issue(
            forge.new_id(), 2, "Fix the greeting's typo", "Helo -> Hello", "alice", state="closed"
        )
    )
    plans = forge.add_repo("alice", "secret-plans", description="Not for Bob", private=True)
    plans.issues.append(Issue(forge.new_id(), 1, "World domination", "Step 1: ...", "alice"))
    widgets = forge.add_repo("bob", "widgets", description="Bob's widget factory")
    widgets.files["README.md"] = "# widgets\n"
    widgets.issues.append(Issue(forge.new_id(), 1, "More widgets", "We need more.", "bob"))
    forge.add_repo("carol", "notes", description="Carol's notes", private=True)
