"""
Rate limits and the client address behind proxies.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from fjmcp.http.ratelimit import Limit, RateLimiter, client_address
from fjmcp.oauth.clients import ClientRegistry
from fjmcp.store import Store, migrate_database
from tests.helpers import http_client, make_config, routes_over, serve, token_service

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
ipv4 = st.ip_addresses(v=4).map(str)


class ClientAddressTests(SynchronousTestCase):
    def test_untrusted_peer_is_the_client(self) -> None:
        self.assertEqual(client_address("203.0.113.9", ["1.2.3.4"], LOOPBACK), "203.0.113.9")

    def test_trusted_proxy_forwards(self) -> None:
        self.assertEqual(client_address("127.0.0.1", ["198.51.100.7"], LOOPBACK), "198.51.100.7")

    def test_rightmost_untrusted_hop_wins(self) -> None:
        """
        A client can put anything in front of the chain; only what our own
        proxies appended counts.
        """
        self.assertEqual(
            client_address("127.0.0.1", ["6.6.6.6, 198.51.100.7", "127.0.0.2"], LOOPBACK),
            "198.51.100.7",
        )

    def test_garbage_stops_the_chain(self) -> None:
        self.assertEqual(client_address("127.0.0.1", ["not-an-ip"], LOOPBACK), "127.0.0.1")

    def test_unix_socket_peer_is_trusted(self) -> None:
        self.assertEqual(client_address(None, ["198.51.100.7"], ()), "198.51.100.7")
        self.assertEqual(client_address(None, [], ()), "unix")

    @given(ipv4, st.lists(ipv4, max_size=4))
    def test_no_trust_no_say(self, peer: str, forwarded: list[str]) -> None:
        """
        Without trusted proxies, X-Forwarded-For never changes the answer.
        """
        self.assertEqual(client_address(peer, forwarded, ()), peer)

    @given(st.lists(ipv4, min_size=1, max_size=4))
    def test_answer_is_a_sent_address(self, forwarded: list[str]) -> None:
        self.assertIn(client_address("127.0.0.1", forwarded, LOOPBACK), [*forwarded, "127.0.0.1"])


class BucketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = RateLimiter(self.clock, {"x": Limit(per_minute=60, burst=3)})

    def test_burst_then_refill(self) -> None:
        self.assertEqual([self.limiter.check("x", "a") for _ in range(3)], [0.0] * 3)
        wait = self.limiter.check("x", "a")
        self.assertAlmostEqual(wait, 1.0)
        self.clock.advance(1.0)
        self.assertEqual(self.limiter.check("x", "a"), 0.0)

    def test_addresses_are_separate(self) -> None:
        for _ in range(3):
            self.limiter.check("x", "a")
        self.assertGreater(self.limiter.check("x", "a"), 0)
        self.assertEqual(self.limiter.check("x", "b"), 0.0)

    @given(st.lists(st.floats(0, 5), max_size=40))
    def test_never_more_than_the_rate_allows(self, gaps: list[float]) -> None:
        """
        Over any sequence of requests, the number allowed is at most the
        burst plus what the elapsed time refilled.
        """
        clock = Clock()
        limiter = RateLimiter(clock, {"x": Limit(per_minute=60, burst=3)})
        allowed = 0
        for gap in gaps:
            clock.advance(gap)
            if limiter.check("x", "a") == 0.0:
                allowed += 1
        self.assertLessEqual(allowed, 3 + clock.seconds() * 1.0 + 1e-6)


class HTTPLimitTests(TestCase):
    def limited(self, endpoint: str) -> str:
        """
        The routes over a real store with C{endpoint} limited to two
        requests at once per address, none more for a minute; their URL.
        """
        path = Path(self.mktemp()).resolve()
        config = make_config(str(path), trusted_proxies=())
        migrate_database(config.db_path)
        store = Store.open(config.db_path, reactor)
        self.addCleanup(store.close)
        app = routes_over(
            config,
            reactor,
            store,
            clients=ClientRegistry(store),
            tokens=token_service(store, config, reactor),
            limiter=RateLimiter(Clock(), {endpoint: Limit(per_minute=1, burst=2)}),
        )
        return serve(self, app.resource())

    async def test_registration_is_limited_per_client(self) -> None:
        url = self.limited("register")
        http = http_client()
        body = json.dumps({"redirect_uris": ["https://a.example/cb"]}).encode()
        codes = []
        for _ in range(3):
            # A spoofed X-Forwarded-For from an untrusted peer changes nothing.
            response = await http.post(
                url + "/oauth/register",
                data=body,
                headers=Headers(
                    {b"Content-Type": [b"application/json"], b"X-Forwarded-For": [b"9.9.9.9"]}
                ),
            )
            codes.append(response.code)
            last = await response.json()
        self.assertEqual(codes, [201, 201, 429])
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"60"])
        self.assertIn("too many requests", last["error_description"])

    async def test_revocation_is_limited_per_client(self) -> None:
        """
        Revocation checks client credentials: guessing them is slowed down
        like at the token endpoint.
        """
        url = self.limited("revoke")
        http = http_client()
        codes = []
        for _ in range(3):
            response = await http.post(
                url + "/oauth/revoke",
                data={"token": "gta_guess", "client_id": "fjmcp-nobody", "client_secret": "x"},
            )
            codes.append(response.code)
            await response.content()
        self.assertNotIn(429, codes[:2])
        self.assertEqual(codes[2], 429)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"60"])
