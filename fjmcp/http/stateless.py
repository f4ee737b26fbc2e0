"""
`/mcp` for clients of the stateless revision (MCP 2026-07-28): one request
per POST, no session header, answered as JSON (or as an event stream when
the child reports progress first).

What a request must be and how answers are stamped is
L{fjmcp.mcp.stateless}'s; which child serves it (the grant's warm one)
L{fjmcp.mcp.warm}'s.  The per-user cap on open exchanges and the error
answers are shared with the handshake-era endpoint
(L{fjmcp.http.streamable}), which hands such requests over here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from fjmcp.http.exchanges import _SSE, KEEPALIVE, PostExchange, accepted
from fjmcp.mcp.children import Child
from fjmcp.mcp.jsonrpc import known_id
from fjmcp.mcp.session import Session
from fjmcp.mcp.session_children import SessionLimitError, SpawnError
from fjmcp.mcp.sessions import SessionManager
from fjmcp.mcp.stateless import (
    LISTEN,
    SUBSCRIPTION_ID,
    acknowledgement,
    check,
    discover_result,
    for_listener,
    honoured,
    http_status,
    refusal_to_child,
    stamp,
    to_child,
)
from fjmcp.mcp.warm import WarmChildren

if TYPE_CHECKING:
    from fjmcp.http.streamable import MCPEndpoint

ROUTING_HEADERS = ("mcp-protocol-version", "mcp-method", "mcp-name")


class StatelessExchange(PostExchange):
    """
    The answer to one stateless request.  The revision lets only the
    request's progress come before its response: a child's log messages
    are dropped, and its requests to the client (which a stateless client
    cannot answer on this wire) are refused to the child at once.
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        keepalive: float,
        on_response: Callable[[dict[str, Any], Request], None],
        child: Callable[[], Child],
        refuse: Callable[[dict[str, Any]], None],
    ) -> None:
        super().__init__(request, clock, keepalive, on_response, child, status=http_status)
        self._refuse = refuse

    def message(self, message: dict[str, Any]) -> None:
        if "id" in message:
            self._refuse(message)
        elif message.get("method") == "notifications/progress":
            super().message(message)


class StatelessEndpoint:
    def __init__(
        self,
        endpoint: MCPEndpoint,
        sessions: SessionManager,
        warm: WarmChildren,
        users: Any,
        clock: IReactorTime,
        keepalive: float = KEEPALIVE,
    ) -> None:
        self._endpoint = endpoint
        self._sessions = sessions
        self._warm = warm
        self._users = users
        self._clock = clock
        self._keepalive = keepalive

    async def post(
        self,
        request: Request,
        message: Any,
        user_id: int,
        forgejo_token: str,
        family_id: str,
    ) -> bytes | None:
        endpoint = self._endpoint
        headers = {
            name: [
                v.decode("latin-1")
                for v in request.requestHeaders.getRawHeaders(name.encode("ascii"), [])
            ]
            for name in ROUTING_HEADERS
        }
        refusal = check(message, headers)
        if refusal is not None:
            return endpoint.json(request, refusal.status, refusal.response)
        if "id" not in message:
            # The revision defines no notification from the client; one
            # that comes anyway is taken and dropped.
            return accepted(request)
        if (full := endpoint.full(request, user_id, message)) is not None:
            return full

        async def login() -> str:
            user = await self._users.get_user(user_id)
            return user.login if user is not None else str(user_id)

        try:
            session = await self._warm.session(user_id, login, forgejo_token, family_id)
        except (SessionLimitError, SpawnError) as e:
            return endpoint.unavailable(request, known_id(message), e)
        handshake = session.handshake_result or {}
        method = message["method"]
        if method == LISTEN:
            await self._listen(request, message, session, user_id)
            return None
        if method == "server/discover":
            return endpoint.json(
                request,
                200,
                {"jsonrpc": "2.0", "id": message["id"], "result": discover_result(handshake)},
            )
        server_info = handshake.get("serverInfo")

        def on_response(response: dict[str, Any], _: Request) -> None:
            stamp(method, message, response, server_info)

        def refuse(server_request: dict[str, Any]) -> None:
            self._sessions.client_response(session, refusal_to_child(server_request))

        exchange = StatelessExchange(
            request, self._clock, self._keepalive, on_response, lambda: session.child, refuse
        )
        router = self._sessions.client_request(session, to_child(message), exchange)
        await endpoint.hold(user_id, exchange.done)
        if exchange.gone:
            router.abandon(exchange)
        return None

    async def _listen(
        self, request: Request, message: dict[str, Any], session: Session, user_id: int
    ) -> None:
        """
        A subscriptions/listen stream: the acknowledgement (what it will
        carry: the list changes asked for that the child announces), then
        each such change, until the client goes away or the grant's session
        ends (then the request's response closes it).
        """
        subscription = message["id"]
        handshake = session.handshake_result or {}
        delivered = honoured(message["params"].get("notifications"), handshake.get("capabilities"))
        sse = _SSE(request, self._clock, self._keepalive)
        sse.send(acknowledgement(subscription, delivered))
        done: Deferred[None] = Deferred(lambda d: sse.close(finish=False))

        def send(notification: dict[str, Any]) -> None:
            out = for_listener(notification, subscription, delivered)
            if out is not None:
                sse.send(out)

        def end() -> None:
            result: dict[str, Any] = {"resultType": "complete"}
            stamp(LISTEN, message, {"result": result}, handshake.get("serverInfo"))
            result["_meta"][SUBSCRIPTION_ID] = subscription
            sse.send({"jsonrpc": "2.0", "id": subscription, "result": result})
            sse.close()
            if not done.called:
                done.callback(None)

        stop = self._warm.listen(session, send, end)
        try:
            await self._endpoint.hold(user_id, done)
        finally:
            stop()
