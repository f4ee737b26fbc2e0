"""
The broker's routes served in memory (treq's StubTreq over the Klein tree).
"""

from __future__ import annotations

from pathlib import Path

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from fjmcp import __version__
from fjmcp.buildinfo import build_info
from fjmcp.store import Store, migrate_database
from fjmcp.web import BrokerApp
from tests.helpers import http_client, make_config, serve


class BrokenStore:
    def check(self) -> Deferred[None]:
        return fail(RuntimeError("disk on fire"))


class HangingStore:
    def check(self) -> Deferred[None]:
        return Deferred()


def app_over(test: TestCase, store: object, clock: object) -> BrokerApp:
    return BrokerApp(make_config(test.mktemp()), store, [], clock)  # type: ignore[arg-type]


class HealthTests(TestCase):
    async def test_healthy(self) -> None:
        path = Path(self.mktemp())
        path.mkdir()
        migrate_database(path / "broker.db")
        store = Store.open(path / "broker.db", reactor)
        self.addCleanup(store.close)
        # The store answers from its thread, so this one goes over a real
        # loopback socket rather than StubTreq's in-memory pipe.
        url = serve(self, BrokerApp(make_config(self.mktemp()), store, [1, 2], reactor).resource())
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
