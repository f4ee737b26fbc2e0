"""
How an answer travels on `/mcp`: plain JSON, or Server-Sent Events with
periodic keep-alive comments and backpressure onto the child (a client that
reads slowly pauses reading from the child's stdout).  L{PostExchange}
answers one client request (L{HeldAnswer} once something else is done),
L{BatchExchange} a 2025-03-26 batch; a session's GET stream is an L{_SSE}
stream of its own, opened by L{fjmcp.http.streamable}, which owns what the
messages mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from fjmcp import safejson
from fjmcp.mcp.children import Child

KEEPALIVE = 15.0
# Longest a L{HeldAnswer} holds its response.
HOLD_LIMIT = 5.0

log = Logger()


def accepted(request: Request) -> bytes:
    request.setResponseCode(202)
    # No body, so no content type (Twisted would claim text/html).
    request.defaultContentType = None
    return b""


def sse_event(message: dict[str, Any]) -> bytes:
    # JSON never contains a raw newline, so one data: line carries it.
    return b"event: message\ndata: " + safejson.dumps(message) + b"\n\n"


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
        clock: IReactorTime,
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
        clock: IReactorTime,
        keepalive: float = KEEPALIVE,
        on_response: Callable[[dict[str, Any], Request], None] | None = None,
        child: Callable[[], Child] | None = None,
        status: Callable[[dict[str, Any]], int] | None = None,
    ) -> None:
        """
        @param on_response: sees (and may change) the response before it
            is written.
        @param status: the HTTP status of a response sent as plain JSON
            (default 200).
        """
        self._request = request
        self._status = status
        self._child = child
        self._clock = clock
        self._keepalive = keepalive
        self._on_response = on_response
        self._sse: _SSE | None = None
        self.closed = False
        # The client went away before the answer.
        self.gone = False
        self.done: Deferred[None] = Deferred(lambda d: self._gone())

    def _gone(self) -> None:
        self.closed = True
        self.gone = True
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
        self.closed = True
        try:
            if self._sse is not None:
                self._sse.send(response)
                self._sse.close()
            else:
                self._request.setResponseCode(
                    200 if self._status is None else self._status(response)
                )
                self._request.setHeader(b"Content-Type", b"application/json")
                self._request.write(safejson.dumps(response))
                self._request.finish()
        finally:
            # Whatever went wrong writing it, the exchange is over.
            self.done.callback(None)


class HeldAnswer:
    """
    A L{PostExchange} whose response goes out only once C{before}, which
    sees it first, is done (L{HOLD_LIMIT} seconds at most); interim
    messages go at once.  What C{before} does happens even when the wait is
    given up.  A client already gone gets nothing, and C{before} is not
    asked.
    """

    def __init__(
        self,
        exchange: PostExchange,
        before: Callable[[dict[str, Any]], Deferred[Any]],
        clock: IReactorTime,
    ) -> None:
        self._exchange = exchange
        self._before = before
        self._clock = clock

    def message(self, message: dict[str, Any]) -> None:
        self._exchange.message(message)

    def finish(self, response: dict[str, Any]) -> None:
        if self._exchange.closed:
            self._exchange.finish(response)
            return

        def late(failure: Failure) -> None:
            log.warn(
                "answering a request before what had to come first: {error}",
                error=failure.getErrorMessage(),
            )

        # A Deferred of its own, so that giving up waiting cancels nothing.
        waiting: Deferred[None] = Deferred()

        def done(result: object) -> object:
            if not waiting.called:
                waiting.callback(None)
            return result

        maybeDeferred(self._before, response).addBoth(done).addErrback(late)
        waiting.addTimeout(HOLD_LIMIT, self._clock)
        waiting.addErrback(late)
        waiting.addBoth(lambda _: self._exchange.finish(response))


class BatchExchange:
    """
    The answer to a 2025-03-26 batch: one SSE stream carrying every
    response, closed after the last.
    """

    def __init__(self, request: Request, clock: IReactorTime, expected: int) -> None:
        self._sse = _SSE(request, clock, KEEPALIVE)
        self._left = expected
        self.parts: list[_BatchPart] = []
        self.gone = False
        self.done: Deferred[None] = Deferred(lambda d: self._gone())

    def _gone(self) -> None:
        self.gone = True
        self._sse.close(finish=False)

    def part(self) -> _BatchPart:
        part = _BatchPart(self)
        self.parts.append(part)
        return part

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
