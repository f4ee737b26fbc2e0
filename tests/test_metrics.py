"""
/metrics as an operator scrapes it: a separate listener, counters that move
as sessions start and end and as clients log in, bounded labels, and the
--metrics-listen option.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

import fjmcp
from fjmcp import metrics
from fjmcp.app.tap import build_service
from fjmcp.config import ConfigError, build_config
from fjmcp.forgejo.client import ForgejoUser, UpstreamError, UpstreamTokens
from fjmcp.forgejo.credentials import LoginRequiredError, UpstreamCredentials
from fjmcp.http import metrics as http_metrics
from fjmcp.http.routes import BrokerApp
from fjmcp.secrets.crypto import new_pkce_pair
from fjmcp.store import migrate_database
from tests.broker_support import Broker, BrokerTestCase, browser
from tests.helpers import http_client, wait_until
from tests.test_config import good_argv, make_files
from tests.test_daemon import Daemon, _UnixEndpoints

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

ROUTES = http_metrics.RouteLabels.of(*BrokerApp.apps())


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(lbls)[label] for (n, lbls) in samples if n == name and label in dict(lbls)}


class Scraper:
    """
    Two scrapes and the difference a test made between them.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.before: Samples = {}

    async def scrape(self) -> Samples:
        response = await http_client().get(self.url + "/metrics")
        body = (await response.content()).decode()
        assert response.code == 200, (response.code, body)
        content_type = response.headers.getRawHeaders(b"content-type")[0]
        assert content_type.startswith(b"text/plain"), content_type
        return parse(body)

    async def start(self) -> None:
        self.before = await self.scrape()

    def delta(self, after: Samples, name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(self.before, name, **labels)


class MetricsBrokerTestCase(BrokerTestCase):
    broker_options: dict[str, Any] = {}

    def setUp(self) -> None:
        self.broker = Broker(self, metrics=True, **self.broker_options)
        self.browser = browser()
        self.verifier, self.challenge = new_pkce_pair()
        self.metrics = Scraper(self.broker.metrics_url)

    def only_session(self) -> Any:
        sessions = list(self.broker.sessions._sessions.values())
        self.assertEqual(len(sessions), 1)
        return sessions[0]

    async def exited(self, session: Any, timeout: float = 10.0) -> None:
        await wait_until(
            lambda: session.child.protocol.exit is not None, timeout, "the child's exit"
        )


class SessionMetricsTests(MetricsBrokerTestCase):
    broker_options = {"session_idle_timeout": 0.3}

    async def test_counters_follow_a_session_from_start_to_end(self) -> None:
        await self.metrics.start()
        token, session_id = await self.mcp_session()
        during = await self.metrics.scrape()
        self.assertEqual(value(during, "fjmcp_sessions_active"), 1)
        self.assertEqual(value(during, "fjmcp_children_live"), 1)
        self.assertEqual(self.metrics.delta(during, "fjmcp_sessions_started_total"), 1)
        self.assertEqual(self.metrics.delta(during, "fjmcp_child_spawns_total", result="ok"), 1)
        self.assertEqual(value(during, "fjmcp_sessions_limit"), self.broker.config.max_sessions)

        # The session's GET stream stays open until the session ends.
        stream = await self.browser.get(
            self.broker.url + "/mcp",
            headers=Headers(
                {
                    b"Accept": [b"text/event-stream"],
                    b"Authorization": [b"Bearer " + token.encode()],
                    b"Mcp-Session-Id": [session_id.encode()],
                }
            ),
        )
        self.assertEqual(stream.code, 200)
        streamed: Deferred[bytes] = stream.content()

        session = self.only_session()
        await sleep(0.4)
        self.broker.sessions.reap()
        await self.exited(session)
        await streamed
        after = await self.metrics.scrape()
        self.assertEqual(value(after, "fjmcp_sessions_active"), 0)
        self.assertEqual(value(after, "fjmcp_children_live"), 0)
        self.assertEqual(self.metrics.delta(after, "fjmcp_sessions_ended_total", reason="idle"), 1)
        ended = sum(
            self.metrics.delta(after, "fjmcp_sessions_ended_total", reason=r)
            for r in metrics.SESSION_END_REASONS
        )
        self.assertEqual(ended, 1)
        # The scripted child exits 0 when its stdin closes.
        self.assertEqual(self.metrics.delta(after, "fjmcp_child_exits_total", how="clean"), 1)

        # The stream was counted when it ended, timed apart from answers.
        self.assertEqual(
            self.metrics.delta(
                after, "fjmcp_http_requests_total", route="/mcp", method="GET", status="200"
            ),
            1,
        )
        self.assertEqual(
            self.metrics.delta(after, "fjmcp_http_stream_duration_seconds_count", route="/mcp"), 1
        )
        self.assertEqual(
            self.metrics.delta(
                after, "fjmcp_http_request_duration_seconds_count", route="/mcp", status="200"
            ),
            self.metrics.delta(
                after, "fjmcp_http_requests_total", route="/mcp", method="POST", status="200"
            ),
        )


class FailureMetricsTests(MetricsBrokerTestCase):
    broker_options = {"child": ["crash-on-call"]}

    async def test_a_crashed_child(self) -> None:
        await self.metrics.start()
        token, session_id = await self.mcp_session()
        session = self.only_session()
        await self.mcp_rpc(
            token,
            {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "echo"}},
            session_id,
        )
        await self.exited(session)
        after = await self.metrics.scrape()
        self.assertEqual(
            self.metrics.delta(after, "fjmcp_sessions_ended_total", reason="crashed"), 1
        )
        self.assertEqual(self.metrics.delta(after, "fjmcp_child_exits_total", how="error"), 1)
        self.assertEqual(value(after, "fjmcp_sessions_active"), 0)

    async def test_a_child_that_cannot_start(self) -> None:
        self.broker.sessions._executable = str(Path(self.mktemp()) / "missing")
        await self.metrics.start()
        token = (await self.login_tokens())["access_token"]
        code, _, _ = await self.mcp_rpc(
            token,
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {}},
            },
        )
        self.assertNotEqual(code, 200)
        await wait_until(
            lambda: not len(self.broker.sessions) and not len(self.broker.sessions._children),
            what="the end of the session",
        )
        after = await self.metrics.scrape()
        # Depending on the platform, a missing binary fails in spawnProcess
        # or as a child that exits at once: either way it is counted.
        failed = self.metrics.delta(after, "fjmcp_child_spawns_total", result="failed")
        died = self.metrics.delta(after, "fjmcp_child_exits_total", how="error")
        self.assertEqual(failed + died, 1)
        self.assertEqual(value(after, "fjmcp_sessions_active"), 0)


class RequestMetricsTests(MetricsBrokerTestCase):
    async def request(self, method: str, path: str, **kwargs: Any) -> int:
        response = await http_client().request(method, self.broker.url + path, **kwargs)
        await response.content()
        return int(response.code)

    async def test_requests_by_route_and_status(self) -> None:
        await self.metrics.start()
        self.assertEqual(await self.request("GET", "/healthz"), 200)
        self.assertEqual(await self.request("GET", "/.well-known/oauth-authorization-server"), 200)
        self.assertEqual(await self.request("POST", "/mcp", data=b"{}"), 401)
        self.assertEqual(await self.request("GET", "/no/such/page?x=1"), 404)
        self.assertEqual(await self.request("GET", "/metrics"), 404)
        self.assertEqual(await self.request("PUT", "/oauth/token"), 405)
        after = await self.metrics.scrape()

        def requests(route: str, method: str, status: str) -> float:
            return self.metrics.delta(
                after, "fjmcp_http_requests_total", route=route, method=method, status=status
            )

        self.assertEqual(requests("/healthz", "GET", "200"), 1)
        self.assertEqual(requests("/.well-known/oauth-authorization-server", "GET", "200"), 1)
        self.assertEqual(requests("/mcp", "POST", "401"), 1)
        # Unknown paths, /metrics among them, all count as one route.
        self.assertEqual(requests("other", "GET", "404"), 2)
        self.assertEqual(requests("/oauth/token", "PUT", "405"), 1)
        self.assertEqual(
            self.metrics.delta(
                after, "fjmcp_http_request_duration_seconds_count", route="/healthz", status="200"
            ),
            1,
        )
        self.assertGreater(
            self.metrics.delta(
                after, "fjmcp_http_request_duration_seconds_sum", route="/healthz", status="200"
            ),
            0,
        )
        # The health check read the database: its latency was observed.
        self.assertGreaterEqual(
            self.metrics.delta(
                after, "fjmcp_store_operation_duration_seconds_count", operation="check"
            ),
            1,
        )
        self.assertIn("/healthz", label_values(after, "fjmcp_http_requests_total", "route"))

    async def test_random_paths_add_no_route_labels(self) -> None:
        """
        Whatever paths clients send, the route label stays within the
        broker's own route templates (and "other").
        """
        rng = st.text(
            st.characters(codec="utf-8", exclude_characters="?#\x00"), min_size=1, max_size=30
        )
        paths = ["/" + rng.example() for _ in range(25)]
        paths += ["/mcp/../x", "//mcp", "/MCP", "/healthz/", "/oauth/%74oken", "/.well-known/"]
        for path in paths:
            await self.request(
                "GET", "/" + "/".join(p.replace("%", "%25") for p in path.split("/")[1:])
            )
        after = await self.metrics.scrape()
        self.assertLessEqual(
            label_values(after, "fjmcp_http_requests_total", "route"),
            ROUTES.templates | {"other"},
        )
        self.assertLessEqual(
            label_values(after, "fjmcp_http_request_duration_seconds_count", "route"),
            ROUTES.templates | {"other"},
        )

    async def test_the_metrics_listener_serves_only_metrics(self) -> None:
        response = await http_client().get(self.broker.metrics_url + "/")
        await response.content()
        self.assertEqual(response.code, 404)
        response = await http_client().get(self.broker.metrics_url + "/metrics/x")
        await response.content()
        self.assertEqual(response.code, 404)
        # A scraper asking for OpenMetrics gets it.
        response = await http_client().get(
            self.broker.metrics_url + "/metrics",
            headers=Headers({b"Accept": [b"application/openmetrics-text; version=1.0.0"]}),
        )
        body = (await response.content()).decode()
        self.assertTrue(
            response.headers.getRawHeaders(b"content-type")[0].startswith(
                b"application/openmetrics-text"
            )
        )
        self.assertTrue(body.rstrip().endswith("# EOF"))
        self.assertIn("fjmcp_sessions_active", body)

    async def test_process_metrics(self) -> None:
        samples = await self.metrics.scrape()
        self.assertGreater(value(samples, "fjmcp_process_resident_memory_bytes"), 0)
        self.assertGreater(value(samples, "fjmcp_process_open_fds"), 0)
        self.assertIn("fjmcp_process_cpu_seconds_total", {name for name, _ in samples})
        self.assertEqual(label_values(samples, "fjmcp_build_info", "version"), {fjmcp.__version__})


class TokenMetricsTests(MetricsBrokerTestCase):
    broker_options = {"refresh_grace_period": 0.2}

    async def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        response = await self.browser.post(self.broker.url + "/oauth/token", data=form)
        return response.code, await response.json()

    async def test_grants_and_reuse(self) -> None:
        await self.metrics.start()
        tokens = await self.login_tokens()
        client_id = tokens["client"]["client_id"]
        refresh = {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": client_id,
        }
        code, body = await self.token(refresh)
        self.assertEqual(code, 200, body)
        await sleep(0.3)
        # The old refresh token again, after the grace period: reuse.
        code, body = await self.token(refresh)
        self.assertEqual((code, body["error"]), (400, "invalid_grant"))
        code, body = await self.token({"grant_type": "password", "client_id": client_id})
        self.assertEqual((code, body["error"]), (400, "unsupported_grant_type"))
        after = await self.metrics.scrape()

        def grants(grant_type: str, outcome: str) -> float:
            return self.metrics.delta(
                after, "fjmcp_token_requests_total", grant_type=grant_type, outcome=outcome
            )

        self.assertEqual(grants("authorization_code", "ok"), 1)
        self.assertEqual(grants("refresh_token", "ok"), 1)
        self.assertEqual(grants("refresh_token", "invalid_grant"), 1)
        self.assertEqual(grants("other", "unsupported_grant_type"), 1)
        self.assertEqual(
            self.metrics.delta(after, "fjmcp_token_reuse_detections_total", kind="refresh_token"),
            1,
        )
        for operation in ("token authorization_code", "token refresh_token"):
            self.assertGreaterEqual(
                self.metrics.delta(
                    after, "fjmcp_store_operation_duration_seconds_count", operation=operation
                ),
                1,
            )
        self.assertIn(
            "/oauth/token",
            label_values(after, "fjmcp_http_request_duration_seconds_count", "route"),
        )
        self.assertEqual(
            self.metrics.delta(
                after,
                "fjmcp_http_requests_total",
                route="/oauth/token",
                method="POST",
                status="400",
            ),
            2,
        )

    async def expiring(self, refresh: str | None = None) -> UpstreamCredentials:
        """
        Make alice's stored Forgejo token expire in a minute (so the next
        use renews it), with her real refresh token or C{refresh}.
        """
        credentials = self.broker.credentials
        cred = await self.broker.store.get_upstream_credential(1)
        assert cred is not None and cred.refresh_token_enc is not None
        token = await credentials.access_token(1)
        real = credentials._box.open(cred.refresh_token_enc, "forgejo-user:1:refresh")
        await credentials.save(
            ForgejoUser(1, "alice", "Alice"),
            UpstreamTokens(token, refresh or real, reactor.seconds() + 60, cred.scope),
        )
        credentials._cache.clear()
        return credentials

    async def test_upstream_refresh_outcomes(self) -> None:
        await self.login_tokens()
        await self.metrics.start()
        credentials = await self.expiring()
        await credentials.access_token(1)
        credentials = await self.expiring(refresh="gtr_not-a-refresh-token")
        with self.assertRaises(LoginRequiredError):
            await credentials.access_token(1)
        after = await self.metrics.scrape()
        self.assertEqual(
            self.metrics.delta(after, "fjmcp_upstream_refreshes_total", outcome="ok"), 1
        )
        self.assertEqual(
            self.metrics.delta(after, "fjmcp_upstream_refreshes_total", outcome="rejected"), 1
        )

    async def test_upstream_unavailable(self) -> None:
        await self.login_tokens()
        await self.metrics.start()
        credentials = await self.expiring()
        await self.broker.forgejo_site.port.stopListening()
        await self.broker.parts.upstream_pool.closeCachedConnections()
        with self.assertRaises(UpstreamError):
            await credentials.access_token(1)
        after = await self.metrics.scrape()
        self.assertEqual(
            self.metrics.delta(after, "fjmcp_upstream_refreshes_total", outcome="unavailable"), 1
        )


class LabelTests(SynchronousTestCase):
    def test_known_routes_are_their_own_label(self) -> None:
        for path in (b"/mcp", b"/mcp/", b"/healthz", b"/oauth/token", b"/oauth/authorize"):
            self.assertEqual(ROUTES(path), path.decode())
        self.assertEqual(ROUTES(b"/%6Dcp"), "/mcp")
        self.assertEqual(ROUTES(b"/metrics"), "other")

    @given(st.binary(max_size=200))
    @settings(max_examples=500)
    def test_random_paths_never_make_a_new_route_label(self, path: bytes) -> None:
        self.assertIn(ROUTES(b"/" + path), ROUTES.templates | {"other"})

    @given(st.lists(st.text(max_size=20), max_size=5))
    def test_route_templates_with_variables(self, segments: list[str]) -> None:
        routes = http_metrics.RouteLabels(
            ["/a", "/connections/<client_id>/revoke", "/f/<path:rest>"]
        )
        path = "/" + "/".join(segments)
        self.assertIn(routes(path.encode("utf-8")), routes.templates | {"other"})
        self.assertEqual(routes(b"/connections/abc/revoke"), "/connections/<client_id>/revoke")
        self.assertEqual(routes(b"/f/x/y/z"), "/f/<path:rest>")

    @given(st.binary(max_size=20), st.integers(min_value=-1000, max_value=100_000), st.booleans())
    def test_methods_and_statuses_are_bounded(self, method: bytes, code: int, wrote: bool) -> None:
        self.assertIn(http_metrics.method_label(method), metrics.METHODS | {"other"})
        status = http_metrics.status_label(code, wrote)
        self.assertTrue(status in ("aborted", "other") or 100 <= int(status) <= 599, status)

    @given(st.text(max_size=30), st.text(max_size=30))
    def test_other_labels_are_bounded(self, reason: str, outcome: str) -> None:
        metrics.session_ended(reason)
        metrics.token_request(reason, 400, {"error": outcome})
        metrics.upstream_refresh(outcome)
        labels = {s.labels["reason"] for m in metrics.SESSIONS_ENDED.collect() for s in m.samples}
        self.assertLessEqual(labels, set(metrics.SESSION_END_REASONS))
        grants = {
            (s.labels["grant_type"], s.labels["outcome"])
            for m in metrics.TOKEN_REQUESTS.collect()
            for s in m.samples
        }
        for grant_type, result in grants:
            self.assertIn(grant_type, (*metrics.GRANT_TYPES, "other"))
            self.assertIn(result, metrics.GRANT_OUTCOMES | {"ok", "other"})

    def test_store_operation_names_are_capped(self) -> None:
        self.patch(metrics, "_store_operations", set())
        for i in range(metrics.MAX_STORE_OPERATIONS + 10):
            done: Deferred[None] = Deferred()
            metrics.timed_store_operation(f"op-{i}", done)
            done.callback(None)
        names = {s.labels["operation"] for m in metrics.STORE_DURATION.collect() for s in m.samples}
        self.assertIn("other", names)
        self.assertNotIn(f"op-{metrics.MAX_STORE_OPERATIONS}", names)


class ConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(self.mktemp())
        self.tmp.mkdir()
        self.files = make_files(self.tmp)
        self.argv = good_argv(self.files, str(self.tmp / "data"))

    def config(self, flags: dict[str, str], environ: dict[str, str] | None = None) -> Any:
        base = {}
        for arg in self.argv:
            name, _, val = arg[2:].partition("=")
            base[name] = val
        base.update(flags)
        return build_config(base, [], environ or {})

    def test_disabled_by_default(self) -> None:
        config = self.config({})
        self.assertEqual(config.metrics_listen, "")
        migrate_database(config.db_path)
        top = build_service(config, reactor, schema_version=1)
        self.assertNotIn("metrics", [s.name for s in top])
        top.getServiceNamed("store").store.close()

    def test_enabled(self) -> None:
        config = self.config({"metrics-listen": "tcp:0:interface=127.0.0.1"})
        self.assertEqual(config.metrics_listen, "tcp:0:interface=127.0.0.1")
        environ = {"FJMCP_METRICS_LISTEN": "unix:/tmp/fjmcp-metrics.sock"}
        self.assertEqual(self.config({}, environ).metrics_listen, "unix:/tmp/fjmcp-metrics.sock")
        migrate_database(config.db_path)
        top = build_service(config, reactor, schema_version=1)
        self.assertIn("metrics", [s.name for s in top])
        top.getServiceNamed("store").store.close()

    def test_invalid_is_listed_with_the_other_mistakes(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            self.config({"metrics-listen": "bogus:9108", "max-sessions": "lots"})
        joined = "\n".join(cm.exception.problems)
        self.assertIn("--metrics-listen: not a usable endpoint description 'bogus:9108'", joined)
        self.assertIn("--max-sessions: not a whole number", joined)
        self.assertEqual(len(cm.exception.problems), 2, joined)
        with self.assertRaises(ConfigError) as cm:
            self.config({}, {"FJMCP_METRICS_LISTEN": "tcp:notaport"})
        self.assertIn("FJMCP_METRICS_LISTEN: not a usable endpoint", cm.exception.problems[0])

    def test_not_on_the_public_listener(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            build_config(
                {
                    **{a[2:].partition("=")[0]: a.partition("=")[2] for a in self.argv},
                    "metrics-listen": "tcp:8080:interface=127.0.0.1",
                },
                ["tcp:8080:interface=127.0.0.1"],
                {},
            )
        self.assertIn("never the public one", cm.exception.problems[0])


class DaemonTests(TestCase):
    async def test_daemon_serves_metrics_on_its_own_listener(self) -> None:
        daemon = Daemon(self)
        # A short path: AF_UNIX allows 108 bytes, and trial's are longer.
        short = Path(tempfile.mkdtemp(prefix="fjmcp-"))
        self.addCleanup(shutil.rmtree, short, True)
        socket_path = short / "metrics.sock"
        daemon.argv.append(f"--metrics-listen=unix:{socket_path}")
        daemon.start()
        port = await daemon.port()
        await wait_until(socket_path.exists, what="the metrics socket")
        # The public listener has no /metrics.
        public = await http_client().get(f"http://127.0.0.1:{port}/metrics")
        await public.content()
        self.assertEqual(public.code, 404)
        agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(str(socket_path)))
        response = await HTTPClient(agent).get("http://localhost/metrics")
        samples = parse((await response.content()).decode())
        self.assertEqual(response.code, 200)
        self.assertEqual(value(samples, "fjmcp_sessions_active"), 0)
        self.assertEqual(
            value(samples, "fjmcp_http_requests_total", route="other", method="GET", status="404"),
            1,
        )
        self.assertGreater(value(samples, "fjmcp_process_resident_memory_bytes"), 0)
        self.assertEqual((await daemon.terminate())[0], 0)
        # Scrapes are not in the access log.
        self.assertEqual(daemon.log_text().count('"GET /metrics'), 1)
