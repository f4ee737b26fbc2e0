"""
L{fjmcp.forgejo.client.ForgejoClient} over real loopback HTTP: against the Forgejo
stand-in for the OAuth flow and token rules, and against tiny canned servers
for the ways Forgejo can fail (refused, silent, 5xx, not JSON, too big).
"""

from __future__ import annotations

import base64
import gzip
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

from fjmcp_dev.standin.model import Forge, seed
from fjmcp_dev.standin.web import StandinForgejo
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from fjmcp import __version__
from fjmcp.forgejo.client import (
    REDACTED,
    ForgejoClient,
    ForgejoUser,
    UpstreamError,
    UpstreamRejectedError,
    UpstreamTokens,
    UpstreamUnavailableError,
)
from fjmcp.secrets.crypto import new_pkce_pair, new_token
from tests.helpers import http_client, serve

REDIRECT = "http://broker.test/oauth/callback"
SCOPES = ("read:user", "write:repository")
CLIENT_ID = "5a9c4f27-58a4-4c36-a0b8-8d1d0d7d5e61"
CLIENT_SECRET = "gto_cannedsecretthatmustnotleak"
MiB = 1024 * 1024


def token_json(**overrides: Any) -> bytes:
    body: dict[str, Any] = {
        "access_token": "eyJhbGciOi.canned-access.token",
        "token_type": "bearer",
        "expires_in": 3600,
        "refresh_token": "eyJhbGciOi.canned-refresh.token",
    }
    body.update(overrides)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


@implementer(ILogObserver)
class LogCollector:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def __call__(self, event: dict[str, Any]) -> None:
        self.lines.append(f"{formatEvent(event)} {event!r}")


class Secrets:
    """
    Every secret value a test handled, and the checks that no exception and
    no log line carries one.
    """

    def __init__(self, test: SynchronousTestCase, *initial: str) -> None:
        self.test = test
        self.values: set[str] = {s for s in initial if s}
        self.log: list[str] = []
        observer = LogCollector(self.log)
        globalLogPublisher.addObserver(observer)
        test.addCleanup(globalLogPublisher.removeObserver, observer)
        test.addCleanup(self.assertLogClean)

    def add(self, *values: str | None) -> None:
        self.values.update(v for v in values if v)

    def assertClean(self, error: BaseException) -> None:
        texts = [str(error), repr(error), *map(repr, error.args)]
        if isinstance(error, UpstreamRejectedError):
            texts += [error.error, error.description]
        for value in self.values:
            for text in texts:
                self.test.assertNotIn(value, text)
        # Nothing chained that a traceback printer would show.
        self.test.assertIsNone(error.__cause__)
        self.test.assertTrue(error.__context__ is None or error.__suppress_context__)

    def assertLogClean(self) -> None:
        for value in self.values:
            for line in self.log:
                self.test.assertNotIn(value, line)


def under_way(op: Awaitable[Any]) -> Deferred[Any]:
    """
    C{op} started, as a Deferred a test can look at before it ends.
    """

    async def run() -> Any:
        return await op

    return Deferred.fromCoroutine(run())


async def failure(
    test: TestCase, secrets: Secrets, kind: type[UpstreamError], op: Awaitable[Any]
) -> UpstreamError:
    """
    Await C{op}, expecting it to raise C{kind} with a clean message.
    """
    try:
        result = await op
    except UpstreamError as e:
        test.assertIsInstance(e, kind)
        secrets.assertClean(e)
        return e
    test.fail(f"expected {kind.__name__}, got {result!r}")


class StandinTests(TestCase):
    """
    The whole flow against the Forgejo stand-in: the browser leg with the
    stand-in's test login, then the broker's calls.
    """

    def setUp(self) -> None:
        # The broker's clock is ours to move; the stand-in runs on real time.
        self.clock = Clock()
        self.clock.advance(1000)
        self.forge = Forge(reactor.seconds)
        seed(self.forge)
        self.app = self.forge.add_app("fjmcp", [REDIRECT], confidential=True)
        standin = StandinForgejo(self.forge, "http://placeholder", test_login=True)
        self.url = serve(self, standin.resource())
        self.secrets = Secrets(self, self.app.client_secret)
        self.client = self.make_client()

    def make_client(self, **overrides: Any) -> ForgejoClient:
        kwargs: dict[str, Any] = {
            "http": http_client(),
            "clock": self.clock,
            "forgejo_url": self.url,
            "client_id": self.app.client_id,
            "client_secret": self.app.client_secret,
            "redirect_uri": REDIRECT,
            "scopes": SCOPES,
        }
        kwargs.update(overrides)
        return ForgejoClient(**kwargs)

    async def browser_login(
        self, login: str = "alice", client: ForgejoClient | None = None
    ) -> tuple[str, str]:
        """
        What the user's browser does: follow the authorize URL, signed in
        as C{login}, to the 303 back to the broker.  Returns the code and
        the PKCE verifier it belongs to.
        """
        verifier, challenge = new_pkce_pair()
        state = new_token()
        response = await http_client().get(
            (client or self.client).authorize_url(state, challenge),
            headers=Headers({"X-Standin-Login": [login]}),
            allow_redirects=False,
        )
        await response.content()
        self.assertEqual(response.code, 303)
        location = urlsplit(response.headers.getRawHeaders("location")[0])
        self.assertEqual(f"{location.scheme}://{location.netloc}{location.path}", REDIRECT)
        query = parse_qs(location.query)
        self.assertEqual(query["state"], [state])
        code = query["code"][0]
        self.secrets.add(code, verifier)
        return code, verifier

    async def tokens(self, login: str = "alice", client: ForgejoClient | None = None):
        client = client or self.client
        tokens = await client.exchange_code(*await self.browser_login(login, client))
        self.secrets.add(tokens.access_token, tokens.refresh_token)
        return tokens

    async def rejected(self, op: Awaitable[Any]) -> UpstreamRejectedError:
        e = await failure(self, self.secrets, UpstreamRejectedError, op)
        assert isinstance(e, UpstreamRejectedError)
        return e

    async def test_exchange_and_get_user(self) -> None:
        tokens = await self.tokens()
        self.assertIsInstance(tokens, UpstreamTokens)
        self.assertEqual(tokens.scope, "read:user write:repository")
        self.assertIsNotNone(tokens.refresh_token)
        self.assertEqual(tokens.access_token.count("."), 2)
        user = await self.client.get_user(tokens.access_token)
        self.assertEqual(user, ForgejoUser(id=1, login="alice", full_name="Alice Liddell"))
        # The calls are logged (without their secrets, as every test checks).
        self.assertTrue(any("/api/v1/user: HTTP 200" in line for line in self.secrets.log))
        # The tokens stay out of reprs (and so out of logged objects).
        self.assertNotIn(tokens.access_token, repr(tokens))
        assert tokens.refresh_token is not None
        self.assertNotIn(tokens.refresh_token, repr(tokens))

    async def test_expires_at_is_on_the_clients_clock(self) -> None:
        tokens = await self.tokens()
        self.assertEqual(tokens.expires_at, 1000 + 3600)
        # Forgejo's expires_in, which sets how early the token is renewed.
        self.assertEqual(tokens.lifetime, 3600)
        self.clock.advance(600)
        assert tokens.refresh_token is not None
        renewed = await self.client.refresh(tokens.refresh_token)
        self.assertEqual(renewed.expires_at, 1600 + 3600)

    async def test_refresh_rotates_and_old_token_is_rejected(self) -> None:
        first = await self.tokens()
        assert first.refresh_token is not None
        second = await self.client.refresh(first.refresh_token)
        self.secrets.add(second.access_token, second.refresh_token)
        self.assertNotEqual(second.refresh_token, first.refresh_token)
        self.assertNotEqual(second.access_token, first.access_token)
        self.assertEqual((await self.client.get_user(second.access_token)).login, "alice")

        e = await self.rejected(self.client.refresh(first.refresh_token))
        self.assertEqual(e.error, "unauthorized_client")
        self.assertEqual(e.description, "token was already used")
        self.assertIn("token refresh", str(e))
        assert second.refresh_token is not None
        third = await self.client.refresh(second.refresh_token)
        self.secrets.add(third.access_token, third.refresh_token)

    async def test_second_exchange_invalidates_earlier_refresh_token(self) -> None:
        first = await self.tokens("bob")
        second = await self.tokens("bob")
        assert first.refresh_token is not None and second.refresh_token is not None
        e = await self.rejected(self.client.refresh(first.refresh_token))
        self.assertEqual(e.error, "unauthorized_client")
        renewed = await self.client.refresh(second.refresh_token)
        self.secrets.add(renewed.access_token, renewed.refresh_token)
        self.assertEqual((await self.client.get_user(renewed.access_token)).id, 2)

    async def test_other_users_are_independent(self) -> None:
        alice = await self.tokens("alice")
        await self.tokens("carol")
        assert alice.refresh_token is not None
        renewed = await self.client.refresh(alice.refresh_token)
        self.secrets.add(renewed.access_token, renewed.refresh_token)
        self.assertEqual((await self.client.get_user(renewed.access_token)).login, "alice")

    async def test_revoked_grant(self) -> None:
        tokens = await self.tokens()
        assert tokens.refresh_token is not None
        self.forge.revoke_grant(1, self.app.client_id)
        e = await self.rejected(self.client.refresh(tokens.refresh_token))
        self.assertEqual(e.error, "invalid_grant")
        e = await self.rejected(self.client.get_user(tokens.access_token))
        self.assertEqual(e.error, "invalid_token")
        self.assertIn("user lookup", str(e))

    async def test_token_without_read_user(self) -> None:
        client = self.make_client(scopes=["read:repository"])
        tokens = await self.tokens("bob", client)
        e = await self.rejected(client.get_user(tokens.access_token))
        self.assertEqual(e.error, "insufficient_scope")
        self.assertIn("read:user", e.description)

    async def test_wrong_client_secret(self) -> None:
        tokens = await self.tokens()
        wrong = "gto_notthesecretatallnotatall"
        self.secrets.add(wrong)
        client = self.make_client(client_secret=wrong)
        code, verifier = await self.browser_login(client=client)
        e = await self.rejected(client.exchange_code(code, verifier))
        self.assertEqual((e.error, e.description), ("unauthorized_client", "invalid client secret"))
        # Forgejo's quirk: the same failure is invalid_client on a refresh.
        assert tokens.refresh_token is not None
        e = await self.rejected(client.refresh(tokens.refresh_token))
        self.assertEqual(e.error, "invalid_client")

    async def test_unknown_client(self) -> None:
        client = self.make_client(client_id="no-such-client")
        e = await self.rejected(client.refresh("eyJ.not.arefreshtoken"))
        self.assertEqual(e.error, "invalid_client")

    async def test_pkce_verifier_mismatch(self) -> None:
        code, _ = await self.browser_login()
        other, _ = new_pkce_pair()
        self.secrets.add(other)
        e = await self.rejected(self.client.exchange_code(code, other))
        self.assertEqual(
            (e.error, e.description), ("unauthorized_client", "failed PKCE code challenge")
        )

    async def test_code_is_single_use(self) -> None:
        code, verifier = await self.browser_login()
        tokens = await self.client.exchange_code(code, verifier)
        self.secrets.add(tokens.access_token, tokens.refresh_token)
        e = await self.rejected(self.client.exchange_code(code, verifier))
        self.assertEqual(e.error, "unauthorized_client")

    async def test_secret_that_needs_encoding(self) -> None:
        """
        A client secret that form-urlencoding would change still works:
        Forgejo does not decode Basic credentials, so such a secret goes in
        the body instead.
        """
        secret = "s3cret with+plus/slash:colon&amp"
        app = self.forge.add_app("odd", [REDIRECT], client_secret=secret)
        self.secrets.add(secret)
        client = self.make_client(client_id=app.client_id, client_secret=secret)
        tokens = await self.tokens("carol", client)
        self.assertEqual((await client.get_user(tokens.access_token)).login, "carol")

    async def test_forgejo_url_with_trailing_slash(self) -> None:
        client = self.make_client(forgejo_url=self.url + "/")
        self.assertTrue(client.authorize_url("s", "c").startswith(self.url + "/login/oauth/"))
        tokens = await self.tokens("alice", client)
        self.assertEqual((await client.get_user(tokens.access_token)).id, 1)


class Canned(Resource):
    """
    A server that answers every request the same way, remembering what it
    was asked.  C{stall}: C{"headers"} never answers, C{"body"} sends the
    headers and part of a body, then nothing.
    """

    isLeaf = True

    def __init__(
        self,
        code: int = 200,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        chunked: bool = False,
        stall: str | None = None,
    ) -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.chunked = chunked
        self.stall = stall
        self.requests: list[tuple[bytes, bytes, dict[bytes, Any], bytes]] = []
        self.arrived: Deferred[None] = Deferred()

    def render(self, request: Request) -> Any:
        assert request.method is not None and request.uri is not None
        headers = dict(request.requestHeaders.getAllRawHeaders())
        content: bytes = request.content.read() if request.content is not None else b""
        self.requests.append((request.method, request.uri, headers, content))
        if not self.arrived.called:
            self.arrived.callback(None)
        if self.stall == "headers":
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        if self.stall == "body":
            request.write(self.body[:10])
            return NOT_DONE_YET
        if self.chunked:
            for i in range(0, len(self.body), 4096):
                request.write(self.body[i : i + 4096])
            request.finish()
            return NOT_DONE_YET
        return self.body


class CannedTests(TestCase):
    """
    The client's limits and error mapping, against servers that misbehave.
    """

    def setUp(self) -> None:
        self.clock: Any = reactor
        self.secrets = Secrets(self, CLIENT_SECRET)

    def listen(self, resource: Resource) -> str:
        """
        Serve C{resource}; at cleanup, wait until every connection to it
        (even ones the client dropped mid-answer) is closed.
        """
        factory = WrappingFactory(Site(resource))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]

        async def cleanup() -> None:
            await maybeDeferred(port.stopListening)
            for _ in range(500):
                if not factory.protocols:
                    return
                await deferLater(reactor, 0.01, lambda: None)
            self.fail("server connections left open")

        self.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
        return f"http://127.0.0.1:{port.getHost().port}"

    def client(self, url: str, **overrides: Any) -> ForgejoClient:
        kwargs: dict[str, Any] = {
            "http": http_client(),
            "clock": self.clock,
            "forgejo_url": url,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "redirect_uri": REDIRECT,
            "scopes": SCOPES,
            "timeout": 5.0,
        }
        kwargs.update(overrides)
        return ForgejoClient(**kwargs)

    async def unavailable(self, op: Awaitable[Any], *fragments: str) -> UpstreamUnavailableError:
        e = await failure(self, self.secrets, UpstreamUnavailableError, op)
        assert isinstance(e, UpstreamUnavailableError)
        for fragment in fragments:
            self.assertIn(fragment, str(e))
        return e

    def all_operations(
        self, client: ForgejoClient
    ) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
        code, verifier, refresh, access = (
            "gta_cannedcodevalue",
            "cannedverifiervalue-abcdefghijklmnopqrstuvwxyz",
            "eyJ.cannedrefresh.value",
            "eyJ.cannedaccess.value",
        )
        self.secrets.add(code, verifier, refresh, access)
        return [
            ("code exchange", lambda: client.exchange_code(code, verifier)),
            ("token refresh", lambda: client.refresh(refresh)),
            ("user lookup", lambda: client.get_user(access)),
        ]

    async def test_request_shape(self) -> None:
        """
        Token requests: a form POST with HTTP Basic client authentication
        and nothing secret in the URL; API requests: C{token} auth.  All of
        them name fjmcp and ask for JSON.
        """
        canned = Canned(body=token_json())
        client = self.client(self.listen(canned))
        tokens = await client.exchange_code("gta_thecode", "the-verifier")
        self.assertEqual(tokens.refresh_token, "eyJhbGciOi.canned-refresh.token")
        await client.refresh("eyJ.old.refresh")
        canned.body = json.dumps({"id": 7, "login": "zed", "full_name": "Zed"}).encode()
        self.assertEqual(await client.get_user("eyJ.the.access"), ForgejoUser(7, "zed", "Zed"))

        basic = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        (m1, uri1, h1, b1), (m2, uri2, h2, b2), (m3, uri3, h3, b3) = canned.requests
        self.assertEqual((m1, uri1), (b"POST", b"/login/oauth/access_token"))
        self.assertEqual((m2, uri2), (b"POST", b"/login/oauth/access_token"))
        self.assertEqual((m3, uri3, b3), (b"GET", b"/api/v1/user", b""))
        self.assertEqual(
            dict(parse_qsl(b1.decode(), strict_parsing=True)),
            {
                "grant_type": "authorization_code",
                "code": "gta_thecode",
                "redirect_uri": REDIRECT,
                "code_verifier": "the-verifier",
            },
        )
        self.assertEqual(
            dict(parse_qsl(b2.decode(), strict_parsing=True)),
            {"grant_type": "refresh_token", "refresh_token": "eyJ.old.refresh"},
        )
        for headers in (h1, h2):
            self.assertEqual(headers[b"Authorization"], [basic.encode()])
            self.assertEqual(headers[b"Content-Type"], [b"application/x-www-form-urlencoded"])
        self.assertEqual(h3[b"Authorization"], [b"token eyJ.the.access"])
        for headers in (h1, h2, h3):
            self.assertEqual(headers[b"User-Agent"], [f"fjmcp/{__version__}".encode()])
            self.assertEqual(headers[b"Accept"], [b"application/json"])
            self.assertNotIn(b"Cookie", headers)

    async def test_odd_credentials_go_in_the_body(self) -> None:
        """
        Credentials that form-urlencoding would change are sent in the body:
        RFC 6749 encodes them inside Basic, Forgejo does not decode them.
        """
        canned = Canned(body=token_json())
        odd_id, odd_secret = "client id", "secret:with+plus&amp"
        self.secrets.add(odd_secret)
        client = self.client(self.listen(canned), client_id=odd_id, client_secret=odd_secret)
        await client.refresh("eyJ.old.refresh")
        [(_, _, headers, body)] = canned.requests
        self.assertNotIn(b"Authorization", headers)
        self.assertEqual(
            dict(parse_qsl(body.decode(), strict_parsing=True)),
            {
                "grant_type": "refresh_token",
                "refresh_token": "eyJ.old.refresh",
                "client_id": odd_id,
                "client_secret": odd_secret,
            },
        )

    async def test_token_answer_defaults_and_case(self) -> None:
        canned = Canned(body=token_json(expires_in=..., refresh_token=..., token_type="Bearer"))
        self.clock = Clock()
        self.clock.advance(50)
        tokens = await self.client(self.listen(canned)).refresh("eyJ.some.refresh")
        self.assertEqual(tokens.expires_at, 50 + 3600)
        self.assertEqual(tokens.lifetime, 3600)
        self.assertIsNone(tokens.refresh_token)
        self.assertEqual(tokens.scope, "read:user write:repository")

    async def test_malformed_token_answers(self) -> None:
        canned = Canned()
        client = self.client(self.listen(canned))
        for body in [
            b"not json at all",
            b"[]",
            b"",
            token_json(access_token=...),
            token_json(access_token=""),
            token_json(access_token=42),
            token_json(token_type=...),
            token_json(token_type="mac"),
            token_json(expires_in="3600"),
            token_json(expires_in=0),
            token_json(expires_in=-5),
            token_json(expires_in=True),
            token_json(expires_in=3600.5),
            token_json(refresh_token=5),
            token_json(refresh_token=""),
        ]:
            canned.body = body
            await self.unavailable(client.refresh("eyJ.some.refresh"), "token refresh")

    async def test_malformed_user_answers(self) -> None:
        canned = Canned()
        client = self.client(self.listen(canned))
        for user in [{}, {"id": "1", "login": "a"}, {"id": True, "login": "a"}, {"id": 1}, []]:
            canned.body = json.dumps(user).encode()
            await self.unavailable(client.get_user("eyJ.some.access"), "user lookup")
        canned.body = json.dumps({"id": 3, "login": "c", "full_name": None}).encode()
        self.assertEqual(await client.get_user("eyJ.some.access"), ForgejoUser(3, "c", ""))

    async def test_server_errors_are_unavailable(self) -> None:
        canned = Canned()
        client = self.client(self.listen(canned))
        for code, body in [
            (500, b'{"message": "internal error"}'),
            (502, b"<html>Bad Gateway</html>"),
            (503, b'{"error": "temporarily_unavailable"}'),
            (404, b"Not found"),
            (429, b"slow down"),
            (400, b"<html>400 Bad Request</html>"),
            (400, b'{"message": "not an oauth error"}'),
        ]:
            canned.code, canned.body = code, body
            for operation, call in self.all_operations(client):
                await self.unavailable(call(), operation, f"HTTP {code}")

    async def test_non_json_success(self) -> None:
        canned = Canned(body=b"<html>Sign in</html>", headers={"Content-Type": "text/html"})
        client = self.client(self.listen(canned))
        for operation, call in self.all_operations(client):
            await self.unavailable(call(), operation, "JSON")

    async def test_redirects_are_not_followed(self) -> None:
        target = Canned(body=token_json())
        canned = Canned(code=302, headers={"Location": self.listen(target) + "/elsewhere"})
        client = self.client(self.listen(canned))
        for operation, call in self.all_operations(client):
            await self.unavailable(call(), operation, "HTTP 302")
        self.assertEqual(target.requests, [])

    async def test_oauth_error_text_is_cleaned(self) -> None:
        """
        Forgejo's error text goes into the exception, but never a secret
        of the request, a control character, or more than 200 characters.
        """
        canned = Canned(code=400)
        client = self.client(self.listen(canned))
        refresh = "eyJ.echoed.refreshtoken"
        self.secrets.add(refresh)
        canned.body = json.dumps(
            {
                "error": "invalid_grant",
                "error_description": f"bad {refresh} for {CLIENT_SECRET}\r\nFAKE LOG LINE",
            }
        ).encode()
        e = await failure(self, self.secrets, UpstreamRejectedError, client.refresh(refresh))
        assert isinstance(e, UpstreamRejectedError)
        self.assertEqual(e.error, "invalid_grant")
        self.assertEqual(e.description, f"bad {REDACTED} for {REDACTED}??FAKE LOG LINE")
        canned.body = json.dumps({"error": "x" * 1000}).encode()
        e = await failure(self, self.secrets, UpstreamRejectedError, client.refresh(refresh))
        assert isinstance(e, UpstreamRejectedError)
        self.assertEqual(len(e.error), 200)
        self.assertEqual(e.description, "")

    async def test_401_token_error(self) -> None:
        canned = Canned(code=401, body=b'{"error": "invalid_client"}')
        client = self.client(self.listen(canned))
        e = await failure(self, self.secrets, UpstreamRejectedError, client.refresh("eyJ.r"))
        assert isinstance(e, UpstreamRejectedError)
        self.assertEqual((e.error, e.description), ("invalid_client", ""))

    async def test_connection_refused(self) -> None:
        site = Site(Resource())
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
        url = f"http://127.0.0.1:{port.getHost().port}"
        await maybeDeferred(port.stopListening)
        client = self.client(url, timeout=30.0)
        for operation, call in self.all_operations(client):
            started = time.monotonic()
            await self.unavailable(call(), operation, "cannot connect", "refused")
            self.assertLess(time.monotonic() - started, 5.0)

    async def test_oversized_answers(self) -> None:
        """
        Over the cap is unavailable, however the length is told: a
        Content-Length, chunks, or gzip that inflates past it.
        """
        big = b'{"id": 1, "login": "a", "pad": "' + b"x" * (2 * MiB) + b'"}'
        for canned in [
            Canned(body=big),
            Canned(body=big, chunked=True),
            Canned(body=gzip.compress(big), headers={"Content-Encoding": "gzip"}),
        ]:
            client = self.client(self.listen(canned))
            for operation, call in self.all_operations(client):
                await self.unavailable(call(), operation, f"larger than {MiB} bytes")

    async def test_cap_boundary(self) -> None:
        user = json.dumps({"id": 1, "login": "a", "full_name": "A"}).encode()
        for chunked in (False, True):
            canned = Canned(body=user.ljust(100), chunked=chunked)
            client = self.client(self.listen(canned), max_response_bytes=100)
            self.assertEqual((await client.get_user("eyJ.a.b")).login, "a")
            canned.body = user.ljust(101)
            await self.unavailable(client.get_user("eyJ.a.b"), "larger than 100 bytes")

    async def test_timeout_without_answer(self) -> None:
        """
        Every operation gives up at its deadline, on the client's clock (so
        ours: the deadline is exact, and no test time passes).
        """
        self.clock = Clock()
        canned = Canned(stall="headers")
        client = self.client(self.listen(canned), timeout=0.5)
        for operation, call in self.all_operations(client):
            canned.arrived = Deferred()
            d = under_way(call())
            await canned.arrived
            self.clock.advance(0.49)
            self.assertNoResult(d)
            self.clock.advance(0.01)
            self.assertTrue(d.called, f"the {operation} outlived its deadline")
            await self.unavailable(d, operation, "did not answer", "within 0.5 s")

    async def test_timeout_covers_the_body(self) -> None:
        """
        treq's own timeout ends when the headers arrive; ours covers the
        body too.
        """
        canned = Canned(body=token_json(), stall="body", headers={"Content-Length": "500"})
        client = self.client(self.listen(canned), timeout=0.5)
        started = time.monotonic()
        await self.unavailable(client.refresh("eyJ.a.refresh"), "did not answer")
        self.assertLess(time.monotonic() - started, 5.0)

    async def test_deadline_runs_on_the_given_clock(self) -> None:
        self.clock = Clock()
        canned = Canned(stall="headers")
        client = self.client(self.listen(canned), timeout=2.0)
        d = Deferred.fromCoroutine(client.get_user("eyJ.a.b"))
        await canned.arrived
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        e = self.failureResultOf(d, UpstreamUnavailableError).value
        self.assertIn("within 2 s", str(e))

    async def test_caller_cancel_is_not_unavailable(self) -> None:
        for stall in ("headers", "body"):
            canned = Canned(stall=stall, body=token_json(), headers={"Content-Length": "500"})
            client = self.client(self.listen(canned))
            d = Deferred.fromCoroutine(client.get_user("eyJ.a.b"))
            await canned.arrived
            if stall == "body":
                await deferLater(reactor, 0.1, lambda: None)
            d.cancel()
            self.failureResultOf(d, CancelledError)


class AuthorizeURLTests(SynchronousTestCase):
    def client(self, url: str = "https://git.example.org/forgejo/") -> ForgejoClient:
        return ForgejoClient(
            http_client(),
            Clock(),
            url,
            CLIENT_ID,
            CLIENT_SECRET,
            "https://mcp.example.org/oauth/callback?x=1&y=2",
            ["read:user", "write:issue"],
        )

    def test_shape(self) -> None:
        url = urlsplit(self.client().authorize_url("st", "ch"))
        self.assertEqual(
            (url.scheme, url.netloc, url.path),
            ("https", "git.example.org", "/forgejo/login/oauth/authorize"),
        )
        self.assertEqual(
            parse_qsl(url.query, strict_parsing=True),
            [
                ("client_id", CLIENT_ID),
                ("redirect_uri", "https://mcp.example.org/oauth/callback?x=1&y=2"),
                ("response_type", "code"),
                ("scope", "read:user write:issue"),
                ("state", "st"),
                ("code_challenge", "ch"),
                ("code_challenge_method", "S256"),
            ],
        )
        self.assertNotIn(CLIENT_SECRET, url.geturl())
        self.assertIn("scope=read%3Auser%20write%3Aissue", url.query)

    @given(
        state=st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1),
        challenge=st.text(
            st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1
        ),
    )
    def test_state_and_challenge_round_trip(self, state: str, challenge: str) -> None:
        url = urlsplit(self.client().authorize_url(state, challenge))
        self.assertEqual(url.path, "/forgejo/login/oauth/authorize")
        self.assertFalse(url.fragment)
        query = parse_qs(url.query, keep_blank_values=True, strict_parsing=True)
        self.assertEqual(query["state"], [state])
        self.assertEqual(query["code_challenge"], [challenge])
        self.assertEqual(query["code_challenge_method"], ["S256"])
        self.assertEqual(query["client_id"], [CLIENT_ID])
        self.assertEqual(len(query), 7)
        # Nothing a browser or proxy would mangle: plain ASCII, no spaces.
        self.assertTrue(url.geturl().isascii())
        self.assertNotIn(" ", url.geturl())
