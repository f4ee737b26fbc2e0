"""
Message routing inside one MCP session: which HTTP exchange each message
from the stdio child belongs to, and which id it carries on either side.

This module owns the id spaces of one session and the life of each request
in them: no HTTP, no processes.  A L{SessionRouter} is driven by plain
method calls (what a client POSTed, what the child wrote, a client that went
away) and answers through callables (write to the child, deliver on the
session's standalone GET stream) and L{ResponseStream}s (the response of one
client POST).  Every client request ends exactly once: with the child's
answer, or with an error when the child is gone, the client cancelled it, or
its deadline passed (the clock is the only piece of the reactor it uses).

Ids on the pipe to the child are the router's own:

  - every client request gets a fresh integer id (never reused within the
    session), so clashing ids of several clients, retries and out-of-order
    answers all route correctly; the client's response carries its original
    id again.  A request's progress token is rewritten the same way (to the
    request's child-side id), because clients routinely use their request id
    as progress token and therefore clash just as often;
  - every request the child makes of the client (sampling, elicitation,
    roots, ping) gets a fresh string id (C{"fjmcp-N"}) so it cannot clash
    with the client's own ids; the client's answer is mapped back to the
    child's id.

Callbacks may re-enter the router: its state is consistent before any of
them runs.  Exceptions raised by a callback are logged, never propagated, so
one broken HTTP response cannot stall the rest of the session.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeGuard

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from fjmcp.mcp.jsonrpc import INTERNAL_ERROR, REQUEST_CANCELLED, REQUEST_TIMEOUT
from fjmcp.mcp.jsonrpc import error as _error

__all__ = ["INTERNAL_ERROR", "REQUEST_CANCELLED", "REQUEST_TIMEOUT", "SessionRouter"]

log = Logger()

# Notifications that describe the session, not any one request.
STANDALONE_NOTIFICATIONS = frozenset(
    {
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/resources/list_changed",
        "notifications/resources/updated",
    }
)

SERVER_REQUEST_PREFIX = "fjmcp-"


class ResponseStream(Protocol):
    """
    Where the messages of one client POST go (an HTTP response: JSON or SSE).
    """

    def message(self, message: dict[str, Any]) -> None:
        """
        An interim message for this request (a notification or a
        server-to-client request), sent before the response.
        """

    def finish(self, response: dict[str, Any]) -> None:
        """
        The final JSON-RPC response, already carrying the client's original
        id.  Called exactly once per request; nothing follows it.
        """


@attrs.define
class _ClientRequest:
    client_id: Any
    stream: ResponseStream
    # The client's own progress token, or None when it asked for no progress.
    progress_token: str | int | None
    # When it was written to the child, and what ends it if the child never
    # answers (None: no deadline).
    sent_at: float = 0.0
    deadline: IDelayedCall | None = None


@attrs.define
class _ServerRequest:
    child_id: Any
    # The child-side id of the client request on whose stream it went, or
    # None when it went to the standalone stream.
    via: int | None


def _id_key(value: Any) -> tuple[str, Any]:
    """
    A hashable key for a JSON-RPC id that keeps C{1}, C{1.0}, C{True} and
    C{"1"} apart and copes with ids that are not hashable at all.
    """
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, str):
        return ("str", value)
    try:
        return ("json", json.dumps(value, sort_keys=True, default=repr))
    except (TypeError, ValueError):
        return ("repr", repr(value))


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _progress_token(message: dict[str, Any]) -> str | int | None:
    """
    C{params._meta.progressToken} when it is a valid token (a string or an
    integer), else None.
    """
    params = message.get("params")
    if not isinstance(params, dict):
        return None
    meta = params.get("_meta")
    if not isinstance(meta, dict):
        return None
    token = meta.get("progressToken")
    if isinstance(token, str) or _is_int(token):
        return token
    return None


def _with_progress_token(message: dict[str, Any], token: str | int) -> dict[str, Any]:
    """
    A copy of C{message} whose C{params._meta.progressToken} is C{token}.
    Only the dicts on the way are copied; the caller's message is untouched.
    """
    out = dict(message)
    params = dict(out["params"])
    meta = dict(params["_meta"])
    meta["progressToken"] = token
    params["_meta"] = meta
    out["params"] = params
    return out


def _with_param(message: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    out = dict(message)
    params = dict(out["params"])
    params[name] = value
    out["params"] = params
    return out


class SessionRouter:
    """
    The routing state of one MCP session between HTTP exchanges and one
    stdio child.

    @param to_child: writes one message to the child's stdin.
    @param standalone: delivers a message not tied to any client request
        (the session's GET/SSE stream; the caller queues it).
    @param clock: what deadlines are measured with; None: requests have no
        deadline.
    @param timeout: seconds a client request may wait for the child.  At the
        deadline the client gets a JSON-RPC error, the child a
        C{notifications/cancelled}, and the router forgets the request.
    @param on_silent: called when a request reached its deadline and the
        child had written nothing at all since it was sent: a child that
        hangs (stopped, deadlocked) rather than one that is merely slow.
    """

    def __init__(
        self,
        to_child: Callable[[dict[str, Any]], None],
        standalone: Callable[[dict[str, Any]], None],
        clock: IReactorTime | None = None,
        timeout: float | None = None,
        on_silent: Callable[[], None] = lambda: None,
        numbers: Iterator[int] | None = None,
    ) -> None:
        self._to_child = to_child
        self._standalone = standalone
        self._clock = clock
        self._timeout = timeout
        self._on_silent = on_silent
        # When the child last wrote anything.
        self._last_heard = clock.seconds() if clock is not None else 0.0
        self._next_child_id = 1
        # Numbers the child's requests (shared by a session's children).
        self._numbers = numbers if numbers is not None else itertools.count(1)
        # Client requests waiting for the child, by child-side id.
        self._pending: dict[int, _ClientRequest] = {}
        # The child's requests waiting for the client, by broker-side id ...
        self._server_requests: dict[str, _ServerRequest] = {}
        # ... and the broker-side id of each, by the child's own id.
        self._server_ids: dict[tuple[str, Any], str] = {}

    @property
    def last_heard(self) -> float:
        """
        When the child last wrote anything (its start, before that).
        """
        return self._last_heard

    @property
    def in_flight(self) -> int:
        """
        How many client requests are waiting for the child.
        """
        return len(self._pending)

    @property
    def server_requests_pending(self) -> int:
        """
        How many of the child's requests are waiting for the client.
        """
        return len(self._server_requests)

    # From the client.

    def client_request(self, message: dict[str, Any], stream: ResponseStream) -> None:
        """
        Forward a client request to the child; its response (and anything
        related to it) goes to C{stream}.  If the child cannot be written
        to, C{stream} is finished at once with an internal error.

        @raise ValueError: C{message} has no id, so it is not a request.
        """
        client_id = message.get("id")
        if client_id is None:
            raise ValueError("a request needs an id")
        child_id = self._next_child_id
        self._next_child_id += 1
        token = _progress_token(message)
        out = dict(message) if token is None else _with_progress_token(message, child_id)
        out["id"] = child_id
        request = _ClientRequest(client_id, stream, token)
        self._pending[child_id] = request
        if not self._send(out):
            if self._pending.pop(child_id, None) is not None:
                self._finish(
                    request,
                    _error(client_id, INTERNAL_ERROR, "could not write to the MCP server process"),
                )
            return
        if self._clock is not None and self._timeout is not None and child_id in self._pending:
            request.sent_at = self._clock.seconds()
            request.deadline = self._clock.callLater(self._timeout, self._expire, child_id)

    def _take(self, child_id: Any) -> _ClientRequest | None:
        """
        Forget the pending request of C{child_id} (and its deadline); it is
        returned to be finished, or None when it is not pending.
        """
        request = self._pending.pop(child_id, None) if _is_int(child_id) else None
        if request is not None and request.deadline is not None:
            if request.deadline.active():
                request.deadline.cancel()
            request.deadline = None
        return request

    def _expire(self, child_id: int) -> None:
        request = self._take(child_id)
        if request is None:
            return
        silent = self._last_heard < request.sent_at
        self._cancel_in_child(child_id, "the request timed out")
        self._finish(
            request,
            _error(
                request.client_id,
                REQUEST_TIMEOUT,
                f"Request timed out: the MCP server did not answer within {self._timeout:g} s",
            ),
        )
        if silent:
            self._on_silent()

    def rebind(self, old: ResponseStream, new: ResponseStream, client_id: Any = None) -> None:
        """What would go to C{old} goes to C{new} (under C{client_id}) from now."""
        for request in self._pending.values():
            if request.stream is old:
                request.stream = new
                request.client_id = request.client_id if client_id is None else client_id

    def abandon(self, stream: ResponseStream) -> int:
        """
        The client of C{stream} went away: nothing can reach it any more
        (the broker keeps no events for resumption), so its requests are
        forgotten and the child is told to stop working on them.  Returns
        how many were in flight.
        """
        gone = [cid for cid, r in self._pending.items() if r.stream is stream]
        for child_id in gone:
            self._take(child_id)
            self._cancel_in_child(child_id, "the client disconnected")
        return len(gone)

    def _cancel_in_child(self, child_id: int, reason: str) -> None:
        self._send(
            {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": child_id, "reason": reason},
            }
        )

    def client_notification(self, message: dict[str, Any]) -> None:
        """
        Forward a client notification to the child.

        C{notifications/cancelled} names the client's id of the request; it
        is rewritten to the child-side id, and the request's stream is
        finished at once with a "Request cancelled" error, since the child
        need not answer a cancelled request and the HTTP exchange must end.
        A cancellation of a request no longer in flight, or one whose id
        matches several in-flight requests, is dropped.
        """
        if message.get("method") != "notifications/cancelled":
            self._send(message)
            return
        params = message.get("params")
        request_id = params.get("requestId") if isinstance(params, dict) else None
        if request_id is None:
            log.debug("dropping a client cancellation without a request id")
            return
        key = _id_key(request_id)
        matches = [cid for cid, r in self._pending.items() if _id_key(r.client_id) == key]
        if len(matches) != 1:
            log.debug(
                "dropping a client cancellation of {id!r}: {n} requests in flight have that id",
                id=request_id,
                n=len(matches),
            )
            return
        child_id = matches[0]
        request = self._take(child_id)
        assert request is not None
        self._send(_with_param(message, "requestId", child_id))
        self._finish(request, _error(request.client_id, REQUEST_CANCELLED, "Request cancelled"))

    def client_response(self, message: dict[str, Any]) -> bool:
        """
        Forward the client's answer to one of the child's requests, with the
        child's own id restored.

        @return: False (and nothing is forwarded) when the id is not that of
            a child's request waiting for an answer: already answered,
            cancelled, forgotten by L{fail_all}, or never sent.
        """
        broker_id = message.get("id")
        if not isinstance(broker_id, str):
            return False
        request = self._server_requests.pop(broker_id, None)
        if request is None:
            return False
        key = _id_key(request.child_id)
        if self._server_ids.get(key) == broker_id:
            del self._server_ids[key]
        out = dict(message)
        out["id"] = request.child_id
        self._send(out)
        return True

    # From the child.

    def child_message(self, message: Any) -> None:
        """
        Route anything the child wrote: a message, or a batch of them.
        Anything else is logged and dropped.
        """
        if self._clock is not None:
            self._last_heard = self._clock.seconds()
        if isinstance(message, list):
            for element in message:
                self._child_one(element)
        else:
            self._child_one(message)

    def _child_one(self, message: Any) -> None:
        if not isinstance(message, dict):
            log.debug("dropping a child message that is not an object: {m!r}", m=message)
            return
        method = message.get("method")
        if isinstance(method, str):
            if message.get("id") is not None:
                self._server_request(message)
            else:
                self._child_notification(message, method)
        elif method is None and "id" in message and ("result" in message or "error" in message):
            self._child_response(message)
        else:
            log.debug("dropping a child message that is not JSON-RPC: {m!r}", m=message)

    def _child_response(self, message: dict[str, Any]) -> None:
        child_id = message["id"]
        if child_id is None and "error" in message and self._pending:
            # The child could not tell which request it refuses (it failed
            # to parse it).  It reads its stdin in order and refuses at
            # once, so the request it means is the one written last.
            child_id = max(self._pending)
            log.warn(
                "the child refused a request without naming it: {error!r}; "
                "answering request {id} with it",
                error=message["error"],
                id=child_id,
            )
        request = self._take(child_id)
        if request is None:
            log.debug("dropping a child response to unknown id {id!r}", id=child_id)
            return
        out = dict(message)
        out["id"] = request.client_id
        self._finish(request, out)

    def _server_request(self, message: dict[str, Any]) -> None:
        via, out = self._related(message)
        broker_id = f"{SERVER_REQUEST_PREFIX}{next(self._numbers)}"
        self._server_requests[broker_id] = _ServerRequest(message["id"], via)
        self._server_ids[_id_key(message["id"])] = broker_id
        out = dict(out)
        out["id"] = broker_id
        self._deliver(via, out)

    def _child_notification(self, message: dict[str, Any], method: str) -> None:
        if method == "notifications/progress":
            self._child_progress(message)
        elif method == "notifications/cancelled":
            self._child_cancelled(message)
        elif method in STANDALONE_NOTIFICATIONS:
            self._deliver(None, message)
        else:
            self._deliver(*self._related(message))

    def _child_progress(self, message: dict[str, Any]) -> None:
        params = message.get("params")
        token = params.get("progressToken") if isinstance(params, dict) else None
        owner = self._token_owner(token)
        if owner is not None:
            original = self._pending[owner].progress_token
            self._deliver(owner, _with_param(message, "progressToken", original))
        elif _is_int(token) and 0 < token < self._next_child_id:
            # One of the tokens this router handed out, for a request that
            # is no longer in flight: the client cannot place it.
            log.debug("dropping progress for a finished request ({t})", t=token)
        else:
            self._deliver(None, message)

    def _child_cancelled(self, message: dict[str, Any]) -> None:
        params = message.get("params")
        request_id = params.get("requestId") if isinstance(params, dict) else None
        broker_id = None if request_id is None else self._server_ids.pop(_id_key(request_id), None)
        if broker_id is None:
            log.debug("dropping a child cancellation of unknown id {id!r}", id=request_id)
            return
        request = self._server_requests.pop(broker_id)
        # Where the request went; the standalone stream if that client
        # request has finished meanwhile.
        self._deliver(request.via, _with_param(message, "requestId", broker_id))

    def _token_owner(self, token: Any) -> int | None:
        """
        The child-side id of the in-flight request whose (rewritten)
        progress token is C{token}.
        """
        if not _is_int(token):
            return None
        request = self._pending.get(token)
        if request is None or request.progress_token is None:
            return None
        return token

    def _related(self, message: dict[str, Any]) -> tuple[int | None, dict[str, Any]]:
        """
        Which client request a child's request or notification belongs to
        (None: the standalone stream), and the message to deliver there: the
        request whose progress token it names, else the only request in
        flight, else none.
        """
        token = _progress_token(message)
        owner = self._token_owner(token)
        if owner is not None:
            original = self._pending[owner].progress_token
            assert original is not None
            return owner, _with_progress_token(message, original)
        if len(self._pending) == 1:
            return next(iter(self._pending)), message
        return None, message

    # Endings.

    def fail_all(self, code: int, message: str) -> None:
        """
        The child is gone or the session ended: every pending client request
        is finished now with a JSON-RPC error, and the child's requests still
        waiting for the client are forgotten (their answers get False from
        L{client_response}).
        """
        pending = [r for r in map(self._take, list(self._pending)) if r is not None]
        self._server_requests = {}
        self._server_ids = {}
        for request in pending:
            self._finish(request, _error(request.client_id, code, message))

    # Delivery.

    def _send(self, message: dict[str, Any]) -> bool:
        try:
            self._to_child(message)
        except Exception as e:
            log.warn("could not write to the child: {e!r}", e=e)
            return False
        return True

    def _deliver(self, via: int | None, message: dict[str, Any]) -> None:
        """
        To the stream of client request C{via} while it is in flight, else
        to the standalone stream.
        """
        request = None if via is None else self._pending.get(via)
        try:
            if request is None:
                self._standalone(message)
            else:
                request.stream.message(message)
        except Exception:
            log.failure("delivering a message from the child failed")

    def _finish(self, request: _ClientRequest, response: dict[str, Any]) -> None:
        try:
            request.stream.finish(response)
        except Exception:
            log.failure("finishing a response stream failed")
