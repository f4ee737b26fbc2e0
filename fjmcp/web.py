"""
The broker's HTTP face: the Klein resource tree.  Routes turn requests into
calls on domain objects and results into responses; they hold no state of
their own.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Request

from fjmcp import __version__

HEALTH_TIMEOUT = 3.0

log = Logger()


class HealthSource(Protocol):
    def check(self) -> Deferred[None]: ...


class SessionCount(Protocol):
    def __len__(self) -> int: ...


def json_response(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode("utf-8")


def access_log_line(timestamp: str, request: Any) -> str:
    """
    One access-log line per request, without the query string: OAuth
    redirects carry codes and state there, and logs outlive them.
    """
    client = getattr(request.getClientAddress(), "host", "-")
    path = request.path.decode("latin-1", "replace")
    agent = (request.getHeader(b"user-agent") or b"-").decode("latin-1", "replace")
    return (
        f'"{client}" "{request.method.decode("latin-1")} {path} '
        f'{request.clientproto.decode("latin-1")}" {request.code} '
        f'{request.sentLength or "-"} "{agent}"'
    )


class BrokerApp:
    """
    All broker routes.  Dependencies come in through the constructor so
    tests can serve the same tree over fakes.
    """

    app = Klein()

    def __init__(self, store: HealthSource, sessions: SessionCount, clock: Any) -> None:
        self._store = store
        self._sessions = sessions
        self._clock = clock

    def resource(self) -> Any:
        return self.app.resource()

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
                "store": store,
                "sessions": len(self._sessions),
            },
        )
