"""
Shared helpers for the Forgejo stand-in's tests (no tests in here): a seeded
stand-in over a controllable clock, driven in memory through
L{treq.testing.StubTreq}, with shortcuts for the OAuth2 flows.

Everything the stand-in does in memory completes synchronously, so the
helpers return plain values and the tests can be L{SynchronousTestCase}s
(which also lets hypothesis drive them).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from fjmcp_dev.standin.model import ACCESS_TOKEN_LIFETIME, App, Forge, seed
from fjmcp_dev.standin.web import StandinForgejo
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

BASE = "http://forgejo.test"
START = 1_750_000_000.0

BROKER_ID = "fjmcp-broker"
BROKER_SECRET = "gto_brokersecret"
BROKER_REDIRECT = "http://127.0.0.1:8080/oauth/callback"
PUBLIC_ID = "public-cli"
PUBLIC_REDIRECT = "http://127.0.0.1/callback"

# RFC 7636, appendix B.
VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


def resolved(d: Deferred[Any]) -> Any:
    """
    The result of a Deferred that has already fired (raising its failure).
    """
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the stand-in did not answer synchronously"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert isinstance(claims, dict)
    return claims


@attrs.frozen
class Reply:
    """
    A finished HTTP response: status, headers, whole body.
    """

    code: int
    headers: Headers
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def all_headers(self, name: str) -> list[str]:
        return list(self.headers.getRawHeaders(name) or [])

    @property
    def location(self) -> str:
        location = self.header("location")
        assert location is not None, f"no Location in a {self.code} response: {self.body!r}"
        return location

    @property
    def query(self) -> dict[str, str]:
        """
        The redirect's query parameters (blank ones kept).
        """
        return {
            k: v[0]
            for k, v in parse_qs(urlsplit(self.location).query, keep_blank_values=True).items()
        }

    def cookie(self, name: str) -> str | None:
        """
        The (unquoted) value of a cookie this response sets.
        """
        for header in self.all_headers("set-cookie"):
            key, _, rest = header.partition("=")
            if key == name:
                return unquote(rest.split(";", 1)[0])
        return None


@attrs.frozen
class Form:
    action: str
    fields: dict[str, str]
    buttons: list[tuple[str, str]]


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(Form(a.get("action", ""), {}, []))
        elif tag == "input" and self.forms:
            self.forms[-1].fields[a["name"]] = a.get("value", "")
        elif tag == "button" and self.forms:
            self.forms[-1].buttons.append((a.get("name", ""), a.get("value", "")))


def forms(html: str) -> list[Form]:
    parser = _FormParser()
    parser.feed(html)
    return parser.forms


class Standin:
    """
    A seeded stand-in (users alice, bob, carol) with two extra OAuth2 apps:
    the broker (confidential) and a public CLI client, a clock starting at
    L{START}, and a cookie-keeping in-memory HTTP client (C{browser}).
    """

    def __init__(
        self,
        test_login: bool = True,
        access_token_lifetime: int = ACCESS_TOKEN_LIFETIME,
        base_url: str = BASE,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.forge = Forge(self.clock.seconds, access_token_lifetime=access_token_lifetime)
        seed(self.forge)
        self.broker = self.forge.add_app(
            "fjmcp broker",
            [BROKER_REDIRECT],
            confidential=True,
            client_id=BROKER_ID,
            client_secret=BROKER_SECRET,
        )
        self.public = self.forge.add_app(
            "CLI", [PUBLIC_REDIRECT], confidential=False, client_id=PUBLIC_ID
        )
        self.web = StandinForgejo(self.forge, base_url, test_login=test_login)
        self.browser = self.new_client()

    def new_client(self) -> StubTreq:
        """
        A client with an empty cookie jar (a different browser).
        """
        return StubTreq(self.web.resource())

    def user_id(self, login: str) -> int:
        user = self.forge.user_by_login(login)
        assert user is not None
        return user.id

    # --- plain HTTP

    def request(
        self, method: str, path: str, client: StubTreq | None = None, **kwargs: Any
    ) -> Reply:
        kwargs.setdefault("allow_redirects", False)
        client = client or self.browser
        response = resolved(client.request(method, BASE + path, **kwargs))
        body = resolved(response.content())
        return Reply(response.code, response.headers, body)

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Reply:
        return self.request("POST", path, **kwargs)

    # --- OAuth2

    def authorize(
        self,
        login: str | None = "alice",
        app: App | None = None,
        client: StubTreq | None = None,
        **params: str | None,
    ) -> Reply:
        """
        GET /login/oauth/authorize for C{app} (the broker by default), signed
        in through the test switch as C{login} unless that is None.  A
        parameter given as None is left out.
        """
        app = app or self.broker
        query: dict[str, str | None] = {
            "client_id": app.client_id,
            "redirect_uri": app.redirect_uris[0],
            "response_type": "code",
            "state": "st4te",
        }
        query.update(params)
        headers = {"X-Standin-Login": login} if login else {}
        return self.get(
            "/login/oauth/authorize",
            params={k: v for k, v in query.items() if v is not None},
            headers=headers,
            client=client,
        )

    def code(
        self,
        login: str = "alice",
        app: App | None = None,
        scope: str = "",
        verifier: str = VERIFIER,
        method: str = "S256",
    ) -> str:
        """
        An authorization code, through the test switch (consent approves
        itself).
        """
        challenge = s256(verifier) if method == "S256" else verifier
        reply = self.authorize(
            login,
            app=app,
            scope=scope,
            code_challenge=challenge,
            code_challenge_method=method,
        )
        assert reply.code == 303, (reply.code, reply.body)
        assert "code" in reply.query, reply.location
        return reply.query["code"]

    def token_request(self, **kwargs: Any) -> Reply:
        return self.post("/login/oauth/access_token", **kwargs)

    def exchange(
        self,
        code: str,
        app: App | None = None,
        verifier: str | None = VERIFIER,
        **extra: str | None,
    ) -> Reply:
        app = app or self.broker
        data: dict[str, str | None] = {
            "grant_type": "authorization_code",
            "code": code,
            "client_id": app.client_id,
            "client_secret": app.client_secret if app.confidential else None,
            "redirect_uri": app.redirect_uris[0],
            "code_verifier": verifier,
        }
        data.update(extra)
        return self.token_request(data={k: v for k, v in data.items() if v is not None})

    def refresh(self, refresh_token: str, app: App | None = None) -> Reply:
        app = app or self.broker
        data = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": app.client_id,
        }
        if app.confidential:
            data["client_secret"] = app.client_secret
        return self.token_request(data=data)

    def tokens(self, login: str = "alice", app: App | None = None, scope: str = "") -> Any:
        """
        The token response of a whole successful code flow.
        """
        reply = self.exchange(self.code(login, app=app, scope=scope), app=app)
        assert reply.code == 200, reply.body
        return reply.json()

    def access_token(self, login: str = "alice", scope: str = "") -> str:
        """
        An access token of C{login} for the broker, from a new grant with
        exactly C{scope}: an earlier grant is revoked first, since a
        returning user of a confidential app keeps the grant's first scope.
        """
        self.forge.revoke_grant(self.user_id(login), self.broker.client_id)
        token = self.tokens(login, scope=scope)["access_token"]
        assert isinstance(token, str)
        return token

    # --- API

    def api(
        self,
        path: str,
        token: str | None = None,
        scheme: str = "token",
        method: str = "GET",
        **kwargs: Any,
    ) -> Reply:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"{scheme} {token}"
        # A fresh client: API calls carry no session cookies.
        return self.request(
            method, "/api/v1" + path, client=self.new_client(), headers=headers, **kwargs
        )
