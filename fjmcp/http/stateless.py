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
from fjmcp.mcp.input_required import (
    ASKING,
    InputWaits,
    Parked,
    may_ask,
    responses_problem,
    same_call,
)
from fjmcp.mcp.jsonrpc import INVALID_PARAMS, known_id
from fjmcp.mcp.jsonrpc import error as rpc_error
from fjmcp.mcp.router import SessionRouter
from fjmcp.mcp.session import Session
from fjmcp.mcp.session_children import SessionLimitError, SpawnError
from fjmcp.mcp.sessions import SessionManager
from fjmcp.mcp.stateless import (
    LISTEN,
    META_CAPABILITIES,
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
    are dropped, and its questions to the client go to C{question} (which
    answers with them, or refuses them to the child).
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        keepalive: float,
        on_response: Callable[[dict[str, Any], Request], None],
        child: Callable[[], Child],
        question: Callable[[dict[str, Any]], None],
    ) -> None:
        super().__init__(request, clock, keepalive, on_response, child, status=http_status)
        self._question = question

    def message(self, message: dict[str, Any]) -> None:
        if "id" in message:
            self._question(message)
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
        self._waits = InputWaits(clock)

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

        # Waiting for the grant's child counts against the user's open
        # exchanges too; discover needs no child once the handshake is known.
        waited: Deferred[None] = Deferred()
        counted = Deferred.fromCoroutine(endpoint.hold(user_id, waited))
        try:
            session = await self._warm.session(
                user_id,
                login,
                forgejo_token,
                family_id,
                wake=message["method"] != "server/discover",
            )
        except (SessionLimitError, SpawnError) as e:
            return endpoint.unavailable(request, known_id(message), e)
        finally:
            waited.callback(None)
            await counted
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
        owner = (user_id, family_id)
        if method in ASKING and "requestState" in message["params"]:
            return await self._follow_up(request, message, session, owner)
        # The router the call goes to (the session's current child's).
        router = session.router
        exchange = self._exchange(request, message, session, owner, router)
        self._sessions.client_request(session, to_child(message), exchange)
        await self._held(user_id, exchange, router)
        return None

    async def _held(self, user_id: int, exchange: StatelessExchange, router: SessionRouter) -> None:
        """
        Hold the exchange open against the user's cap until it is answered;
        a client gone meanwhile has its call cancelled in the child.
        """
        await self._endpoint.hold(user_id, exchange.done)
        if exchange.gone:
            router.abandon(exchange)

    def _exchange(
        self,
        request: Request,
        message: dict[str, Any],
        session: Session,
        owner: tuple[int, str],
        router: SessionRouter,
    ) -> StatelessExchange:
        """
        The answer to C{message}, the call C{router} holds:
        the child's answer stamped, or, when the child asks the client
        something the client can answer, the question (the call parked until
        the client's follow-up).
        """
        method = message["method"]
        server_info = (session.handshake_result or {}).get("serverInfo")
        capabilities = message["params"]["_meta"].get(META_CAPABILITIES)

        def on_response(response: dict[str, Any], _: Request) -> None:
            stamp(method, message, response, server_info)

        def question(asked: dict[str, Any]) -> None:
            if not may_ask(message, capabilities, asked):
                router.client_response(refusal_to_child(asked))
                return
            parked = Parked(owner, session, router, message)
            parked.message(asked)
            router.rebind(exchange, parked)
            handle = self._waits.park(parked)
            exchange.finish(
                {"jsonrpc": "2.0", "id": message["id"], "result": parked.input_required(handle)}
            )

        exchange = StatelessExchange(
            request, self._clock, self._keepalive, on_response, lambda: session.child, question
        )
        return exchange

    async def _follow_up(
        self,
        request: Request,
        message: dict[str, Any],
        session: Session,
        owner: tuple[int, str],
    ) -> bytes | None:
        """
        A call repeated with the client's answers to the child's questions:
        they go to the child, and the call goes on (or asks what is still
        unanswered).  A state that is not this user's and grant's parked
        call, or answers that are not objects, are invalid params.
        """
        endpoint = self._endpoint
        params = message["params"]
        handle = params["requestState"]
        parked = self._waits.peek(handle, owner)
        if parked is None or parked.session is not session or not same_call(parked.call, message):
            return endpoint.json(
                request,
                400,
                rpc_error(
                    message["id"],
                    INVALID_PARAMS,
                    "Invalid or expired requestState",
                    {"reason": "invalid_request_state"},
                ),
            )
        responses = params.get("inputResponses", {})
        problem = responses_problem(responses)
        if problem is not None:
            return endpoint.json(
                request, 400, rpc_error(message["id"], INVALID_PARAMS, f"Invalid params: {problem}")
            )
        self._waits.take(handle)
        server_info = (session.handshake_result or {}).get("serverInfo")
        if parked.final is not None:
            # The call ended meanwhile (its deadline, its child): that is
            # the answer, and its questions are moot.
            parked.refuse_all()
            response = dict(parked.final)
            response["id"] = message["id"]
            stamp(message["method"], message, response, server_info)
            return endpoint.json(request, http_status(response), response)
        for key, answer in responses.items():
            if parked.asked.pop(key, None) is not None:
                parked.router.client_response({"jsonrpc": "2.0", "id": key, "result": answer})
        if parked.asked:
            # Still unanswered: ask again, under a new handle.
            response = {
                "jsonrpc": "2.0",
                "id": message["id"],
                "result": parked.input_required(self._waits.park(parked)),
            }
            stamp(message["method"], message, response, server_info)
            return endpoint.json(request, 200, response)
        user_id = owner[0]
        if (full := endpoint.full(request, user_id, message)) is not None:
            return full
        exchange = self._exchange(request, message, session, owner, parked.router)
        parked.router.rebind(parked, exchange, message["id"])
        await self._held(user_id, exchange, parked.router)
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
            result.setdefault("_meta", {})[SUBSCRIPTION_ID] = subscription
            sse.send({"jsonrpc": "2.0", "id": subscription, "result": result})
            sse.close()
            if not done.called:
                done.callback(None)

        stop = self._warm.listen(session, send, end)
        try:
            await self._endpoint.hold(user_id, done)
        finally:
            stop()
