"""
MCP Streamable HTTP on `/mcp`, for an already authenticated user: session
headers, protocol versions, JSON or SSE answers, the GET stream, DELETE.

This module owns the wire format (status codes, headers, which answer goes
out as JSON and which as a stream), what a body must be before anything of
it reaches a child (L{fjmcp.safejson}, L{fjmcp.mcp.jsonrpc}), and the
per-user cap on exchanges held open; SSE framing, keep-alives and
backpressure are L{fjmcp.http.exchanges}', sessions and their children
L{fjmcp.mcp.sessions}', message routing and request deadlines
L{fjmcp.mcp.router}'s.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from fjmcp import safejson
from fjmcp.http.exchanges import (
    _SSE,
    KEEPALIVE,
    BatchExchange,
    HeldAnswer,
    PostExchange,
    accepted,
)
from fjmcp.http.stateless import StatelessEndpoint
from fjmcp.mcp.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    PARSE_ERROR,
    SERVER_ERROR,
    SESSION_NOT_FOUND,
    classify,
    known_id,
)
from fjmcp.mcp.jsonrpc import error as rpc_error
from fjmcp.mcp.session import Session, wakes
from fjmcp.mcp.session_children import SessionLimitError, SpawnError
from fjmcp.mcp.sessions import SessionManager
from fjmcp.mcp.stateless import HANDSHAKE_VERSIONS, is_stateless
from fjmcp.mcp.warm import WarmChildren

SUPPORTED_VERSIONS = HANDSHAKE_VERSIONS
DEFAULT_VERSION = "2025-03-26"
SESSION_HEADER = b"Mcp-Session-Id"
# Requests in flight and GET streams one user may hold open at once: enough
# for parallel tool calls in several sessions, far below what would starve
# other users of descriptors.
MAX_EXCHANGES_PER_USER = 64
EXCHANGES_RETRY_AFTER = 5

log = Logger()


class MCPEndpoint:
    """
    `/mcp` after authentication.  Each method answers one HTTP request for
    the user C{user_id}, whose bearer token belongs to the grant (token
    family) C{family_id}: a session records it, and ends when it is revoked.
    """

    def __init__(
        self,
        sessions: SessionManager,
        users: Any,
        clock: IReactorTime,
        max_body: int = 1024 * 1024,
        keepalive: float = KEEPALIVE,
        max_exchanges_per_user: int = MAX_EXCHANGES_PER_USER,
        warm: WarmChildren | None = None,
    ) -> None:
        """
        @param warm: the children of stateless (2026-07-28) clients; None:
            made here over C{sessions}.
        """
        self._sessions = sessions
        self._users = users
        self._clock = clock
        self._max_body = max_body
        self._keepalive = keepalive
        self._max_exchanges = max_exchanges_per_user
        # Open exchanges (requests waiting for an answer, GET streams) by user.
        self._open: collections.Counter[int] = collections.Counter()
        self.warm = warm if warm is not None else WarmChildren(sessions, clock)
        self._stateless = StatelessEndpoint(self, sessions, self.warm, users, clock, keepalive)

    def open_exchanges(self, user_id: int) -> int:
        return self._open[user_id]

    def json(self, request: Request, status: int, body: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return safejson.dumps(body)

    async def _session(
        self,
        request: Request,
        user_id: int,
        family_id: str = "",
        forgejo_token: str | None = None,
        message: Any = None,
    ) -> tuple[Session | None, bytes | None]:
        """
        The request's session (resumed from the store when this process
        does not hold it, see L{SessionManager.find}), or the error answer
        (under the id of C{message} when it has one): 400 for an
        unsupported protocol version, 400 without a session id, 404 for an
        unknown, ended or someone else's session, 503 when it cannot be
        resumed now.
        """
        id = known_id(message)
        raw_version = request.getHeader(b"mcp-protocol-version")
        version = raw_version.decode("latin-1") if raw_version is not None else None
        if version is not None and version not in SUPPORTED_VERSIONS:
            if request.method in (b"GET", b"DELETE"):
                # A stateless client has no stream to open and no session to end.
                request.setHeader(b"Allow", b"POST")
                return None, self.json(
                    request,
                    405,
                    rpc_error(
                        id,
                        INVALID_REQUEST,
                        f"Method Not Allowed: MCP-Protocol-Version {version!r} "
                        "has no GET stream or DELETE",
                    ),
                )
            return None, self.json(
                request,
                400,
                rpc_error(
                    id,
                    INVALID_REQUEST,
                    f"Bad Request: unsupported MCP-Protocol-Version {version!r}"
                    f" (supported: {', '.join(SUPPORTED_VERSIONS)})",
                ),
            )
        raw = request.getHeader(SESSION_HEADER)
        if not raw:
            return None, self.json(
                request,
                400,
                rpc_error(id, INVALID_REQUEST, "Bad Request: Mcp-Session-Id header is required"),
            )
        try:
            session = await self._sessions.find(
                raw.decode("latin-1"), user_id, family_id, forgejo_token
            )
        except (SessionLimitError, SpawnError) as e:
            return None, self.unavailable(request, id, e)
        except CancelledError:
            raise
        except Exception as e:
            log.error("cannot look a session up in the store: {error}", error=str(e))
            request.setHeader(b"Retry-After", b"5")
            return None, self.json(
                request, 503, rpc_error(id, INTERNAL_ERROR, "the session store is unavailable")
            )
        if session is None:
            return None, self.json(
                request, 404, rpc_error(id, SESSION_NOT_FOUND, "Session not found")
            )
        return session, None

    def unavailable(self, request: Request, id: Any, e: SessionLimitError | SpawnError) -> bytes:
        """
        No child for the session now: 503, and when to try again.
        """
        if isinstance(e, SpawnError):
            log.error("{error}", error=str(e))
            request.setHeader(b"Retry-After", b"30")
            return self.json(request, 503, rpc_error(id, INTERNAL_ERROR, str(e)))
        request.setHeader(b"Retry-After", str(e.retry_after).encode())
        return self.json(request, 503, rpc_error(id, SERVER_ERROR, str(e)))

    def _ensure_child(
        self,
        request: Request,
        session: Session,
        forgejo_token: str,
        wake: bool,
        message: Any = None,
    ) -> bytes | None:
        try:
            self._sessions.ensure_child(session, forgejo_token, wake)
        except (SessionLimitError, SpawnError) as e:
            id = message.get("id") if isinstance(message, dict) else None
            return self.unavailable(request, id, e)
        return None

    def full(self, request: Request, user_id: int, message: Any = None) -> bytes | None:
        """
        None while the user may open another exchange; else the 429 answer.
        """
        if self._open[user_id] < self._max_exchanges:
            return None
        log.info(
            "user {u} holds {n} requests and streams open; refusing another",
            u=user_id,
            n=self._open[user_id],
        )
        request.setHeader(b"Retry-After", str(EXCHANGES_RETRY_AFTER).encode())
        return self.json(
            request,
            429,
            rpc_error(
                known_id(message),
                SERVER_ERROR,
                f"Too many requests in flight: a user may have {self._max_exchanges} requests "
                "and streams open at once; retry when some have ended",
            ),
        )

    async def hold(self, user_id: int, done: Deferred[None]) -> None:
        """
        Count an exchange against its user until it ends (answered, or the
        client went away).
        """
        self._open[user_id] += 1
        try:
            await _until_done(done)
        finally:
            self._open[user_id] -= 1
            if self._open[user_id] <= 0:
                del self._open[user_id]

    async def post(
        self,
        request: Request,
        user_id: int,
        client_id: str,
        forgejo_token: str,
        family_id: str = "",
    ) -> bytes | None:
        body = request.content.read(self._max_body + 1) if request.content is not None else b""
        if len(body) > self._max_body:
            return self.json(
                request,
                413,
                rpc_error(
                    None, INVALID_REQUEST, f"request body larger than {self._max_body} bytes"
                ),
            )
        try:
            message = safejson.loads(body)
        except safejson.JSONInputError as e:
            return self.json(request, 400, rpc_error(None, PARSE_ERROR, f"Parse error: {e}"))
        version = request.getHeader(b"mcp-protocol-version")
        if not isinstance(message, list) and is_stateless(
            version.decode("latin-1") if version is not None else None, message
        ):
            return await self._stateless.post(request, message, user_id, forgejo_token, family_id)

        if isinstance(message, list):
            return await self._batch(request, user_id, message, forgejo_token, family_id)
        what = classify(message)
        if what.kind == "invalid":
            return self.json(request, 400, what.refusal(message))
        if what.kind == "request" and message["method"] == "initialize":
            if request.getHeader(SESSION_HEADER):
                return self.json(
                    request,
                    400,
                    rpc_error(
                        message["id"], INVALID_REQUEST, "this session is already initialized"
                    ),
                )
            if (full := self.full(request, user_id, message)) is not None:
                return full
            user = await self._users.get_user(user_id)
            login = user.login if user is not None else str(user_id)
            return await self._initialize(
                request, user_id, login, client_id, message, forgejo_token, family_id
            )

        session, error = await self._session(request, user_id, family_id, forgejo_token, message)
        if session is None:
            return error
        # A hibernating session gets a child again; and the user's Forgejo
        # token may have been renewed since the child started: the session
        # then moves to a child holding the new one.
        wake = what.kind != "response" and wakes(message)
        if (
            refused := self._ensure_child(request, session, forgejo_token, wake, message)
        ) is not None:
            return refused
        if what.kind == "notification":
            self._sessions.client_notification(session, message)
            return accepted(request)
        if what.kind == "response":
            if not self._sessions.client_response(session, message):
                return self.json(
                    request,
                    400,
                    rpc_error(message["id"], INVALID_REQUEST, "no server request has that id"),
                )
            return accepted(request)
        if (full := self.full(request, user_id, message)) is not None:
            return full
        exchange = PostExchange(request, self._clock, self._keepalive, child=lambda: session.child)
        router = self._sessions.client_request(session, message, exchange)
        await self.hold(user_id, exchange.done)
        if exchange.gone:
            router.abandon(exchange)
        return None

    async def _initialize(
        self,
        request: Request,
        user_id: int,
        user_login: str,
        client_id: str,
        message: dict[str, Any],
        forgejo_token: str,
        family_id: str = "",
    ) -> bytes | None:
        params = message.get("params") or {}
        asked = params.get("protocolVersion") if isinstance(params, dict) else None
        holder: list[Session] = []

        def on_response(response: dict[str, Any]) -> Deferred[Any]:
            if "result" not in response:
                # The child refused, died or did not answer in time: no
                # session for the client (nor its id, unless a stream
                # already carried the headers).
                if not request.startedWriting:
                    request.responseHeaders.removeHeader(SESSION_HEADER)
                if holder and not holder[0].ended:
                    self._sessions.end(holder[0], "initialize failed", "initialize_failed")
                return succeed(None)
            result = response["result"]
            if isinstance(result, dict) and result.get("protocolVersion") in SUPPORTED_VERSIONS:
                holder[0].protocol_version = result["protocolVersion"]
            return self._sessions.initialized(holder[0])

        exchange = PostExchange(request, self._clock, self._keepalive)
        try:
            session = self._sessions.create(
                user_id,
                user_login,
                client_id,
                asked if asked in SUPPORTED_VERSIONS else DEFAULT_VERSION,
                forgejo_token,
                family_id=family_id,
            )
        except (SessionLimitError, SpawnError) as e:
            return self.unavailable(request, message["id"], e)
        holder.append(session)
        session.initialize = message
        # Now, not with the result: a child that logs while it initializes
        # turns the answer into a stream, whose headers go out first.
        request.setHeader(SESSION_HEADER, session.id.encode())
        # Answered once the session is in the store: with several nodes on
        # one database, the client's next request may reach another node,
        # which resumes the session from there (answered before, that
        # request could find nothing and get 404).
        self._sessions.client_request(
            session, message, HeldAnswer(exchange, on_response, self._clock)
        )
        await self.hold(user_id, exchange.done)
        if exchange.gone and not session.ended:
            # The client never learnt this session's id: nobody can use it.
            # (Ending it forgets the initialize; MCP has no cancelling one.)
            self._sessions.end(session, "the client went away during initialize", "abandoned")
        return None

    async def _batch(
        self,
        request: Request,
        user_id: int,
        messages: list[Any],
        forgejo_token: str,
        family_id: str = "",
    ) -> bytes | None:
        session, error = await self._session(request, user_id, family_id, forgejo_token)
        if session is None:
            return error
        if session.protocol_version != "2025-03-26":
            return self.json(
                request,
                400,
                rpc_error(None, INVALID_REQUEST, "batches are only allowed in 2025-03-26 sessions"),
            )
        if not messages:
            return self.json(
                request, 400, rpc_error(None, INVALID_REQUEST, "Invalid Request: empty batch")
            )
        # JSON-RPC answers each element on its own: the broken ones with an
        # error under their id, the rest as if sent one by one.
        kinds = [classify(message) for message in messages]
        requests = [
            m
            for m, what in zip(messages, kinds, strict=True)
            if what.kind == "request" and m["method"] != "initialize"
        ]
        # A batch refused as a whole delivers nothing: the client retries it.
        if requests and (full := self.full(request, user_id)) is not None:
            return full
        wake = any(
            what.kind != "invalid" and wakes(m)
            for m, what in zip(messages, kinds, strict=True)
            if what.kind in ("request", "notification")
        )
        if (refused := self._ensure_child(request, session, forgejo_token, wake)) is not None:
            return refused
        refusals: list[dict[str, Any]] = []
        for message, what in zip(messages, kinds, strict=True):
            if what.kind == "invalid":
                refusals.append(what.refusal(message))
            elif what.kind == "request" and message["method"] == "initialize":
                refusals.append(
                    rpc_error(message["id"], INVALID_REQUEST, "initialize cannot be batched")
                )
            elif what.kind == "notification":
                self._sessions.client_notification(session, message)
            elif what.kind == "response" and not self._sessions.client_response(session, message):
                refusals.append(
                    rpc_error(message["id"], INVALID_REQUEST, "no server request has that id")
                )
        if not requests and not refusals:
            return accepted(request)
        batch = BatchExchange(request, self._clock, len(requests) + len(refusals))
        for refusal in refusals:
            batch.part().finish(refusal)
        routers = [
            self._sessions.client_request(session, message, batch.part()) for message in requests
        ]
        if not requests:
            return None
        await self.hold(user_id, batch.done)
        if batch.gone:
            for router, part in zip(routers, batch.parts[len(refusals) :], strict=True):
                router.abandon(part)
        return None

    async def get(
        self,
        request: Request,
        user_id: int,
        forgejo_token: str | None = None,
        family_id: str = "",
    ) -> bytes | None:
        """
        The server-to-client stream: notifications and requests not tied to
        a client request.  One per session; a new one replaces the old.  It
        ends when the session does (DELETE, revocation, the child's death).
        """
        session, error = await self._session(request, user_id, family_id, forgejo_token)
        if session is None:
            return error
        if (full := self.full(request, user_id)) is not None:
            return full
        if forgejo_token is not None:
            # An open GET stream does not keep a child running (a hibernating
            # session keeps its stream and wakes on the next request).
            self._sessions.ensure_child(session, forgejo_token, wake=False)
        sse = _SSE(request, self._clock, self._keepalive, child=lambda: session.child)
        # Some proxies hold the headers back until the first bytes.
        request.write(b": stream open\n\n")
        done: Deferred[None] = Deferred(lambda d: sse.close(finish=False))

        def end_stream() -> None:
            sse.close()
            if not done.called:
                done.callback(None)

        session.standalone.attach(sse.send, end_stream)
        try:
            await self.hold(user_id, done)
        finally:
            session.standalone.detach(sse.send)
        return None

    async def delete(self, request: Request, user_id: int) -> bytes:
        session, error = await self._session(request, user_id)
        if session is None:
            assert error is not None
            raw = request.getHeader(SESSION_HEADER)
            if (
                request.code == 404
                and raw
                and await self._sessions.forget_stored(raw.decode("latin-1"), user_id)
            ):
                # Kept from before a restart: ended without a child.
                request.responseHeaders.removeHeader(b"content-type")
                request.setResponseCode(204)
                return b""
            return error
        self._sessions.end(session, "the client ended the session", "deleted")
        request.setResponseCode(204)
        return b""


async def _until_done(done: Deferred[None]) -> None:
    """
    Wait for an exchange to end.  If the client disconnects, Klein cancels
    us: the exchange is marked gone, and the caller forgets its requests.
    """
    try:
        await done
    except CancelledError:
        pass
    return None
