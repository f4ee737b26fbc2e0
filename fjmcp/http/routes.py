"""
The root of the broker's HTTP tree: health, and one Klein branch per
audience (the `/mcp` gate, the OAuth endpoints for programs, the pages for
people), each with only the dependencies it needs.  Routes turn requests
into calls on domain objects and results into responses; they hold no state
of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import MapAdapter, RequestRedirect

from fjmcp import __version__
from fjmcp.buildinfo import build_info
from fjmcp.http.browser import BrowserPages
from fjmcp.http.common import html_page, json_response, unexpected
from fjmcp.http.gate import MCPGate
from fjmcp.http.oauth_endpoints import OAuthEndpoints

HEALTH_TIMEOUT = 3.0

log = Logger()


class HealthSource(Protocol):
    def check(self) -> Deferred[None]: ...


class SessionCount(Protocol):
    def __len__(self) -> int: ...


class Health:
    """
    `/healthz`, and the answer for paths no branch has (Klein's 404).
    """

    app = Klein()

    def __init__(
        self,
        store: HealthSource,
        sessions: SessionCount,
        clock: IReactorTime,
        home: bytes = b"",
    ) -> None:
        self._store = store
        self._sessions = sessions
        self._clock = clock
        self._home = home

    def resource(self) -> Any:
        return self.app.resource()

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        return unexpected(request, failure)

    @app.route("/", methods=["GET", "HEAD"])
    def home(self, request: Request) -> bytes:
        """
        A person who opens the broker's address learns what it is, rather
        than reading a bare 404.
        """
        return html_page(request, 200, self._home)

    @app.route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self, request: Request) -> bytes:
        """
        Liveness and readiness in one: 200 while the database answers, 503
        when it does not (a load balancer or podman then knows).
        """
        store = "ok"
        try:
            await self._store.check().addTimeout(HEALTH_TIMEOUT, self._clock)
        except Exception as e:
            log.error("health check: the store did not answer: {error}", error=e)
            store = "unavailable"
        return json_response(
            request,
            200 if store == "ok" else 503,
            {
                "status": "ok" if store == "ok" else "unavailable",
                "version": __version__,
                # Read once at start-up: which build answers (see fjmcp.buildinfo).
                "build": build_info().as_dict(),
                "store": store,
                "sessions": len(self._sessions),
            },
        )


class Branch(Protocol):
    app: Klein

    def resource(self) -> Any: ...


class Branches(Resource):
    """
    Hands each request to the first branch with a route for its path (any
    method: the branch answers 405 itself), else to the last one.
    """

    isLeaf = True

    def __init__(self, branches: Sequence[Branch]) -> None:
        super().__init__()
        self._branches = [(b.app.url_map.bind(""), b.resource()) for b in branches]

    def render(self, request: IRequest) -> Any:
        path = "/" + "/".join(s.decode("utf-8") for s in request.postpath)
        method = request.method.decode("latin-1")
        for routes, resource in self._branches[:-1]:
            if _has_route(routes, path, method):
                return resource.render(request)
        return self._branches[-1][1].render(request)


def _has_route(routes: MapAdapter, path: str, method: str) -> bool:
    try:
        routes.match(path, method=method)
    except NotFound:
        return False
    except (MethodNotAllowed, RequestRedirect):
        # The branch answers: 405, or the redirect Klein makes of it.
        return True
    return True


class UTF8Gate(Resource):
    """
    Answers a request whose path or Host name is not UTF-8 with a plain 400
    before Klein sees it: Klein cannot route such a request either, and
    answers 400 too, but logs each one as an error with a traceback, so any
    client could fill the operator's log with what are only bad requests.
    """

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: IRequest) -> Any:
        # What Klein decodes before routing: the path, percent-decoded by
        # twisted.web into segments, and the host name from Host.
        path = b"/".join([*request.prepath, *request.postpath])
        for what, raw in (("path", path), ("Host header", request.getRequestHostname())):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                request.setResponseCode(400)
                request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
                return f"400 Bad Request: the request's {what} is not UTF-8\n".encode()
        return self._inner.render(request)


class BrokerApp:
    """
    The whole tree: the branches in the order requests try them (the
    busiest first), behind the UTF-8 gate.
    """

    def __init__(
        self, health: Health, gate: MCPGate, oauth: OAuthEndpoints, browser: BrowserPages
    ) -> None:
        self.branches: list[Branch] = [gate, oauth, browser, health]

    @staticmethod
    def apps() -> list[Klein]:
        """
        Every branch's routes (for the metrics' route labels).
        """
        return [MCPGate.app, OAuthEndpoints.app, BrowserPages.app, Health.app]

    def resource(self) -> Any:
        return UTF8Gate(Branches(self.branches))
