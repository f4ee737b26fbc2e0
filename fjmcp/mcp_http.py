"""
MCP Streamable HTTP on `/mcp`, for an already authenticated user: session
headers, protocol versions, JSON or SSE answers, the GET stream, DELETE.

This module owns the wire format (status codes, headers, SSE framing and
keep-alives); sessions and their children are L{fjmcp.sessions}', message
routing L{fjmcp.router}'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from fjmcp.children import Child
from fjmcp.sessions import Session, SessionLimitError, SessionManager, SpawnError

SUPPORTED_VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")
DEFAULT_VERSION = "2025-03-26"
SESSION_HEADER = b"Mcp-Session-Id"
KEEPALIVE = 15.0

log = Logger()


def rpc_error(id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}


def sse_event(message: dict[str, Any]) -> bytes:
    # JSON never contains a raw newline, so one data: line carries it.
    return b"event: message\ndata: " + json.dumps(message, ensure_ascii=False).encode() + b"\n\n"


@implementer(IPushProducer)
class _Backpressure:
    """
    Registered with an SSE response: when the client reads slower than the
    child writes, Twisted pauses us and we pause reading from the child; a
    reader that vanished stops holding the child back.
    """

    def __init__(self, child: Callable[[], Child]) -> None:
        self._child = child
        self._paused: Child | None = None

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = self._child()
            self._paused.pause_reading(self)

    def resumeProducing(self) -> None:
        if self._paused is not None:
            self._paused.resume_reading(self)
            self._paused = None

    def stopProducing(self) -> None:
        self.resumeProducing()


class _SSE:
    """
    An open text/event-stream response with periodic comments, so proxies
    and clients do not time an idle stream out.
    """

    def __init__(
        self,
        request: Request,
        clock: Any,
        keepalive: float,
        child: Callable[[], Child] | None = None,
    ) -> None:
        self.request = request
        self.open = True
        self._producer: _Backpressure | None = None
        if child is not None:
            self._producer = _Backpressure(child)
            request.registerProducer(self._producer, True)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")
        self._ping = LoopingCall(self._comment)
        self._ping.clock = clock
        self._ping.start(keepalive, now=False)

    def _comment(self) -> None:
        if self.open:
            self.request.write(b": keep-alive\n\n")

    def send(self, message: dict[str, Any]) -> None:
        if self.open:
            self.request.write(sse_event(message))

    def close(self, finish: bool = True) -> None:
        if not self.open:
            return
        self.open = False
        if self._ping.running:
            self._ping.stop()
        if self._producer is not None:
            self._producer.resumeProducing()
            if finish:
                self.request.unregisterProducer()
        if finish:
            self.request.finish()


class PostExchange:
    """
    The answer to one client POST: plain JSON when the response comes with
    nothing before it, an SSE stream as soon as something else (progress,
    logging, a server-to-client request) has to go first.  A client that
    went away gets nothing more, but its request runs on (a dropped
    connection is not a cancellation).
    """

    def __init__(
        self,
        request: Request,
        clock: Any,
        keepalive: float = KEEPALIVE,
        on_response: Callable[[dict[str, Any], Request], None] | None = None,
        child: Callable[[], Child] | None = None,
    ) -> None:
        self._request = request
        self._child = child
        self._clock = clock
        self._keepalive = keepalive
        self._on_response = on_response
        self._sse: _SSE | None = None
        self.closed = False
        self.done: Deferred[None] = Deferred(lambda d: self._gone())

    def _gone(self) -> None:
        self.closed = True
        if self._sse is not None:
            self._sse.close(finish=False)

    def message(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        if self._sse is None:
            self._sse = _SSE(self._request, self._clock, self._keepalive, self._child)
        self._sse.send(message)

    def finish(self, response: dict[str, Any]) -> None:
        if self.closed:
            return
        if self._on_response is not None:
            self._on_response(response, self._request)
        if self._sse is not None:
            self._sse.send(response)
            self._sse.close()
        else:
            self._request.setResponseCode(200)
            self._request.setHeader(b"Content-Type", b"application/json")
            self._request.write(json.dumps(response, ensure_ascii=False).encode())
            self._request.finish()
        self.closed = True
        self.done.callback(None)


class BatchExchange:
    """
    The answer to a 2025-03-26 batch: one SSE stream carrying every
    response, closed after the last.
    """

    def __init__(self, request: Request, clock: Any, expected: int) -> None:
        self._sse = _SSE(request, clock, KEEPALIVE)
        self._left = expected
        self.done: Deferred[None] = Deferred(lambda d: self._sse.close(finish=False))

    def part(self) -> _BatchPart:
        return _BatchPart(self)

    def _message(self, message: dict[str, Any]) -> None:
        self._sse.send(message)

    def _finish(self, response: dict[str, Any]) -> None:
        self._sse.send(response)
        self._left -= 1
        if self._left == 0 and self._sse.open:
            self._sse.close()
            self.done.callback(None)


class _BatchPart:
    def __init__(self, batch: BatchExchange) -> None:
        self._batch = batch

    def message(self, message: dict[str, Any]) -> None:
        self._batch._message(message)

    def finish(self, response: dict[str, Any]) -> None:
        self._batch._finish(response)


def _kind(message: Any) -> str:
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return "invalid"
    if "method" in message:
        return "request" if message.get("id") is not None else "notification"
    if "id" in message and ("result" in message or "error" in message):
        return "response"
    return "invalid"


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
        clock: Any,
        max_body: int = 1024 * 1024,
        keepalive: float = KEEPALIVE,
    ) -> None:
        self._sessions = sessions
        self._users = users
        self._clock = clock
        self._max_body = max_body
        self._keepalive = keepalive

    def _json(self, request: Request, status: int, body: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(body).encode()

    def _session(
        self, request: Request, user_id: int, family_id: str = ""
    ) -> tuple[Session | None, bytes | None]:
        """
        The request's session, or the error answer: 400 without a session
        id, 404 for an unknown, ended or someone else's session, 400 for an
        unsupported protocol version.
        """
        raw = request.getHeader(SESSION_HEADER)
        if not raw:
            return None, self._json(
                request,
                400,
                rpc_error(None, -32600, "Bad Request: Mcp-Session-Id header is required"),
            )
        session = self._sessions.get(raw.decode("latin-1"), user_id, family_id)
        if session is None:
            return None, self._json(request, 404, rpc_error(None, -32001, "Session not found"))
        version = request.getHeader(b"mcp-protocol-version")
        if version is not None and version.decode("latin-1") not in SUPPORTED_VERSIONS:
            return None, self._json(
                request,
                400,
                rpc_error(
                    None,
                    -32600,
                    f"Bad Request: unsupported MCP-Protocol-Version {version.decode('latin-1')!r}",
                ),
            )
        return session, None

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
            return self._json(
                request,
                413,
                rpc_error(None, -32600, f"request body larger than {self._max_body} bytes"),
            )
        try:
            message = json.loads(body)
        except ValueError:
            return self._json(request, 400, rpc_error(None, -32700, "Parse error: not JSON"))

        if isinstance(message, list):
            return await self._batch(request, user_id, message, family_id)
        kind = _kind(message)
        if kind == "invalid":
            return self._json(request, 400, rpc_error(None, -32600, "Invalid JSON-RPC message"))
        if kind == "request" and message["method"] == "initialize":
            if request.getHeader(SESSION_HEADER):
                return self._json(
                    request,
                    400,
                    rpc_error(message["id"], -32600, "this session is already initialized"),
                )
            user = await self._users.get_user(user_id)
            login = user.login if user is not None else str(user_id)
            return await self._initialize(
                request, user_id, login, client_id, message, forgejo_token, family_id
            )

        session, error = self._session(request, user_id, family_id)
        if session is None:
            return error
        # The user's Forgejo token may have been renewed since the child
        # started; the session then moves to a child holding the new one.
        self._sessions.renew(session, forgejo_token)
        if kind == "notification":
            self._sessions.client_notification(session, message)
            return _accepted(request)
        if kind == "response":
            if not self._sessions.client_response(session, message):
                return self._json(
                    request, 400, rpc_error(None, -32600, "no server request has that id")
                )
            return _accepted(request)
        exchange = PostExchange(request, self._clock, self._keepalive, child=lambda: session.child)
        session.router.client_request(message, exchange)
        await _until_done(exchange.done)
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

        def on_response(response: dict[str, Any], req: Request) -> None:
            if "result" not in response:
                # The child refused or died: no session for the client.
                if holder and not holder[0].ended:
                    self._sessions.end(holder[0], "initialize failed", "initialize_failed")
                return
            result = response["result"]
            if isinstance(result, dict) and result.get("protocolVersion") in SUPPORTED_VERSIONS:
                holder[0].protocol_version = result["protocolVersion"]
            req.setHeader(SESSION_HEADER, holder[0].id.encode())

        exchange = PostExchange(request, self._clock, self._keepalive, on_response)
        token = forgejo_token
        try:
            session = self._sessions.create(
                user_id,
                user_login,
                client_id,
                asked if asked in SUPPORTED_VERSIONS else DEFAULT_VERSION,
                token,
                family_id=family_id,
            )
        except SessionLimitError as e:
            request.setHeader(b"Retry-After", b"30")
            return self._json(request, 503, rpc_error(message["id"], -32000, str(e)))
        except SpawnError as e:
            log.error("{error}", error=str(e))
            return self._json(request, 503, rpc_error(message["id"], -32603, str(e)))
        holder.append(session)
        session.initialize = message
        session.router.client_request(message, exchange)
        await _until_done(exchange.done)
        return None

    async def _batch(
        self, request: Request, user_id: int, messages: list[Any], family_id: str = ""
    ) -> bytes | None:
        session, error = self._session(request, user_id, family_id)
        if session is None:
            return error
        if session.protocol_version != "2025-03-26":
            return self._json(
                request,
                400,
                rpc_error(None, -32600, "batches are only allowed in 2025-03-26 sessions"),
            )
        kinds = [_kind(m) for m in messages]
        if (
            not messages
            or "invalid" in kinds
            or any(
                k == "request" and m["method"] == "initialize"
                for k, m in zip(kinds, messages, strict=True)
            )
        ):
            return self._json(request, 400, rpc_error(None, -32600, "Invalid batch"))
        for kind, message in zip(kinds, messages, strict=True):
            if kind == "notification":
                self._sessions.client_notification(session, message)
            elif kind == "response":
                self._sessions.client_response(session, message)
        requests = [m for k, m in zip(kinds, messages, strict=True) if k == "request"]
        if not requests:
            return _accepted(request)
        batch = BatchExchange(request, self._clock, len(requests))
        for message in requests:
            session.router.client_request(message, batch.part())
        await _until_done(batch.done)
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
        session, error = self._session(request, user_id, family_id)
        if session is None:
            return error
        if forgejo_token is not None:
            self._sessions.renew(session, forgejo_token)
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
            await _until_done(done)
        finally:
            session.standalone.detach(sse.send)
        return None

    def delete(self, request: Request, user_id: int) -> bytes:
        session, error = self._session(request, user_id)
        if session is None:
            assert error is not None
            return error
        self._sessions.end(session, "the client ended the session", "deleted")
        request.setResponseCode(204)
        return b""


def _accepted(request: Request) -> bytes:
    request.setResponseCode(202)
    # No body, so no content type (Twisted would claim text/html).
    request.defaultContentType = None
    return b""


async def _until_done(done: Deferred[None]) -> None:
    """
    Wait for an exchange to end.  If the client disconnects, Klein cancels
    us: the exchange is marked gone and the request itself runs on.
    """
    try:
        await done
    except CancelledError:
        pass
    return None
