"""
The broker's routes served in memory (treq's StubTreq over the Klein tree).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote_from_bytes

from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from fjmcp import __version__
from fjmcp.buildinfo import build_info
from fjmcp.http.routes import BrokerApp
from fjmcp.oauth.authorize import AuthorizationFlow
from fjmcp.oauth.connections import Connections
from fjmcp.store import Store, migrate_database
from tests.broker_support import BrokerTestCase
from tests.helpers import http_client, make_config, raw_http, routes_over, serve


class BrokenStore:
    def check(self) -> Deferred[None]:
        return fail(RuntimeError("disk on fire"))


class HangingStore:
    def check(self) -> Deferred[None]:
        return Deferred()


def app_over(test: TestCase, store: object, clock: object) -> BrokerApp:
    tree: BrokerApp = routes_over(make_config(test.mktemp()), clock, store)
    return tree


class HealthTests(TestCase):
    async def test_healthy(self) -> None:
        path = Path(self.mktemp())
        path.mkdir()
        migrate_database(path / "broker.db")
        store = Store.open(path / "broker.db", reactor)
        self.addCleanup(store.close)
        # The store answers from its thread, so this one goes over a real
        # loopback socket rather than StubTreq's in-memory pipe.
        tree = routes_over(make_config(self.mktemp()), reactor, store, sessions=[1, 2])
        url = serve(self, tree.resource())
        response = await http_client().get(url + "/healthz")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(
            await response.json(),
            {
                "status": "ok",
                "version": __version__,
                "build": build_info().as_dict(),
                "store": "ok",
                "sessions": 2,
            },
        )

    async def test_store_failure_is_503(self) -> None:
        stub = StubTreq(app_over(self, BrokenStore(), reactor).resource())
        response = await stub.get("http://broker.test/healthz")
        self.assertEqual(response.code, 503)
        body = await response.json()
        self.assertEqual((body["status"], body["store"]), ("unavailable", "unavailable"))
        # The reason goes to the log, not to whoever asks.
        self.assertNotIn("fire", str(body))
        self.flushLoggedErrors()

    def test_store_hang_is_503_after_timeout(self) -> None:
        clock = Clock()
        stub = StubTreq(app_over(self, HangingStore(), clock).resource())
        d = stub.get("http://broker.test/healthz")
        self.assertNoResult(d)
        clock.advance(5)
        stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 503)

    async def test_unknown_path_is_404(self) -> None:
        stub = StubTreq(app_over(self, BrokenStore(), reactor).resource())
        response = await stub.get("http://broker.test/nope")
        self.assertEqual(response.code, 404)


class RawURLTests(TestCase):
    async def exchange(self, target: bytes, host: bytes = b"mcp.example.org") -> tuple[int, bytes]:
        url = serve(self, app_over(self, BrokenStore(), reactor).resource())
        answer = await raw_http(
            url,
            b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body

    async def test_a_path_or_host_that_is_not_utf_8_is_a_clean_400(self) -> None:
        """
        Klein cannot route what it cannot decode; it answered 400 but logged
        each such request as an error, with a traceback.
        """
        for target, host, says in [
            (b"/%ff", b"mcp.example.org", b"path"),
            (b"/mcp/%c3", b"mcp.example.org", b"path"),
            (b"/\xff", b"mcp.example.org", b""),  # Twisted's own parser refuses this one
            (b"/.well-known/oauth-authorization-server", b"\xff", b"Host"),
            (b"/.well-known/oauth-authorization-server", b"mcp.\xc3:443", b"Host"),
        ]:
            code, body = await self.exchange(target, host)
            self.assertEqual(code, 400, (target, host))
            self.assertIn(says, body)
        self.assertEqual(self.flushLoggedErrors(), [])
        # UTF-8 is fine, in either place.
        code, _ = await self.exchange(b"/%C3%A9")
        self.assertEqual(code, 404)
        code, _ = await self.exchange(
            b"/.well-known/oauth-authorization-server", "bücher.example".encode()
        )
        self.assertEqual(code, 200)


def _form(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"&".join(
        quote_from_bytes(k).encode() + b"=" + quote_from_bytes(v).encode() for k, v in pairs
    )


_FIELDS = st.sampled_from([b"consent", b"decision", b"csrf", b"client_id"]) | st.binary(max_size=8)


class FormBodyProperties(SynchronousTestCase):
    """
    The routes that read urlencoded forms, over stores they never reach:
    without cookies, every form ends in a refusal before any lookup.
    """

    def setUp(self) -> None:
        config = make_config(self.mktemp())
        clock = Clock()
        flow = AuthorizationFlow(config, None, None, None, None, clock)  # type: ignore[arg-type]
        connections = Connections(None, None, None, clock)  # type: ignore[arg-type]
        app = routes_over(config, clock, flow=flow, connections=connections)
        self.stub = StubTreq(app.resource())

    @given(
        st.sampled_from(["/oauth/authorize", "/connections/revoke"]),
        st.binary(max_size=300)
        | st.lists(st.tuples(_FIELDS, st.binary(max_size=20)), max_size=5).map(_form)
        | st.lists(st.tuples(st.text(max_size=8), st.text(max_size=20)), max_size=5).map(
            lambda pairs: b"&".join(f"{k}={v}".encode() for k, v in pairs)
        ),
    )
    def test_any_form_body_is_answered_without_a_server_error(self, path: str, body: bytes) -> None:
        d = self.stub.post(
            "https://mcp.example.org" + path,
            data=body,
            headers={b"Content-Type": [b"application/x-www-form-urlencoded"]},
        )
        self.stub.flush()
        response = self.successResultOf(d)
        page = self.successResultOf(response.content())
        self.assertIn(response.code, (400, 403), page)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_form_too_large_is_refused_not_cut_short(self) -> None:
        d = self.stub.post(
            "https://mcp.example.org/oauth/authorize",
            data=b"decision=approve&consent=" + b"x" * 20_000,
            headers={b"Content-Type": [b"application/x-www-form-urlencoded"]},
        )
        self.stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 413)
        self.assertIn(b"larger than", self.successResultOf(response.content()))


class HomePageTests(BrokerTestCase):
    async def test_the_root_says_what_this_is(self) -> None:
        """
        Someone who opens the broker's address in a browser learns what it
        is and what to give an MCP client, instead of a bare 404; other
        unknown paths still get 404.
        """
        response = await http_client().get(self.broker.url + "/")
        body = (await response.content()).decode()
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"]
        )
        self.assertIn(self.broker.public_url + "/mcp", body)
        self.assertIn(self.broker.forgejo_url, body)
        self.assertEqual(response.headers.getRawHeaders("x-frame-options"), ["DENY"])
        missing = await http_client().get(self.broker.url + "/nothing-here")
        await missing.content()
        self.assertEqual(missing.code, 404)
