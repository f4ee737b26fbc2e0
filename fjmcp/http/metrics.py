"""
Metrics over HTTP: every request measured at the twisted.web level, the
scrape-time collector of live sessions and children, and the C{/metrics}
resource of the separate listener (L{fjmcp.metrics} has the counters and
why they are shaped as they are).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any
from urllib.parse import unquote

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule

from fjmcp import __version__
from fjmcp.metrics import (
    EVENT_METRICS,
    HTTP_DURATION,
    HTTP_REQUESTS,
    HTTP_STREAM_DURATION,
    METHODS,
    NAMESPACE,
    OTHER,
)

# --- HTTP requests


class RouteLabels:
    """
    Maps a request path to the route template that serves it, or C{other}:
    the label never contains anything a client chose.
    """

    def __init__(self, templates: Iterable[str]) -> None:
        self.templates = frozenset(templates)
        # Every route today is a plain path; a dict answers those.  Routes
        # with variables, if any appear, go through werkzeug as Klein does.
        self._static = {t: t for t in self.templates if "<" not in t}
        dynamic = sorted(t for t in self.templates if "<" in t)
        self._dynamic = (
            Map([Rule(t, endpoint=t) for t in dynamic], merge_slashes=False).bind("fjmcp")
            if dynamic
            else None
        )

    @classmethod
    def of(cls, *apps: Any) -> RouteLabels:
        """
        The route templates of Klein apps.
        """
        return cls(rule.rule for app in apps for rule in app.url_map.iter_rules())

    def __call__(self, path: bytes) -> str:
        text = unquote(path.decode("latin-1"), errors="replace")
        route = self._static.get(text)
        if route is not None:
            return route
        if self._dynamic is not None:
            try:
                endpoint, _ = self._dynamic.match(text, method="GET")
            except HTTPException:
                # Not found, or a redirect Klein would answer: not a route.
                return OTHER
            return str(endpoint) if endpoint in self.templates else OTHER
        return OTHER


def method_label(method: bytes) -> str:
    text = method.decode("latin-1", "replace")
    return text if text in METHODS else OTHER


def status_label(code: int, started_writing: bool) -> str:
    if not started_writing:
        # The client went away before any answer.
        return "aborted"
    return str(code) if 100 <= code <= 599 else OTHER


class MeasuredRequest(Request):
    """
    A request that counts itself when it is done, finished or cut off.
    C{routes} is set on the subclass L{measured_request_factory} makes.
    """

    routes: Callable[[bytes], str] = staticmethod(lambda path: OTHER)

    def process(self) -> None:
        started = time.monotonic()
        self.notifyFinish().addBoth(self._measured, started)
        super().process()

    def _measured(self, result: object, started: float) -> None:
        elapsed = time.monotonic() - started
        route = self.routes(self.path or b"")
        method = method_label(self.method or b"")
        status = status_label(self.code, bool(self.startedWriting))
        HTTP_REQUESTS.labels(route, method, status).inc()
        content_type = self.responseHeaders.getRawHeaders(b"content-type") or [b""]
        if method == "GET" and content_type[0].startswith(b"text/event-stream"):
            # A GET event stream stays open as long as the client listens:
            # its length says nothing about how fast the broker answers.
            HTTP_STREAM_DURATION.labels(route).observe(elapsed)
        else:
            HTTP_DURATION.labels(route, status).observe(elapsed)
        # Consumes a lost connection's failure: nothing else waits on it.
        return None


def measured_request_factory(routes: Callable[[bytes], str]) -> type[Request]:
    return type("MeasuredRequest", (MeasuredRequest,), {"routes": staticmethod(routes)})


def instrument(site: Site, routes: Callable[[bytes], str]) -> None:
    """
    Count and time every request C{site} answers from now on.
    """
    site.requestFactory = measured_request_factory(routes)


# --- live state, read at scrape time


class BrokerCollector(Collector):
    """
    One broker's live sessions and children, and what it was built as.
    """

    def __init__(self, sessions: Sized, children: Sized, max_sessions: int | None = None) -> None:
        self._sessions = sessions
        self._children = children
        self._max_sessions = max_sessions

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "fjmcp_sessions_active", "MCP sessions open now", value=len(self._sessions)
        )
        yield GaugeMetricFamily(
            "fjmcp_children_live",
            "forgejo-mcp children running now (more than sessions while a renewed "
            "session's old child finishes its calls)",
            value=len(self._children),
        )
        if self._max_sessions is not None:
            yield GaugeMetricFamily(
                "fjmcp_sessions_limit", "--max-sessions", value=self._max_sessions
            )
        info = GaugeMetricFamily("fjmcp_build_info", "fjmcp's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

    def describe(self) -> Iterator[Metric]:
        # Names only: registering must not read the live objects.
        for name in ("sessions_active", "children_live", "build_info"):
            yield GaugeMetricFamily(f"fjmcp_{name}", "")
        if self._max_sessions is not None:
            yield GaugeMetricFamily("fjmcp_sessions_limit", "")


def broker_registry(
    sessions: Sized, children: Sized, max_sessions: int | None = None
) -> CollectorRegistry:
    """
    A registry with every event metric, this broker's live gauges and the
    process's memory, file descriptors and CPU time (C{fjmcp_process_*}).
    """
    registry = CollectorRegistry(auto_describe=True)
    for metric in EVENT_METRICS:
        registry.register(metric)
    registry.register(BrokerCollector(sessions, children, max_sessions))
    ProcessCollector(namespace=NAMESPACE, registry=registry)
    return registry


# --- the /metrics listener


class MetricsResource(Resource):
    """
    C{/metrics} in the Prometheus text format (or OpenMetrics, when the
    scraper asks for it); 404 for every other path.  Rendered on the
    reactor thread: the collectors read reactor-owned state, and a scrape
    takes well under a millisecond.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"404 Not Found: this listener serves only /metrics\n"
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encode, content_type = choose_encoder(accept)
        request.setHeader(b"Content-Type", content_type.encode("latin-1"))
        request.setHeader(b"Cache-Control", b"no-store")
        return encode(self.registry)


class MetricsSite(Site):
    """
    The metrics listener's site: no access log for scrapes.
    """

    def log(self, request: Any) -> None:
        pass


def metrics_site(registry: CollectorRegistry) -> Site:
    site = MetricsSite(MetricsResource(registry))
    site.displayTracebacks = False
    return site
