"""
Every route of a whole broker against bodies, headers and queries no
client should send: the answer is a 4xx with a message, never a 500, and
nothing is logged as an error (issue 10: "never a traceback").
"""

from __future__ import annotations

from typing import Any

from twisted.web.http_headers import Headers

from tests.broker_support import BrokerTestCase
from tests.helpers import http_client, raw_http

NESTED = b"[" * 100_000 + b"]" * 100_000
BODIES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not UTF-8", b"\xff\xfe\x00garbage"),
    ("deep JSON", NESTED),
    ("deep JSON object", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    ("NaN", b'{"client_name": NaN, "redirect_uris": ["https://a.example/cb"]}'),
    ("lone surrogate", b'{"client_name": "\\ud800", "redirect_uris": ["https://a.example/cb"]}'),
    ("form, not UTF-8", b"grant_type=authorization_code&code=%ff%fe&client_id=\xff"),
    ("form, UTF-8", "grant_type=r\u00e9fresh&client_id=\u202e".encode()),
    ("form, broken escape", b"a=%&b=%zz&=&&&c"),
    ("huge field name", b"x" * 20_000 + b"=1"),
    ("JSON array", b"[1, 2, 3]"),
    ("JSON string", b'"just text"'),
]
CONTENT_TYPES = [
    b"application/json",
    b"application/x-www-form-urlencoded",
    b"application/x-www-form-urlencoded; charset=latin-1",
    b"text/plain",
    b"\xff/\xfe",
]
ROUTES = [
    "/oauth/register",
    "/oauth/token",
    "/oauth/revoke",
    "/oauth/authorize",
    "/connections/revoke",
    "/mcp",
]


class HostileInputTests(BrokerTestCase):
    timeout = 300

    async def post(self, path: str, body: bytes, headers: dict[bytes, list[bytes]]) -> Any:
        response = await http_client().request(
            "POST", self.broker.url + path, data=body, headers=Headers(headers)
        )
        text = await response.content()
        return response.code, text

    async def test_no_body_makes_a_500(self) -> None:
        tokens = await self.login_tokens()
        bearer = b"Bearer " + tokens["access_token"].encode()
        for path in ROUTES:
            for content_type in CONTENT_TYPES:
                for name, body in BODIES:
                    headers = {b"Content-Type": [content_type]}
                    if path == "/mcp":
                        headers[b"Authorization"] = [bearer]
                        headers[b"Accept"] = [b"application/json, text/event-stream"]
                    code, text = await self.post(path, body, headers)
                    where = (path, content_type, name, text[:200])
                    self.assertGreaterEqual(code, 200, where)
                    self.assertLess(code, 500, where)
                    if code >= 400:
                        self.assertTrue(text, where)
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_odd_headers_and_queries(self) -> None:
        tokens = await self.login_tokens()
        for path, query in [
            ("/oauth/authorize", b"?client_id=%ff&redirect_uri=\xff&response_type=code"),
            ("/oauth/authorize", b"?" + b"a=1&" * 2000),
            ("/oauth/callback", b"?state=%ff%fe&code=\xc3"),
            ("/connections", b"?revoked=%ff"),
            ("/.well-known/oauth-authorization-server", b"?x=%zz"),
        ]:
            answer = await raw_http(
                self.broker.url,
                b"GET " + path.encode() + query + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Connection: close\r\n\r\n",
            )
            code = int(answer.split(b" ", 2)[1])
            self.assertLess(code, 500, (path, query, answer[:300]))
        for header, value in [
            (b"Authorization", b"Bearer \xff\xfe"),
            (b"Authorization", b"Bearer " + b"a" * 10_000),
            (b"Mcp-Session-Id", b"\xff"),
            (b"MCP-Protocol-Version", b"\xff"),
            (b"Origin", b"\xff"),
            (b"Cookie", b"fjmcp-login=\xff; fjmcp-browser=\xfe"),
        ]:
            headers = {
                b"Authorization": [b"Bearer " + tokens["access_token"].encode()],
                b"Accept": [b"application/json, text/event-stream"],
                b"Content-Type": [b"application/json"],
            }
            headers[header] = [value]
            for method in ("GET", "POST", "DELETE"):
                response = await http_client().request(
                    method,
                    self.broker.url + "/mcp",
                    data=b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}',
                    headers=Headers(headers),
                )
                await response.content()
                self.assertLess(response.code, 500, (header, value, method))
        self.assertEqual(self.flushLoggedErrors(), [])
