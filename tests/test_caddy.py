"""
The shipped Caddyfile (deploy/caddy/Caddyfile), run by the real Caddy in
front of the broker (L{tests.caddy_support}: only its addresses, TLS and the
admin endpoint are changed).

Through it: the official SDK's OAuth + MCP flow, SSE delivered as it is
written (progress before the result, the GET stream kept open while idle),
and the client address the broker derives from Caddy's X-Forwarded-For.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from pathlib import Path
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest
from twisted.web.resource import Resource

from fjmcp.http.common import request_client_address
from fjmcp.secrets.crypto import new_pkce_pair
from tests.broker_support import REDIRECT, Broker, BrokerTestCase, browser, run_sdk_client
from tests.caddy_support import caddy_missing, free_port, run_caddy

SCRIPT = str(Path(__file__).with_name("sdk_oauth_client.py"))
SCRIPT_TIMEOUT = 60
# What the broker is told to trust in production (--trusted-proxies).
TRUSTED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
# Another loopback address for the test's client, so that "the address
# Caddy saw" differs from Caddy's own.
CLIENT_SOURCE = "127.0.0.7"


class Recorder(Resource):
    """
    The broker's resource, noting for each request the client address the
    broker derives (L{request_client_address}, as its access log and rate
    limiter do) and the X-Forwarded-For it was given.
    """

    isLeaf = True

    def __init__(self, inner: Any, trusted: Any) -> None:
        super().__init__()
        self.inner = inner
        self.trusted = trusted
        self.seen: list[dict[str, Any]] = []

    def render(self, request: Any) -> Any:
        self.seen.append(
            {
                "path": request.path.decode(),
                "client": request_client_address(request, self.trusted),
                "forwarded_for": request.requestHeaders.getRawHeaders(b"x-forwarded-for"),
                "peer": request.getClientAddress().host,
            }
        )
        return self.inner.render(request)


def raw_http(
    port: int, request: bytes, seconds: float, until: bytes | None = None
) -> list[tuple[float, bytes]]:
    """
    Send C{request} to 127.0.0.1:C{port} from L{CLIENT_SOURCE} and collect
    what comes back, with the time each chunk arrived, for C{seconds} at
    most, or until C{until} has arrived, or the server closes.  Blocking:
    run it in a thread.
    """
    chunks: list[tuple[float, bytes]] = []
    start = time.monotonic()
    with socket.socket() as s:
        s.bind((CLIENT_SOURCE, 0))
        s.settimeout(seconds)
        s.connect(("127.0.0.1", port))
        s.sendall(request)
        data = b""
        while (left := seconds - (time.monotonic() - start)) > 0:
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append((time.monotonic() - start, chunk))
            data += chunk
            if until is not None and until in data:
                break
    return chunks


class CaddyTests(BrokerTestCase):
    timeout = SCRIPT_TIMEOUT + 30

    def setUp(self) -> None:
        reason = caddy_missing()
        if reason:
            raise SkipTest(reason)
        self.port = free_port()
        self.caddy_url = f"http://127.0.0.1:{self.port}"
        self.broker = Broker(
            self, child=("slow",), public_url=self.caddy_url, trusted_proxies=TRUSTED
        )
        self.recorder = Recorder(self.broker.site.resource, TRUSTED)
        self.broker.site.resource = self.recorder
        # Every URL the BrokerTestCase helpers use now goes through Caddy.
        self.broker.url = self.caddy_url
        self.browser = browser()
        self.verifier, self.challenge = new_pkce_pair()
        return self.start_caddy()  # type: ignore[return-value]

    async def start_caddy(self) -> None:
        await run_caddy(self, self.port, self.broker.site.port.getHost().port)

    async def test_sdk_flow(self) -> None:
        """
        The SDK's OAuth client and MCP session, all through Caddy: the
        broker's metadata names Caddy's URL and the tool call answers.
        """
        summary, _ = await run_sdk_client(
            self,
            [
                SCRIPT,
                self.caddy_url + "/mcp",
                "--redirect-uri",
                REDIRECT,
                "--timeout",
                str(SCRIPT_TIMEOUT),
            ],
        )
        first = summary["requests"][0]
        self.assertEqual((first["path"], first["status"]), ("/mcp", 401))
        self.assertIn(
            f'resource_metadata="{self.caddy_url}/.well-known/oauth-protected-resource/mcp"',
            first["www_authenticate"],
        )
        self.assertTrue(summary["initialize"]["ok"], summary["initialize"])
        self.assertIn("slow", summary["initialize"]["tools"])
        self.assertEqual(summary["initialize"]["echo"], [json.dumps({"hello": "world"})])
        # Every request reached the broker through Caddy.
        self.assertTrue(self.recorder.seen)
        self.assertEqual({s["peer"] for s in self.recorder.seen}, {"127.0.0.1"})

    def mcp_request(self, method: bytes, token: str, session: str, body: bytes = b"") -> bytes:
        head = [
            method + b" /mcp HTTP/1.1",
            f"Host: 127.0.0.1:{self.port}".encode(),
            b"Accept: application/json, text/event-stream",
            b"Authorization: Bearer " + token.encode(),
            b"Mcp-Session-Id: " + session.encode(),
            b"Connection: close",
        ]
        if body:
            head += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
        return b"\r\n".join(head) + b"\r\n\r\n" + body

    async def test_progress_streams(self) -> None:
        """
        Progress notifications of a slow tool reach the client as they are
        written, well before the result (flush_interval -1).
        """
        token, session = await self.mcp_session()
        call = {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {
                "name": "slow",
                "arguments": {"delay": 1.0},
                "_meta": {"progressToken": "p"},
            },
        }
        chunks = await deferToThread(
            raw_http,
            self.port,
            self.mcp_request(b"POST", token, session, json.dumps(call).encode()),
            20.0,
            b'"id": 7',
        )
        data = b"".join(c for _, c in chunks)
        self.assertIn(b"200 OK", data.split(b"\r\n", 1)[0])
        self.assertIn(b"text/event-stream", data.lower())
        progress = next(t for t, c in chunks if b"notifications/progress" in c)
        done = next(t for t, c in chunks if b'"id": 7' in c or b'"id":7' in c)
        # The child sleeps 1 s after each of its three notifications.
        self.assertLess(progress + 2.0, done, chunks)

    async def test_get_stream_idle(self) -> None:
        """
        The GET stream stays open through Caddy while nothing happens, and
        the broker's keep-alive comments get through.
        """
        token, session = await self.mcp_session()
        chunks = await deferToThread(
            raw_http, self.port, self.mcp_request(b"GET", token, session), 4.0
        )
        data = b"".join(c for _, c in chunks)
        self.assertIn(b"200 OK", data.split(b"\r\n", 1)[0])
        # Still open after 4 s (raw_http stopped on its clock, not at EOF),
        # with keep-alives arriving over time, not in one burst at the end.
        keepalives = [t for t, c in chunks if b": keep-alive" in c]
        self.assertGreaterEqual(len(keepalives), 2, chunks)
        self.assertLess(keepalives[0], 3.0, chunks)

    async def test_client_address(self) -> None:
        """
        The broker takes the client address Caddy saw, and a forged
        X-Forwarded-For from the client is not believed.
        """
        request = (
            f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "X-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n"
        ).encode()
        chunks = await deferToThread(raw_http, self.port, request, 10.0)
        self.assertIn(b"200", b"".join(c for _, c in chunks).split(b"\r\n", 1)[0])
        [seen] = [s for s in self.recorder.seen if s["path"] == "/healthz"]
        self.assertEqual(seen["peer"], "127.0.0.1")
        self.assertEqual(seen["client"], CLIENT_SOURCE)
        # Caddy replaced the client's header rather than appending to it.
        self.assertEqual(seen["forwarded_for"], [CLIENT_SOURCE.encode()])

    async def test_unknown_host_is_refused(self) -> None:
        """
        A request for a host name this Caddy does not serve (DNS rebinding:
        a hostile name resolving to our address) gets 421 from Caddy and
        never reaches the broker.
        """
        request = (
            b"POST /mcp HTTP/1.1\r\nHost: evil.example.com\r\n"
            b"Origin: http://evil.example.com\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        chunks = await deferToThread(raw_http, self.port, request, 10.0)
        self.assertIn(b" 421 ", b"".join(c for _, c in chunks).split(b"\r\n", 1)[0])
        self.assertEqual(self.recorder.seen, [])
