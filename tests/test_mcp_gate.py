"""
/mcp as a resource server: who gets in, and what a client is told when it
does not (the challenge that starts OAuth discovery).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from fjmcp.forgejo.client import UpstreamTokens
from tests.broker_support import Broker, BrokerTestCase, browser

INITIALIZE = b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}'


class GateTests(BrokerTestCase):
    async def post_mcp(self, token: str | None, path: str = "/mcp") -> tuple[int, Any, Headers]:
        headers = {b"Content-Type": [b"application/json"]}
        if token is not None:
            headers[b"Authorization"] = [b"Bearer " + token.encode()]
        response = await self.browser.post(
            self.broker.url + path, data=INITIALIZE, headers=Headers(headers)
        )
        return response.code, await response.json(), response.headers

    def www_auth(self, headers: Headers) -> str:
        values = headers.getRawHeaders(b"www-authenticate")
        assert values is not None
        return values[0].decode()

    async def test_no_token(self) -> None:
        code, _, headers = await self.post_mcp(None)
        self.assertEqual(code, 401)
        challenge = self.www_auth(headers)
        self.assertIn(
            f'resource_metadata="{self.broker.url}/.well-known/oauth-protected-resource/mcp"',
            challenge,
        )
        self.assertNotIn("error=", challenge)
        # The scopes to ask for, as the metadata lists them.
        self.assertIn('scope="mcp offline_access"', challenge)
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [b"*"])
        exposed = (headers.getRawHeaders(b"access-control-expose-headers") or [b""])[0]
        self.assertIn(b"WWW-Authenticate", exposed)

    async def test_unknown_token(self) -> None:
        code, _, headers = await self.post_mcp("not-a-token")
        self.assertEqual(code, 401)
        self.assertIn('error="invalid_token"', self.www_auth(headers))
        self.assertIn("resource_metadata=", self.www_auth(headers))

    async def test_valid_token_is_let_in_on_both_paths(self) -> None:
        tokens = await self.login_tokens()
        for path in ("/mcp", "/mcp/"):
            code, body, headers = await self.post_mcp(tokens["access_token"], path)
            # Authenticated: a session starts and its child answers.
            self.assertEqual(code, 200, body)
            self.assertEqual(body["result"]["serverInfo"]["name"], "scripted-child")
            self.assertTrue(headers.getRawHeaders(b"mcp-session-id"))
            self.assertIsNone(headers.getRawHeaders(b"location"))

    async def test_revoked_token(self) -> None:
        tokens = await self.login_tokens()
        await self.revoke_token(tokens, "access_token")
        code, _, headers = await self.post_mcp(tokens["access_token"])
        self.assertEqual(code, 401)
        self.assertIn('error="invalid_token"', self.www_auth(headers))

    async def expire_upstream(self, user_id: int = 1) -> None:
        """
        Make the stored Forgejo token look as if it expires in a minute.
        """
        cred = await self.broker.store.get_upstream_credential(user_id)
        assert cred is not None
        token = await self.broker.credentials.access_token(user_id)
        user = await self.broker.store.get_user(user_id)
        assert user is not None
        refresh = self.broker.credentials._box.open(
            cred.refresh_token_enc or b"", f"forgejo-user:{user_id}:refresh"
        )
        from fjmcp.forgejo.client import ForgejoUser

        await self.broker.credentials.save(
            ForgejoUser(user.forgejo_user_id, user.login, user.full_name),
            UpstreamTokens(token, refresh, reactor.seconds() + 60, cred.scope),
        )

    async def test_forgejo_revoked_the_app(self) -> None:
        """
        The user removed the app in Forgejo: when the broker next needs to
        renew their Forgejo token it is refused, and the client is told to
        authorize again with a 401 invalid_token.
        """
        tokens = await self.login_tokens()
        await self.expire_upstream()
        self.broker.forge.revoke_grant(1, "fjmcp-broker")
        code, _, headers = await self.post_mcp(tokens["access_token"])
        self.assertEqual(code, 401)
        self.assertIn('error="invalid_token"', self.www_auth(headers))

    async def test_concurrent_requests_one_upstream_refresh(self) -> None:
        # Room for ten sessions of one user: each request here opens one,
        # and the point is the one refresh behind them, not the caps.
        self.broker = Broker(
            self, max_sessions_per_user=10, max_children_per_user=10, max_sessions=20
        )
        tokens = await self.login_tokens()
        await self.expire_upstream()
        grant = self.broker.forge.grant_for(1, "fjmcp-broker")
        assert grant is not None
        before = grant.counter
        results = await gatherResults(
            [Deferred.fromCoroutine(self.post_mcp(tokens["access_token"])) for _ in range(10)]
        )
        self.assertEqual([r[0] for r in results], [200] * 10)
        # One refresh at Forgejo: the grant counter moved once.
        self.assertEqual(grant.counter, before + 1)

    async def test_forgejo_down(self) -> None:
        tokens = await self.login_tokens()
        await self.expire_upstream()
        # Forgejo goes away: its listener, and the connections kept to it.
        await self.broker.forgejo_site.port.stopListening()
        await self.broker.parts.upstream_pool.closeCachedConnections()
        code, body, headers = await self.post_mcp(tokens["access_token"])
        self.assertEqual(code, 503)
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"30"])
        self.assertIn("Forgejo", body["error"]["message"])


class CookieSetter(Resource):
    """
    The Forgejo stand-in, setting a cookie on every answer (as Forgejo sets
    its session cookie) and noting the Cookie header of each request the
    broker makes (the token endpoint and the API; the browser's pages are
    its own business).
    """

    isLeaf = True

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.cookies: list[tuple[str, list[bytes] | None]] = []

    def render(self, request: Any) -> Any:
        path = request.path.decode()
        if path.startswith(("/login/oauth/access_token", "/api/")):
            self.cookies.append((path, request.requestHeaders.getRawHeaders(b"cookie")))
        request.addCookie(b"i_like_forgejo", path.encode(), path=b"/")
        return self.inner.render(request)


class ForgejoCookieTests(BrokerTestCase):
    async def test_the_forgejo_client_keeps_no_cookies(self) -> None:
        """
        Whatever Forgejo sets while serving one user must not ride along
        with the next user's requests: the daemon's Forgejo client (built
        by the same composition root as here) keeps no cookies.
        """
        setter = CookieSetter(self.broker.forgejo_site.resource)
        self.broker.forgejo_site.resource = setter
        await self.login_tokens("alice")
        self.browser = browser()
        await self.login_tokens("bob")
        self.assertGreaterEqual(len(setter.cookies), 4, setter.cookies)
        self.assertEqual([c for c in setter.cookies if c[1] is not None], [])
